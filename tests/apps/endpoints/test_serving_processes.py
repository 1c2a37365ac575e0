"""Two real serving processes behind one real web process (SERVING_URL lists both), driven by the `openai` SDK:
stable routing by endpoint, failover when one process is killed, and a redeploy while both serve."""

import os
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import openai
import pytest
import redis

from apps.core.storage import object_store
from apps.datasets.models import File
from apps.endpoints.routing import rendezvous_order
from apps.jobs.models import FineTuningJob, JobStatus
from apps.jobs.serialization import fine_tuned_model_name
from apps.jobs.services import job_create
from tests.workers.ml.engine_fixtures import train
from tests.workers.ml.test_train import write_training_corpus
from tunehouse.localrun import free_port, start_asgi_server, start_serving_server, stop_process, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

SERVING_TOKEN = "two-processes-token"
# A Redis database of its own: the session's serving process (other tests) watches database 0 and must neither
# load these deployments nor see its own disappear.
_PRIVATE_DATABASE = 6


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("two-processes-model")
    corpus = write_training_corpus(folder / "corpus.txt", paragraphs=30)
    run = train(str(corpus), folder / "model", max_steps=3)
    assert run.result.output_dir is not None
    return Path(run.result.output_dir)


@pytest.fixture
def private_env(service_env) -> dict:
    env = dict(service_env, SERVING_TOKEN=SERVING_TOKEN, SERVING_THREADS="1")
    env["REDIS_URL"] = urlunsplit(urlsplit(os.environ["REDIS_URL"])._replace(path=f"/{_PRIVATE_DATABASE}"))
    client = redis.Redis.from_url(env["REDIS_URL"])
    client.flushdb()
    yield env
    client.flushdb()
    client.close()


class ServingProcesses:
    def __init__(self, env: dict, logs: Path, count: int) -> None:
        self.urls, self.processes = [], {}
        for number in range(count):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            log = logs / f"serving-{number}.log"
            self.processes[url] = start_serving_server(port=port, env=env, log_path=log)
            self.urls.append(url)
        for url, process in self.processes.items():
            wait_until(
                lambda url=url: httpx.get(f"{url}/readyz", timeout=2).status_code == 200,
                timeout=90,
                what=f"serving process at {url}",
                process=process,
            )

    def loaded(self, url: str) -> dict[str, set[int]]:
        """Endpoint → revisions the process at ``url`` holds ready (or is retiring)."""
        rows = httpx.get(f"{url}/v1/deployments", headers={"X-Serving-Token": SERVING_TOKEN}, timeout=5).json()
        loaded: dict[str, set[int]] = {}
        for row in rows["data"]:
            if row["state"] in ("ready", "retiring"):
                loaded.setdefault(row["endpoint"], set()).add(row["revision"])
        return loaded

    def stop(self) -> None:
        for process in self.processes.values():
            stop_process(process)


@pytest.fixture
def serving_pair(private_env, tmp_path):
    processes = ServingProcesses(private_env, tmp_path, count=2)
    yield processes
    processes.stop()


@pytest.fixture
def web(private_env, serving_pair, tmp_path):
    env = dict(private_env, SERVING_URL=",".join(serving_pair.urls), SERVING_FAILURE_BACKOFF_SECONDS="5")
    port = free_port()
    process = start_asgi_server(port=port, env=env, log_path=tmp_path / "web.log")
    base_url = f"http://127.0.0.1:{port}"
    wait_until(
        lambda: httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200,
        timeout=60,
        what="uvicorn",
        process=process,
        log=tmp_path / "web.log",
    )
    yield base_url
    stop_process(process)


def _served_job(tenant, folder: Path) -> FineTuningJob:
    """A succeeded job whose model files are in the object store, as a finished training run leaves them."""
    file = File.objects.create(tenant=tenant, filename="t.txt", bytes=1, sha256="c" * 64, storage_key="k")
    job = job_create(tenant=tenant, user=None, training_file=file, model="gpt2-tiny")
    prefix = f"tenants/{tenant.pk}/models/{job.public_id}"
    object_store().upload_dir(prefix, folder)
    FineTuningJob.objects.filter(pk=job.pk).update(
        status=JobStatus.SUCCEEDED, fine_tuned_model=fine_tuned_model_name(job), model_storage_prefix=prefix
    )
    job.refresh_from_db()
    return job


class Clients:
    """Threads that keep asking one endpoint until stopped; every failure is kept (the finding)."""

    def __init__(self, base_url: str, api_key: str, model: str, *, plain: int, streaming: int = 0) -> None:
        self.base_url, self.api_key, self.model = base_url, api_key, model
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[str | None] = []  # system_fingerprint of each answer (the revision)
        self.failures: list[str] = []
        self.broken_streams = 0  # streams cut after their first chunk: no client could retry those cleanly
        self.threads = [threading.Thread(target=self._ask) for _ in range(plain)]
        self.threads += [threading.Thread(target=self._stream) for _ in range(streaming)]

    def _client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key, max_retries=0, timeout=60)

    def _ask(self) -> None:
        client = self._client()
        while not self.stop_event.is_set():
            try:
                completion = client.completions.create(model=self.model, prompt="Once upon", max_tokens=6)
            except Exception as error:  # noqa: BLE001 - every failure is the finding
                with self.lock:
                    self.failures.append(repr(error))
            else:
                with self.lock:
                    self.answers.append(completion.system_fingerprint)

    def _stream(self) -> None:
        client = self._client()
        while not self.stop_event.is_set():
            chunks = 0
            try:
                for _chunk in client.completions.create(model=self.model, prompt="The", max_tokens=6, stream=True):
                    chunks += 1
            except Exception as error:  # noqa: BLE001
                with self.lock:
                    if chunks:
                        self.broken_streams += 1
                    else:
                        self.failures.append(f"stream before its first chunk: {error!r}")
            else:
                with self.lock:
                    self.answers.append("stream")

    def __enter__(self) -> "Clients":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=90)

    def answered(self) -> int:
        with self.lock:
            return len(self.answers)


def _wait_for(predicate, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_endpoints_stick_to_their_process_and_fail_over_when_it_is_killed(
    serving_pair, web, tenant_a, tiny_model_folder
):
    client = openai.OpenAI(base_url=f"{web}/v1", api_key=tenant_a.api_key, max_retries=0, timeout=60)
    job = _served_job(tenant_a.tenant, tiny_model_folder)
    names = ["one", "two", "three", "four"]
    endpoints = {
        name: client.post("/endpoints", body={"name": name, "model": job.public_id}, cast_to=object)["id"]
        for name in names
    }
    for _ in range(3):
        for name in names:
            assert client.completions.create(model=name, prompt="Once upon", max_tokens=4).choices[0].text is not None

    # Each endpoint was served by its rendezvous choice alone: its model is loaded in one process.
    holders = {url: serving_pair.loaded(url) for url in serving_pair.urls}
    for endpoint in endpoints.values():
        top = rendezvous_order(endpoint, serving_pair.urls)[0]
        assert [url for url in serving_pair.urls if endpoint in holders[url]] == [top]

    name = "one"
    victim = rendezvous_order(endpoints[name], serving_pair.urls)[0]
    survivor = next(url for url in serving_pair.urls if url != victim)
    with Clients(web, tenant_a.api_key, name, plain=3, streaming=1) as clients:
        _wait_for(lambda: clients.answered() >= 6, timeout=60, what="no answers before the kill")
        serving_pair.processes[victim].kill()  # SIGKILL: no goodbye, connections reset mid-request
        serving_pair.processes[victim].wait(timeout=10)
        answered_at_kill = clients.answered()
        _wait_for(lambda: clients.answered() >= answered_at_kill + 10, timeout=90, what="no answers after the kill")
    assert clients.failures == []
    # The survivor took the killed process's endpoint over (loaded on demand at the first re-routed request).
    assert endpoints[name] in serving_pair.loaded(survivor)
    # Every endpoint still answers, the killed process's ones included, and the status shows it ready.
    for other in names:
        assert client.completions.create(model=other, prompt="a", max_tokens=2).choices[0].text is not None
    assert client.get(f"/endpoints/{endpoints[name]}", cast_to=object)["status"] == "ready"


def test_redeploying_while_two_processes_serve_fails_no_request(serving_pair, web, tenant_a, tiny_model_folder):
    client = openai.OpenAI(base_url=f"{web}/v1", api_key=tenant_a.api_key, max_retries=0, timeout=60)
    first, second = _served_job(tenant_a.tenant, tiny_model_folder), _served_job(tenant_a.tenant, tiny_model_folder)
    # max_replicas 2: under concurrent load the endpoint spreads over both processes, so both hot-swap.
    endpoint = client.post(
        "/endpoints", body={"name": "swap", "model": first.public_id, "max_replicas": 2}, cast_to=object
    )["id"]
    with Clients(web, tenant_a.api_key, "swap", plain=4) as clients:
        _wait_for(
            lambda: all(endpoint in serving_pair.loaded(url) for url in serving_pair.urls),
            timeout=90,
            what="the endpoint never spread over both processes",
        )
        updated = client.post(f"/endpoints/{endpoint}", body={"model": second.public_id}, cast_to=object)
        assert updated["revision"] == 2
        _wait_for(
            lambda: all(serving_pair.loaded(url).get(endpoint) == {2} for url in serving_pair.urls),
            timeout=90,
            what="both processes did not switch to revision 2 alone",
        )
        answered_at_swap = clients.answered()
        _wait_for(lambda: clients.answered() >= answered_at_swap + 8, timeout=60, what="no answers after the swap")
    assert clients.failures == []
    assert clients.answers[-1] == "rev-2"
    assert client.get(f"/endpoints/{endpoint}", cast_to=object)["revision"] == 2
