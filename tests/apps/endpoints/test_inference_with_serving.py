"""The official `openai` SDK against a deployed tiny model, through the real web and serving processes (the
`serving_server` session fixture starts workers/serving on the test Redis before `asgi_server` starts the web)."""

import io
import threading
import time

import httpx
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


def _train(client, file_id: str, *, seed: int):
    job = client.fine_tuning.jobs.create(
        model="gpt2-tiny", training_file=file_id, hyperparameters={"max_steps": 5}, seed=seed
    )
    return job


def test_redeploying_while_clients_run_fails_no_request(
    serving_server, service_env, asgi_server, celery_workers, tenant_a
):
    client = openai.OpenAI(base_url=f"{asgi_server}/v1", api_key=tenant_a.api_key, max_retries=0)
    uploaded = client.files.create(file=("swap.txt", io.BytesIO(english_corpus(200).encode())), purpose="fine-tune")
    first, second = (_wait_for_status(client, _train(client, uploaded.id, seed=seed).id, FINISHED) for seed in (1, 2))
    assert first.status == second.status == "succeeded", (first.error, second.error)
    endpoint = client.post("/endpoints", body={"name": "swap", "model": first.fine_tuned_model}, cast_to=object)
    client.completions.create(model="swap", prompt="warm", max_tokens=2)  # revision 1 is loaded and answering

    stop = threading.Event()
    lock = threading.Lock()
    answered: list[str] = []
    failures: list[str] = []

    def keep_asking() -> None:
        own = openai.OpenAI(base_url=f"{asgi_server}/v1", api_key=tenant_a.api_key, max_retries=0)
        while not stop.is_set():
            try:
                completion = own.completions.create(model="swap", prompt="Once upon", max_tokens=6)
            except Exception as error:  # noqa: BLE001 - every failure is the finding
                with lock:
                    failures.append(repr(error))
            else:
                with lock:
                    answered.append(completion.choices[0].text)

    clients = [threading.Thread(target=keep_asking) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(1.0)
        updated = client.post(f"/endpoints/{endpoint['id']}", body={"model": second.fine_tuned_model}, cast_to=object)
        assert updated["revision"] == 2
        # Done when the serving process answers with revision 2 alone (the old one freed after its last request).
        headers = {"X-Serving-Token": service_env["SERVING_TOKEN"]}
        deadline = time.monotonic() + 60
        while True:
            rows = httpx.get(f"{serving_server}/v1/deployments", headers=headers).json()["data"]
            revisions = {row["revision"] for row in rows if row["endpoint"] == endpoint["id"]}
            if revisions == {2}:
                break
            assert time.monotonic() < deadline, f"still serving revisions {revisions}"
            time.sleep(0.2)
        with lock:
            answered_at_swap = len(answered)
        time.sleep(1.0)  # and it keeps answering on the new revision
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=60)
    assert failures == []
    assert answered_at_swap > 0 and len(answered) > answered_at_swap
    assert client.get(f"/endpoints/{endpoint['id']}", cast_to=object)["revision"] == 2
