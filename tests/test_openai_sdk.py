"""The official `openai` package, pointed at a real Tunehouse server by `base_url`, drives files and jobs."""

import io
import time

import openai
import pytest

from tests.corpus import english_corpus

pytestmark = pytest.mark.django_db(transaction=True)


def test_openai_sdk_uploads_trains_and_reads_events(asgi_server, celery_workers, tenant_a):
    client = openai.OpenAI(base_url=f"{asgi_server}/v1", api_key=tenant_a.api_key, max_retries=0)
    uploaded = client.files.create(file=("sdk.txt", io.BytesIO(english_corpus(200).encode())), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.purpose == "fine-tune"
    assert [f.id for f in client.files.list()] == [uploaded.id]

    job = client.fine_tuning.jobs.create(
        model="gpt2-tiny", training_file=uploaded.id, hyperparameters={"max_steps": 20}, suffix="sdk"
    )
    for _ in range(240):
        job = client.fine_tuning.jobs.retrieve(job.id)
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith("ft:gpt2-tiny:acme:sdk:")

    # The SDK's auto-pagination follows `after` through every page of the event log.
    messages = [event.message for event in client.fine_tuning.jobs.list_events(job.id, limit=3)]
    assert messages[0] == "The job has successfully completed"
    assert messages[-1] == f"Created fine-tuning job: {job.id}"
    ids = [event.id for event in client.fine_tuning.jobs.list_events(job.id, limit=3)]
    assert len(ids) == len(set(ids)) > 6


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
