"""Job latency through the real processes: submit → first training step, and worker event → websocket client; prints
one JSON object.

    .venv/bin/python benchmarks/job_latency.py [--jobs 20] [--max-steps 5] [--ws-steps 200]

Everything runs here, as ``make up`` runs it (``tunehouse.localrun``, started by ``benchmarks/local_platform.py``): a
private Redis, the ASGI server (uvicorn), one ``cpu`` and one ``gpu`` Celery worker, on a fresh SQLite database and
data folder in a temporary directory (``manage.py migrate``, ``prepare_catalog --no-convert``: the jobs train
``gpt2-tiny`` from scratch, no converted model is needed, and ``create_tenant`` for the API key). One small text
corpus (400 generated English sentences) is uploaded once through ``POST /v1/files`` and validated by the ``cpu``
worker before anything is timed.

``submit_to_first_step``: one warm-up job first (not counted: the ``gpu`` pool process imports the engine and the
tokenized-data cache is filled), then ``--jobs`` jobs strictly one after another through ``POST
/v1/fine_tuning/jobs`` (``gpt2-tiny``, ``max_steps`` 5, ``log_every_steps`` 1, batch 8, max_length 32). Each is timed
from just before its POST until the client receives the job's first metrics event (``data.step == 1``) on the tenant
websocket feed (``/ws/events/``, connected before the first POST, so nothing is replayed). The next job is submitted
only once the previous one has finished (its terminal ``fine_tuning.job`` update arrived): the single ``gpu``
worker is idle at every POST, so the figure is latency, not queueing. ``breakdown_median_seconds`` splits it with
the database's own timestamps (same machine, same clock): the HTTP request until the job row is written, row →
``dispatched_at`` (sent to the ``cpu`` queue, data read and tokenized there, tokenizer trained, sent to the ``gpu``
queue), dispatch → ``started_at`` (the ``gpu`` worker claimed it), claim → the step-1 event row (prepared data
copied, model built, the first optimizer step), row → received by the client.

``event_to_websocket``: one longer job (``--ws-steps`` steps, a metrics event every step, all kept by the platform
below 1,000 steps) watched on its own socket ``/ws/fine_tuning/jobs/<id>/``, opened right after the POST. For every
metrics event received live, the receive time (wall clock, taken in the socket's reader thread) less the moment the
worker wrote the event's row (``JobEvent.created_at``, microseconds, read with the ORM after the run). Events the
socket replayed from the log because they were written before it subscribed are not counted (``replayed``). It
includes the rest of the worker's write (commit), the channel-layer publish through Redis, the consumer in the web
process and the websocket frame; the client's JSON parsing is negligible. The same figure from the tenant feed,
which was connected all along, is reported next to it.

Goals: submit → first step p50 ≤ 5 s; event → websocket p95 ≤ 250 ms. Every process and the temporary folder are
removed at the end, also on error (``--keep`` keeps the folder, with the processes' logs, for a look).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

# benchmarks/ is sys.path[0] when this runs as a script; local_platform puts platform/ and the repository root there.
from local_platform import LocalPlatform, english_corpus, local_platform, upload_processed
from machine import cpu_model

GOAL_SUBMIT_P50_SECONDS = 5.0
GOAL_EVENT_P95_MILLISECONDS = 250.0
_TERMINAL = {"succeeded", "failed", "cancelled"}


# -- websockets ---------------------------------------------------------------------------------------------------
class SocketRecorder:
    """Reads one websocket in a thread and keeps every JSON message with its receive time (time.time())."""

    def __init__(self, url: str, *, api_key: str, origin: str):
        from websockets.sync.client import connect

        self.messages: list[tuple[float, dict]] = []
        self._changed = threading.Condition()
        self._socket = connect(url, additional_headers={"Authorization": f"Bearer {api_key}"}, origin=origin)
        self._thread = threading.Thread(target=self._read, name="socket-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            for raw in self._socket:
                received = time.time()
                with self._changed:
                    self.messages.append((received, json.loads(raw)))
                    self._changed.notify_all()
        except ConnectionClosed:
            pass
        finally:
            with self._changed:
                self._changed.notify_all()

    def wait_for(self, predicate, *, timeout: float, what: str) -> tuple[float, dict]:
        """The first message (from the start) for which ``predicate`` is true, with its receive time."""
        deadline = time.monotonic() + timeout
        checked = 0
        with self._changed:
            while True:
                for received, message in self.messages[checked:]:
                    if predicate(message):
                        return received, message
                checked = len(self.messages)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {what} within {timeout} s on the websocket")
                if not self._thread.is_alive():
                    raise RuntimeError(f"the websocket closed before {what}")
                self._changed.wait(min(left, 1.0))

    def close(self) -> None:
        self._socket.close()
        self._thread.join(timeout=10)


def _is_step(job_id: str, step: int):
    return lambda message: (
        message.get("object") == "fine_tuning.job.event"
        and message.get("job_id") == job_id
        and message.get("type") == "metrics"
        and (message.get("data") or {}).get("step") == step
    )


def _is_finished(job_id: str):
    return lambda message: (
        message.get("object") == "fine_tuning.job" and message.get("id") == job_id and message["status"] in _TERMINAL
    )


def _summary(values: list[float], scale: float, digits: int) -> dict[str, Any]:
    ordered = sorted(value * scale for value in values)

    def quantile(q: float) -> float:
        # Nearest rank: the smallest value with at least q of the values at or below it.
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {
        "n": len(ordered),
        "p50": round(statistics.median(ordered), digits),
        "p95": round(quantile(0.95), digits),
        "max": round(ordered[-1], digits),
        "mean": round(statistics.fmean(ordered), digits),
        "min": round(ordered[0], digits),
    }


def _timestamp(value: datetime | None) -> float | None:
    return value.timestamp() if value else None


def run(arguments: argparse.Namespace, folder: Path) -> dict[str, Any]:
    with local_platform(folder) as local:
        return _measure(arguments, local)


def _measure(arguments: argparse.Namespace, local: LocalPlatform) -> dict[str, Any]:
    sockets: list[SocketRecorder] = []
    try:
        api, base_url, port = local.api, local.base_url, local.port
        training_file = upload_processed(api, "stories.txt", english_corpus().encode())
        setup_seconds = time.perf_counter() - local.setup_started

        ws_base = f"ws://127.0.0.1:{port}"
        feed = SocketRecorder(f"{ws_base}/ws/events/", api_key=local.api_key, origin=base_url)
        sockets.append(feed)

        def hyperparameters(steps: int) -> dict:
            return {"max_steps": steps, "log_every_steps": 1, "batch_size": 8, "max_length": 32}

        def run_job(steps: int) -> tuple[str, float, float]:
            """POSTs a job; returns its id, the time before the POST, and when its step-1 event arrived."""
            submitted = time.time()
            job = api.post_json(
                "/v1/fine_tuning/jobs",
                {"model": "gpt2-tiny", "training_file": training_file, "hyperparameters": hyperparameters(steps)},
            )
            first_step, _ = feed.wait_for(_is_step(job["id"], 1), timeout=arguments.timeout, what="step 1")
            return job["id"], submitted, first_step

        def wait_finished(job_id: str, recorder: SocketRecorder) -> None:
            _, job = recorder.wait_for(_is_finished(job_id), timeout=arguments.timeout, what=f"end of {job_id}")
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")

        warmup_id, warmup_submitted, warmup_first = run_job(arguments.max_steps)
        wait_finished(warmup_id, feed)
        timed: list[tuple[str, float, float]] = []
        for _ in range(arguments.jobs):
            timed.append(run_job(arguments.max_steps))
            wait_finished(timed[-1][0], feed)

        # The long job, on its own socket.
        ws_submitted = time.time()
        long_job = api.post_json(
            "/v1/fine_tuning/jobs",
            {
                "model": "gpt2-tiny",
                "training_file": training_file,
                "hyperparameters": hyperparameters(arguments.ws_steps),
            },
        )
        job_socket = SocketRecorder(
            f"{ws_base}/ws/fine_tuning/jobs/{long_job['id']}/", api_key=local.api_key, origin=base_url
        )
        sockets.append(job_socket)
        # The socket's first message is the job itself, sent after it joined the job's group: events written before
        # then may come as a replay of the log, not as a push.
        subscribed, _ = job_socket.wait_for(
            lambda message: message.get("object") == "fine_tuning.job", timeout=30, what="the job snapshot"
        )
        wait_finished(long_job["id"], job_socket)
        feed.wait_for(_is_finished(long_job["id"]), timeout=30, what="the long job's end on the tenant feed")

        from apps.jobs.models import FineTuningJob, JobEvent

        tenant_id = local.tenant_id

        def metrics_received(recorder: SocketRecorder, job_id: str) -> dict[str, float]:
            first: dict[str, float] = {}
            for received, message in recorder.messages:
                if (
                    message.get("object") == "fine_tuning.job.event"
                    and message.get("job_id") == job_id
                    and message.get("type") == "metrics"
                ):
                    first.setdefault(message["id"], received)  # a replayed duplicate keeps its first arrival
            return first

        def written_at(event_ids) -> dict[str, float]:
            rows = JobEvent.objects.for_tenant(tenant_id).filter(public_id__in=list(event_ids))
            pairs = rows.values_list("public_id", "created_at")
            return {public_id: created_at.timestamp() for public_id, created_at in pairs}

        received_on_job_socket = metrics_received(job_socket, long_job["id"])
        received_on_feed = metrics_received(feed, long_job["id"])
        written = written_at(received_on_job_socket.keys() | received_on_feed.keys())
        live = {key: value for key, value in received_on_job_socket.items() if written[key] >= subscribed}
        event_delays = [received - written[key] for key, received in live.items()]
        feed_delays = [received - written[key] for key, received in received_on_feed.items()]
        stored_metrics = JobEvent.objects.for_tenant(tenant_id).filter(job__public_id=long_job["id"], type="metrics")

        # Where submit → first step goes: the database's timestamps for each timed job.
        parts: dict[str, list[float]] = {
            "request_to_job_row": [],
            "job_row_to_data_prepared_and_sent_to_gpu": [],
            "dispatched_to_claimed_by_worker": [],
            "claimed_to_step1_row": [],
            "step1_row_to_client": [],
        }
        for job_id, submitted, first_step in timed:
            job = FineTuningJob.objects.for_tenant(tenant_id).get(public_id=job_id)
            step1 = (
                JobEvent.objects.for_tenant(tenant_id)
                .filter(job=job, type="metrics", data__step=1)
                .values_list("created_at", flat=True)
                .first()
            )
            moments = [submitted, *map(_timestamp, (job.created_at, job.dispatched_at, job.started_at, step1))]
            moments.append(first_step)
            for values, (start, end) in zip(parts.values(), itertools.pairwise(moments), strict=True):
                values.append(end - start)
        latencies = [first_step - submitted for _, submitted, first_step in timed]
        submit_summary = _summary(latencies, 1, 3)
        event_summary = _summary(event_delays, 1000, 1)
        return {
            "benchmark": "job latency through the real web, Redis and Celery processes (SQLite)",
            "machine": {"cpu_model": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
            "settings": {
                "model": "gpt2-tiny",
                "jobs": arguments.jobs,
                "max_steps": arguments.max_steps,
                "ws_steps": arguments.ws_steps,
                "batch_size": 8,
                "max_length": 32,
                "corpus_lines": 400,
                "workers": "1 cpu + 1 gpu (prefork, concurrency 1, on CPU here)",
                "database": "sqlite",
            },
            "n": arguments.jobs,
            "submit_to_first_step_seconds": {
                **submit_summary,
                "warmup_seconds": round(warmup_first - warmup_submitted, 3),
                "breakdown_median_seconds": {name: round(statistics.median(v), 3) for name, v in parts.items()},
                "breakdown_max_seconds": {name: round(max(v), 3) for name, v in parts.items()},
            },
            "event_to_websocket_milliseconds": {
                **event_summary,
                "replayed": len(received_on_job_socket) - len(live),
                "metrics_events_stored": stored_metrics.count(),
                "tenant_feed": _summary(feed_delays, 1000, 1),
                "job_seconds": round(max(received_on_job_socket.values(), default=ws_submitted) - ws_submitted, 2),
            },
            "goal_submit_p50_seconds": GOAL_SUBMIT_P50_SECONDS,
            "goal_submit_met": submit_summary["p50"] <= GOAL_SUBMIT_P50_SECONDS,
            "goal_event_p95_milliseconds": GOAL_EVENT_P95_MILLISECONDS,
            "goal_event_met": event_summary["p95"] <= GOAL_EVENT_P95_MILLISECONDS,
            "setup_seconds": round(setup_seconds, 1),
            "notes": {
                "submit_to_first_step": "time.time() before POST /v1/fine_tuning/jobs until the step-1 metrics event "
                "arrives on the tenant websocket feed; each job submitted only after the previous one finished (an "
                "idle gpu worker, no queueing); includes the HTTP request, dispatch to the broker after commit, the "
                "worker's pickup and claim, the file copy, model build, tokenization (cached after the warm-up), the "
                "first optimizer step, and the event's push",
                "event_to_websocket": "receive time on the job's socket less JobEvent.created_at (set when the worker "
                "builds the row, before its commit); includes the commit, the channel-layer publish through Redis, "
                "the consumer in the web process and the frame; events written before the socket subscribed are "
                "excluded (replayed)",
            },
        }
    finally:
        for recorder in sockets:
            with contextlib.suppress(Exception):  # closing on the way out; the processes go next anyway
                recorder.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20, help="timed jobs, one after another (after one warm-up job)")
    parser.add_argument("--max-steps", type=int, default=5, help="steps of each timed job")
    parser.add_argument("--ws-steps", type=int, default=200, help="steps of the job timed on its websocket")
    parser.add_argument("--timeout", type=float, default=180, help="seconds any one job may take")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, database)")
    arguments = parser.parse_args()
    if arguments.jobs < 1 or arguments.max_steps < 1 or arguments.ws_steps < 1:
        parser.error("--jobs, --max-steps and --ws-steps must be at least 1")
    folder = Path(tempfile.mkdtemp(prefix="tunehouse-bench-latency-"))
    started = time.perf_counter()
    try:
        report = run(arguments, folder)
    except BaseException:
        if arguments.keep:
            print(f"kept {folder}", file=sys.stderr)
        raise
    finally:
        if not arguments.keep:
            shutil.rmtree(folder, ignore_errors=True)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
