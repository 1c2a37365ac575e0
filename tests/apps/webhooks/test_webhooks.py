"""Webhooks with real parts: a real HTTP receiver on loopback, the real Celery worker and Redis broker, and the
official `openai` package verifying the signatures (the proof that receivers written for OpenAI accept ours)."""

import json
import time
from datetime import timedelta

import openai
import pytest
from django.contrib.auth import get_user_model
from django.db import transaction
from django.test import Client
from django.utils import timezone

from apps.datasets.models import File
from apps.jobs.models import FineTuningJob, JobPhase, JobStatus
from apps.jobs.services import job_create
from apps.tenancy.models import Membership, Role
from apps.webhooks.models import DeliveryStatus, WebhookDelivery, WebhookEndpoint
from apps.webhooks.services import (
    retry_delay_seconds,
    webhook_deliveries_redispatch_overdue,
    webhook_delivery_attempt,
    webhooks_job_finished,
)
from tests.polling import wait_for
from tunehouse.localrun import free_port


def _job_for(tenant) -> FineTuningJob:
    # The file is still being checked, so the job waits in validating_files: no training runs.
    file = File.objects.create(tenant=tenant, filename="t.txt", bytes=1, sha256="0" * 64, storage_key="k")
    return job_create(tenant=tenant, user=None, training_file=file, model="gpt2-tiny")


def _finish_job(job: FineTuningJob, status: str) -> None:
    """What the job services do when a job ends: the terminal status and the webhooks in one transaction."""
    with transaction.atomic():
        FineTuningJob.objects.filter(pk=job.pk).update(status=status, phase=JobPhase.DONE, finished_at=timezone.now())
        job.refresh_from_db()
        webhooks_job_finished(job=job)


def _create_endpoint(client, url: str, **fields) -> dict:
    response = client.post("/v1/webhooks", {"url": url, **fields}, format="json")
    assert response.status_code == 200, response.content
    return response.json()


def _wait_for_outcome(client, endpoint_id: str, timeout: float = 60) -> dict:
    body = wait_for(
        client,
        f"/v1/webhooks/{endpoint_id}/deliveries",
        lambda body: bool(body["data"]) and body["data"][0]["status"] != "pending",
        timeout=timeout,
    )
    return body["data"][0]


def _assert_openai_error(response, *, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.django_db(transaction=True)
def test_failed_post_is_retried_then_delivered_and_verifies_with_the_openai_sdk(
    tenant_a, webhook_workers, webhook_receiver
):
    receiver = webhook_receiver(500, 200)
    api = tenant_a.api()
    endpoint = _create_endpoint(api, receiver.url)
    secret = endpoint["signing_secret"]
    assert secret.startswith("whsec_")
    job = _job_for(tenant_a.tenant)

    _finish_job(job, JobStatus.SUCCEEDED)

    delivery = _wait_for_outcome(api, endpoint["id"])
    assert delivery["status"] == "delivered" and delivery["attempts"] == 2 and delivery["last_status_code"] == 200
    first, second = receiver.received()
    assert first.path == second.path == "/hooks/tunehouse"
    # The same webhook-id on the retry, so a receiver can drop a redelivery.
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == delivery["id"]
    client = openai.OpenAI(api_key="x", webhook_secret=secret)
    for request in (first, second):
        event = client.webhooks.unwrap(request.body, request.headers)
        assert type(event).__name__ == "FineTuningJobSucceededWebhookEvent"
        assert event.type == "fine_tuning.job.succeeded" and event.data.id == job.public_id
    payload = json.loads(second.body)
    assert payload == {
        "id": payload["id"],
        "object": "event",
        "created_at": int(FineTuningJob.objects.get(pk=job.pk).finished_at.timestamp()),
        "type": "fine_tuning.job.succeeded",
        "data": {"id": job.public_id},
    }
    assert payload["id"].startswith("evt_") and delivery["event"] == payload
    # The check is not vacuous: a changed body or another secret fails it.
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(second.body.replace(job.public_id.encode(), b"ftjob-forged"), second.headers)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.verify_signature(second.body, second.headers, secret=WebhookEndpoint().secret)


@pytest.mark.django_db(transaction=True)
def test_client_error_fails_the_delivery_at_once(tenant_a, webhook_workers, webhook_receiver):
    receiver = webhook_receiver(410)
    api = tenant_a.api()
    endpoint = _create_endpoint(api, receiver.url, event_types=["fine_tuning.job.failed"])

    _finish_job(_job_for(tenant_a.tenant), JobStatus.FAILED)

    delivery = _wait_for_outcome(api, endpoint["id"])
    assert delivery["status"] == "failed" and delivery["attempts"] == 1 and delivery["last_status_code"] == 410
    assert delivery["event_type"] == "fine_tuning.job.failed"
    time.sleep(1.5)  # longer than a retry would wait here
    assert len(receiver.received()) == 1


@pytest.mark.django_db(transaction=True)
def test_lost_task_is_sent_again_by_the_overdue_sweep(tenant_a, webhook_workers, webhook_receiver):
    receiver = webhook_receiver(204)
    endpoint = WebhookEndpoint.objects.create(tenant=tenant_a.tenant, url=receiver.url)
    # A delivery whose task never reached the broker (or was lost with it): due an hour ago, still pending.
    delivery = WebhookDelivery.objects.create(
        tenant=tenant_a.tenant,
        endpoint=endpoint,
        event_type="fine_tuning.job.cancelled",
        payload={"id": "evt_x", "object": "event", "created_at": 1, "type": "fine_tuning.job.cancelled", "data": {}},
        next_attempt_at=timezone.now() - timedelta(hours=1),
    )

    assert webhook_deliveries_redispatch_overdue(grace_seconds=60) == 1

    body = _wait_for_outcome(tenant_a.api(), endpoint.public_id)
    assert body["id"] == delivery.public_id and body["status"] == "delivered" and body["last_status_code"] == 204
    assert len(receiver.received()) == 1


def test_only_enabled_subscribed_endpoints_of_the_jobs_tenant_get_a_delivery(db, tenant_a, tenant_b):
    everything = WebhookEndpoint.objects.create(tenant=tenant_a.tenant, url="https://a.example/all")
    WebhookEndpoint.objects.create(tenant=tenant_a.tenant, url="https://a.example/off", enabled=False)
    WebhookEndpoint.objects.create(
        tenant=tenant_a.tenant, url="https://a.example/failures", event_types=["fine_tuning.job.failed"]
    )
    WebhookEndpoint.objects.create(tenant=tenant_b.tenant, url="https://b.example/all")
    job = _job_for(tenant_a.tenant)

    webhooks_job_finished(job=job)  # still validating its files: not an outcome, nothing to send
    assert not WebhookDelivery.objects.exists()

    _finish_job(job, JobStatus.CANCELLED)

    delivery = WebhookDelivery.objects.get()
    assert delivery.endpoint == everything and delivery.tenant_id == tenant_a.tenant.pk
    assert delivery.event_type == "fine_tuning.job.cancelled" and delivery.status == DeliveryStatus.PENDING
    assert delivery.payload["data"] == {"id": job.public_id}


def test_network_errors_are_retried_with_backoff_until_the_last_attempt(db, tenant_a, settings):
    settings.WEBHOOK_RETRY_BASE_SECONDS = 60
    settings.WEBHOOK_MAX_ATTEMPTS = 2
    closed_port = free_port()  # nothing listens there: the connection is refused
    endpoint = WebhookEndpoint.objects.create(tenant=tenant_a.tenant, url=f"http://127.0.0.1:{closed_port}/hook")
    delivery = WebhookDelivery.objects.create(
        tenant=tenant_a.tenant, endpoint=endpoint, event_type="fine_tuning.job.succeeded", payload={"x": 1}
    )

    assert webhook_delivery_attempt(delivery_id=delivery.pk) == 60
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.PENDING and delivery.attempts == 1
    assert "Connection" in delivery.last_error and delivery.last_status_code is None
    assert delivery.next_attempt_at > timezone.now() + timedelta(seconds=50)

    # A duplicate task arriving before the retry is due does nothing.
    assert webhook_delivery_attempt(delivery_id=delivery.pk) is None
    delivery.refresh_from_db()
    assert delivery.attempts == 1

    WebhookDelivery.objects.filter(pk=delivery.pk).update(next_attempt_at=timezone.now())
    assert webhook_delivery_attempt(delivery_id=delivery.pk) is None  # the last attempt: given up
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.FAILED and delivery.attempts == 2


def test_retry_delays_grow_five_fold_up_to_an_hour(settings):
    settings.WEBHOOK_RETRY_BASE_SECONDS = 5
    assert [retry_delay_seconds(attempts_made=n) for n in range(1, 8)] == [5, 25, 125, 625, 3125, 3600, 3600]


def test_delivered_delivery_is_not_sent_again(db, tenant_a, webhook_receiver):
    receiver = webhook_receiver(200)
    endpoint = WebhookEndpoint.objects.create(tenant=tenant_a.tenant, url=receiver.url)
    delivery = WebhookDelivery.objects.create(
        tenant=tenant_a.tenant,
        endpoint=endpoint,
        event_type="fine_tuning.job.succeeded",
        payload={"x": 1},
        status=DeliveryStatus.DELIVERED,
        attempts=1,
    )
    assert webhook_delivery_attempt(delivery_id=delivery.pk) is None
    assert receiver.received() == []
    delivery.refresh_from_db()
    assert delivery.attempts == 1


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/hook",
        "http://localhost/hook",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://10.1.2.3/hook",
        "http://192.168.1.10/hook",
        "http://169.254.169.254/latest/meta-data",  # the cloud metadata service
        "http://0.0.0.0/hook",
    ],
)
def test_private_addresses_are_refused_when_private_networks_are_off(db, tenant_a, settings, url):
    settings.WEBHOOK_ALLOW_PRIVATE_NETWORKS = False
    error = _assert_openai_error(tenant_a.api().post("/v1/webhooks", {"url": url}, format="json"), status=400)
    assert error["param"] == "url" and error["code"] == "invalid_url"
    assert not WebhookEndpoint.objects.exists()


def test_public_address_is_accepted_when_private_networks_are_off(db, tenant_a, settings):
    settings.WEBHOOK_ALLOW_PRIVATE_NETWORKS = False
    endpoint = _create_endpoint(tenant_a.api(), "https://93.184.215.14/hook")
    assert endpoint["url"] == "https://93.184.215.14/hook"


def test_private_address_is_refused_again_when_sending(db, tenant_a, settings, webhook_receiver):
    receiver = webhook_receiver(200)
    endpoint = WebhookEndpoint.objects.create(tenant=tenant_a.tenant, url=receiver.url)  # allowed when created
    delivery = WebhookDelivery.objects.create(
        tenant=tenant_a.tenant, endpoint=endpoint, event_type="fine_tuning.job.succeeded", payload={"x": 1}
    )
    settings.WEBHOOK_ALLOW_PRIVATE_NETWORKS = False

    assert webhook_delivery_attempt(delivery_id=delivery.pk) is None

    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.FAILED and "private address" in delivery.last_error
    assert receiver.received() == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "url"),
        ({"url": "ftp://example.com/hook"}, "url"),
        ({"url": "not a url"}, "url"),
        ({"url": "https://user:password@example.com/hook"}, "url"),
        ({"url": "https://example.com:99999/hook"}, "url"),
        ({"url": "https://example.com/hook", "event_types": ["fine_tuning.job.exploded"]}, "event_types"),
        ({"url": "https://example.com/hook", "event_types": []}, "event_types"),
        ({"url": "https://example.com/hook", "event_types": "fine_tuning.job.failed"}, "event_types"),
    ],
)
def test_bad_input_is_a_400_in_openai_shape(db, tenant_a, body, param):
    _assert_openai_error(tenant_a.api().post("/v1/webhooks", body, format="json"), status=400, param=param)
    assert not WebhookEndpoint.objects.exists()


def test_secret_is_shown_only_at_creation_and_endpoints_can_be_listed_and_deleted(db, tenant_a):
    api = tenant_a.api()
    created = _create_endpoint(api, "https://example.com/hook", name="CI", event_types=["fine_tuning.job.failed"])
    assert created["object"] == "webhook_endpoint" and created["id"].startswith("whep-")
    assert created["event_types"] == ["fine_tuning.job.failed"] and created["enabled"] and created["name"] == "CI"
    secret = created["signing_secret"]
    assert created["signing_secret_hint"].endswith(secret[-4:])

    listed = api.get("/v1/webhooks").json()
    fetched = api.get(f"/v1/webhooks/{created['id']}").json()
    assert [item["id"] for item in listed["data"]] == [created["id"]]
    for shown in (listed["data"][0], fetched):
        assert "signing_secret" not in shown and secret not in json.dumps(shown)

    deleted = api.delete(f"/v1/webhooks/{created['id']}")
    assert deleted.json() == {"id": created["id"], "object": "webhook_endpoint.deleted", "deleted": True}
    _assert_openai_error(api.get(f"/v1/webhooks/{created['id']}"), status=404)


def test_another_tenant_cannot_see_or_delete_an_endpoint(db, tenant_a, tenant_b):
    endpoint = _create_endpoint(tenant_a.api(), "https://a.example/hook")
    api_b = tenant_b.api()
    assert api_b.get("/v1/webhooks").json()["data"] == []
    for response in (
        api_b.get(f"/v1/webhooks/{endpoint['id']}"),
        api_b.delete(f"/v1/webhooks/{endpoint['id']}"),
        api_b.get(f"/v1/webhooks/{endpoint['id']}/deliveries"),
    ):
        _assert_openai_error(response, status=404)
    assert WebhookEndpoint.objects.filter(public_id=endpoint["id"]).exists()


def test_a_viewer_can_read_but_not_create_or_delete(db, tenant_a):
    endpoint = _create_endpoint(tenant_a.api(), "https://a.example/hook")
    viewer = get_user_model().objects.create_user(username="viewer@acme.test", password="x-long-password")
    Membership.objects.create(user=viewer, tenant=tenant_a.tenant, role=Role.VIEWER)
    browser = Client()
    browser.force_login(viewer)

    assert browser.get("/v1/webhooks").json()["data"][0]["id"] == endpoint["id"]
    created = browser.post("/v1/webhooks", {"url": "https://a.example/other"}, content_type="application/json")
    _assert_openai_error(created, status=403)
    _assert_openai_error(browser.delete(f"/v1/webhooks/{endpoint['id']}"), status=403)
    assert WebhookEndpoint.objects.count() == 1


def test_deliveries_are_listed_newest_first_in_cursor_pages(db, tenant_a):
    endpoint = WebhookEndpoint.objects.create(tenant=tenant_a.tenant, url="https://a.example/hook")
    deliveries = [
        WebhookDelivery.objects.create(
            tenant=tenant_a.tenant, endpoint=endpoint, event_type="fine_tuning.job.succeeded", payload={"n": n}
        )
        for n in range(3)
    ]
    api = tenant_a.api()
    path = f"/v1/webhooks/{endpoint.public_id}/deliveries"

    first = api.get(path, {"limit": 2}).json()
    rest = api.get(path, {"limit": 2, "after": first["last_id"]}).json()

    assert [item["id"] for item in first["data"] + rest["data"]] == [d.public_id for d in reversed(deliveries)]
    assert first["has_more"] and not rest["has_more"]
    assert first["data"][0]["object"] == "webhook_endpoint.delivery" and first["data"][0]["status"] == "pending"
