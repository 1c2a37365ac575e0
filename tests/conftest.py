"""Shared fixtures: tenants with API keys, a real Celery worker and a real ASGI server on the test database."""

import json
import os
import time
import warnings
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db.backends.signals import connection_created
from django.dispatch import receiver
from django.test import TransactionTestCase
from rest_framework.test import APIClient

from tunehouse.localrun import (
    free_port,
    start_asgi_server,
    start_celery_worker,
    start_serving_server,
    stop_process,
    wait_until,
)


@receiver(connection_created)
def _let_workers_lose_deadlocks(sender, connection, **kwargs) -> None:
    """Between transactional tests the database is emptied with one TRUNCATE of every table, while the real workers
    may still be finishing something (a cancelled job's last task) or running their recovery loop. PostgreSQL
    resolves such a deadlock by aborting the session that detects it first; this one waits longest before
    checking, so the worker's transaction is the one aborted (the workers retry), never the test's flush."""
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        if cursor.fetchone()[0]:  # only a superuser may change it (CI's is); otherwise the default stays
            cursor.execute("SET deadlock_timeout = '10s'")


_FLUSH_ATTEMPTS = 3


def _flush_with_retries(flush_once):
    """TransactionTestCase's flush, tried again when PostgreSQL aborts it. The deadlock_timeout above does not always
    make a worker the victim: PostgreSQL checks a wait for a deadlock once, after that timeout, so when the test's
    TRUNCATE (which locks table after table) is the one whose wait closes the cycle, only the test's own check ever
    sees it, and the flush fails (seen once in CI: "Database test_tunehouse couldn't be flushed", and the next test
    then found the last one's rows). A failed flush is rolled back whole, so trying it again is safe."""

    def flush(self) -> None:
        from django.core.management.base import CommandError
        from django.db import DatabaseError

        for attempt in range(1, _FLUSH_ATTEMPTS + 1):
            try:
                return flush_once(self)
            except CommandError as error:
                if attempt == _FLUSH_ATTEMPTS or not isinstance(error.__cause__, DatabaseError):
                    raise
                # A flake shown, not hidden: pytest's warnings summary lists it.
                warnings.warn(f"flush attempt {attempt} failed, trying again: {error.__cause__}", stacklevel=1)
                time.sleep(0.5 * attempt)
        return None

    return flush


TransactionTestCase._fixture_teardown = _flush_with_retries(TransactionTestCase._fixture_teardown)


def _clear_serving_registry() -> None:
    import redis

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    try:
        stale = [b"serving:deployments", *client.scan_iter(match="serving:status:*")]
        client.delete(*stale)
    finally:
        client.close()


@pytest.fixture(autouse=True)
def _empty_serving_registry():
    """Every test starts and ends with no deployment registered. The registry lives in the session's one Redis, so
    an endpoint a test deployed (whose rows the database rollback removes) would otherwise stay registered: the
    serving tests would see a stranger among their deployments and the session's serving process would keep trying
    to load a model that no longer exists."""
    _clear_serving_registry()
    yield
    _clear_serving_registry()


@pytest.fixture
def advances(monkeypatch) -> list[int]:
    """The studies whose advance was sent, recorded here instead of reaching the session's `cpu` worker: for tests of
    pages and APIs that must not train (see tests/tuning_rows.py)."""
    from workers.tasks.tuning import advance_study

    sent: list[int] = []
    monkeypatch.setattr(advance_study, "delay", lambda study_id: sent.append(study_id))
    return sent


@dataclass
class TenantFixture:
    tenant: object
    owner: object
    api_key: str
    password: str = "correct-horse-battery"

    def api(self) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {self.api_key}")
        return client


@pytest.fixture
def make_tenant(db):
    """Creates a tenant through the documented CLI, exactly as scripts do, plus a password for its owner."""
    from apps.tenancy.models import Tenant

    def make(slug: str) -> TenantFixture:
        out = StringIO()
        call_command("create_tenant", slug, "--owner-email", f"owner@{slug}.test", stdout=out)
        created = json.loads(out.getvalue())
        owner = get_user_model().objects.get(username=f"owner@{slug}.test")
        fixture = TenantFixture(
            tenant=Tenant.objects.get(slug=created["tenant"]), owner=owner, api_key=created["api_key"]
        )
        owner.set_password(fixture.password)
        owner.save()
        return fixture

    return make


@pytest.fixture
def tenant_a(make_tenant) -> TenantFixture:
    return make_tenant("acme")


@pytest.fixture
def tenant_b(make_tenant) -> TenantFixture:
    return make_tenant("globex")


def _test_database_url() -> str:
    """The URL of the database pytest-django created, for processes started outside this one."""
    database = settings.DATABASES["default"]
    if database["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{database['NAME']}"
    base = urlsplit(os.environ["DATABASE_URL"])
    return urlunsplit(base._replace(path="/" + database["NAME"]))


@pytest.fixture(scope="session")
def service_env(django_db_setup, django_db_blocker, tmp_path_factory) -> dict:
    """Environment for processes started outside this one; torn down after them, before the test database."""
    env = dict(os.environ)
    env["DATABASE_URL"] = _test_database_url()
    env["PYTHONUNBUFFERED"] = "1"
    # Leases that expire in seconds, not a minute: the fault tests wait for a killed worker's lease to run out.
    env.update(JOB_HEARTBEAT_SECONDS="0.5", JOB_LEASE_SECONDS="5", JOB_RECOVERY_INTERVAL_SECONDS="1")
    yield env
    _drop_leftover_sessions(django_db_blocker)


def _drop_leftover_sessions(django_db_blocker) -> None:
    """A Celery pool child can outlive its parent by a moment; PostgreSQL then refuses to drop the test database."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


@pytest.fixture(scope="session")
def service_logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("service-logs")


@pytest.fixture(scope="session")
def celery_workers(service_env, service_logs):
    """One real `cpu` worker and one real `gpu` worker (CPU here), fed by the real Redis broker."""
    from tunehouse.celery import app

    processes = {
        "cpu": start_celery_worker(queues="cpu", env=service_env, log_path=service_logs / "cpu.log", name="cpu"),
        "gpu": start_celery_worker(queues="gpu", env=service_env, log_path=service_logs / "gpu.log", name="gpu"),
    }

    def both_answer() -> bool:
        replies = app.control.ping(timeout=0.5) or []
        names = {name.split("@")[0] for reply in replies for name in reply}
        return {"cpu", "gpu"} <= names

    wait_until(both_answer, timeout=90, what="celery workers", log=service_logs / "gpu.log")
    yield processes
    for process in processes.values():
        stop_process(process)


@pytest.fixture(scope="session")
def asgi_server(service_env, service_logs, serving_server):
    """The real ASGI application under uvicorn (HTTP and websockets), on a free port, reaching the real serving
    process (started first, so SERVING_URL is in the web's environment whichever test asks first)."""
    import urllib.request

    port = free_port()
    process = start_asgi_server(port=port, env=service_env, log_path=service_logs / "asgi.log")
    base_url = f"http://127.0.0.1:{port}"
    wait_until(
        lambda: urllib.request.urlopen(f"{base_url}/healthz", timeout=2).status == 200,  # noqa: S310 - loopback
        timeout=60,
        what="uvicorn",
        process=process,
        log=service_logs / "asgi.log",
    )
    yield base_url
    stop_process(process)


@pytest.fixture(scope="session")
def serving_server(service_env, service_logs):
    """The real serving process (workers/serving) under uvicorn on a free port; service_env points SERVING_URL and
    SERVING_TOKEN at it, so processes started after this fixture reach it (`asgi_server` depends on it)."""
    import urllib.request

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    service_env["SERVING_URL"] = base_url
    service_env.setdefault("SERVING_TOKEN", "test-serving-token")
    process = start_serving_server(port=port, env=service_env, log_path=service_logs / "serving.log")
    wait_until(
        lambda: urllib.request.urlopen(f"{base_url}/readyz", timeout=2).status == 200,  # noqa: S310 - loopback
        timeout=60,
        what="serving process",
        process=process,
        log=service_logs / "serving.log",
    )
    yield base_url
    stop_process(process)
