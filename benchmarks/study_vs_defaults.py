"""One real hyperparameter study on a tiny model against the default hyperparameters, through the real processes;
prints one JSON object.

    .venv/bin/python benchmarks/study_vs_defaults.py [--trials 12] [--max-steps 60] [--sentences 1200]

Everything runs here, as ``make up`` runs it (``tunehouse.localrun``, started by ``benchmarks/local_platform.py``): a
private Redis, the ASGI server (uvicorn), one ``cpu`` and one ``gpu`` Celery worker, on a fresh SQLite database and
data folder in a temporary directory. One text corpus (``--sentences`` generated English sentences) is uploaded once
through ``POST /v1/files`` and validated by the ``cpu`` worker before anything runs.

Base hyperparameters, shared by both sides: ``gpt2-tiny`` trained from scratch, ``max_steps`` 60, batch 16,
max_length 64, an evaluation every 10 steps on a tenth of the training data held back (``validation_fraction`` 0.1:
the same held-back lines for every job, ``seed`` 0). Every other hyperparameter is the engine's default.

``baseline``: one job (``POST /v1/fine_tuning/jobs``) with exactly the base hyperparameters, so the defaults of the
searched ones apply (``baseline.defaults``: the from-scratch learning rate, no warmup, the default weight decay, the
cosine schedule); its ``valid_loss`` is the job's ``metrics.valid_loss``, the loss on the held-back lines at its end.
``seconds``: from the POST until the job's status read ``succeeded`` (polled every 2 s).

``study``: one study (``POST /v1/tuning/studies``) on the same file and base: TPE sampler (seed 0), median pruner,
``--trials`` trials one at a time (``max_parallel_trials`` 1: one ``gpu`` worker), minimising ``valid_loss``, over
learning_rate (log-uniform 1e-4 to 3e-2), warmup_steps (0 to 20 by 5), weight_decay (0 to 0.2) and scheduler
(constant, linear, cosine). Each trial is a fine-tuning job with the base plus its parameters; the pruner may stop
one at an evaluation where it is worse than the median of the earlier trials at that step. The study is polled
every 2 s until it ends or ``--timeout`` passes (then it is cancelled and reported as it stands, ``timed_out``).
``best_value`` is the best complete trial's ``valid_loss`` (pruned trials never count), read from the study's own
JSON with its parameters, the parameter importances and ``gpu_seconds_used`` (its trial jobs' wall-clock time).

``improvement``: baseline ``valid_loss`` less the study's best (positive: the study found better hyperparameters),
and that as a percentage of the baseline. One run, one data seed: a single comparison, not a distribution.

Every process and the temporary folder are removed at the end, also on error (``--keep`` keeps the folder, with the
processes' logs, for a look).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# benchmarks/ is sys.path[0] when this runs as a script; local_platform puts platform/ and the repository root there.
from local_platform import Api, english_corpus, local_platform, upload_processed
from machine import cpu_model

MODEL = "gpt2-tiny"
POLL_SECONDS = 2.0
SEARCH_SPACE = {
    "learning_rate": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
    "warmup_steps": {"type": "int", "low": 0, "high": 20, "step": 5},
    "weight_decay": {"type": "float", "low": 0.0, "high": 0.2},
    "scheduler": {"type": "categorical", "choices": ["constant", "linear", "cosine"]},
}
_JOB_ENDED = {"succeeded", "failed", "cancelled"}
_STUDY_ENDED = {"succeeded", "budget_exhausted", "cancelled", "failed"}


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return round(value, digits) if isinstance(value, int | float) else value


def _params(params: dict) -> dict:
    return {name: _rounded(value, 6) for name, value in params.items()}


def _poll(api: Api, path: str, ended: set[str], *, timeout: float) -> tuple[dict, bool]:
    """GETs ``path`` every POLL_SECONDS until its status is in ``ended``; the last body, and whether time ran out."""
    deadline = time.monotonic() + timeout
    while (body := api.get(path))["status"] not in ended:
        if time.monotonic() > deadline:
            return body, True
        time.sleep(POLL_SECONDS)
    return body, False


def run_baseline(api: Api, training_file: str, base: dict, *, timeout: float) -> dict[str, Any]:
    started = time.perf_counter()
    job = api.post_json(
        "/v1/fine_tuning/jobs", {"model": MODEL, "training_file": training_file, "hyperparameters": base}
    )
    job, timed_out = _poll(api, f"/v1/fine_tuning/jobs/{job['id']}", _JOB_ENDED, timeout=timeout)
    seconds = time.perf_counter() - started
    valid_loss = (job.get("metrics") or {}).get("valid_loss")
    if timed_out or job["status"] != "succeeded" or valid_loss is None:
        raise RuntimeError(f"the baseline job did not succeed with a valid_loss: {job}")
    resolved = job.get("hyperparameters") or {}
    return {
        "job": job["id"],
        "valid_loss": _rounded(valid_loss),
        "defaults": {name: resolved.get(name) for name in SEARCH_SPACE},
        "seconds": round(seconds, 1),
    }


def run_study(api: Api, training_file: str, base: dict, arguments: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    study = api.post_json(
        "/v1/tuning/studies",
        {
            "model": MODEL,
            "training_file": training_file,
            "hyperparameters": base,
            "search_space": SEARCH_SPACE,
            "objective": {"metric": "valid_loss", "direction": "minimize"},
            "sampler": "tpe",
            "pruner": {"type": "median"},
            "n_trials": arguments.trials,
            "max_parallel_trials": 1,
            "seed": 0,
            "name": "study-vs-defaults benchmark",
        },
    )
    path = f"/v1/tuning/studies/{study['id']}"
    study, timed_out = _poll(api, path, _STUDY_ENDED, timeout=arguments.timeout)
    if timed_out:
        api.post_json(f"{path}/cancel", {})
        study, _ = _poll(api, path, _STUDY_ENDED, timeout=120)
    seconds = time.perf_counter() - started
    trials = study.get("trials") or []
    best = study.get("best_trial") or {}
    return {
        "id": study["id"],
        "status": study["status"],
        "status_reason": study.get("status_reason"),
        "timed_out": timed_out,
        "n_trials": study["n_trials"],
        "complete": sum(1 for trial in trials if trial["state"] == "complete"),
        "pruned": sum(1 for trial in trials if trial["state"] == "pruned"),
        "failed": sum(1 for trial in trials if trial["state"] == "failed"),
        "best_value": _rounded(best.get("value")),
        "best_params": _params(best.get("params") or {}),
        "best_trial_number": best.get("number"),
        "param_importances": {name: _rounded(value) for name, value in (study.get("param_importances") or {}).items()},
        "gpu_seconds_used": study.get("gpu_seconds_used"),
        "seconds": round(seconds, 1),
        "trials": [
            {
                "number": trial["number"],
                "state": trial["state"],
                "value": _rounded(trial.get("value")),
                "params": _params(trial.get("params") or {}),
                "duration_seconds": trial.get("duration_seconds"),
            }
            for trial in trials
        ],
    }


def run(arguments: argparse.Namespace, folder: Path) -> dict[str, Any]:
    base = {
        "max_steps": arguments.max_steps,
        "batch_size": 16,
        "max_length": 64,
        "eval_every_steps": arguments.eval_every_steps,
        "validation_fraction": 0.1,
        "seed": 0,
    }
    with local_platform(folder) as local:
        training_file = upload_processed(
            local.api, "stories.txt", english_corpus(arguments.sentences).encode(), timeout=300
        )
        setup_seconds = time.perf_counter() - local.setup_started
        baseline = run_baseline(local.api, training_file, base, timeout=arguments.job_timeout)
        study = run_study(local.api, training_file, base, arguments)
    trials = study.pop("trials")
    best = study["best_value"]
    improvement = None
    if best is not None:
        absolute = baseline["valid_loss"] - best
        improvement = {
            "absolute": round(absolute, 4),
            "relative_percent": round(100 * absolute / baseline["valid_loss"], 2),
        }
    return {
        "benchmark": "one hyperparameter study against the default hyperparameters, through the real web, Redis and "
        "Celery processes (SQLite)",
        "machine": {"cpu_model": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "model": MODEL,
        "corpus_lines": arguments.sentences,
        "base_hyperparameters": base,
        "search_space": SEARCH_SPACE,
        "objective": {"metric": "valid_loss", "direction": "minimize"},
        "sampler": "tpe",
        "pruner": "median",
        "baseline": baseline,
        "study": study,
        "improvement": improvement,
        "trials": trials,
        "setup_seconds": round(setup_seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12, help="the study's n_trials")
    parser.add_argument("--max-steps", type=int, default=60, help="steps of every job (baseline and trials)")
    parser.add_argument("--eval-every-steps", type=int, default=10, help="steps between evaluations (the pruner's)")
    parser.add_argument("--sentences", type=int, default=1200, help="lines of the generated training corpus")
    parser.add_argument("--timeout", type=float, default=1500, help="seconds the study may take before it is cancelled")
    parser.add_argument("--job-timeout", type=float, default=600, help="seconds the baseline job may take")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, database)")
    arguments = parser.parse_args()
    if min(arguments.trials, arguments.max_steps, arguments.eval_every_steps, arguments.sentences) < 1:
        parser.error("--trials, --max-steps, --eval-every-steps and --sentences must be at least 1")
    folder = Path(tempfile.mkdtemp(prefix="tunehouse-bench-study-"))
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
