"""Websockets through the real ASGI application and the real Redis channel layer: authentication, tenant
isolation, replay after a given event id, and live pushes of exactly the REST API's event objects."""

import asyncio
import contextlib
import json

import pytest
import pytest_asyncio
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from apps.datasets.models import File
from apps.jobs.services import job_cancel, job_create, job_event_record
from apps.tenancy.services import api_key_create
from tunehouse.asgi import application

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

ORIGIN = (b"origin", b"http://127.0.0.1")


def _job_for(tenant):
    # The file is still being checked, so the job waits in validating_files: no worker is needed here.
    file = File.objects.create(tenant=tenant, filename="t.txt", bytes=1, sha256="0" * 64, storage_key="k")
    return job_create(tenant=tenant, user=None, training_file=file, model="gpt2-tiny")


_opened: list[WebsocketCommunicator] = []


@pytest_asyncio.fixture(autouse=True)
async def _every_socket_closed():
    """Each test's application instances end with the test: a consumer left running (a refused connection included)
    would otherwise be cancelled mid-await when the test's event loop closes, which can hang the teardown."""
    yield
    while _opened:
        communicator = _opened.pop()
        with contextlib.suppress(Exception):
            await communicator.disconnect(timeout=2)


def _communicator(path: str, headers: list[tuple[bytes, bytes]]) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(application, path, headers=headers)
    _opened.append(communicator)
    return communicator


async def _connect(path: str, headers: list[tuple[bytes, bytes]]):
    communicator = _communicator(path, [ORIGIN, (b"host", b"127.0.0.1"), *headers])
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


async def test_an_inference_only_key_is_refused_and_a_read_only_key_watches(tenant_a):
    job = await sync_to_async(_job_for)(tenant_a.tenant)

    def key(permissions: str) -> str:
        return api_key_create(tenant=tenant_a.tenant, user=None, name=permissions, permissions=permissions).secret

    inference_key, read_only_key = await sync_to_async(key)("inference"), await sync_to_async(key)("read_only")
    for path in (f"/ws/fine_tuning/jobs/{job.public_id}/", "/ws/events/"):
        communicator, _ = await _connect(path, [_bearer(inference_key)])
        assert await communicator.receive_output(timeout=10) == {"type": "websocket.close", "code": 4403}
    watcher, connected = await _connect(f"/ws/fine_tuning/jobs/{job.public_id}/", [_bearer(read_only_key)])
    assert connected
    assert (await watcher.receive_json_from(timeout=10))["object"] == "fine_tuning.job"
    await watcher.disconnect()


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
    communicator = _communicator("/ws/events/", [(b"origin", b"http://evil.example"), _bearer(tenant_a.api_key)])
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


def _event_json_in_order(tenant) -> list[dict]:
    from apps.jobs.models import JobEvent
    from apps.jobs.serialization import event_to_json

    events = JobEvent.objects.for_tenant(tenant).select_related("job").order_by("id")
    return [event_to_json(event, job_public_id=event.job.public_id) for event in events]


async def test_tenant_feed_replays_every_event_of_the_tenant_after_the_given_id_then_goes_live(tenant_a):
    first_job = await sync_to_async(_job_for)(tenant_a.tenant)
    second_job = await sync_to_async(_job_for)(tenant_a.tenant)
    await sync_to_async(job_event_record)(job=first_job, message="first job, later")
    written = await sync_to_async(_event_json_in_order)(tenant_a.tenant)
    assert len(written) == 5  # two per job at creation, one more

    feed, connected = await _connect(f"/ws/events/?after={written[1]['id']}", [_bearer(tenant_a.api_key)])
    assert connected
    replayed = await _receive_until_closed_or(feed, 3)

    # Both jobs' events, in the order they were written, as the very objects the REST API returns.
    assert replayed == written[2:]
    assert {event["job_id"] for event in replayed} == {first_job.public_id, second_job.public_id}
    rest = await sync_to_async(
        lambda: (
            Client(HTTP_AUTHORIZATION=f"Bearer {tenant_a.api_key}")
            .get(f"/v1/fine_tuning/jobs/{first_job.public_id}/events")
            .json()["data"][0]
        )
    )()
    assert replayed[-1] == rest
    assert await feed.receive_nothing(timeout=0.3)
    live = await sync_to_async(job_event_record)(job=second_job, message="live after the replay")
    assert (await feed.receive_json_from(timeout=10))["id"] == live.public_id
    await feed.disconnect()


async def test_tenant_feed_replay_is_bounded_and_says_where_to_resume(tenant_a, monkeypatch):
    from apps.jobs import consumers
    from apps.jobs.models import JobEvent

    monkeypatch.setattr(consumers, "TENANT_REPLAY_LIMIT", 4)
    job = await sync_to_async(_job_for)(tenant_a.tenant)
    await sync_to_async(JobEvent.objects.bulk_create)(
        [JobEvent(tenant=tenant_a.tenant, job=job, message=f"step {n}") for n in range(6)]
    )
    written = await sync_to_async(_event_json_in_order)(tenant_a.tenant)

    feed, _ = await _connect(f"/ws/events/?after={written[0]['id']}", [_bearer(tenant_a.api_key)])
    *first_page, marker = await _receive_until_closed_or(feed, 5)
    assert first_page == written[1:5]
    assert marker == {"type": "replay.truncated", "last_id": written[4]["id"]}
    await feed.disconnect()

    feed, _ = await _connect(f"/ws/events/?after={marker['last_id']}", [_bearer(tenant_a.api_key)])
    assert await _receive_until_closed_or(feed, 3) == written[5:]
    assert await feed.receive_nothing(timeout=0.3)
    await feed.disconnect()


async def test_client_messages_cannot_subscribe_to_another_tenants_events(tenant_a, tenant_b):
    from apps.jobs.realtime import job_group, tenant_group

    job_a = await sync_to_async(_job_for)(tenant_a.tenant)
    job_b = await sync_to_async(_job_for)(tenant_b.tenant)
    a_event_id = await sync_to_async(lambda: job_a.events.order_by("id").first().public_id)()
    a_names = [tenant_group(tenant_a.tenant.pk), job_group(tenant_a.tenant.pk, job_a.public_id), job_a.public_id]

    # A's job over B's key: not found, as before.
    refused, _ = await _connect(f"/ws/fine_tuning/jobs/{job_a.public_id}/", [_bearer(tenant_b.api_key)])
    assert await refused.receive_output(timeout=10) == {"type": "websocket.close", "code": 4404}

    # B's own feed, resuming "after" one of A's event ids: that id is not B's, so B gets its own events only.
    feed, _ = await _connect(f"/ws/events/?after={a_event_id}", [_bearer(tenant_b.api_key)])
    replayed = await _receive_until_closed_or(feed, 2)
    assert {event["job_id"] for event in replayed} == {job_b.public_id}
    own_job, _ = await _connect(f"/ws/fine_tuning/jobs/{job_b.public_id}/", [_bearer(tenant_b.api_key)])
    await _receive_until_closed_or(own_job, 3)  # its snapshot and two events

    attempts = [
        *({"subscribe": name} for name in a_names),
        *({"type": "subscribe", "group": name} for name in a_names),
        {"type": "websocket.join", "groups": a_names},
        {"type": "job.event", "job_id": job_a.public_id},
    ]
    for socket in (feed, own_job):
        for attempt in attempts:
            await socket.send_json_to(attempt)
        await socket.send_to(text_data=a_names[0])  # not even JSON
        await socket.send_to(bytes_data=a_names[1].encode())
        replies = await _receive_until_closed_or(socket, len(attempts) + 2)
        assert all(reply["type"] == "error" and reply["error"]["code"] == "unsupported_message" for reply in replies)
        assert not any(name in json.dumps(replies) for name in a_names)

    # A's job now emits events and changes status: none of it reaches B's sockets.
    await sync_to_async(job_event_record)(job=job_a, message="tenant A's secret progress")
    await sync_to_async(job_cancel)(tenant=tenant_a.tenant, job=job_a, user=None)
    assert await feed.receive_nothing(timeout=0.5)
    assert await own_job.receive_nothing(timeout=0.1)
    # The sockets still work for what is B's own.
    await sync_to_async(job_event_record)(job=job_b, message="B's own progress")
    for socket in (feed, own_job):
        assert (await socket.receive_json_from(timeout=10))["message"] == "B's own progress"
        await socket.disconnect()
