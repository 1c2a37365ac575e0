"""A streamed completion whose client leaves before Django starts sending the stream: the serving connection is
closed, its in-flight count ends and the request is metered (an async generator that never started runs no
``finally``, so nothing else would). Django's own ASGI handler and async view, a small real HTTP server in place of
serving; no mocks."""

import asyncio
import gc
import json

import pytest
from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIHandler
from django.test import AsyncRequestFactory, override_settings

from apps.endpoints.api.inference import completions
from apps.endpoints.models import EndpointRequest
from apps.endpoints.routing import serving_pool
from tests.apps.endpoints.test_endpoints import (  # noqa: F401 - the autouse fixture gives these tests their Redis db
    _deploy,
    _registry_no_serving_process_watches,
    _succeeded_job,
)

pytestmark = pytest.mark.django_db(transaction=True)

BACKOFF_SECONDS = 5.0


class _SlowServing:
    """Answers every generate request with a stream that sends one event and then waits; notes when the web side
    closes the connection."""

    def __init__(self) -> None:
        self.requests = 0
        self.closed = asyncio.Event()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
        length = next(int(line.split(":")[1]) for line in head.split("\r\n") if line.startswith("content-length:"))
        await reader.readexactly(length)
        self.requests += 1
        event = json.dumps({"index": 0, "text": "Hello", "finish_reason": None})
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
            + f"data: {event}\n\n".encode()
        )
        await writer.drain()
        await reader.read()  # returns when the web side closes the connection
        self.closed.set()
        writer.close()

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
def bot(tenant_a):
    job = _succeeded_job(tenant_a.tenant)
    response = _deploy(tenant_a.api(), name="bot", model=job.public_id)
    assert response.status_code == 200, response.json()
    return response.json()


BODY = json.dumps({"model": "bot", "prompt": "Once upon", "max_tokens": 8, "stream": True}).encode()


async def _client_gone_while_headers_go_out(api_key: str) -> int:
    """One request through Django's ASGI handler whose client disconnects as the response headers are sent."""
    gone = asyncio.Event()
    received_body = False
    statuses: list[int] = []

    async def receive() -> dict:
        nonlocal received_body
        if not received_body:
            received_body = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])
            gone.set()
            await asyncio.sleep(30)  # a peer that is gone: the handler cancels this send

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
            (b"authorization", f"Bearer {api_key}".encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    await asyncio.wait_for(ASGIHandler()(scope, receive, send), 20)
    return statuses[0]


async def _response_dropped_before_iteration(api_key: str) -> int:
    """The view's streaming response is dropped unread, as when the client leaves while middleware still runs."""
    request = AsyncRequestFactory().post(
        "/v1/completions", data=BODY, content_type="application/json", headers={"authorization": f"Bearer {api_key}"}
    )
    response = await completions(request)
    status = response.status_code
    del response
    gc.collect()
    return status


@pytest.mark.parametrize(
    "leave", [_client_gone_while_headers_go_out, _response_dropped_before_iteration], ids=["closed", "dropped"]
)
def test_a_client_gone_before_its_stream_starts_frees_serving_and_is_metered(bot, tenant_a, leave):
    async def scenario() -> None:
        serving = _SlowServing()
        url = await serving.start()
        try:
            with override_settings(SERVING_URL=url, SERVING_FAILURE_BACKOFF_SECONDS=BACKOFF_SECONDS):
                status = await leave(tenant_a.api_key)
                assert status == 200 and serving.requests == 1
                await asyncio.wait_for(serving.closed.wait(), 10)  # the web closed its serving connection
                pool = serving_pool(url, backoff_seconds=BACKOFF_SECONDS)
                for _ in range(100):  # the count ends right after the connection closes
                    if pool.in_flight(url) == 0:
                        break
                    await asyncio.sleep(0.05)
                assert pool.in_flight(url) == 0
                for _ in range(100):
                    rows = await sync_to_async(list)(
                        EndpointRequest.objects.filter(endpoint_public_id=bot["id"]).values_list(
                            "status_code", "error_code", "completion_tokens"
                        )
                    )
                    if rows:
                        break
                    await asyncio.sleep(0.05)
                # Nothing reached the client: metered as a request it closed, with no tokens charged.
                assert rows == [(499, "client_disconnected", 0)]
        finally:
            await serving.stop()

    asyncio.run(scenario())
