"""Websockets through the real ASGI application and the real Redis channel layer: authentication, tenant
isolation, replay after a given event id, and live pushes of exactly the REST API's event objects."""

import asyncio

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from apps.datasets.models import File
from apps.jobs.services import job_create, job_event_record
from tunehouse.asgi import application

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

ORIGIN = (b"origin", b"http://127.0.0.1")


def _job_for(tenant):
    # The file is still being checked, so the job waits in validating_files: no worker is needed here.
    file = File.objects.create(tenant=tenant, filename="t.txt", bytes=1, sha256="0" * 64, storage_key="k")
    return job_create(tenant=tenant, user=None, training_file=file, model="gpt2-tiny")


async def _connect(path: str, headers: list[tuple[bytes, bytes]]):
    communicator = WebsocketCommunicator(application, path, headers=[ORIGIN, (b"host", b"127.0.0.1"), *headers])
    connected, _ = await communicator.connect(timeout=10)
    return communicator, connected


def _bearer(key: str) -> tuple[bytes, bytes]:
    return (b"authorization", f"Bearer {key}".encode())


async def _receive_until_closed_or(communicator, count: int) -> list:
    return [await communicator.receive_json_from(timeout=10) for _ in range(count)]


async def test_api_key_client_gets_snapshot_backlog_then_live_events(tenant_a):
    job = await sync_to_async(_job_for)(tenant_a.tenant)
    communicator, connected = await _connect(f"/ws/fine_tuning/jobs/{job.public_id}/", [_bearer(tenant_a.api_key)])
    assert connected
    snapshot, *backlog = await _receive_until_closed_or(communicator, 3)
    assert snapshot["object"] == "fine_tuning.job" and snapshot["id"] == job.public_id
    assert [event["message"] for event in backlog] == [
        f"Created fine-tuning job: {job.public_id}",
        f"Validating training file: {job.training_file.public_id}",
    ]
    event = await sync_to_async(job_event_record)(job=job, message="step 5", event_type="metrics", data={"step": 5})
    pushed = await communicator.receive_json_from(timeout=10)
    rest = await sync_to_async(
        lambda: (
            Client(HTTP_AUTHORIZATION=f"Bearer {tenant_a.api_key}")
            .get(f"/v1/fine_tuning/jobs/{job.public_id}/events")
            .json()["data"][0]
        )
    )()
    assert pushed == rest and pushed["id"] == event.public_id
    await communicator.disconnect()


async def test_reconnecting_client_replays_only_events_after_its_last_id(tenant_a):
    job = await sync_to_async(_job_for)(tenant_a.tenant)
    first = await sync_to_async(lambda: list(job.events.order_by("id")))()
    communicator, _ = await _connect(
        f"/ws/fine_tuning/jobs/{job.public_id}/?after={first[0].public_id}", [_bearer(tenant_a.api_key)]
    )
    _snapshot, replayed = await _receive_until_closed_or(communicator, 2)
    assert replayed["id"] == first[1].public_id
    assert await communicator.receive_nothing(timeout=0.3)
    await communicator.disconnect()


async def test_other_tenants_job_is_not_found_over_websocket(tenant_a, tenant_b):
    job = await sync_to_async(_job_for)(tenant_a.tenant)
    communicator, _ = await _connect(f"/ws/fine_tuning/jobs/{job.public_id}/", [_bearer(tenant_b.api_key)])
    closed = await communicator.receive_output(timeout=10)
    assert closed == {"type": "websocket.close", "code": 4404}
    # And tenant A's live events never reach tenant B's tenant-wide feed.
    feed, connected = await _connect("/ws/events/", [_bearer(tenant_b.api_key)])
    assert connected
    await sync_to_async(job_event_record)(job=job, message="secret progress")
    assert await feed.receive_nothing(timeout=0.5)
    await feed.disconnect()


async def test_unauthenticated_and_bad_key_are_refused(tenant_a):
    job = await sync_to_async(_job_for)(tenant_a.tenant)
    for headers in ([], [_bearer("th-wrong")]):
        communicator, _ = await _connect(f"/ws/fine_tuning/jobs/{job.public_id}/", headers)
        assert await communicator.receive_output(timeout=10) == {"type": "websocket.close", "code": 4401}


async def test_tenant_feed_receives_its_own_events_and_browser_session_works(tenant_a):
    job = await sync_to_async(_job_for)(tenant_a.tenant)
    browser = Client()
    await sync_to_async(browser.force_login)(tenant_a.owner)
    cookie = f"sessionid={browser.cookies['sessionid'].value}".encode()
    feed, connected = await _connect("/ws/events/", [(b"cookie", cookie)])
    assert connected
    await sync_to_async(job_event_record)(job=job, message="visible to my tenant")
    event = await feed.receive_json_from(timeout=10)
    assert event["message"] == "visible to my tenant" and event["job_id"] == job.public_id
    await feed.send_json_to({"type": "ping"})
    assert await feed.receive_json_from(timeout=10) == {"type": "pong"}
    await feed.disconnect()


async def test_foreign_origin_is_rejected(tenant_a):
    communicator = WebsocketCommunicator(
        application, "/ws/events/", headers=[(b"origin", b"http://evil.example"), _bearer(tenant_a.api_key)]
    )
    connected, _ = await communicator.connect(timeout=10)
    assert not connected
    await asyncio.sleep(0)


async def test_long_backlog_is_replayed_completely_in_order(tenant_a):
    from apps.jobs.models import JobEvent

    job = await sync_to_async(_job_for)(tenant_a.tenant)
    await sync_to_async(JobEvent.objects.bulk_create)(
        [JobEvent(tenant=tenant_a.tenant, job=job, message=f"step {n}") for n in range(1200)]
    )
    communicator, _ = await _connect(f"/ws/fine_tuning/jobs/{job.public_id}/", [_bearer(tenant_a.api_key)])
    _snapshot, *replayed = await _receive_until_closed_or(communicator, 1 + 1202)
    assert [event["message"] for event in replayed[2:]] == [f"step {n}" for n in range(1200)]
    assert len({event["id"] for event in replayed}) == 1202
    assert await communicator.receive_nothing(timeout=0.3)
    await communicator.disconnect()
