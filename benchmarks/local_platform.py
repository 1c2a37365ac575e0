"""The whole platform on this machine for a benchmark, as ``make up`` runs it (``tunehouse.localrun``), in a folder.

    with local_platform(folder) as platform:
        file_id = upload_processed(platform.api, "stories.txt", english_corpus().encode())
        job = platform.api.post_json("/v1/fine_tuning/jobs", {...})

A private Redis, a fresh SQLite database and data folder under ``folder`` (``manage.py migrate``, ``prepare_catalog
--no-convert``: ``gpt2-tiny`` trains from scratch, no converted model is needed, and ``create_tenant`` for the API
key), the ASGI server (uvicorn) and one ``cpu`` and one ``gpu`` Celery worker, each logging under ``folder/logs``.
This process gets the same settings as theirs and Django set up, so a benchmark may read the database with the ORM
and ping the workers. Leaving the block stops every process and Redis, also on error; the folder stays (the caller
removes it).

Imported by the benchmark scripts as ``local_platform`` (``benchmarks/`` is their ``sys.path[0]``); importing it
puts ``platform/`` and the repository root on ``sys.path``, so ``tunehouse``, ``apps`` and ``workers`` import too.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
PLATFORM_DIR = REPOSITORY_ROOT / "platform"
for _folder in (PLATFORM_DIR, REPOSITORY_ROOT):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
_SUBJECTS = ["The cat", "A small dog", "The old sailor", "My neighbour", "The engineer", "A quiet child", "The river",
             "Our teacher", "The baker", "A tired farmer", "The young painter", "My grandmother"]  # fmt: skip
_VERBS = ["watches", "follows", "paints", "remembers", "carries", "finds", "builds", "answers", "visits", "mends"]
_OBJECTS = ["the morning light", "a red kite", "the long road", "an empty boat", "the last letter", "a warm loaf",
            "the broken gate", "a blue umbrella", "the village square", "an old map"]  # fmt: skip
_ENDINGS = ["before dawn.", "in the rain.", "without a word.", "near the harbour.", "after supper.", "every day.",
            "with great care.", "when the bells ring.", "as the wind rises.", "under the bridge."]  # fmt: skip


def english_corpus(sentences: int = 400, seed: int = 7) -> str:
    """Generated English sentences, one a line: a small plain-text training file."""
    rng = random.Random(seed)
    return "".join(
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}\n"
        for _ in range(sentences)
    )


# -- HTTP --------------------------------------------------------------------------------------------------------
class Api:
    def __init__(self, base_url: str, api_key: str):
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {api_key}"}

    def _call(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> dict:
        headers = dict(self.headers)
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.base_url + path, data=body, method=method, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - loopback only
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"{method} {path}: HTTP {error.code}: {error.read()[:2000]!r}") from error

    def get(self, path: str) -> dict:
        return self._call("GET", path)

    def post_json(self, path: str, payload: dict) -> dict:
        return self._call("POST", path, json.dumps(payload).encode(), "application/json")

    def upload(self, filename: str, content: bytes) -> dict:
        boundary = uuid.uuid4().hex
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                "Content-Type: text/plain\r\n\r\n"
            ).encode()
            + content
            + f"\r\n--{boundary}--\r\n".encode()
        )
        return self._call("POST", "/v1/files", body, f"multipart/form-data; boundary={boundary}")


def upload_processed(api: Api, filename: str, content: bytes, *, timeout: float = 120) -> str:
    """Uploads a training file through ``POST /v1/files`` and waits until the ``cpu`` worker validated it; its id."""
    upload = api.upload(filename, content)
    deadline = time.monotonic() + timeout
    while (file := api.get(f"/v1/files/{upload['id']}"))["status"] != "processed":
        if file["status"] == "error" or time.monotonic() > deadline:
            raise RuntimeError(f"the training file was not processed: {file}")
        time.sleep(0.1)
    return upload["id"]


# -- processes ----------------------------------------------------------------------------------------------------
def manage(env: dict, *arguments: str) -> str:
    """Runs ``manage.py`` with these settings; its standard output."""
    completed = subprocess.run(
        [sys.executable, "manage.py", *arguments], cwd=REPOSITORY_ROOT, env=env, capture_output=True, text=True
    )
    if completed.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(arguments)} failed:\n{completed.stdout}\n{completed.stderr[-4000:]}")
    return completed.stdout


@dataclass
class LocalPlatform:
    base_url: str  # http://127.0.0.1:<port>
    port: int
    api_key: str
    tenant_id: int
    api: Api
    logs: Path  # web.log, worker-cpu.log, worker-gpu.log
    env: dict[str, str]  # the processes' environment (this process has it too)
    setup_started: float  # time.perf_counter() when the setup began (Redis was up), for a benchmark's setup time


@contextlib.contextmanager
def local_platform(folder: Path, *, tenant: str = "bench") -> Iterator[LocalPlatform]:
    """Starts Redis, the database, uvicorn and the ``cpu`` and ``gpu`` workers under ``folder``; yields once all of
    them answer, and stops them all on the way out."""
    from tunehouse.localrun import (
        RedisServer,
        free_port,
        start_asgi_server,
        start_celery_worker,
        stop_process,
        wait_until,
    )

    data_dir = folder / "data"
    logs = folder / "logs"
    logs.mkdir(parents=True)
    processes: list[subprocess.Popen] = []
    redis_server = RedisServer.start(str(folder / "redis"))
    try:
        python_path = [str(PLATFORM_DIR), str(REPOSITORY_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = dict(
            os.environ,
            **_OFFLINE,
            DATABASE_URL=f"sqlite:///{folder / 'db.sqlite3'}",
            TUNEHOUSE_DATA_DIR=str(data_dir),
            REDIS_URL=redis_server.url,
            DJANGO_SETTINGS_MODULE="tunehouse.settings",
            PYTHONPATH=os.pathsep.join(python_path),
            PYTHONUNBUFFERED="1",
        )
        # This process reads the same database afterwards and pings the workers: same settings as theirs.
        os.environ.update(env)
        setup_started = time.perf_counter()
        manage(env, "migrate", "--noinput")
        manage(env, "prepare_catalog", "--no-convert")
        created = json.loads(manage(env, "create_tenant", tenant, "--owner-email", f"owner@{tenant}.test"))
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        processes.append(start_asgi_server(port=port, env=env, log_path=logs / "web.log"))
        processes.append(start_celery_worker(queues="cpu", env=env, log_path=logs / "worker-cpu.log", name="cpu"))
        processes.append(start_celery_worker(queues="gpu", env=env, log_path=logs / "worker-gpu.log", name="gpu"))

        import django

        django.setup()
        from tunehouse.celery import app

        wait_until(
            lambda: urllib.request.urlopen(f"{base_url}/healthz", timeout=2).status == 200,  # noqa: S310 - loopback
            timeout=120,
            what="uvicorn",
            process=processes[0],
            log=logs / "web.log",
        )

        def both_workers_answer() -> bool:
            replies = app.control.ping(timeout=0.5) or []
            return {"cpu", "gpu"} <= {name.split("@")[0] for reply in replies for name in reply}

        wait_until(both_workers_answer, timeout=120, what="celery workers", log=logs / "worker-gpu.log")
        yield LocalPlatform(
            base_url=base_url,
            port=port,
            api_key=created["api_key"],
            tenant_id=created["tenant_id"],
            api=Api(base_url, created["api_key"]),
            logs=logs,
            env=env,
            setup_started=setup_started,
        )
    finally:
        with contextlib.suppress(Exception):  # Django is not set up when the failure came early
            from django.db import connections

            connections.close_all()
        for process in reversed(processes):
            stop_process(process)
        redis_server.stop()
