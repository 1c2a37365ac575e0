"""Serving throughput: the continuous-batching serving process against sequential Hugging Face ``generate`` on the
same model, measured in the same run; prints one JSON object.

    .venv/bin/python benchmarks/serve_throughput.py [--clients 1,8,32,64] [--requests-per-client 2]
                                                    [--max-tokens 64] [--threads N] [--layers 6] [--width 384]

Model: a GPT-2 built from config with random weights (``--layers``, ``--width``; a BPE tokenizer of 8,000 tokens
trained on the platform's sample data), saved as a safetensors folder into a temporary object store. Random weights
rarely sample the end-of-text token, so nearly every request produces ``--max-tokens`` tokens: the work per
request is the same for the baseline and the server.

Baseline: ``model.generate`` one request after another in this process (temperature 0.8, top_p 1, KV cache on),
with the same prompts and the same torch thread count as the server.

Server: ``python -m workers.serving`` under uvicorn (its own process), a private Redis holding the deployment, the
model loaded before measuring. Each client is a thread that sends its requests one after another
(``stream: true``, so time to first token is measured where the client sees it); levels are run one after another.
Per level: completion tokens per second over the level's wall time, p50/p95 request latency, p50/p95 time to first
token, and the speed-up over the baseline's tokens per second. Goal: ≥ 6× the baseline at 32 clients.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402

from tunehouse.localrun import RedisServer, free_port, stop_process, wait_until  # noqa: E402
from workers.ml.data.samples import write_sample_datasets  # noqa: E402
from workers.ml.tokenizer_training import TokenizerSpec, train_tokenizer  # noqa: E402
from workers.serving.registry import CHANGED_CHANNEL, DEPLOYMENTS_KEY  # noqa: E402
from workers.storage import LocalFolderStore  # noqa: E402

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
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


def sequential_baseline(model_dir: Path, *, requests: int, max_tokens: int) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    latencies, tokens = [], 0
    with torch.inference_mode():
        for index in range(requests + 1):
            prompt = tokenizer(PROMPTS[index % len(PROMPTS)], return_tensors="pt", add_special_tokens=False)
            started = time.perf_counter()
            output = model.generate(
                **prompt,
                max_new_tokens=max_tokens,
                do_sample=True,
                temperature=0.8,
                top_p=1.0,
                top_k=None,
                pad_token_id=tokenizer.eos_token_id,
            )
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
        {"endpoint": ENDPOINT, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "stream": True}
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


def run_level(port: int, token: str, *, clients: int, requests_per_client: int, max_tokens: int) -> dict:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--baseline-requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    # The serving default (SERVING_THREADS: half the cores), for the baseline too: the same compute on both sides.
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)

    with tempfile.TemporaryDirectory(prefix="serve-throughput-") as work:
        work_dir = Path(work)
        build_model(work_dir, layers=arguments.layers, width=arguments.width)
        model_dir = work_dir / "model"
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
        baseline = sequential_baseline(model_dir, requests=arguments.baseline_requests, max_tokens=arguments.max_tokens)

        store_dir = work_dir / "storage"
        LocalFolderStore(store_dir).upload_dir("tenants/1/models/benchmark", model_dir)
        redis_server = RedisServer.start(str(work_dir / "redis"))
        port, token = free_port(), "benchmark-token"
        env = dict(
            os.environ,
            REDIS_URL=redis_server.url,
            STORAGE_DIR=str(store_dir),
            SERVING_CACHE_DIR=str(work_dir / "serving-cache"),
            SERVING_TOKEN=token,
            SERVING_THREADS=str(arguments.threads),
            TUNEHOUSE_DATA_DIR=str(work_dir),
        )
        env.pop("S3_BUCKET", None)
        client = redis.Redis.from_url(redis_server.url)
        record = {
            "endpoint": ENDPOINT,
            "tenant_id": 1,
            "revision": 1,
            "task": "causal_lm",
            "model_prefix": "tenants/1/models/benchmark",
            "adapter": False,
            "base_model_dir": None,
            "chat_template": None,
            "generation_defaults": {"max_tokens": arguments.max_tokens, "temperature": 0.8, "top_p": 1.0},
            "max_context": 512,
            "idle_unload_seconds": 3600,
            "min_replicas": 1,
            "state": "active",
        }
        client.hset(DEPLOYMENTS_KEY, ENDPOINT, json.dumps(record))
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
        try:
            wait_until(
                lambda: streamed_request(port, token, PROMPTS[0], 4)[2] > 0,
                timeout=120,
                what="serving process",
                process=process,
                log=log_path,
            )
            levels = []
            for clients in (int(value) for value in arguments.clients.split(",")):
                level = run_level(
                    port,
                    token,
                    clients=clients,
                    requests_per_client=max(arguments.requests_per_client, 4 if clients == 1 else 0),
                    max_tokens=arguments.max_tokens,
                )
                level["speedup_vs_sequential"] = round(level["tokens_per_second"] / baseline["tokens_per_second"], 2)
                levels.append(level)
        finally:
            stop_process(process)
            redis_server.stop()

    report = {
        "benchmark": "serve_throughput",
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": arguments.threads},
        "model": {
            "architecture": "gpt2 (random init)",
            "layers": arguments.layers,
            "width": arguments.width,
            "parameters": parameters,
        },
        "max_tokens": arguments.max_tokens,
        "temperature": 0.8,
        "baseline_sequential_hf_generate": baseline,
        "server": levels,
        "goal": "speedup_vs_sequential >= 6 at 32 clients",
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
