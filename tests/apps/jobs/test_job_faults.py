"""Jobs survive what goes wrong in production, each shown with real worker processes and a real Redis:
a worker killed with SIGKILL, a worker asked to stop (SIGTERM), Redis restarting, cancel, pause and resume.

The `gpu` worker of the session is replaced by the tests that stop it; leases expire after 5 s here (see
`service_env`), so a dead worker's job is taken over within seconds.
"""

import io
import os
import signal
import time

import pytest

from apps.jobs.models import FineTuningJob, JobCheckpoint, JobStatusChange
from tests.corpus import english_corpus
from tests.polling import wait_for
from tunehouse.localrun import start_celery_worker, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

# Long enough to interrupt (a few seconds of steps on 2 CPU cores), small enough to finish fast after a resume.
LONG_RUN = {
    "max_steps": 240,
    "batch_size": 16,
    "max_length": 64,
    "log_every_steps": 2,
    "checkpoint_every_steps": 10,
}
FINISHED = {"succeeded", "failed", "cancelled"}


def _upload(client) -> str:
    stream = io.BytesIO(english_corpus().encode())
    stream.name = "stories.txt"
    response = client.post("/v1/files", {"purpose": "fine-tune", "file": stream}, format="multipart")
    assert response.status_code == 200, response.content
    return response.json()["id"]


def _start_job(client, **hyperparameters) -> str:
    response = client.post(
        "/v1/fine_tuning/jobs",
        {"model": "gpt2-tiny", "training_file": _upload(client), "hyperparameters": {**LONG_RUN, **hyperparameters}},
        format="json",
    )
    assert response.status_code == 200, response.content
    return response.json()["id"]


def _job(client, job_id: str) -> dict:
    return client.get(f"/v1/fine_tuning/jobs/{job_id}").json()


def _wait(client, job_id: str, done, timeout: float = 180) -> dict:
    return wait_for(client, f"/v1/fine_tuning/jobs/{job_id}", done, timeout)


def _running_past(client, job_id: str, step: int) -> dict:
    return _wait(client, job_id, lambda job: job["status"] in FINISHED or job["progress"]["step"] >= step)


def _events(client, job_id: str) -> list[dict]:
    """Every event of the job, oldest first, through the REST API's pages."""
    events, after = [], None
    while True:
        page = client.get(
            f"/v1/fine_tuning/jobs/{job_id}/events", {"limit": 100, **({"after": after} if after else {})}
        )
        body = page.json()
        events.extend(body["data"])
        if not body["has_more"]:
            return list(reversed(events))
        after = body["data"][-1]["id"]


def _steps_by_attempt(events: list[dict]) -> list[list[int]]:
    """The metrics steps each attempt logged, split at every "Fine-tuning job started" event."""
    attempts: list[list[int]] = []
    for event in events:
        if event["message"].startswith("Fine-tuning job started"):
            attempts.append([])
        elif event["type"] == "metrics" and attempts and event["data"].get("train_loss") is not None:
            attempts[-1].append(event["data"]["step"])
    return attempts


def _replace_gpu_worker(celery_workers, service_env, service_logs, name: str):
    """Starts a fresh `gpu` worker in place of the session's (which the caller stopped)."""
    from tunehouse.celery import app

    process = start_celery_worker(queues="gpu", env=service_env, log_path=service_logs / f"{name}.log", name=name)
    celery_workers["gpu"] = process  # the session fixture stops whatever is here at the end

    def answers() -> bool:
        replies = app.control.ping(timeout=0.5) or []
        return any(name == reply_name.split("@")[0] for reply in replies for reply_name in reply)

    wait_until(answers, timeout=90, what=f"celery worker {name}", process=process, log=service_logs / f"{name}.log")
    return process


def _assert_resumed_without_repeating(events: list[dict], checkpoint_step: int, max_steps: int) -> None:
    attempts = _steps_by_attempt(events)
    assert len(attempts) >= 2, attempts
    resumed = attempts[-1]
    # The engine says where it resumed: the newest complete checkpoint when the worker died, the one the test read or
    # the next one, which the killed worker finished just after the test looked (seen in CI: 40 after reading 30),
    # recorded or not (seen in CI: its files complete on disk, the worker killed before it reached the database).
    resumed_events = [event for event in events if "resumed_from_step" in (event.get("data") or {})]
    assert resumed_events, [event["message"] for event in events]
    resumed_from = resumed_events[-1]["data"]["resumed_from_step"]
    assert resumed_from in (checkpoint_step, checkpoint_step + LONG_RUN["checkpoint_every_steps"]), resumed_events[-1]
    assert resumed_events[-1]["message"].startswith(f"Resumed from the checkpoint of step {resumed_from:,}")
    # The resumed attempt starts right after that checkpoint and never logs a step twice.
    assert resumed[0] == resumed_from + LONG_RUN["log_every_steps"], (resumed_from, resumed[:5])
    assert resumed == sorted(set(resumed)) and resumed[-1] == max_steps


def test_a_worker_killed_mid_training_is_replaced_and_the_job_resumes_from_its_checkpoint(
    celery_workers, service_env, service_logs, tenant_a
):
    client = tenant_a.api()
    job_id = _start_job(client)
    _wait(client, job_id, lambda job: JobCheckpoint.objects.filter(job__public_id=job_id, step_number__gte=30).exists())
    assert _job(client, job_id)["status"] == "running"

    os.killpg(celery_workers["gpu"].pid, signal.SIGKILL)  # the worker and its pool process, no goodbye
    celery_workers["gpu"].wait(timeout=10)
    last_checkpoint = JobCheckpoint.objects.filter(job__public_id=job_id).order_by("-step_number").first()
    _replace_gpu_worker(celery_workers, service_env, service_logs, "gpu-after-kill")

    job = _wait(client, job_id, lambda job: job["status"] in FINISHED)
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"]["step"] == LONG_RUN["max_steps"]
    _assert_resumed_without_repeating(_events(client, job_id), last_checkpoint.step_number, LONG_RUN["max_steps"])
    changes = list(JobStatusChange.objects.filter(job__public_id=job_id).values_list("to_status", "actor"))
    assert ("queued", "system:lease-expired") in changes
    assert FineTuningJob.objects.get(public_id=job_id).attempt == 2


def test_a_worker_asked_to_stop_checkpoints_and_requeues_the_job(celery_workers, service_env, service_logs, tenant_a):
    client = tenant_a.api()
    job_id = _start_job(client)
    _running_past(client, job_id, 20)

    worker = celery_workers["gpu"]
    worker.send_signal(signal.SIGTERM)  # the main process only, as `docker stop` does
    worker.wait(timeout=60)  # a warm shutdown: it waits for the job to checkpoint and hand itself back
    job = _job(client, job_id)
    assert job["status"] == "queued", job
    events = _events(client, job_id)
    handed_back = [event for event in events if event["message"].startswith("The worker is shutting down")]
    assert len(handed_back) == 1
    stopped_at = job["progress"]["step"]
    assert JobCheckpoint.objects.filter(job__public_id=job_id, step_number=stopped_at).exists()

    _replace_gpu_worker(celery_workers, service_env, service_logs, "gpu-after-term")
    job = _wait(client, job_id, lambda job: job["status"] in FINISHED)
    assert job["status"] == "succeeded", job["error"]
    # The checkpoint was written at the step it stopped, which need not be a multiple of log_every_steps.
    attempts = _steps_by_attempt(_events(client, job_id))
    assert attempts[-1][0] > stopped_at and attempts[-1][0] - stopped_at <= LONG_RUN["log_every_steps"]
    assert attempts[-1][-1] == LONG_RUN["max_steps"]
    assert ("queued", "system:worker-shutdown") in JobStatusChange.objects.filter(job__public_id=job_id).values_list(
        "to_status", "actor"
    )


def test_a_cancelled_job_stops_within_a_few_steps_and_says_nothing_more(celery_workers, tenant_a):
    client = tenant_a.api()
    job_id = _start_job(client, max_steps=2000)
    running = _running_past(client, job_id, 10)
    assert running["status"] == "running"

    response = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert response.status_code == 200
    requested_at_step = _job(client, job_id)["progress"]["step"]
    job = _wait(client, job_id, lambda job: job["status"] in FINISHED, timeout=30)
    assert job["status"] == "cancelled"
    assert job["progress"]["step"] - requested_at_step <= 40  # a quarter-second poll: a handful of tiny steps

    count = len(_events(client, job_id))
    time.sleep(3)
    events = _events(client, job_id)
    assert len(events) == count
    assert events[-1]["message"].startswith("Job cancelled at step")
    cancelled = JobStatusChange.objects.get(job__public_id=job_id, to_status="cancelled")
    assert cancelled.actor == f"user:{tenant_a.owner.get_username()}"


def test_a_paused_job_keeps_its_progress_and_resumes_where_it_stopped(celery_workers, tenant_a):
    client = tenant_a.api()
    job_id = _start_job(client)
    _running_past(client, job_id, 20)

    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/pause").status_code == 200
    paused = _wait(client, job_id, lambda job: job["status"] in {"paused", *FINISHED}, timeout=30)
    assert paused["status"] == "paused"
    paused_at = paused["progress"]["step"]
    assert JobCheckpoint.objects.filter(job__public_id=job_id, step_number=paused_at).exists()
    time.sleep(2)
    assert _job(client, job_id)["progress"]["step"] == paused_at  # nothing runs while paused

    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/resume").status_code == 200
    job = _wait(client, job_id, lambda job: job["status"] in FINISHED)
    assert job["status"] == "succeeded", job["error"]
    attempts = _steps_by_attempt(_events(client, job_id))
    assert len(attempts) == 2 and attempts[0][-1] <= paused_at < attempts[1][0]
    assert attempts[1][-1] == LONG_RUN["max_steps"]


def test_a_job_completes_when_redis_restarts_mid_run(celery_workers, tenant_a):
    from tests.plugins import services

    client = tenant_a.api()
    job_id = _start_job(client)
    _running_past(client, job_id, 20)

    services.redis_server().restart()  # broker and channel layer: every connection drops, queued messages too

    job = _wait(client, job_id, lambda job: job["status"] in FINISHED)
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"]["step"] == LONG_RUN["max_steps"]
    # Later jobs still reach the workers through the restarted broker.
    second = _start_job(client, max_steps=20)
    assert _wait(client, second, lambda job: job["status"] in FINISHED)["status"] == "succeeded"
