"""Endpoints without generation: deploy/update/stop/delete and the Redis registry, status from serving's reports,
REST validation and key scoping, limits (429 + Retry-After), metering rows, usage and /metrics."""

import json

import pytest
from django.contrib.auth import get_user_model
from django.test import Client, override_settings
from django.utils import timezone
from rest_framework.test import APIClient

from apps.datasets.models import File
from apps.endpoints.models import Endpoint, EndpointRequest
from apps.endpoints.registry import (
    DEPLOYMENTS_CHANGED_CHANNEL,
    DEPLOYMENTS_KEY,
    INSTANCE_KEY_PREFIX,
    STATUS_KEY_PREFIX,
    redis_client,
)
from apps.endpoints.services import endpoint_request_record, endpoint_status_refresh
from apps.jobs.models import FineTuningJob, JobCheckpoint, JobStatus
from apps.jobs.serialization import fine_tuned_model_name
from apps.jobs.services import job_create
from apps.tenancy.models import ApiKey, Membership, Role

pytestmark = pytest.mark.django_db(transaction=True)

# A Redis database of its own: the session's real serving process (started by other tests) watches the registry in
# database 0 and would try to load these tests' model-less deployments, reporting failures of its own into the
# status hashes these tests write by hand.
_PRIVATE_REGISTRY_DATABASE = 3


@pytest.fixture(autouse=True)
def _registry_no_serving_process_watches(settings):
    import os
    from urllib.parse import urlsplit, urlunsplit

    settings.REDIS_URL = urlunsplit(urlsplit(os.environ["REDIS_URL"])._replace(path=f"/{_PRIVATE_REGISTRY_DATABASE}"))
    redis_client().flushdb()
    yield
    redis_client().flushdb()


def _succeeded_job(tenant, *, model: str = "gpt2-tiny", suffix: str = "") -> FineTuningJob:
    file = File.objects.create(tenant=tenant, filename="t.txt", bytes=1, sha256="c" * 64, storage_key="k")
    job = job_create(tenant=tenant, user=None, training_file=file, model=model)
    FineTuningJob.objects.filter(pk=job.pk).update(
        status=JobStatus.SUCCEEDED,
        fine_tuned_model=fine_tuned_model_name(job),
        model_storage_prefix=f"tenants/{tenant.pk}/models/{job.public_id}",
        suffix=suffix,
    )
    job.refresh_from_db()
    return job


def _deploy(client, **body):
    return client.post("/v1/endpoints", body, format="json")


def _registry(endpoint_id: str) -> dict:
    return json.loads(redis_client().hget(DEPLOYMENTS_KEY, endpoint_id))


def test_deploy_registers_the_model_for_serving_and_announces_it(tenant_a):
    job = _succeeded_job(tenant_a.tenant)
    pubsub = redis_client().pubsub()
    pubsub.subscribe(DEPLOYMENTS_CHANGED_CHANNEL)
    pubsub.get_message(timeout=1)  # the subscription confirmation
    response = _deploy(tenant_a.api(), name="support-bot", model=job.fine_tuned_model)
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["id"].startswith("ep-") and body["status"] == "ready" and body["revision"] == 1
    entry = _registry(body["id"])
    assert entry["endpoint"] == body["id"] and entry["tenant_id"] == tenant_a.tenant.pk
    assert entry["model_prefix"] == job.model_storage_prefix and entry["state"] == "active"
    assert entry["adapter"] is False and entry["base_model_dir"] is None and entry["max_context"] > 0
    assert entry["generation_defaults"] == {"max_tokens": 128, "temperature": 0.7, "top_p": 1.0}
    message = pubsub.get_message(timeout=2)
    assert message and message["data"] == body["id"]


def test_deploy_refusals(tenant_a, tenant_b):
    api = tenant_a.api()
    job = _succeeded_job(tenant_a.tenant)
    unfinished = _succeeded_job(tenant_a.tenant)
    FineTuningJob.objects.filter(pk=unfinished.pk).update(status=JobStatus.RUNNING)
    assert _deploy(api, name="x", model=unfinished.public_id).json()["error"]["code"] == "model_not_ready"
    assert _deploy(api, name="Bad Name", model=job.public_id).json()["error"]["param"] == "name"
    assert _deploy(api, name="gpt2-tiny", model=job.public_id).status_code == 400  # a catalog id
    assert _deploy(api, name="bot", model=job.public_id).status_code == 200
    clash = _deploy(api, name="bot", model=job.public_id)
    assert clash.status_code == 400 and clash.json()["error"]["code"] == "endpoint_name_taken"
    other = _succeeded_job(tenant_b.tenant)
    assert _deploy(api, name="b", model=other.public_id).status_code == 404
    checkpoint_b = JobCheckpoint.objects.create(tenant=tenant_b.tenant, job=other, step_number=1, storage_prefix="p")
    response = _deploy(api, name="c", model=job.public_id, checkpoint=checkpoint_b.public_id)
    assert response.status_code == 404 and response.json()["error"]["param"] == "checkpoint"
    bad = _deploy(api, name="d", model=job.public_id, generation_defaults={"temperature": 9})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "generation_defaults.temperature"
    assert _deploy(api, name="e", model=job.public_id, min_replicas=3, max_replicas=1).status_code == 400


def test_update_redeploys_a_new_revision_then_stop_and_delete(tenant_a):
    api = tenant_a.api()
    job = _succeeded_job(tenant_a.tenant)
    checkpoint = JobCheckpoint.objects.create(
        tenant=tenant_a.tenant, job=job, step_number=5, storage_prefix=f"tenants/{tenant_a.tenant.pk}/ckpt/5"
    )
    endpoint_id = _deploy(api, name="bot", model=job.public_id).json()["id"]
    path = f"/v1/endpoints/{endpoint_id}"
    updated = api.post(
        path, {"checkpoint": checkpoint.public_id, "generation_defaults": {"max_tokens": 64}}, format="json"
    )
    assert updated.status_code == 200 and updated.json()["revision"] == 2
    entry = _registry(endpoint_id)
    assert entry["revision"] == 2 and entry["model_prefix"] == checkpoint.storage_prefix
    assert entry["generation_defaults"]["max_tokens"] == 64
    # Scale only: same revision.
    assert api.post(path, {"min_replicas": 1}, format="json").json()["revision"] == 2
    stopped = api.post(path, {"state": "stopped"}, format="json").json()
    assert stopped["status"] == "stopped" and _registry(endpoint_id)["state"] == "stopped"
    assert api.post(path, {"state": "active"}, format="json").json()["status"] == "deploying"  # min_replicas 1
    assert api.delete(path).json()["deleted"] is True
    assert redis_client().hget(DEPLOYMENTS_KEY, endpoint_id) is None
    assert api.get(path).status_code == 404


def test_status_follows_serving_reports_for_the_current_revision(tenant_a):
    job = _succeeded_job(tenant_a.tenant)
    endpoint_id = _deploy(tenant_a.api(), name="bot", model=job.public_id, min_replicas=1).json()["id"]
    endpoint = Endpoint.objects.get(public_id=endpoint_id)
    assert endpoint.status == "deploying"
    key = STATUS_KEY_PREFIX + endpoint_id
    for instance in ("old", "i1", "i2"):  # live serving instances (their liveness keys are set)
        redis_client().set(INSTANCE_KEY_PREFIX + instance, "1", ex=60)
    redis_client().hset(key, "old", json.dumps({"revision": 0, "state": "ready"}))
    assert endpoint_status_refresh(endpoint=endpoint).status == "deploying"  # another revision's report
    redis_client().hset(key, "i1", json.dumps({"revision": 1, "state": "failed", "error": "out of memory"}))
    endpoint = endpoint_status_refresh(endpoint=endpoint)
    assert endpoint.status == "failed" and endpoint.error["message"] == "out of memory"
    redis_client().hset(key, "i2", json.dumps({"revision": 1, "state": "ready"}))
    assert tenant_a.api().get(f"/v1/endpoints/{endpoint_id}").json()["status"] == "ready"


def test_status_counts_only_live_serving_instances(tenant_a):
    """Several serving processes report side by side; a killed one never takes its "ready" back, so its report
    stops counting (and is removed) once its liveness key expires."""
    job = _succeeded_job(tenant_a.tenant)
    endpoint_id = _deploy(tenant_a.api(), name="bot", model=job.public_id, min_replicas=1).json()["id"]
    endpoint = Endpoint.objects.get(public_id=endpoint_id)
    key = STATUS_KEY_PREFIX + endpoint_id
    redis_client().hset(key, "dead", json.dumps({"revision": 1, "state": "ready"}))
    assert endpoint_status_refresh(endpoint=endpoint).status == "deploying"
    assert redis_client().hget(key, "dead") is None
    redis_client().set(INSTANCE_KEY_PREFIX + "live", "1", ex=60)
    redis_client().hset(key, "live", json.dumps({"revision": 1, "state": "loading"}))
    assert endpoint_status_refresh(endpoint=endpoint).status == "deploying"
    redis_client().hset(key, "live", json.dumps({"revision": 1, "state": "ready"}))
    assert endpoint_status_refresh(endpoint=endpoint).status == "ready"
    redis_client().delete(INSTANCE_KEY_PREFIX + "live")  # it stopped
    assert endpoint_status_refresh(endpoint=endpoint).status == "deploying"


def test_a_key_limited_to_some_endpoints_gets_404_for_the_others(tenant_a):
    job = _succeeded_job(tenant_a.tenant)
    first = Endpoint.objects.get(public_id=_deploy(tenant_a.api(), name="one", model=job.public_id).json()["id"])
    second = _deploy(tenant_a.api(), name="two", model=job.public_id).json()["id"]
    key = ApiKey.objects.for_tenant(tenant_a.tenant).get()
    first.api_keys.add(key)
    api = tenant_a.api()
    assert [e["id"] for e in api.get("/v1/endpoints").json()["data"]] == [first.public_id]
    assert api.get(f"/v1/endpoints/{second}").status_code == 404
    response = api.post("/v1/completions", {"model": "two", "prompt": "hi"}, format="json")
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def _signed_in(user) -> APIClient:
    client = APIClient()
    client.force_login(user)
    return client


def test_owners_limit_keys_to_endpoints_through_the_api_and_nothing_else_changes_on_a_refusal(tenant_a, tenant_b):
    job = _succeeded_job(tenant_a.tenant)
    owner = _signed_in(tenant_a.owner)
    first = _deploy(owner, name="one", model=job.public_id).json()["id"]
    second = _deploy(owner, name="two", model=job.public_id).json()["id"]
    limited = ApiKey.objects.for_tenant(tenant_a.tenant).get()
    other_key = ApiKey.objects.for_tenant(tenant_b.tenant).get()

    # Another tenant's key, an unknown one or a malformed list: not found / invalid, and the endpoint is unchanged.
    for key_ids, status, code in (
        ([other_key.public_id], 404, "not_found"),
        (["key-nope"], 404, "not_found"),
        ("all", 400, "invalid_request_error"),
    ):
        response = owner.post(f"/v1/endpoints/{first}", {"api_keys": key_ids, "name": "renamed"}, format="json")
        error = response.json()["error"]
        assert response.status_code == status and error["param"] == "api_keys", response.json()
        assert code in (error["code"], error["type"])
    assert owner.get(f"/v1/endpoints/{first}").json()["name"] == "one"

    scoped = owner.post(f"/v1/endpoints/{first}", {"api_keys": [limited.public_id]}, format="json")
    assert scoped.status_code == 200 and scoped.json()["api_keys"] == [limited.public_id]
    key = tenant_a.api()
    assert [e["id"] for e in key.get("/v1/endpoints").json()["data"]] == [first]
    assert key.get(f"/v1/endpoints/{second}").status_code == 404
    Endpoint.objects.update(status="ready")  # as serving would report; the limited key lists only its endpoint
    assert [m["id"] for m in key.get("/v1/models").json()["data"] if m.get("endpoint")] == ["one"]

    # The limited key (member rights) cannot widen its own reach, nor can a member; nothing changes.
    widened = key.post(f"/v1/endpoints/{first}", {"api_keys": []}, format="json")
    assert widened.status_code == 403 and widened.json()["error"]["code"] == "permission_denied"
    member = get_user_model().objects.create_user("member@acme.test", "member@acme.test", "pw")
    Membership.objects.create(tenant=tenant_a.tenant, user=member, role=Role.MEMBER)
    assert _signed_in(member).post(f"/v1/endpoints/{first}", {"api_keys": []}, format="json").status_code == 403
    assert key.get(f"/v1/endpoints/{second}").status_code == 404

    # A revoked key cannot be named; clearing the list gives the key every endpoint again.
    assert owner.post(f"/v1/endpoints/{first}", {"api_keys": []}, format="json").json()["api_keys"] == []
    assert key.get(f"/v1/endpoints/{second}").status_code == 200
    ApiKey.objects.filter(pk=limited.pk).update(revoked_at=timezone.now())
    revoked = owner.post(f"/v1/endpoints/{second}", {"api_keys": [limited.public_id]}, format="json")
    assert revoked.status_code == 404 and revoked.json()["error"]["param"] == "api_keys"


def test_the_endpoint_page_shows_which_keys_are_limited_to_it(tenant_a):
    job = _succeeded_job(tenant_a.tenant)
    owner = _signed_in(tenant_a.owner)
    endpoint_id = _deploy(owner, name="one", model=job.public_id).json()["id"]
    key = ApiKey.objects.for_tenant(tenant_a.tenant).get()
    owner.post(f"/v1/endpoints/{endpoint_id}", {"api_keys": [key.public_id]}, format="json")
    page = owner.get(f"/endpoints/{endpoint_id}/").content.decode()
    assert f'value="{key.public_id}" checked' in page and 'id="keys-submit"' in page
    member = get_user_model().objects.create_user("member@acme.test", "member@acme.test", "pw")
    Membership.objects.create(tenant=tenant_a.tenant, user=member, role=Role.MEMBER)
    read_only = _signed_in(member).get(f"/endpoints/{endpoint_id}/").content.decode()
    assert "Only owners and admins can change this." in read_only and 'id="keys-submit"' not in read_only


def test_inference_bounds_are_checked_and_metered_before_serving(tenant_a):
    job = _succeeded_job(tenant_a.tenant)
    _deploy(tenant_a.api(), name="bot", model=job.public_id)
    api = tenant_a.api()
    too_long = api.post("/v1/completions", {"model": "bot", "prompt": "hi", "max_tokens": 100_000}, format="json")
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"
    with override_settings(INFERENCE_MAX_PROMPT_CHARS=10):
        long_prompt = api.post("/v1/completions", {"model": "bot", "prompt": "x" * 11}, format="json")
    assert long_prompt.json()["error"]["code"] == "context_length_exceeded"
    bad_n = api.post(
        "/v1/chat/completions", {"model": "bot", "messages": [{"role": "user", "content": "x"}], "n": 99}, format="json"
    )
    assert bad_n.status_code == 400 and bad_n.json()["error"]["param"] == "n"
    no_serving = api.post(
        "/v1/chat/completions", {"model": "bot", "messages": [{"role": "user", "content": "x"}]}, format="json"
    )
    with override_settings(SERVING_URL=""):
        no_serving = api.post("/v1/completions", {"model": "bot", "prompt": "x"}, format="json")
    assert no_serving.status_code == 503 and no_serving.json()["error"]["code"] == "serving_unavailable"
    rows = list(EndpointRequest.objects.order_by("id").values_list("kind", "status_code"))
    assert rows[0] == ("completion", 400) and ("chat", 400) in rows and rows[-1] == ("completion", 503)


def test_stopped_endpoint_answers_409_and_classifier_predict_shape(tenant_a):
    job = _succeeded_job(tenant_a.tenant)
    endpoint_id = _deploy(tenant_a.api(), name="bot", model=job.public_id).json()["id"]
    tenant_a.api().post(f"/v1/endpoints/{endpoint_id}", {"state": "stopped"}, format="json")
    response = tenant_a.api().post("/v1/completions", {"model": "bot", "prompt": "x"}, format="json")
    assert response.status_code == 409 and response.json()["error"]["code"] == "endpoint_stopped"
    predict = tenant_a.api().post(f"/v1/endpoints/{endpoint_id}/predict", {"input": "x"}, format="json")
    assert predict.status_code in (400, 409)


def test_rate_limit_answers_429_with_retry_after(tenant_a):
    job = _succeeded_job(tenant_a.tenant)
    _deploy(tenant_a.api(), name="bot", model=job.public_id)
    limits = {"acme": {"requests_per_minute_per_key": 2}}
    with override_settings(INFERENCE_TENANT_LIMITS=limits, SERVING_URL=""):
        codes = [
            tenant_a.api().post("/v1/completions", {"model": "bot", "prompt": "x"}, format="json") for _ in range(3)
        ]
    assert [r.status_code for r in codes] == [503, 503, 429]
    # Minute limits slide: one of the two slides out within the rest of this minute and half of the next.
    assert codes[2].json()["error"]["type"] == "rate_limit_error" and 1 <= int(codes[2]["Retry-After"]) <= 90
    with override_settings(INFERENCE_TENANT_LIMITS={"acme": {"tokens_per_day": 0}}):
        quota = tenant_a.api().post("/v1/completions", {"model": "bot", "prompt": "x"}, format="json")
    assert quota.status_code == 429 and quota.json()["error"]["code"] == "insufficient_quota"
    assert EndpointRequest.objects.filter(status_code=429).count() == 2


def test_usage_metrics_and_models_list(tenant_a):
    job = _succeeded_job(tenant_a.tenant)
    endpoint = Endpoint.objects.get(public_id=_deploy(tenant_a.api(), name="bot", model=job.public_id).json()["id"])
    for latency, status in ((100, 200), (300, 200), (50, 500)):
        endpoint_request_record(
            tenant=tenant_a.tenant,
            endpoint=endpoint,
            endpoint_public_id=endpoint.public_id,
            api_key=None,
            kind="completion",
            status_code=status,
            prompt_tokens=3,
            completion_tokens=7,
            latency_ms=latency,
        )
    usage = tenant_a.api().get(f"/v1/endpoints/{endpoint.public_id}/usage?window=24h").json()
    assert usage["requests"] == 3 and usage["errors"] == 1 and usage["total_tokens"] == 30
    assert usage["latency_ms"] == {"p50": 100.0, "p95": 300.0} and usage["bucket"] == "hour"
    assert sum(point["requests"] for point in usage["series"]) == 3
    assert tenant_a.api().get(f"/v1/endpoints/{endpoint.public_id}/usage?window=2y").status_code == 400
    text = Client().get("/metrics").content.decode()
    labels = f'endpoint="{endpoint.public_id}",kind="completion",tenant="acme"'
    assert f"tunehouse_inference_requests_total{{{labels}}} 3.0" in text
    assert "tunehouse_inference_latency_seconds_bucket" in text
    assert "tunehouse_inference_completion_tokens_total" in text
    models = tenant_a.api().get("/v1/models").json()["data"]
    assert {"id": "bot", "owned_by": "acme", "endpoint": endpoint.public_id}.items() <= next(
        m for m in models if m["id"] == "bot"
    ).items()
