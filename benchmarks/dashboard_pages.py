"""Dashboard pages at scale: server-side latency of the workspace pages for a tenant with 10,000 jobs and 100,000 job
events, next to the same pages of a new tenant measured in the same run; prints one JSON object.

    .venv/bin/python benchmarks/dashboard_pages.py [--jobs 10000] [--events 100000] [--big-job-events 20000]
                                                  [--requests 40] [--warmup 5]

Setup: a throwaway database, created like the test runner creates one (``connection.creation.create_test_db``, all
migrations): a SQLite file in a temporary data folder by default, or a ``test_…`` database next to the one
``DATABASE_URL`` names (PostgreSQL), dropped at the end. A private Redis (``tunehouse.localrun.RedisServer``) serves
as the cache, as in production. Rows are written with ``bulk_create``:

- the big tenant: 20 files (their validation reports carry 500 per-line errors each, as real reports of messy data
  do), ``--jobs`` jobs over the last 180 days (mostly finished, 2 running, 50 queued, with suffixes ``sweep-…``),
  ``--events`` events, of which ``--big-job-events`` belong to one job (the one whose page is measured; two thirds
  ``metrics`` events, one third ``message``) and the rest are spread over the other jobs;
- the baseline tenant: one file and one job without events (the job page needs a job), nothing else.

Measurement: Django's test ``Client`` in this process, signed in as the tenant's owner, so each figure is the whole
server side of a request (middleware, session, tenant context, selectors, template rendering) without a network or
an ASGI server. Per page: ``--warmup`` requests not counted, then ``--requests`` requests one after another; p50 and
p95 in milliseconds, and the number of SQL queries of one request. Goal: p95 ≤ 150 ms on every page of the big tenant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
for _folder in (REPOSITORY_ROOT / "platform", REPOSITORY_ROOT):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from benchmarks.machine import cpu_model  # noqa: E402  (the repository root is on sys.path from here)

GOAL_P95_MILLISECONDS = 150.0
FILES_IN_BIG_TENANT = 20
ERRORS_PER_REPORT = 500


@contextlib.contextmanager
def _explicit_created_at(*models):
    """bulk_create fills `auto_now_add` fields with the current time; the data set needs jobs spread over months."""
    fields = [model._meta.get_field("created_at") for model in models]
    for field in fields:
        field.auto_now_add = False
    try:
        yield
    finally:
        for field in fields:
            field.auto_now_add = True


def _files(tenant, count: int, *, errors: int) -> list:
    from apps.datasets.models import File, FileStatus

    report_errors = [
        {"line": line, "code": "invalid_json", "message": "Line is not valid JSON."} for line in range(errors)
    ]
    files = [
        File(
            tenant=tenant,
            filename=f"corpus-{index:02d}.jsonl",
            bytes=1_000_000 + index,
            sha256=f"{index:064d}",
            storage_key=f"tenants/{tenant.pk}/files/{index}",
            status=FileStatus.PROCESSED,
            task="chat",
            format="chat_jsonl",
            validation_report={"ok": True, "rows": 5000 + index, "errors": report_errors},
        )
        for index in range(count)
    ]
    return File.objects.bulk_create(files)


def _jobs(tenant, files: list, count: int, rng: random.Random) -> list:
    from django.utils import timezone

    from apps.jobs.models import FineTuningJob, JobPhase, JobStatus

    now = timezone.now()
    finished = [JobStatus.SUCCEEDED] * 14 + [JobStatus.FAILED] * 2 + [JobStatus.CANCELLED]
    jobs = []
    for index in range(count):
        created = now - timedelta(days=180) + timedelta(seconds=index * (180 * 86400 / max(count, 1)))
        status = rng.choice(finished)
        if index >= count - 2:
            status = JobStatus.RUNNING
        elif index >= count - 52:
            status = JobStatus.QUEUED
        started = created + timedelta(minutes=1) if status != JobStatus.QUEUED else None
        done = status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
        jobs.append(
            FineTuningJob(
                tenant=tenant,
                model=rng.choice(["gpt2-tiny", "gpt2", "qwen-small"]),
                training_file=files[index % len(files)],
                suffix=f"sweep-{index}",
                status=status,
                phase=JobPhase.DONE if done else JobPhase.TRAINING,
                hyperparameters={"n_epochs": 3, "learning_rate": 3e-4, "batch_size": 16},
                steps_completed=300 if done else 120,
                total_steps=300,
                trained_tokens=rng.randint(10_000, 2_000_000) if status == JobStatus.SUCCEEDED else None,
                created_at=created,
                started_at=started,
                finished_at=started + timedelta(minutes=rng.randint(2, 90)) if done and started else None,
            )
        )
    return FineTuningJob.objects.bulk_create(jobs, batch_size=2000)


def _events(tenant, jobs: list, big_job, *, total: int, on_big_job: int) -> None:
    from apps.jobs.models import EventType, JobEvent

    batch: list = []

    def add(job, index: int) -> None:
        is_metrics = index % 3 != 0
        batch.append(
            JobEvent(
                tenant=tenant,
                job=job,
                created_at=job.created_at + timedelta(seconds=index),
                type=EventType.METRICS if is_metrics else EventType.MESSAGE,
                message=f"Step {index}" if is_metrics else "Checkpoint written",
                data={"step": index, "train_loss": 3.0 / (1 + index / 500)} if is_metrics else None,
            )
        )
        if len(batch) >= 5000:
            JobEvent.objects.bulk_create(batch)
            batch.clear()

    for index in range(on_big_job):
        add(big_job, index)
    others = [job for job in jobs if job.pk != big_job.pk]
    for index in range(total - on_big_job):
        add(others[index % len(others)], index // len(others))
    JobEvent.objects.bulk_create(batch)


def build_world(arguments: argparse.Namespace) -> dict[str, Any]:
    from django.contrib.auth import get_user_model

    from apps.datasets.models import File
    from apps.jobs.models import FineTuningJob, JobEvent
    from apps.tenancy.services import tenant_create

    rng = random.Random(11)
    users = get_user_model().objects
    big_owner = users.create_user(username="owner@big.bench", email="owner@big.bench")
    empty_owner = users.create_user(username="owner@new.bench", email="owner@new.bench")
    big = tenant_create(slug="big", name="Big team", owner=big_owner)
    empty = tenant_create(slug="new", name="New team", owner=empty_owner)
    started = time.perf_counter()
    with _explicit_created_at(FineTuningJob, JobEvent):
        files = _files(big, FILES_IN_BIG_TENANT, errors=ERRORS_PER_REPORT)
        jobs = _jobs(big, files, arguments.jobs, rng)
        big_job = jobs[len(jobs) // 2]
        _events(big, jobs, big_job, total=arguments.events, on_big_job=arguments.big_job_events)
        baseline_job = _jobs(empty, _files(empty, 1, errors=0), 1, rng)[0]
    return {
        "big": {"owner": big_owner, "job": big_job},
        "baseline": {"owner": empty_owner, "job": baseline_job},
        "rows": {
            "jobs": FineTuningJob.objects.for_tenant(big).count(),
            "events": JobEvent.objects.for_tenant(big).count(),
            "events_of_measured_job": JobEvent.objects.filter(job=big_job).count(),
            "files": File.objects.for_tenant(big).count(),
        },
        "build_seconds": round(time.perf_counter() - started, 1),
    }


def _pages(job_public_id: str) -> dict[str, tuple[str, dict]]:
    htmx = {"HTTP_HX_REQUEST": "true"}
    return {
        "home": ("/", {}),
        "home running work (htmx poll)": ("/", {**htmx, "HTTP_HX_TARGET": "running-work"}),
        "jobs": ("/jobs/", {}),
        "jobs last page": ("/jobs/?page=last", {}),
        "jobs deep page (200)": ("/jobs/?page=200", {}),
        "jobs status=succeeded": ("/jobs/?status=succeeded", {}),
        "jobs search": ("/jobs/?q=sweep-123", {}),
        "jobs rows (htmx, page 2)": ("/jobs/?page=2", {**htmx, "HTTP_HX_TARGET": "job-list"}),
        "datasets": ("/datasets/", {}),
        "settings": ("/settings/", {}),
        "job detail": (f"/jobs/{job_public_id}/", {}),
        # What the job page's script then loads: the newest events, the chart series, the checkpoints.
        "job page: latest 100 events (API)": (f"/v1/fine_tuning/jobs/{job_public_id}/events?limit=100", {}),
        "job page: metrics series (API; a finished job's is cached)": (
            f"/v1/fine_tuning/jobs/{job_public_id}/metrics",
            {},
        ),
        "job page: checkpoints (API)": (f"/v1/fine_tuning/jobs/{job_public_id}/checkpoints", {}),
    }


def _measure_uncached_series(job, *, requests: int) -> dict[str, Any]:
    """The metrics series computed from the events every time, as for a running job (no cache)."""
    from apps.jobs.selectors import _job_metrics_series_uncached

    timings = []
    for _ in range(requests):
        started = time.perf_counter()
        _job_metrics_series_uncached(job, 500)
        timings.append((time.perf_counter() - started) * 1000)
    cuts = statistics.quantiles(timings, n=100, method="inclusive")
    return {"p50_ms": round(statistics.median(timings), 1), "p95_ms": round(cuts[94], 1)}


def _measure(client, path: str, headers: dict, *, warmup: int, requests: int) -> dict[str, Any]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    for _ in range(warmup):
        response = client.get(path, **headers)
        if response.status_code != 200:
            raise RuntimeError(f"GET {path}: HTTP {response.status_code}")
    timings = []
    for _ in range(requests):
        started = time.perf_counter()
        client.get(path, **headers)
        timings.append((time.perf_counter() - started) * 1000)
    with CaptureQueriesContext(connection) as queries:
        client.get(path, **headers)
    cuts = statistics.quantiles(timings, n=100, method="inclusive")
    return {"p50_ms": round(statistics.median(timings), 1), "p95_ms": round(cuts[94], 1), "queries": len(queries)}


def run(arguments: argparse.Namespace, folder: Path) -> dict[str, Any]:
    os.environ["TUNEHOUSE_DATA_DIR"] = str(folder / "data")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tunehouse.settings")
    from tunehouse.localrun import RedisServer

    redis = RedisServer.start(str(folder / "redis"))
    os.environ["REDIS_URL"] = redis.url
    try:
        import django

        django.setup()
        from django.db import connection
        from django.test import Client
        from django.test.utils import setup_test_environment, teardown_test_environment

        # DEBUG off as in production: no SQL log kept per query (the test environment allows the test host name).
        setup_test_environment(debug=False)
        test_database = connection.creation.create_test_db(verbosity=0, autoclobber=True, keepdb=False)
        try:
            world = build_world(arguments)
            pages: dict[str, Any] = {}
            for name in ("big", "baseline"):
                client = Client()
                client.force_login(world[name]["owner"])
                for page, (path, headers) in _pages(world[name]["job"].public_id).items():
                    figures = _measure(client, path, headers, warmup=arguments.warmup, requests=arguments.requests)
                    entry = pages.setdefault(page, {"path": path.replace(world[name]["job"].public_id, "<id>")})
                    entry.update({f"{name}_{key}": value for key, value in figures.items()})
            uncached_series = _measure_uncached_series(world["big"]["job"], requests=max(5, arguments.requests // 4))
            vendor = connection.vendor
        finally:
            connection.creation.destroy_test_db(test_database, verbosity=0)
            teardown_test_environment()
    finally:
        redis.stop()
    slowest = max(pages.values(), key=lambda entry: entry["big_p95_ms"])
    return {
        "benchmark": "dashboard_pages",
        "database": vendor,
        "data": {k: world[k] for k in ("rows", "build_seconds")},
        "requests_per_page": arguments.requests,
        "pages": pages,
        "slowest_big_p95_ms": slowest["big_p95_ms"],
        # A running job's series is recomputed per request; real jobs store about 500 metrics events (throttled),
        # this job holds two thirds of --big-job-events: the worst case, reported beside the goal, not in it.
        "metrics_series_uncached_big_job": uncached_series,
        "goal_p95_milliseconds": GOAL_P95_MILLISECONDS,
        "goal_met": all(entry["big_p95_ms"] <= GOAL_P95_MILLISECONDS for entry in pages.values()),
        "machine": {"cpu_model": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--big-job-events", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    arguments = parser.parse_args()
    if arguments.big_job_events > arguments.events:
        parser.error("--big-job-events cannot exceed --events")
    folder = Path(tempfile.mkdtemp(prefix="tunehouse-dashboard-bench-"))
    try:
        report = run(arguments, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
