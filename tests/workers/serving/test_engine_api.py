"""The serving process's API end to end, in-process: real Redis registry, real tiny models, real batching."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import pytest_asyncio

from tests.workers.serving.conftest import new_endpoint
from tests.workers.serving.helpers import AsgiClient, deploy, deployment_record, publish, wait_for
from workers.serving.registry import INSTANCE_KEY_PREFIX, STATUS_KEY_PREFIX

pytestmark = pytest.mark.asyncio

PROMPT = "The old sailor"


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app) -> AsgiClient:
    return AsgiClient(app)


@pytest_asyncio.fixture
async def gpt2_endpoint(app, redis_client, upload, gpt2_folder) -> str:
    endpoint = new_endpoint()
    await deploy(app, redis_client, deployment_record(endpoint, upload(gpt2_folder)))
    return endpoint


def _status(redis_client, endpoint: str, instance_id: str) -> dict | None:
    raw = redis_client.hget(f"{STATUS_KEY_PREFIX}{endpoint}", instance_id)
    return json.loads(raw) if raw else None


async def test_probes_answer_and_generate_loads_on_first_request(app, client, gpt2_endpoint, redis_client):
    assert (await client.request("GET", "/healthz")).json() == {"status": "ok"}
    assert (await client.request("GET", "/readyz")).status == 200
    assert await client.deployments() == []

    response = await client.generate(endpoint=gpt2_endpoint, prompt=PROMPT, max_tokens=12, temperature=0)

    assert response.status == 200, response.body
    body = response.json()
    assert body["endpoint"] == gpt2_endpoint and body["revision"] == 1
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in {"stop", "length"} and choice["text"]
    assert not choice["text"].startswith(PROMPT)
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    [loaded] = await client.deployments()
    assert loaded["endpoint"] == gpt2_endpoint and loaded["state"] == "ready" and loaded["memory_bytes"] > 0
    status = _status(redis_client, gpt2_endpoint, app.config.instance_id)
    assert status["state"] == "ready" and status["revision"] == 1 and status["error"] is None


async def test_greedy_text_matches_hugging_face_generate(client, gpt2_endpoint, gpt2_folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    response = await client.generate(endpoint=gpt2_endpoint, prompt=PROMPT, max_tokens=20, temperature=0)
    tokenizer = AutoTokenizer.from_pretrained(gpt2_folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gpt2_folder, local_files_only=True).eval()
    prompt_ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        output = model.generate(
            input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=20, do_sample=False
        )
    expected = output[0, prompt_ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in expected:
        expected = expected[: expected.index(tokenizer.eos_token_id)]
    assert response.json()["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)


async def test_stream_sends_deltas_then_usage_then_done(client, gpt2_endpoint):
    whole = await client.generate(endpoint=gpt2_endpoint, prompt=PROMPT, max_tokens=16, temperature=0.9, seed=5)
    streamed = await client.generate(
        endpoint=gpt2_endpoint, prompt=PROMPT, max_tokens=16, temperature=0.9, seed=5, stream=True
    )

    assert streamed.status == 200 and streamed.headers["content-type"] == "text/event-stream"
    events = streamed.events()
    assert events[-1] == "[DONE]" and "usage" in events[-2]
    deltas = events[:-2]
    assert len(deltas) > 1 and all(set(event) == {"index", "text", "finish_reason"} for event in deltas)
    assert all(event["finish_reason"] is None for event in deltas[:-1]) and deltas[-1]["finish_reason"]
    assert "".join(event["text"] for event in deltas) == whole.json()["choices"][0]["text"]
    assert events[-2]["usage"] == whole.json()["usage"]


async def test_several_choices_with_a_seed_are_reproducible(client, gpt2_endpoint):
    request = {"endpoint": gpt2_endpoint, "prompt": PROMPT, "max_tokens": 16, "temperature": 1.0, "n": 4, "seed": 11}
    first = (await client.generate(**request)).json()
    second = (await client.generate(**request)).json()
    other_seed = (await client.generate(**{**request, "seed": 12})).json()

    assert [choice["index"] for choice in first["choices"]] == [0, 1, 2, 3]
    assert first["choices"] == second["choices"]
    assert len({choice["text"] for choice in first["choices"]}) > 1
    assert first["choices"] != other_seed["choices"]


async def test_a_seeded_request_gives_the_same_text_alone_and_in_a_busy_batch(client, gpt2_endpoint):
    request = {"endpoint": gpt2_endpoint, "prompt": PROMPT, "max_tokens": 16, "temperature": 1.0, "seed": 99}
    alone = (await client.generate(**request)).json()["choices"][0]["text"]
    neighbours = [
        client.generate(endpoint=gpt2_endpoint, prompt=f"A cat {i}", max_tokens=24, temperature=1.0) for i in range(5)
    ]
    results = await asyncio.gather(*neighbours, client.generate(**request))
    assert results[-1].json()["choices"][0]["text"] == alone


async def test_stop_strings_end_a_choice_without_the_stop_text(client, gpt2_endpoint):
    free = (await client.generate(endpoint=gpt2_endpoint, prompt=PROMPT, max_tokens=24, temperature=0)).json()
    text = free["choices"][0]["text"]
    stop = text.strip().split(" ")[1]  # a word in the middle of the greedy continuation
    stopped = await client.generate(endpoint=gpt2_endpoint, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    choice = stopped.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == text[: text.index(stop)]
    streamed = await client.generate(
        endpoint=gpt2_endpoint, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop], stream=True
    )
    assert "".join(event["text"] for event in streamed.events()[:-2]) == choice["text"]


async def test_concurrent_requests_are_decoded_in_shared_forward_passes(client, gpt2_endpoint):
    await client.generate(endpoint=gpt2_endpoint, prompt=PROMPT, max_tokens=2)  # loaded before counting
    [before] = await client.deployments()

    responses = await asyncio.gather(
        *[
            client.generate(endpoint=gpt2_endpoint, prompt=f"{PROMPT} {i}", max_tokens=24, temperature=0.8)
            for i in range(8)
        ]
    )

    assert all(response.status == 200 for response in responses)
    [after] = await client.deployments()
    forward_passes = after["forward_passes"] - before["forward_passes"]
    # One request alone needs one forward pass per completion token (the prefill yields the first one).
    sequential_passes = sum(response.json()["usage"]["completion_tokens"] for response in responses)
    assert forward_passes < sequential_passes / 2, (forward_passes, sequential_passes)


async def test_deployments_show_where_the_schedulers_time_goes(client, gpt2_endpoint):
    await client.generate(endpoint=gpt2_endpoint, prompt=PROMPT, max_tokens=2)  # loaded before counting
    [before] = await client.deployments()

    responses = await asyncio.gather(
        *[client.generate(endpoint=gpt2_endpoint, prompt=f"{PROMPT} {i}", max_tokens=16) for i in range(6)]
    )

    assert all(response.status == 200 for response in responses)
    [after] = await client.deployments()
    spent = {key: after["scheduler"][key] - before["scheduler"][key] for key in after["scheduler"]}
    # Six requests of up to 16 tokens shared decode steps: more than one row per step on average.
    assert 0 < spent["decode_steps"] < spent["decoded_rows"]
    assert 1 <= spent["prefills"] <= spent["prefilled_rows"] == 6
    parts = ("prefill", "forward", "sampling", "wait", "emit")
    assert all(spent[f"{part}_seconds"] >= 0 for part in parts)
    assert spent["forward_seconds"] > 0 and spent["prefill_seconds"] > 0
    # The parts are disjoint pieces of the scheduler's working time.
    assert sum(spent[f"{part}_seconds"] for part in parts) <= spent["busy_seconds"] + 1e-3
    # And what it runs on (these tests pin SERVING_DTYPE=float32).
    assert (after["device"], after["dtype"], after["kv_cache_dtype"]) == ("cpu", "float32", "float32")


async def test_chat_messages_use_the_deployments_template(app, client, redis_client, upload, gpt2_folder):
    endpoint = new_endpoint()
    await deploy(app, redis_client, deployment_record(endpoint, upload(gpt2_folder), chat_template="chatml"))
    response = await client.generate(
        endpoint=endpoint, messages=[{"role": "user", "content": "Hello there"}], max_tokens=8, temperature=0
    )
    assert response.status == 200, response.body
    assert response.json()["usage"]["prompt_tokens"] > 5


async def test_bad_requests_answer_400_naming_the_parameter(client, gpt2_endpoint):
    too_long = await client.generate(endpoint=gpt2_endpoint, prompt=PROMPT, max_tokens=500)
    assert too_long.status == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    for param, value in [("temperature", -1), ("top_p", 2), ("n", 0), ("max_tokens", "many"), ("stop", [""])]:
        response = await client.generate(endpoint=gpt2_endpoint, prompt=PROMPT, **{param: value})
        assert response.status == 400 and response.json()["error"]["param"] == param, (param, response.body)
    both = await client.generate(endpoint=gpt2_endpoint, prompt=PROMPT, messages=[{"role": "user", "content": "x"}])
    assert both.status == 400
    no_template = await client.generate(endpoint=gpt2_endpoint, messages=[{"role": "user", "content": "x"}])
    assert no_template.status == 400 and no_template.json()["error"]["param"] == "messages"


async def test_unknown_and_stopped_endpoints_answer_404(app, client, gpt2_endpoint, redis_client):
    unknown = await client.generate(endpoint="ep-nothing-here", prompt=PROMPT)
    assert unknown.status == 404 and unknown.json()["error"]["code"] == "endpoint_not_found"

    assert (await client.generate(endpoint=gpt2_endpoint, prompt=PROMPT, max_tokens=2)).status == 200
    record = json.loads(redis_client.hget("serving:deployments", gpt2_endpoint))
    await deploy(app, redis_client, {**record, "state": "stopped"})
    stopped = await client.generate(endpoint=gpt2_endpoint, prompt=PROMPT, max_tokens=2)
    assert stopped.status == 404 and stopped.json()["error"]["code"] == "endpoint_not_found"
    assert await client.deployments() == []
    assert _status(redis_client, gpt2_endpoint, app.config.instance_id)["state"] == "unloaded"


async def test_a_deployment_this_process_has_not_heard_of_yet_is_served_not_refused(
    make_app, redis_client, upload, gpt2_folder
):
    """The web routes to a process as soon as the endpoint is deployed; the process may not have had the registry's
    change message yet (or missed it). It reads the registry again before answering 404."""
    app = make_app(registry_poll_seconds=3600)  # no poll will bring the deployment in during this test
    client = AsgiClient(app)
    await wait_for(lambda: app.service.knows_deployments, what="the first registry read")
    endpoint = new_endpoint()
    record = deployment_record(endpoint, upload(gpt2_folder))
    redis_client.hset("serving:deployments", endpoint, json.dumps(record))  # written, never announced
    assert endpoint not in app.service.manager.deployments

    response = await client.generate(endpoint=endpoint, prompt=PROMPT, max_tokens=2)

    assert response.status == 200, response.json()
    assert (await client.generate(endpoint="ep-nothing-here", prompt=PROMPT)).status == 404


async def test_a_model_that_cannot_load_answers_503_with_the_error(app, client, redis_client):
    endpoint = new_endpoint()
    await deploy(app, redis_client, deployment_record(endpoint, "tenants/1/models/missing"))
    response = await client.generate(endpoint=endpoint, prompt=PROMPT)
    assert response.status == 503 and response.json()["error"]["code"] == "model_unavailable"
    assert "No model files" in response.json()["error"]["message"]
    status = _status(redis_client, endpoint, app.config.instance_id)
    assert status["state"] == "failed" and "No model files" in status["error"]


async def test_the_serving_token_is_required_except_on_probes(make_app, redis_client, upload, gpt2_folder):
    app = make_app(token="s3cret")
    endpoint = new_endpoint()
    await deploy(app, redis_client, deployment_record(endpoint, upload(gpt2_folder)))
    anonymous = AsgiClient(app)
    assert (await anonymous.request("GET", "/healthz")).status == 200
    assert (await anonymous.request("GET", "/readyz")).status == 200
    assert (await anonymous.request("GET", "/v1/deployments")).status == 401
    assert (await anonymous.generate(endpoint=endpoint, prompt=PROMPT)).status == 401
    assert (await AsgiClient(app, token="wrong").generate(endpoint=endpoint, prompt=PROMPT)).status == 401
    assert (
        await AsgiClient(app, token="s3cret").generate(endpoint=endpoint, prompt=PROMPT, max_tokens=2)
    ).status == 200


async def test_classify_returns_labels_from_the_config(app, client, redis_client, upload, classifier_folder):
    endpoint = new_endpoint()
    await deploy(app, redis_client, deployment_record(endpoint, upload(classifier_folder), task="classification"))
    texts = ["I loved it, wonderful", "terrible and broken", "it arrived on a tuesday"]
    responses = await asyncio.gather(
        *[client.request("POST", "/v1/classify", {"endpoint": endpoint, "inputs": [text]}) for text in texts],
        client.request("POST", "/v1/classify", {"endpoint": endpoint, "inputs": texts}),
    )
    assert all(response.status == 200 for response in responses), [r.body for r in responses]
    body = responses[-1].json()
    assert body["endpoint"] == endpoint and body["revision"] == 1 and body["usage"]["prompt_tokens"] > 3
    assert len(body["predictions"]) == 3
    for prediction in body["predictions"]:
        assert set(prediction["scores"]) == {"negative", "neutral", "positive"}
        assert prediction["label"] == max(prediction["scores"], key=prediction["scores"].get)
        assert prediction["score"] == pytest.approx(max(prediction["scores"].values()))
        assert sum(prediction["scores"].values()) == pytest.approx(1.0, abs=1e-4)
    # Requests that arrive together share forward passes.
    [loaded] = await client.deployments()
    assert loaded["forward_passes"] < len(responses)

    not_generative = await client.generate(endpoint=endpoint, prompt=PROMPT)
    assert not_generative.status == 400 and not_generative.json()["error"]["code"] == "not_a_generative_model"


async def test_least_recently_used_model_is_evicted_under_the_memory_budget(
    make_app, redis_client, upload, gpt2_folder
):
    model_bytes = sum(path.stat().st_size for path in gpt2_folder.glob("*.safetensors"))
    app = make_app(memory_budget_bytes=int(model_bytes * 1.5))
    client = AsgiClient(app)
    first, second = new_endpoint(), new_endpoint()
    await deploy(app, redis_client, deployment_record(first, upload(gpt2_folder)))
    await deploy(app, redis_client, deployment_record(second, upload(gpt2_folder)))

    assert (await client.generate(endpoint=first, prompt=PROMPT, max_tokens=2)).status == 200
    assert (await client.generate(endpoint=second, prompt=PROMPT, max_tokens=2)).status == 200

    assert [row["endpoint"] for row in await client.deployments()] == [second]
    assert _status(redis_client, first, app.config.instance_id)["state"] == "unloaded"
    assert (await client.generate(endpoint=first, prompt=PROMPT, max_tokens=2)).status == 200
    assert [row["endpoint"] for row in await client.deployments()] == [first]


async def test_idle_deployments_are_unloaded(app, client, redis_client, upload, gpt2_folder):
    endpoint = new_endpoint()
    await deploy(app, redis_client, deployment_record(endpoint, upload(gpt2_folder), idle_unload_seconds=1))
    assert (await client.generate(endpoint=endpoint, prompt=PROMPT, max_tokens=2)).status == 200
    await wait_for(lambda: not _loaded_revisions(app, endpoint), timeout=20, what="idle unload")
    # The status is written just after the model is dropped.
    await wait_for(
        lambda: _status(redis_client, endpoint, app.config.instance_id)["state"] == "unloaded",
        timeout=5,
        what="the unloaded status",
    )


async def test_min_replicas_loads_eagerly(app, client, redis_client, upload, gpt2_folder):
    endpoint = new_endpoint()
    await deploy(app, redis_client, deployment_record(endpoint, upload(gpt2_folder), min_replicas=1))
    await wait_for(
        lambda: [row["state"] for row in app.service.manager.describe()] == ["ready"], timeout=30, what="eager load"
    )
    # Other tests' apps read the same registry: an eagerly loaded deployment must not stay in it.
    redis_client.hdel("serving:deployments", endpoint)


async def test_hot_swap_under_load_fails_no_request(app, client, redis_client, upload, gpt2_folder):
    endpoint = new_endpoint()
    record = deployment_record(endpoint, upload(gpt2_folder))
    await deploy(app, redis_client, record)
    assert (await client.generate(endpoint=endpoint, prompt=PROMPT, max_tokens=2)).status == 200

    results: list[tuple[int, int | None]] = []
    swapped = asyncio.Event()

    async def keep_asking(worker: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stream = worker % 2 == 0
            response = await client.generate(endpoint=endpoint, prompt=PROMPT, max_tokens=12, stream=stream)
            if response.status != 200:
                results.append((response.status, None))
                continue
            revision = response.json()["revision"] if not stream else None
            results.append((200, revision))
            if swapped.is_set() and revision == 2:
                return
            if stream and swapped.is_set() and _loaded_revisions(app, endpoint) == [2]:
                return

    clients = [asyncio.create_task(keep_asking(worker)) for worker in range(6)]
    await asyncio.sleep(0.5)
    publish(redis_client, {**record, "revision": 2, "model_prefix": upload(gpt2_folder)})
    try:
        await wait_for(
            lambda: _loaded_revisions(app, endpoint) == [2], timeout=60, what="the new revision to serve alone"
        )
    except AssertionError:
        raise AssertionError(app.service.manager.describe()) from None
    swapped.set()
    await asyncio.gather(*clients)

    assert results and all(status == 200 for status, _ in results), results
    revisions = [revision for _, revision in results if revision is not None]
    assert 1 in revisions and 2 in revisions
    await wait_for(
        lambda: (
            _status(redis_client, endpoint, app.config.instance_id)
            == {**_status(redis_client, endpoint, app.config.instance_id), "revision": 2, "state": "ready"}
        ),
        timeout=5,
        what="the new revision's status",
    )


def _loaded_revisions(app, endpoint: str) -> list[int]:
    return sorted(row["revision"] for row in app.service.manager.describe() if row["endpoint"] == endpoint)


async def test_a_process_that_has_not_read_the_registry_sends_requests_elsewhere(
    make_app, storage_dir, monkeypatch, redis_client, upload, gpt2_folder
):
    """Until its first registry read every endpoint would look unknown (404): the 503 carries the header that makes
    the web process try another serving process instead."""
    monkeypatch.setenv("STORAGE_DIR", str(storage_dir))
    from workers.serving.app import NOT_READY_HEADER, ServingApp
    from workers.serving.config import ServingConfig

    starting = ServingApp(ServingConfig.from_env())  # its service not started: the registry never read
    response = await AsgiClient(starting).generate(endpoint=new_endpoint(), prompt=PROMPT)
    assert response.status == 503 and response.json()["error"]["code"] == "serving_not_ready"
    assert response.headers[NOT_READY_HEADER.decode()] == "1"
    assert (await AsgiClient(starting).request("GET", "/readyz")).status == 503


async def test_each_process_keeps_its_own_status_and_liveness_beside_another(
    make_app, redis_client, upload, gpt2_folder
):
    """Two processes side by side: each writes only its own field of the status hash, renews its liveness key on
    every registry poll, rewrites its states (a cleared report comes back) and withdraws its liveness on stop."""
    first, second = make_app(), make_app()
    endpoint = new_endpoint()
    record = deployment_record(endpoint, upload(gpt2_folder))
    await deploy(first, redis_client, record)
    await deploy(second, redis_client, record)
    assert (await AsgiClient(first).generate(endpoint=endpoint, prompt=PROMPT, max_tokens=2)).status == 200
    await wait_for(lambda: (_status(redis_client, endpoint, first.config.instance_id) or {}).get("state") == "ready")
    assert _status(redis_client, endpoint, second.config.instance_id) is None  # it loaded nothing
    for app in (first, second):
        assert redis_client.exists(INSTANCE_KEY_PREFIX + app.config.instance_id)
        assert 0 < redis_client.ttl(INSTANCE_KEY_PREFIX + app.config.instance_id) <= app.service.watcher.alive_seconds
    redis_client.hdel(f"{STATUS_KEY_PREFIX}{endpoint}", first.config.instance_id)
    await wait_for(
        lambda: _status(redis_client, endpoint, first.config.instance_id) is not None, what="the heartbeat's report"
    )
    first.service.stop()
    assert not redis_client.exists(INSTANCE_KEY_PREFIX + first.config.instance_id)
    assert redis_client.exists(INSTANCE_KEY_PREFIX + second.config.instance_id)


async def test_warm_replicas_go_to_the_endpoints_first_live_processes(make_app, redis_client, upload, gpt2_folder):
    """min_replicas 1 with two processes: only the first of the endpoint's rendezvous ranking loads it eagerly (the
    one the web sends its requests to); when that one stops, the other takes the warm replica over."""
    from workers.serving.placement import rendezvous_order

    apps = {url: make_app(advertised_url=url) for url in ("http://serving-a:8100", "http://serving-b:8100")}
    await wait_for(lambda: all(set(apps) <= app.service.manager._live_urls for app in apps.values()), what="peers")
    live = apps["http://serving-a:8100"].service.manager._live_urls  # other live processes of the session count too
    endpoint = next(
        candidate
        for candidate in (new_endpoint() for _ in range(1000))
        if set(rendezvous_order(candidate, live)[:2]) == set(apps)
    )
    first, second = rendezvous_order(endpoint, live)[:2]
    record = deployment_record(endpoint, upload(gpt2_folder), min_replicas=1)
    publish(redis_client, record)
    await wait_for(lambda: _loaded_revisions(apps[first], endpoint) == [1], timeout=30, what="the eager load")
    await asyncio.sleep(1.5)  # a few registry polls: the other process must not load it
    assert _loaded_revisions(apps[second], endpoint) == []

    apps[first].service.stop()
    await wait_for(lambda: _loaded_revisions(apps[second], endpoint) == [1], timeout=30, what="the takeover")
