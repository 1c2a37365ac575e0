"""The thin real slice, end to end through a real Celery worker per queue and a real Redis (no eager mode):
upload a text file → `cpu` validation → job → `gpu` training → events → model in the store → generation."""

import io

import pytest

from apps.core.storage import object_store
from tests.corpus import english_corpus
from tests.polling import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

SMALL_RUN = {"max_steps": 30, "log_every_steps": 5, "batch_size": 8, "max_length": 32}


def _upload(client, content: bytes, name: str = "corpus.txt") -> dict:
    response = client.post("/v1/files", {"purpose": "fine-tune", "file": io.BytesIO(content)}, format="multipart")
    assert response.status_code == 200, response.content
    return response.json()


def _file_named(content: bytes, name: str):
    stream = io.BytesIO(content)
    stream.name = name
    return stream


def _wait_for_job(client, job_id: str, statuses: set[str], timeout: float = 180) -> dict:
    return wait_for(client, f"/v1/fine_tuning/jobs/{job_id}", lambda job: job["status"] in statuses, timeout)


def test_text_file_trains_a_model_through_real_workers(celery_workers, tenant_a):
    client = tenant_a.api()
    upload = client.post(
        "/v1/files",
        {"purpose": "fine-tune", "file": _file_named(english_corpus().encode(), "stories.txt")},
        format="multipart",
    ).json()
    assert upload["status"] == "uploaded" and upload["filename"] == "stories.txt"

    created = client.post(
        "/v1/fine_tuning/jobs",
        {"model": "gpt2-tiny", "training_file": upload["id"], "hyperparameters": SMALL_RUN},
        format="json",
    ).json()
    assert created["status"] in {"validating_files", "queued"}

    job = _wait_for_job(client, created["id"], {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job["error"]
    assert job["fine_tuned_model"].startswith("ft:gpt2-tiny:acme:")
    assert job["trained_tokens"] > 0
    assert job["progress"]["step"] == SMALL_RUN["max_steps"]

    file = client.get(f"/v1/files/{upload['id']}").json()
    assert file["status"] == "processed"
    assert file["validation_report"]["rows"] == 400 and file["task"] == "causal_lm"

    events = client.get(f"/v1/fine_tuning/jobs/{created['id']}/events", {"limit": 100}).json()["data"]
    metrics = [event for event in reversed(events) if event["type"] == "metrics"]
    # Throttled to chart resolution (every 5 steps), in order, and the loss went down.
    assert [event["data"]["step"] for event in metrics] == list(range(5, 31, 5))
    assert metrics[-1]["data"]["train_loss"] < metrics[0]["data"]["train_loss"]
    assert events[0]["message"] == "The job has successfully completed", [event["message"] for event in events[:8]]

    stored = object_store().list_keys(f"tenants/{tenant_a.tenant.pk}/models/{created['id']}/")
    names = {key.rsplit("/", 1)[-1] for key in stored}
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)

    generated = client.post(
        f"/v1/fine_tuning/jobs/{created['id']}/generate",
        {"prompt": "The cat", "max_tokens": 12, "seed": 1},
        format="json",
    )
    assert generated.status_code == 200, generated.content
    body = generated.json()
    assert body["usage"]["completion_tokens"] >= 1 and isinstance(body["choices"][0]["text"], str)


def test_invalid_utf8_file_fails_its_job_with_a_clear_error(celery_workers, tenant_a):
    client = tenant_a.api()
    upload = client.post(
        "/v1/files",
        {"purpose": "fine-tune", "file": _file_named(b"caf\xe9 au lait\n" * 20, "latin1.txt")},
        format="multipart",
    ).json()
    response = client.post("/v1/fine_tuning/jobs", {"model": "gpt2-tiny", "training_file": upload["id"]}, format="json")
    if response.status_code == 400:
        # The cpu worker checked the file before the job was asked for: the job is refused with the same reason.
        error = response.json()["error"]
    else:
        job = _wait_for_job(client, response.json()["id"], {"succeeded", "failed"}, timeout=60)
        assert job["status"] == "failed"
        error = job["error"]
    assert error["code"] == "invalid_training_file"
    assert "UTF-8" in error["message"]
    file = client.get(f"/v1/files/{upload['id']}").json()
    assert file["status"] == "error" and "UTF-8" in file["status_details"]
