"""The official `openai` package, pointed at a real Tunehouse server by `base_url`, drives files and jobs."""

import io
import time

import openai
import pytest

from tests.corpus import english_corpus

pytestmark = pytest.mark.django_db(transaction=True)


FINISHED = ("succeeded", "failed", "cancelled")


def _wait_for_status(client, job_id: str, statuses, *, polls: int = 240):
    for _ in range(polls):
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.5)
    return job


def test_openai_sdk_uploads_trains_and_reads_events(asgi_server, celery_workers, tenant_a):
    client = openai.OpenAI(base_url=f"{asgi_server}/v1", api_key=tenant_a.api_key, max_retries=0)
    uploaded = client.files.create(file=("sdk.txt", io.BytesIO(english_corpus(200).encode())), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.purpose == "fine-tune"
    assert [f.id for f in client.files.list()] == [uploaded.id]

    # OpenAI's current form: hyperparameters under `method`; the engine's own (max_steps, checkpoint_every_steps)
    # ride along as extension fields.
    job = client.fine_tuning.jobs.create(
        model="gpt2-tiny",
        training_file=uploaded.id,
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": "auto",
                    "batch_size": 4,
                    "learning_rate_multiplier": 0.5,
                    "max_steps": 20,
                    "checkpoint_every_steps": 5,
                }
            },
        },
        seed=3,
        suffix="sdk",
        metadata={"experiment": "sdk-flow"},
    )
    assert job.metadata == {"experiment": "sdk-flow"} and job.seed == 3
    assert job.hyperparameters.batch_size == 4
    assert job.to_dict()["hyperparameters"]["learning_rate"] == pytest.approx(0.5 * 3e-3)  # gpt2-tiny: from scratch
    job = _wait_for_status(client, job.id, FINISHED)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith("ft:gpt2-tiny:acme:sdk:")

    # The SDK's auto-pagination follows `after` through every page of the event log.
    messages = [event.message for event in client.fine_tuning.jobs.list_events(job.id, limit=3)]
    assert messages[0] == "The job has successfully completed"
    assert messages[-1] == f"Created fine-tuning job: {job.id}"
    ids = [event.id for event in client.fine_tuning.jobs.list_events(job.id, limit=3)]
    assert len(ids) == len(set(ids)) > 6

    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id, limit=1))
    assert checkpoints, "a job checkpointing every 5 of its 20 steps lists its checkpoints"
    assert [c.step_number for c in checkpoints] == sorted((c.step_number for c in checkpoints), reverse=True)
    latest = checkpoints[0]
    assert latest.fine_tuning_job_id == job.id and latest.step_number in (5, 10, 15, 20)
    assert latest.metrics.step == latest.step_number and latest.metrics.train_loss is not None
    assert latest.fine_tuned_model_checkpoint.startswith(job.fine_tuned_model)

    # The fine-tuned model is one of the tenant's models now.
    assert job.fine_tuned_model in [model.id for model in client.models.list()]
    model = client.models.retrieve(job.fine_tuned_model)
    assert model.id == job.fine_tuned_model and model.owned_by == "acme"

    # A second job, paused, resumed and cancelled through the SDK.
    second = client.fine_tuning.jobs.create(
        model="gpt2-tiny",
        training_file=uploaded.id,
        hyperparameters={"max_steps": 5000, "checkpoint_every_steps": 50},
        metadata={"experiment": "sdk-cancel"},
    )
    client.fine_tuning.jobs.pause(second.id)
    assert _wait_for_status(client, second.id, ("paused", *FINISHED)).status == "paused"
    assert client.fine_tuning.jobs.resume(second.id).status == "queued"
    client.fine_tuning.jobs.cancel(second.id)
    assert _wait_for_status(client, second.id, FINISHED).status == "cancelled"

    # OpenAI's metadata filter: metadata[key]=value.
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"experiment": "sdk-flow"})] == [job.id]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"experiment": "sdk-cancel"})] == [second.id]
    assert [j.id for j in client.fine_tuning.jobs.list(limit=1)] == [second.id, job.id]


def test_openai_sdk_raises_its_usual_errors(asgi_server, tenant_a, tenant_b):
    client_b = openai.OpenAI(base_url=f"{asgi_server}/v1", api_key=tenant_b.api_key, max_retries=0)
    uploaded_by_a = openai.OpenAI(base_url=f"{asgi_server}/v1", api_key=tenant_a.api_key, max_retries=0).files.create(
        file=("a.txt", io.BytesIO(b"tenant a data\n")), purpose="fine-tune"
    )
    with pytest.raises(openai.NotFoundError):
        client_b.files.retrieve(uploaded_by_a.id)
    with pytest.raises(openai.BadRequestError) as bad_model:
        client_b.fine_tuning.jobs.create(model="gpt-9", training_file="file-x")
    assert bad_model.value.status_code in (400, 404)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{asgi_server}/v1", api_key="th-wrong", max_retries=0).files.list()


def test_file_content_streams_through_the_asgi_server(asgi_server, tenant_a):
    client = openai.OpenAI(base_url=f"{asgi_server}/v1", api_key=tenant_a.api_key, max_retries=0)
    content = english_corpus(3000).encode()
    uploaded = client.files.create(file=("big.txt", io.BytesIO(content)), purpose="fine-tune")
    assert client.files.content(uploaded.id).read() == content


def test_openai_sdk_lists_and_retrieves_catalog_models(asgi_server, tenant_a):
    client = openai.OpenAI(base_url=f"{asgi_server}/v1", api_key=tenant_a.api_key, max_retries=0)
    ids = [model.id for model in client.models.list()]
    assert "gpt2-tiny" in ids and "smollm2-135m-instruct" in ids and "minilm-l6-v2" in ids
    model = client.models.retrieve("t5-tiny")
    assert model.id == "t5-tiny" and model.owned_by == "tunehouse"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
