"""The official `openai` SDK against a deployed tiny model, through the real web and serving processes.

Needs the `serving_server` session fixture (tests/conftest.py, from the serving side): it must start
workers/serving on the test Redis and put SERVING_URL / SERVING_TOKEN into `service_env` before `asgi_server` starts
(it is requested first below for that reason)."""

import io

import openai
import pytest

from tests.corpus import english_corpus
from tests.test_openai_sdk import FINISHED, _wait_for_status

pytestmark = pytest.mark.django_db(transaction=True)


def test_openai_sdk_completions_chat_and_streaming(serving_server, asgi_server, celery_workers, tenant_a):
    client = openai.OpenAI(base_url=f"{asgi_server}/v1", api_key=tenant_a.api_key, max_retries=0)
    uploaded = client.files.create(file=("sdk.txt", io.BytesIO(english_corpus(200).encode())), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="gpt2-tiny", training_file=uploaded.id, hyperparameters={"max_steps": 5})
    job = _wait_for_status(client, job.id, FINISHED)
    assert job.status == "succeeded", job.error
    endpoint = client.post("/endpoints", body={"name": "tiny", "model": job.fine_tuned_model}, cast_to=object)
    assert endpoint["status"] in ("ready", "deploying")

    completion = client.completions.create(model="tiny", prompt="Once upon", max_tokens=8, seed=1)
    assert completion.object == "text_completion" and completion.choices[0].text is not None
    assert completion.usage.completion_tokens > 0
    chat = client.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "hello"}], max_tokens=8, n=2
    )
    assert len(chat.choices) == 2 and chat.choices[0].message.role == "assistant"

    chunks = list(
        client.chat.completions.create(
            model=endpoint["id"],
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(model="tiny", prompt="a", max_tokens=4, stream=True)
        if c.choices
    )
    assert isinstance(text, str)
    assert "tiny" in [model.id for model in client.models.list()]
    usage = client.get(f"/endpoints/{endpoint['id']}/usage", cast_to=object)
    assert usage["requests"] == 4 and usage["completion_tokens"] > 0
