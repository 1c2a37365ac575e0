"""Inference limits as data: per-key caps and per-tenant limits set through the API (and staff's route), enforced
in real Redis by reservation; the 429/400 answers and x-ratelimit-* headers. Serving is left unset here (503 after
admission), which is enough for admission, refusals and giving back; answers with real token counts are in
test_inference_with_serving.py."""

import threading
import time

import pytest
from django.contrib.auth import get_user_model
from django.test import override_settings
from rest_framework.test import APIClient

from apps.endpoints import limits
from apps.endpoints.inference import prompt_token_bound
from apps.endpoints.limits import RateLimited, inference_reserve, inference_settle, inference_windows
from apps.endpoints.models import EndpointRequest
from apps.endpoints.registry import model_context_length, redis_client
from apps.tenancy.models import ApiKey, Membership, Role
from tests.apps.endpoints.test_endpoints import (  # noqa: F401 - the autouse fixture gives these tests their Redis db
    _deploy,
    _registry_no_serving_process_watches,
    _succeeded_job,
)

pytestmark = pytest.mark.django_db(transaction=True)

RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)


def _signed_in(user) -> APIClient:
    client = APIClient()
    client.force_login(user)
    return client


def _key_client(secret: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def _complete(client, **body):
    return client.post("/v1/completions", {"model": "bot", "prompt": "x", "max_tokens": 8, **body}, format="json")


@pytest.fixture
def bot(tenant_a):
    """A deployed endpoint named "bot"; with SERVING_URL unset every admitted request answers 503."""
    job = _succeeded_job(tenant_a.tenant)
    endpoint = _deploy(tenant_a.api(), name="bot", model=job.public_id).json()
    with override_settings(SERVING_URL=""):
        yield endpoint


def _worst_case(tenant, prompt: str = "x", max_tokens: int = 8) -> int:
    from apps.endpoints.models import Endpoint

    endpoint = Endpoint.objects.for_tenant(tenant).get(name="bot")
    bound = prompt_token_bound([prompt], context_length=model_context_length(endpoint), max_tokens=max_tokens)
    return bound + max_tokens


def test_a_keys_caps_apply_to_that_key_only(tenant_a, bot):
    owner = _signed_in(tenant_a.owner)
    capped = owner.post("/v1/api_keys", {"name": "capped", "requests_per_minute": 2}, format="json")
    assert capped.status_code == 201 and capped.json()["requests_per_minute"] == 2
    assert capped.json()["tokens_per_minute"] is None and capped.json()["key"].startswith("th-")
    capped_key = _key_client(capped.json()["key"])
    sibling = tenant_a.api()

    assert [_complete(capped_key).status_code for _ in range(3)] == [503, 503, 429]
    # The sibling key of the same tenant has its own window: the capped key's exhaustion does not touch it.
    assert [_complete(sibling).status_code for _ in range(3)] == [503, 503, 503]

    # Token caps of a key: a request whose worst case alone exceeds the key's tokens per minute can never pass.
    worst = _worst_case(tenant_a.tenant)
    key_id = capped.json()["id"]
    updated = owner.post(
        f"/v1/api_keys/{key_id}", {"requests_per_minute": None, "tokens_per_minute": worst - 1}, format="json"
    )
    assert updated.status_code == 200 and updated.json()["tokens_per_minute"] == worst - 1
    too_large = _complete(capped_key)
    assert too_large.status_code == 400
    error = too_large.json()["error"]
    assert error["code"] == "request_too_large" and error["param"] == "max_tokens" and "max_tokens" in error["message"]
    assert _complete(capped_key, max_tokens=4).status_code == 503  # a smaller worst case fits
    assert _complete(sibling).status_code == 503


def test_tenant_limits_set_by_staff_apply_on_the_next_request(tenant_a, bot):
    staff = get_user_model().objects.create_user("ops@platform.test", "ops@platform.test", "pw", is_staff=True)
    path = f"/v1/organizations/{tenant_a.tenant.slug}/limits"
    # The tenant's owner is not staff: the route does not exist for them.
    owner_view = _signed_in(tenant_a.owner).post(path, {"requests_per_minute": 100000}, format="json")
    assert owner_view.status_code == 404 and owner_view.json()["error"]["code"] == "unknown_url"

    assert [_complete(tenant_a.api()).status_code for _ in range(2)] == [503, 503]
    changed = _signed_in(staff).post(path, {"requests_per_minute": 3}, format="json")
    assert changed.status_code == 200
    assert (
        changed.json()["stored"]["requests_per_minute"] == 3 and changed.json()["effective"]["requests_per_minute"] == 3
    )
    # Two requests already counted in this minute: one more fits, then the tenant's own limit refuses.
    assert [_complete(tenant_a.api()).status_code for _ in range(2)] == [503, 429]
    refused = _complete(tenant_a.api())
    assert "3 requests per minute for your organization" in refused.json()["error"]["message"]

    back = _signed_in(staff).post(path, {"requests_per_minute": None}, format="json")
    assert back.json()["effective"]["requests_per_minute"] == 1200  # the platform default again
    assert _complete(tenant_a.api()).status_code == 503

    bad = _signed_in(staff).post(path, {"tokens_per_day": 0}, format="json")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens_per_day"


def test_a_refusal_carries_retry_after_and_rate_headers_and_charges_nothing(tenant_a, bot):
    tenant_a.tenant.tokens_per_minute = _worst_case(tenant_a.tenant) * 2
    tenant_a.tenant.save()
    key = ApiKey.objects.for_tenant(tenant_a.tenant).get()
    # Another request's reservation still holds most of the minute's tokens (its answer is not back yet).
    held = inference_reserve(tenant=tenant_a.tenant, api_key=key, tokens=_worst_case(tenant_a.tenant) + 1)

    refused = _complete(tenant_a.api())
    assert refused.status_code == 429
    assert (
        refused.json()["error"]["type"] == "rate_limit_error"
        and refused.json()["error"]["code"] == "rate_limit_exceeded"
    )
    # The held tokens count until they have slid out of the last 60 seconds: at most the rest of this minute and the
    # next one.
    assert 1 <= int(refused["Retry-After"]) <= 120
    assert all(refused.has_header(name) for name in RATE_HEADERS)
    assert refused["x-ratelimit-limit-tokens"] == str(_worst_case(tenant_a.tenant) * 2)
    assert int(refused["x-ratelimit-remaining-tokens"]) == _worst_case(tenant_a.tenant) - 1
    assert refused["x-ratelimit-reset-tokens"].endswith("s")

    inference_settle(held, used_tokens=1)  # that answer came back using 1 token: the rest is free again
    admitted = _complete(tenant_a.api())
    assert admitted.status_code == 503 and all(admitted.has_header(name) for name in RATE_HEADERS)
    # The refused request was not counted: 1 request held + this one.
    assert int(admitted["x-ratelimit-remaining-requests"]) == 600 - 2
    assert EndpointRequest.objects.filter(status_code=429).count() == 1


def test_the_daily_quota_refuses_with_insufficient_quota_until_the_day_ends(tenant_a, bot):
    tenant_a.tenant.tokens_per_day = _worst_case(tenant_a.tenant)
    tenant_a.tenant.save()
    key = ApiKey.objects.for_tenant(tenant_a.tenant).get()
    inference_reserve(tenant=tenant_a.tenant, api_key=key, tokens=1)  # held, never settled
    refused = _complete(tenant_a.api())
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    seconds_to_midnight_utc = 86_400 - time.time() % 86_400
    assert abs(int(refused["Retry-After"]) - seconds_to_midnight_utc) <= 2


def test_unused_reservations_are_given_back_so_later_requests_fit(tenant_a, bot):
    worst = _worst_case(tenant_a.tenant)
    # Room for one worst case at a time: without giving back, the second request would be refused.
    tenant_a.tenant.tokens_per_minute = worst * 2 - 1
    tenant_a.tenant.save()
    assert [_complete(tenant_a.api()).status_code for _ in range(5)] == [503] * 5  # serving failed: all given back

    key = ApiKey.objects.for_tenant(tenant_a.tenant).get()
    first = inference_reserve(tenant=tenant_a.tenant, api_key=key, tokens=worst)
    inference_settle(first, used_tokens=3)
    inference_settle(first, used_tokens=3)  # settling twice gives back once
    second = inference_reserve(tenant=tenant_a.tenant, api_key=key, tokens=worst)  # 3 + worst fits
    assert second.tokens == worst
    minute_key = next(k for k in first.token_keys if ":tenant:" in k and ":tpm:" in k)
    assert int(redis_client().get(minute_key)) == 3 + worst


def test_concurrent_reservations_never_exceed_a_small_quota(tenant_a):
    tenant_a.tenant.tokens_per_minute = 1000
    tenant_a.tenant.save()
    key = ApiKey.objects.for_tenant(tenant_a.tenant).get()
    start = threading.Barrier(24)
    admitted, refused = [], []
    lock = threading.Lock()

    def ask():
        start.wait()
        try:
            inference_reserve(tenant=tenant_a.tenant, api_key=key, tokens=300)
        except Exception as error:  # noqa: BLE001 - the refusal is the finding
            with lock:
                refused.append(error)
        else:
            with lock:
                admitted.append(1)

    threads = [threading.Thread(target=ask) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == 3  # 3 × 300 ≤ 1000 < 4 × 300, however the 24 callers interleave
    assert len(refused) == 21 and all(error.status_code == 429 for error in refused)


def test_key_limits_through_the_api_need_an_owner_or_admin(tenant_a, tenant_b):
    owner = _signed_in(tenant_a.owner)
    key_id = ApiKey.objects.for_tenant(tenant_a.tenant).get().public_id
    member = get_user_model().objects.create_user("member@acme.test", "member@acme.test", "pw")
    Membership.objects.create(tenant=tenant_a.tenant, user=member, role=Role.MEMBER)
    as_member = _signed_in(member)
    assert as_member.get("/v1/api_keys").status_code == 200
    denied = as_member.post(f"/v1/api_keys/{key_id}", {"tokens_per_day": 1_000_000}, format="json")
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    assert as_member.post("/v1/api_keys", {"name": "mine"}, format="json").status_code == 403
    # A key acts with member rights: it cannot raise (or lift) its own caps.
    assert tenant_a.api().post(f"/v1/api_keys/{key_id}", {"tokens_per_day": None}, format="json").status_code == 403
    assert ApiKey.objects.get(public_id=key_id).tokens_per_day is None

    other_tenants_key = ApiKey.objects.for_tenant(tenant_b.tenant).get().public_id
    for call in (owner.get, owner.delete):
        assert call(f"/v1/api_keys/{other_tenants_key}").status_code == 404
    missing = owner.post(f"/v1/api_keys/{other_tenants_key}", {"tokens_per_day": 5}, format="json")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"

    admin = get_user_model().objects.create_user("admin@acme.test", "admin@acme.test", "pw")
    Membership.objects.create(tenant=tenant_a.tenant, user=admin, role=Role.ADMIN)
    allowed = _signed_in(admin).post(f"/v1/api_keys/{key_id}", {"tokens_per_day": 1000}, format="json")
    assert allowed.status_code == 200 and allowed.json()["tokens_per_day"] == 1000


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("requests_per_minute", 0),
        ("tokens_per_minute", -5),
        ("tokens_per_day", "lots"),
        ("tokens_per_day", 1.5),
        ("requests_per_minute", True),
        ("tokens_per_minute", 2**40),
    ],
)
def test_invalid_limit_values_answer_400_naming_the_field(tenant_a, field, value):
    owner = _signed_in(tenant_a.owner)
    key_id = ApiKey.objects.for_tenant(tenant_a.tenant).get().public_id
    for response in (
        owner.post("/v1/api_keys", {"name": "bad", field: value}, format="json"),
        owner.post(f"/v1/api_keys/{key_id}", {field: value}, format="json"),
    ):
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == field and field in error["message"] and error["type"] == "invalid_request_error"
    assert not ApiKey.objects.filter(name="bad").exists()
    assert getattr(ApiKey.objects.get(public_id=key_id), field) is None
    unknown = owner.post(f"/v1/api_keys/{key_id}", {"tokens_per_hour": 5}, format="json")
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "tokens_per_hour"


def test_windows_combine_the_keys_caps_with_the_tenants_limits(tenant_a):
    key = ApiKey.objects.for_tenant(tenant_a.tenant).get()
    key.tokens_per_day = 50
    with override_settings(INFERENCE_TENANT_LIMITS={"acme": {"tokens_per_day": 7000, "tokens_per_minute": 900}}):
        tenant_a.tenant.tokens_per_minute = 800  # the database wins over INFERENCE_TENANT_LIMITS
        windows = {
            (w.scope, w.unit, w.seconds): w.limit for w in inference_windows(tenant=tenant_a.tenant, api_key=key)
        }
    assert windows == {
        ("key", "requests", 60): 600,
        ("key", "tokens", 86_400): 50,
        ("tenant", "requests", 60): 1200,
        ("tenant", "tokens", 60): 800,
        ("tenant", "tokens", 86_400): 7000,
    }


def test_minute_limits_slide_so_a_burst_across_the_minute_boundary_cannot_pass_twice_the_limit(tenant_a, monkeypatch):
    tenant_a.tenant.requests_per_minute = 10
    tenant_a.tenant.save()
    key = ApiKey.objects.for_tenant(tenant_a.tenant).get()
    minute = (int(time.time()) // 60 + 5) * 60  # a minute boundary of the future: no counter exists there yet
    now = {"t": minute - 5.0}
    monkeypatch.setattr(limits, "clock", lambda: now["t"])

    def burst() -> tuple[int, RateLimited]:
        admitted = 0
        while True:
            try:
                inference_reserve(tenant=tenant_a.tenant, api_key=key, tokens=1)
            except RateLimited as refusal:
                return admitted, refusal
            admitted += 1

    # Ten in the last five seconds of a minute: the eleventh waits until one of them has slid out. That takes the
    # 5 s left of this minute, then a tenth of the next (the ten requests' share decays over its 60 s).
    admitted, refusal = burst()
    assert admitted == 10 and refusal.retry_after == 5 + 6
    assert refusal.headers["x-ratelimit-remaining-requests"] == "0"

    # With fixed windows ten more would pass right after the boundary. Sliding, they still count.
    now["t"] = minute + 5.0
    assert burst()[0] == 0
    now["t"] = minute + 7.0  # 53/60 of the ten left: room for one
    assert burst()[0] == 1
    now["t"] = minute + 30.0  # half of the ten, plus the one: room for four more
    admitted, refusal = burst()
    assert admitted == 4 and refusal.error_code == "rate_limit_exceeded"
    # Within any 60 seconds no more than the limit (give or take the decaying share): 10 + 1 + 4 over 35 s here,
    # against 20 that fixed windows let through in the 10 s around the boundary.
    now["t"] = minute + 120.0
    assert burst()[0] == 10
