"""ServingClient's failover against small real HTTP servers: a refused port, a process still starting (503 with
X-Serving-Not-Ready) and one that answers. No database: the client needs only settings and an endpoint's id."""

import asyncio
import json
from types import SimpleNamespace

import pytest
from django.test import override_settings

from apps.endpoints.inference import ServingClient, ServingError
from apps.endpoints.routing import rendezvous_order, serving_pool, serving_urls
from tunehouse.localrun import free_port


async def _http_server(status: int, body: dict, extra_headers: str = "") -> tuple[asyncio.Server, str, list]:
    """A one-route HTTP/1.1 server answering every request the same; returns it, its URL and the requests' tokens."""
    tokens: list[str] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        headers = {
            name.lower(): value
            for name, value in (line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
        }
        await reader.readexactly(int(headers.get("content-length", "0")))
        tokens.append(headers.get("x-serving-token", ""))
        payload = json.dumps(body).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n"
            f"{extra_headers}connection: close\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", tokens


def _endpoint_ranking_first(url: str, setting: str) -> SimpleNamespace:
    public_id = next(
        candidate
        for candidate in (f"ep-{n}" for n in range(1000))
        if rendezvous_order(candidate, serving_urls(setting))[0] == url
    )
    return SimpleNamespace(public_id=public_id, max_replicas=1)


async def _close(*servers: asyncio.Server) -> None:
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio
async def test_requests_pass_over_refused_and_starting_processes_and_remember_them():
    starting, starting_url, starting_tokens = await _http_server(
        503, {"error": {"code": "serving_not_ready", "message": "starting"}}, "x-serving-not-ready: 1\r\n"
    )
    working, working_url, working_tokens = await _http_server(200, {"choices": [], "revision": 1})
    refused_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    setting = ",".join([refused_url, starting_url, working_url])
    # An endpoint that ranks the working process last, so the request meets both failures first.
    public_id = next(
        candidate
        for candidate in (f"ep-{n}" for n in range(1000))
        if rendezvous_order(candidate, serving_urls(setting))[-1] == working_url
    )
    endpoint = SimpleNamespace(public_id=public_id, max_replicas=1)
    try:
        with override_settings(SERVING_URL=setting, SERVING_TOKEN="tok", SERVING_FAILURE_BACKOFF_SECONDS=30):
            for _ in range(3):
                assert (await ServingClient(endpoint).post_json("/v1/generate", {}))["revision"] == 1
            pool = serving_pool(setting, backoff_seconds=30)
            assert pool.is_up(working_url) and not pool.is_up(refused_url) and not pool.is_up(starting_url)
            assert [pool.in_flight(url) for url in pool.urls] == [0, 0, 0]
            # Each failed process was tried once: afterwards it waits out its backoff behind the live one.
            assert starting_tokens == ["tok"] and working_tokens == ["tok"] * 3
    finally:
        await _close(starting, working)


@pytest.mark.asyncio
async def test_no_process_reachable_is_a_503_for_the_caller():
    setting = f"http://127.0.0.1:{free_port()},http://127.0.0.1:{free_port()}"
    endpoint = SimpleNamespace(public_id="ep-nowhere", max_replicas=1)
    with (
        override_settings(SERVING_URL=setting, SERVING_FAILURE_BACKOFF_SECONDS=30),
        pytest.raises(ServingError) as raised,
    ):
        await ServingClient(endpoint).post_json("/v1/generate", {})
    assert raised.value.status_code == 503 and raised.value.error_code == "serving_unavailable"


@pytest.mark.asyncio
async def test_a_connection_broken_below_httpx_fails_over_instead_of_a_500(monkeypatch):
    """When a process is killed while a connection to it opens, the error can come from below httpx (anyio raised
    AttributeError on a socket already gone, in CI): it must count as one more unreachable process."""
    import httpx

    working, working_url, _ = await _http_server(200, {"choices": [], "revision": 1})
    broken_url = f"http://127.0.0.1:{free_port()}"
    setting = ",".join([broken_url, working_url])
    original_send = httpx.AsyncClient.send

    async def send(client, request, **kwargs):
        if str(request.url).startswith(broken_url):
            raise AttributeError("'NoneType' object has no attribute 'getpeername'")
        return await original_send(client, request, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "send", send)
    try:
        with override_settings(SERVING_URL=setting, SERVING_FAILURE_BACKOFF_SECONDS=30):
            answer = await ServingClient(_endpoint_ranking_first(broken_url, setting)).post_json("/v1/x", {})
            assert answer["revision"] == 1
            pool = serving_pool(setting, backoff_seconds=30)
            assert not pool.is_up(broken_url) and pool.is_up(working_url)
            assert [pool.in_flight(url) for url in pool.urls] == [0, 0]
    finally:
        await _close(working)


async def _sse_server(events: list[dict], *, complete: bool) -> tuple[asyncio.Server, str, list]:
    """A streaming server like serving's: 200 with chunked SSE, then ``events`` one chunk each; ``complete`` ends the
    stream with `[DONE]` and the last chunk, else the connection is cut there (a process killed mid-answer)."""
    requests: list[str] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        length = next(
            int(line.split(": ", 1)[1]) for line in head.split("\r\n") if line.lower().startswith("content-length")
        )
        await reader.readexactly(length)
        requests.append(head.split(" ")[1])
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for data in [*(json.dumps(event) for event in events), *(["[DONE]"] if complete else [])]:
            chunk = f"data: {data}\n\n".encode()
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        if complete:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.transport.abort() if not complete else writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", requests


@pytest.mark.asyncio
async def test_a_stream_cut_before_its_first_event_goes_to_the_next_process():
    """A process killed after its headers but before its first event has sent the caller nothing: the request goes
    to the next process, whose events the caller gets, the first one included, and the cut one is marked down."""
    cut, cut_url, cut_requests = await _sse_server([], complete=False)
    working, working_url, working_requests = await _sse_server([{"text": "Once"}, {"text": " upon"}], complete=True)
    setting = ",".join([cut_url, working_url])
    try:
        with override_settings(SERVING_URL=setting, SERVING_FAILURE_BACKOFF_SECONDS=30):
            stream = await ServingClient(_endpoint_ranking_first(cut_url, setting)).open_stream("/v1/generate", {})
            try:
                assert [event["text"] async for event in stream.events()] == ["Once", " upon"]
            finally:
                await stream.close()
            pool = serving_pool(setting, backoff_seconds=30)
            assert not pool.is_up(cut_url) and pool.is_up(working_url)
            assert [pool.in_flight(url) for url in pool.urls] == [0, 0]
        assert cut_requests == ["/v1/generate"] and working_requests == ["/v1/generate"]
    finally:
        await _close(cut, working)


@pytest.mark.asyncio
async def test_a_stream_cut_after_its_first_event_is_not_sent_again():
    """Once an event came back it may have reached the caller: a cut after it is the caller's error, and no other
    process is asked (the request is never answered twice)."""
    import httpx

    cut, cut_url, _ = await _sse_server([{"text": "Once"}], complete=False)
    other, other_url, other_requests = await _sse_server([{"text": "never"}], complete=True)
    setting = ",".join([cut_url, other_url])
    try:
        with override_settings(SERVING_URL=setting, SERVING_FAILURE_BACKOFF_SECONDS=30):
            stream = await ServingClient(_endpoint_ranking_first(cut_url, setting)).open_stream("/v1/generate", {})
            received = []
            with pytest.raises(httpx.HTTPError):
                async for event in stream.events():
                    received.append(event["text"])
            await stream.close()
            assert received == ["Once"]
            pool = serving_pool(setting, backoff_seconds=30)
            assert [pool.in_flight(url) for url in pool.urls] == [0, 0]
        assert other_requests == []
    finally:
        await _close(cut, other)


@pytest.mark.asyncio
async def test_a_plain_answer_cut_before_its_end_goes_to_the_next_process():
    """The same for a non-streamed answer: it is read whole before the caller sees any of it."""
    cut, cut_url, _ = await _sse_server([{"partial": True}], complete=False)
    working, working_url, _ = await _http_server(200, {"choices": [], "revision": 1})
    setting = ",".join([cut_url, working_url])
    try:
        with override_settings(SERVING_URL=setting, SERVING_FAILURE_BACKOFF_SECONDS=30):
            answer = await ServingClient(_endpoint_ranking_first(cut_url, setting)).post_json("/v1/generate", {})
            assert answer["revision"] == 1
            assert not serving_pool(setting, backoff_seconds=30).is_up(cut_url)
    finally:
        await _close(cut, working)
