"""The official `openai` SDK against a deployed tiny model, through the real web and serving processes (the
`serving_server` session fixture starts workers/serving on the test Redis before `asgi_server` starts the web)."""

import io
import threading
import time

import httpx
import openai
import pytest

from apps.tenancy.services import api_key_create
from tests.apps.endpoints.test_limits import RATE_HEADERS
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

    # An application in production holds an inference-only key: it completes, and the SDK raises its usual
    # PermissionDeniedError for anything else. A monitoring key reads but runs no inference.
    def sdk_with(permissions: str) -> openai.OpenAI:
        secret = api_key_create(tenant=tenant_a.tenant, user=tenant_a.owner, name=permissions, permissions=permissions)
        return openai.OpenAI(base_url=f"{asgi_server}/v1", api_key=secret.secret, max_retries=0)

    app, monitor = sdk_with("inference"), sdk_with("read_only")
    assert app.completions.create(model="tiny", prompt="Once", max_tokens=4).usage.completion_tokens > 0
    assert "tiny" in [model.id for model in app.models.list()]
    with pytest.raises(openai.PermissionDeniedError) as refused:
        app.files.list()
    assert refused.value.code == "insufficient_permissions"
    assert job.id in [listed.id for listed in monitor.fine_tuning.jobs.list()]
    with pytest.raises(openai.PermissionDeniedError):
        monitor.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    with pytest.raises(openai.PermissionDeniedError):
        monitor.files.delete(uploaded.id)
    assert client.files.retrieve(uploaded.id).id == uploaded.id


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


def test_token_quotas_hold_for_concurrent_sdk_clients_and_unused_tokens_come_back(
    serving_server, asgi_server, celery_workers, tenant_a
):
    from apps.endpoints.inference import prompt_token_bound
    from apps.endpoints.models import Endpoint
    from apps.endpoints.registry import model_context_length, redis_client
    from apps.tenancy.services import api_key_create

    client = openai.OpenAI(base_url=f"{asgi_server}/v1", api_key=tenant_a.api_key, max_retries=0)
    uploaded = client.files.create(file=("lim.txt", io.BytesIO(english_corpus(200).encode())), purpose="fine-tune")
    job = _wait_for_status(client, _train(client, uploaded.id, seed=3).id, FINISHED)
    assert job.status == "succeeded", job.error
    endpoint = client.post("/endpoints", body={"name": "lim", "model": job.fine_tuned_model}, cast_to=object)
    client.completions.create(model="lim", prompt="warm", max_tokens=2)  # loaded and answering

    # The headers come on a streamed answer too (sent before the first chunk).
    raw = client.completions.with_raw_response.create(model="lim", prompt="Once upon", max_tokens=4, stream=True)
    assert all(raw.headers.get(name) for name in RATE_HEADERS), dict(raw.headers)
    assert [chunk for chunk in raw.parse()]

    prompt, max_tokens = "Once upon", 8
    context_length = model_context_length(Endpoint.objects.get(public_id=endpoint["id"]))
    worst = prompt_token_bound([prompt], context_length=context_length, max_tokens=max_tokens) + max_tokens

    # Room for one worst case at a time in the key's minute: the second answer fits only if the first gave back
    # what it did not use (its prompt is far below the bound). Set in the database while the web process runs.
    if time.time() % 60 > 45:
        time.sleep(61 - time.time() % 60)  # both requests in one minute window
    one_at_a_time = api_key_create(
        tenant=tenant_a.tenant, user=tenant_a.owner, name="one", limits={"tokens_per_minute": 2 * worst - 1}
    )
    sequential = openai.OpenAI(base_url=f"{asgi_server}/v1", api_key=one_at_a_time.secret, max_retries=0)
    for _ in range(2):
        assert sequential.completions.create(model="lim", prompt=prompt, max_tokens=max_tokens).usage.total_tokens

    # 8 clients at once against a day's quota of two worst cases: what the admitted answers used never exceeds
    # it, the others get RateLimitError, and the counter ends at exactly what was used (all reservations settled).
    burst_key = api_key_create(
        tenant=tenant_a.tenant, user=tenant_a.owner, name="burst", limits={"tokens_per_day": 2 * worst}
    )
    start = threading.Barrier(8)
    lock = threading.Lock()
    used: list[int] = []
    limited: list[openai.RateLimitError] = []
    failures: list[str] = []

    def ask() -> None:
        own = openai.OpenAI(base_url=f"{asgi_server}/v1", api_key=burst_key.secret, max_retries=0)
        start.wait()
        try:
            completion = own.completions.create(model="lim", prompt=prompt, max_tokens=max_tokens)
        except openai.RateLimitError as error:
            with lock:
                limited.append(error)
        except Exception as error:  # noqa: BLE001 - every other failure is the finding
            with lock:
                failures.append(repr(error))
        else:
            with lock:
                used.append(completion.usage.total_tokens)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert failures == []
    assert used and limited, (used, len(limited))
    assert sum(used) <= 2 * worst
    day_counter = f"ratelimit:key:{tenant_a.tenant.pk}:{burst_key.api_key.pk}:tpd:{int(time.time() // 86_400)}"
    assert int(redis_client().get(day_counter)) == sum(used)
    refusal = limited[0].response
    assert int(refusal.headers["retry-after"]) >= 1
    assert refusal.headers["x-ratelimit-limit-tokens"] == str(2 * worst)
    assert limited[0].code == "insufficient_quota"
