"""Driving the serving ASGI app in-process, and writing the deployment registry the way the web process does."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from workers.serving.app import ServingApp
from workers.serving.registry import CHANGED_CHANNEL, DEPLOYMENTS_KEY


@dataclass
class AsgiResponse:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[Any]:
        """The ``data:`` payloads of an event stream, ``[DONE]`` as the string."""
        payloads = []
        for block in self.body.decode().split("\n\n"):
            if block.startswith("data: "):
                data = block[len("data: ") :]
                payloads.append(data if data == "[DONE]" else json.loads(data))
        return payloads


class AsgiClient:
    """Calls the ASGI application directly, as uvicorn would, without a socket."""

    def __init__(self, app: ServingApp, token: str = "") -> None:
        self.app = app
        self.token = token

    async def request(self, method: str, path: str, body: Any = None, *, token: str | None = None) -> AsgiResponse:
        token = self.token if token is None else token
        headers = [(b"content-type", b"application/json")]
        if token:
            headers.append((b"x-serving-token", token.encode()))
        scope = {"type": "http", "method": method, "path": path, "headers": headers, "query_string": b""}
        payload = json.dumps(body).encode() if body is not None else b""
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": payload, "more_body": False}
            await asyncio.Event().wait()  # the client never disconnects
            raise AssertionError

        messages: list[dict] = []

        async def send(message: dict) -> None:
            messages.append(message)

        await self.app(scope, receive, send)
        start = messages[0]
        return AsgiResponse(
            status=start["status"],
            body=b"".join(message.get("body", b"") for message in messages[1:]),
            headers={key.decode(): value.decode() for key, value in start.get("headers", [])},
        )

    async def generate(self, **body: Any) -> AsgiResponse:
        return await self.request("POST", "/v1/generate", body)

    async def deployments(self) -> list[dict]:
        return (await self.request("GET", "/v1/deployments")).json()["data"]


def deployment_record(endpoint: str, model_prefix: str, *, revision: int = 1, **overrides: Any) -> dict:
    record = {
        "endpoint": endpoint,
        "tenant_id": 1,
        "revision": revision,
        "task": "causal_lm",
        "model_prefix": model_prefix,
        "adapter": False,
        "base_model_dir": None,
        "chat_template": None,
        "generation_defaults": {"max_tokens": 16, "temperature": 0.7, "top_p": 1.0},
        "max_context": 128,
        "idle_unload_seconds": 900,
        "min_replicas": 0,
        "state": "active",
    }
    record.update(overrides)
    return record


def publish(client: redis.Redis, record: dict) -> None:
    client.hset(DEPLOYMENTS_KEY, record["endpoint"], json.dumps(record))
    client.publish(CHANGED_CHANNEL, record["endpoint"])


async def wait_for(predicate, *, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def deploy(app: ServingApp, client: redis.Redis, record: dict) -> None:
    """Publish a deployment and wait until this app's registry copy has it."""
    publish(client, record)
    manager = app.service.manager

    def seen() -> bool:
        current = manager.deployments.get(record["endpoint"])
        return current is not None and current.revision == record["revision"] and current.state == record["state"]

    await wait_for(seen, what=f"registry update of {record['endpoint']}")
