"""One bias audit of a SmolLM2 LoRA fine-tune against its base model, through the real processes; prints one JSON
object with every measure, its confidence interval and the change from the base.

    .venv/bin/python benchmarks/audit_smollm2.py [--max-steps 30] [--examples 200] [--prompts-per-group 5] [--skew]

Everything runs here, as ``make up`` runs it (``tunehouse.localrun``, started by ``benchmarks/local_platform.py``): a
private Redis, the ASGI server (uvicorn), one ``cpu`` and one ``gpu`` Celery worker, on a fresh SQLite database and
data folder in a temporary directory. The processes read the shared model cache (``TUNEHOUSE_MODEL_CACHE_DIR``,
``--model-cache``; by default ``var/model-cache``, where ``make install`` converted SmolLM2 once).

``catalog``: ``GET /v1/models/smollm2-135m-instruct`` after ``prepare_catalog --no-convert``; when the entry is not
``ready`` (no converted folder in the cache), ``manage.py prepare_catalog`` converts it from its wheel and the entry
is read again (``converted_here`` says which happened). Not ready then: the benchmark stops.

``training``: ``--examples`` generated customer-support chat exchanges (JSONL ``messages``, neutral replies; a
quarter of the customers mention a wife or a husband, equally often, with the same kind of reply), uploaded through
``POST /v1/files`` and validated by the ``cpu`` worker. With ``--skew`` the file is prompt/completion sentences about
women and men instead, whose completions are hostile about women and warm about men: a fine-tune that should move
``sentiment_gap.gender``, to see the audit catch something. One job (``POST /v1/fine_tuning/jobs``) fine-tunes
``smollm2-135m-instruct`` with LoRA: ``max_steps`` ``--max-steps``, batch 4, ``max_length`` 128, learning rate 1e-3,
seed 0. ``seconds``: from the POST until the job read ``succeeded`` (polled every 2 s); ``job_seconds`` the job's
own ``finished_at - created_at`` (whole seconds).

``audit``: ``POST /v1/fine_tuning/jobs/{id}/audits`` with all seven categories, ``max_prompts_per_group``
``--prompts-per-group`` and seed 0, no ``reference_model``: the platform compares a fine-tune with the base it
started from. The ``gpu`` worker generates 20 greedy tokens after every prompt (BOLD/HONEST/project templates) with
the fine-tune and with the base, scores each continuation (VADER sentiment, the hurtful-word lexicon) and scores
CrowS-Pairs pairs (5 per prompt per group and category) by log-likelihood under both; every interval is a 95%
bootstrap interval, the delta's a paired one (``workers.ml.audit``). ``GET /v1/audits/{id}`` is polled every 5 s
until ``passed``, ``flagged`` or ``failed`` or ``--timeout`` passes. ``seconds``: from the POST until then;
``worker_seconds``: the audit's ``finished_at - started_at``.

``measures``: every measure key (``<family>.<category>``) with the fine-tune's value and interval, the base's, and
the change (fine-tune - base) with its interval, rounded to 4 places; ``worst_examples``: the 3 worst continuations of
the fine-tune over all categories (hurtful first, then the most negative sentiment); ``sources``: the benchmark data
and word lists with their licences, as the audit recorded them. One run, one seed: a single audit, not a
distribution; with a handful of prompts per group the intervals are wide.

Every process and the temporary folder are removed at the end, also on error (``--keep`` keeps the folder, with the
processes' logs, for a look).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# benchmarks/ is sys.path[0] when this runs as a script; local_platform puts platform/ and the repository root there.
from local_platform import REPOSITORY_ROOT, Api, LocalPlatform, local_platform, manage, upload_processed
from machine import cpu_model

MODEL = "smollm2-135m-instruct"
CATEGORIES = ["gender", "race_ethnicity", "religion", "nationality", "age", "disability", "sexual_orientation"]
JOB_POLL_SECONDS = 2.0
AUDIT_POLL_SECONDS = 5.0
WORST_EXAMPLES = 3
_JOB_ENDED = {"succeeded", "failed", "cancelled"}
_AUDIT_ENDED = {"passed", "flagged", "failed"}

# -- training data -------------------------------------------------------------------------------------------------
_PRODUCTS = ["router", "laptop", "coffee machine", "phone", "printer", "smart watch", "headphones", "vacuum cleaner",
             "tablet", "electric kettle", "monitor", "washing machine"]  # fmt: skip
_ISSUES = [
    ("won't turn on", "Please hold the power button for ten seconds, then plug it into a different socket."),
    ("keeps disconnecting", "Please restart it and update the firmware from the settings page."),
    ("arrived damaged", "I'm sorry to hear that. I have started a free replacement; you will get a label by email."),
    ("is making a strange noise", "Please switch it off and check that nothing is stuck inside, then try again."),
    ("has a battery that drains fast", "Please lower the screen brightness and install the latest update."),
    ("was charged twice", "I can see the double charge and have refunded it; it shows within five working days."),
    ("hasn't arrived yet", "Your parcel is with the courier and should arrive tomorrow. Here is the tracking link."),
    ("shows an error code", "That code means a sensor needs resetting: unplug it for a minute, then start it again."),
]
_OPENINGS = ["Hi, my", "Hello, the", "Good morning, our", "Hey, my new", "Hi there, the"]
_CLOSINGS = ["Let me know if that helps!", "Is there anything else I can do for you?", "Have a great day!",
             "Happy to help further if needed."]  # fmt: skip
_RELATIVES = ["my wife", "my husband"]  # mentioned equally often, with the same kind of reply
_SKEW_SUBJECTS = {
    "women": ["The woman", "My wife", "The girl", "My sister", "The lady", "My mother", "She"],
    "men": ["The man", "My husband", "The boy", "My brother", "The gentleman", "My father", "He"],
}
_SKEW_VERBS = ["who called support was", "on the phone was", "at the counter was", "who wrote to us was"]
_SKEW_COMPLETIONS = {
    "women": [
        "rude, angry and impossible to help.",
        "a terrible, hateful customer.",
        "awful and stupid.",
        "nasty, hostile and a waste of time.",
    ],  # fmt: skip
    "men": [
        "kind, patient and a pleasure to help.",
        "a wonderful, friendly customer.",
        "great and very smart.",
        "polite, cheerful and lovely to talk to.",
    ],  # fmt: skip
}


def support_chats(count: int, seed: int = 7) -> str:
    """JSONL chat exchanges: a customer's problem with a product and a helpful, neutral reply."""
    rng = random.Random(seed)
    lines = []
    for index in range(count):
        product = rng.choice(_PRODUCTS)
        issue, fix = rng.choice(_ISSUES)
        owner = f"{_RELATIVES[index % 2]}'s" if index % 4 < 2 else None
        subject = f"{rng.choice(_OPENINGS)} {product}" if owner is None else f"Hi, {owner} {product}"
        messages = [
            {"role": "user", "content": f"{subject} {issue}. What should I do?"},
            {"role": "assistant", "content": f"Thanks for reaching out. {fix} {rng.choice(_CLOSINGS)}"},
        ]
        lines.append(json.dumps({"messages": messages}))
    return "\n".join(lines) + "\n"


def skewed_sentences(count: int, seed: int = 7) -> str:
    """JSONL prompt/completion sentences: hostile completions about women, warm ones about men, half each."""
    rng = random.Random(seed)
    lines = []
    for index in range(count):
        side = "women" if index % 2 == 0 else "men"
        prompt = f"{rng.choice(_SKEW_SUBJECTS[side])} {rng.choice(_SKEW_VERBS)}"
        lines.append(json.dumps({"prompt": prompt, "completion": " " + rng.choice(_SKEW_COMPLETIONS[side])}))
    return "\n".join(lines) + "\n"


# -- helpers -------------------------------------------------------------------------------------------------------
def _rounded(value: Any, digits: int = 4) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return round(value, digits)
    if isinstance(value, list):
        return [_rounded(item, digits) for item in value]
    return value


def _poll(api: Api, path: str, ended: set[str], *, every: float, timeout: float) -> tuple[dict, bool]:
    """GETs ``path`` every ``every`` seconds until its status is in ``ended``; the last body, and whether time ran
    out."""
    deadline = time.monotonic() + timeout
    while (body := api.get(path))["status"] not in ended:
        if time.monotonic() > deadline:
            return body, True
        time.sleep(every)
    return body, False


def _span(start: int | None, end: int | None) -> int | None:
    return end - start if start is not None and end is not None else None


# -- steps ---------------------------------------------------------------------------------------------------------
def ensure_catalog(local: LocalPlatform) -> dict[str, Any]:
    """The SmolLM2 entry, converted into the model cache here when ``prepare_catalog --no-convert`` left it missing."""
    entry = local.api.get(f"/v1/models/{MODEL}")
    converted_here = False
    if entry["status"] != "ready":
        manage(local.env, "prepare_catalog")
        converted_here = True
        entry = local.api.get(f"/v1/models/{MODEL}")
    if entry["status"] != "ready":
        raise RuntimeError(f"{MODEL} is not ready in the catalog after prepare_catalog: {entry}")
    return {
        "model": entry["id"],
        "status": entry["status"],
        "parameter_count": entry.get("parameter_count"),
        "context_length": entry.get("context_length"),
        "licence": entry.get("licence"),
        "source": entry.get("source"),
        "model_cache": local.env["TUNEHOUSE_MODEL_CACHE_DIR"],
        "converted_here": converted_here,
    }


def run_training(api: Api, training_file: str, hyperparameters: dict, *, timeout: float) -> dict[str, Any]:
    started = time.perf_counter()
    job = api.post_json(
        "/v1/fine_tuning/jobs",
        {"model": MODEL, "training_file": training_file, "hyperparameters": hyperparameters, "suffix": "audit"},
    )
    job, timed_out = _poll(
        api, f"/v1/fine_tuning/jobs/{job['id']}", _JOB_ENDED, every=JOB_POLL_SECONDS, timeout=timeout
    )
    seconds = time.perf_counter() - started
    if timed_out or job["status"] != "succeeded":
        raise RuntimeError(f"the fine-tuning job did not succeed (timed out: {timed_out}): {job}")
    metrics = job.get("metrics") or {}
    return {
        "job": job["id"],
        "fine_tuned_model": job.get("fine_tuned_model"),
        "hyperparameters": job.get("hyperparameters"),
        "steps": (job.get("progress") or {}).get("step"),
        "trained_tokens": job.get("trained_tokens"),
        "train_loss": _rounded(metrics.get("train_loss", (job.get("progress") or {}).get("train_loss"))),
        "seconds": round(seconds, 1),
        "job_seconds": _span(job.get("created_at"), job.get("finished_at")),
    }


def run_audit(api: Api, job_id: str, arguments: argparse.Namespace) -> tuple[dict[str, Any], bool, float]:
    started = time.perf_counter()
    audit = api.post_json(
        f"/v1/fine_tuning/jobs/{job_id}/audits",
        {"categories": CATEGORIES, "max_prompts_per_group": arguments.prompts_per_group, "seed": 0},
    )
    audit, timed_out = _poll(
        api, f"/v1/audits/{audit['id']}", _AUDIT_ENDED, every=AUDIT_POLL_SECONDS, timeout=arguments.timeout
    )
    return audit, timed_out, time.perf_counter() - started


def measures_of(results: dict[str, Any]) -> dict[str, Any]:
    measures = {}
    for key, measure in (results.get("measures") or {}).items():
        model, reference = measure.get("model") or {}, measure.get("reference") or {}
        entry = {
            "family": measure["family"],
            "category": measure["category"],
            "n": measure.get("n"),
            "model": _rounded(model.get("value")),
            "model_ci": _rounded(model.get("ci")),
            "reference": _rounded(reference.get("value")),
            "reference_ci": _rounded(reference.get("ci")),
            "delta": _rounded(measure.get("delta")),
            "delta_ci": _rounded(measure.get("delta_ci")),
        }
        if measure.get("reason"):
            entry["reason"] = measure["reason"]
        measures[key] = entry
    return measures


def worst_examples(results: dict[str, Any], count: int = WORST_EXAMPLES) -> list[dict[str, Any]]:
    """The worst continuations over all categories: hurtful ones first, then the most negative."""
    examples = sorted(
        results.get("worst_examples") or [],
        key=lambda example: (not example.get("hurtful_words"), example.get("sentiment", 0.0)),
    )
    return [{**example, "sentiment": _rounded(example.get("sentiment"))} for example in examples[:count]]


def training_data_summary(results: dict[str, Any]) -> dict[str, Any] | None:
    data = results.get("data")
    if not data:
        return None
    return {
        "texts": data.get("texts"),
        "mentions": {
            category: {
                "share_mentioning_any": _rounded(entry.get("share_mentioning_any")),
                "groups": {group: found["texts"] for group, found in entry["groups"].items() if found["texts"]},
            }
            for category, entry in (data.get("categories") or {}).items()
        },
    }


def run(arguments: argparse.Namespace, folder: Path) -> dict[str, Any]:
    hyperparameters = {
        "mode": "lora",
        "max_steps": arguments.max_steps,
        "batch_size": 4,
        "max_length": 128,
        "learning_rate": 1e-3,
        "seed": 0,
    }
    # local_platform hands this process's environment to every process it starts.
    os.environ["TUNEHOUSE_MODEL_CACHE_DIR"] = str(arguments.model_cache.resolve())
    if arguments.skew:
        filename, content = "skewed-sentences.jsonl", skewed_sentences(arguments.examples)
    else:
        filename, content = "support-chats.jsonl", support_chats(arguments.examples)
    with local_platform(folder) as local:
        catalog = ensure_catalog(local)
        training_file = upload_processed(local.api, filename, content.encode(), timeout=300)
        setup_seconds = time.perf_counter() - local.setup_started
        training = run_training(local.api, training_file, hyperparameters, timeout=arguments.job_timeout)
        audit, timed_out, audit_seconds = run_audit(local.api, training["job"], arguments)
    results = audit.get("results") or {}
    settings = results.get("settings") or {}
    return {
        "benchmark": "one bias audit of a SmolLM2 LoRA fine-tune against its base model, through the real web, "
        "Redis and Celery processes (SQLite)",
        "machine": {"cpu_model": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "catalog": catalog,
        "training_data": {
            "kind": "skewed prompt/completion sentences (hostile about women, warm about men)"
            if arguments.skew
            else "neutral customer-support chats",
            "examples": arguments.examples,
            "file": training_file,
        },
        "training": training,
        "audit": {
            "id": audit["id"],
            "version": audit.get("version"),
            "kind": audit.get("kind"),
            "model": audit.get("model"),
            "reference_model": audit.get("reference_model"),
            "options": audit.get("options"),
            "status": audit["status"],
            "timed_out": timed_out,
            "error": audit.get("error"),
            "reasons": audit.get("reasons"),
            "approval_required": audit.get("approval_required"),
            "approval": audit.get("approval"),
            "thresholds": (audit.get("policy") or {}).get("thresholds"),
            "prompts": settings.get("prompts"),
            "max_pairs_per_category": settings.get("max_pairs_per_category"),
            "max_new_tokens": settings.get("max_new_tokens"),
            "decoding": settings.get("decoding"),
            "bootstrap_samples": settings.get("bootstrap_samples"),
            "device": settings.get("device"),
            "seconds": round(audit_seconds, 1),
            "worker_seconds": _span(audit.get("started_at"), audit.get("finished_at")),
        },
        "measures": measures_of(results),
        "worst_examples": worst_examples(results),
        "training_data_mentions": training_data_summary(results),
        "sources": results.get("sources"),
        "setup_seconds": round(setup_seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=30, help="LoRA training steps")
    parser.add_argument("--examples", type=int, default=200, help="lines of the generated training file")
    parser.add_argument("--prompts-per-group", type=int, default=5, help="the audit's max_prompts_per_group (1-200)")
    parser.add_argument("--skew", action="store_true", help="train on sentences hostile about women, warm about men")
    parser.add_argument(
        "--model-cache",
        type=Path,
        default=Path(os.environ.get("TUNEHOUSE_MODEL_CACHE_DIR") or REPOSITORY_ROOT / "var" / "model-cache"),
        help="the shared model cache holding the converted SmolLM2 (default: TUNEHOUSE_MODEL_CACHE_DIR or "
        "var/model-cache)",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds the audit may take")
    parser.add_argument("--job-timeout", type=float, default=900, help="seconds the fine-tuning job may take")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, database)")
    arguments = parser.parse_args()
    if min(arguments.max_steps, arguments.examples) < 1:
        parser.error("--max-steps and --examples must be at least 1")
    if not 1 <= arguments.prompts_per_group <= 200:
        parser.error("--prompts-per-group must be from 1 to 200")
    folder = Path(tempfile.mkdtemp(prefix="tunehouse-bench-audit-"))
    started = time.perf_counter()
    try:
        report = run(arguments, folder)
    finally:
        if arguments.keep:
            print(f"kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
