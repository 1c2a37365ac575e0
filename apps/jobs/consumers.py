"""Websockets: a job's live event log, and a tenant-wide feed. Both push exactly the REST API's JSON objects."""

import json
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from .realtime import job_group, tenant_group
from .selectors import job_events_after, job_get, tenant_events_after
from .serialization import event_to_json, job_to_json

# Close codes in the 4000 range mirror HTTP: the client learns why without a response body.
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404


class _TenantConsumer(AsyncJsonWebsocketConsumer):
    groups_joined: list[str]

    async def connect(self):
        self.groups_joined = []
        self.tenant_context = self.scope.get("tenant_context")
        await self.accept()
        if self.tenant_context is None:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        if self.tenant_context.inference_only:  # an inference-only API key does not watch jobs
            await self.close(code=CLOSE_FORBIDDEN)
            return
        await self.on_authenticated()

    async def on_authenticated(self):
        raise NotImplementedError

    async def join(self, group: str):
        await self.channel_layer.group_add(group, self.channel_name)
        self.groups_joined.append(group)

    async def disconnect(self, code):
        for group in getattr(self, "groups_joined", []):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        # Malformed or binary frames get the same answer as any other unknown message instead of crashing the
        # consumer (channels' JSON consumer raises on them).
        try:
            content = json.loads(text_data) if text_data is not None else None
        except ValueError:
            content = None
        await self.receive_json(content)

    async def receive_json(self, content, **kwargs):
        """The only client message is a ping, so clients can detect a dead connection. What a socket carries is
        fixed by its URL and the caller's tenant when it connects: a message asking to subscribe to anything else
        (a group name, another job id) is refused, never acted upon."""
        if isinstance(content, dict) and content.get("type") == "ping":
            await self.send_json({"type": "pong"})
            return
        # The client's message is not echoed back: it may name another tenant's objects.
        await self.send_json(
            {
                "type": "error",
                "error": {
                    "code": "unsupported_message",
                    "message": 'This socket only accepts {"type": "ping"}; what it sends is set by the URL it '
                    "was opened on.",
                },
            }
        )

    async def job_event(self, message):
        await self.send_json(message["event"])

    async def job_updated(self, message):
        await self.send_json(message["job"])


class JobEventsConsumer(_TenantConsumer):
    """`/ws/fine_tuning/jobs/<id>/?after=<event id>`: replays events after that id, then pushes new ones live."""

    async def on_authenticated(self):
        job_id = self.scope["url_route"]["kwargs"]["job_id"]
        tenant = self.tenant_context.tenant
        job = await database_sync_to_async(job_get)(tenant=tenant, public_id=job_id)
        if job is None:
            # Another tenant's job and a job that does not exist look the same: not found.
            await self.close(code=CLOSE_NOT_FOUND)
            return
        # Join before replaying so nothing written in between is lost; clients drop duplicates by id.
        await self.join(job_group(tenant.pk, job.public_id))
        after = _query_param(self.scope, "after")
        await self.send_json(await database_sync_to_async(job_to_json)(job))
        # The backlog goes out page by page, so a long job's replay never sits whole in memory.
        while backlog := await database_sync_to_async(_backlog_page)(job, after):
            for event in backlog:
                await self.send_json(event)
            after = backlog[-1]["id"]


_REPLAY_PAGE_SIZE = 500


def _query_param(scope, name: str) -> str | None:
    return parse_qs(scope.get("query_string", b"").decode()).get(name, [None])[0]


def _backlog_page(job, after: str | None) -> list[dict]:
    events = job_events_after(job=job, after_event_id=after, limit=_REPLAY_PAGE_SIZE)
    return [event_to_json(event, job_public_id=job.public_id) for event in events]


# A tenant feed replays at most this many events per connection; a client further behind reconnects from the
# `last_id` of the `replay.truncated` message that follows them, or reads the REST event lists.
TENANT_REPLAY_LIMIT = 1000


def _tenant_backlog(tenant, after: str, limit: int) -> list[dict]:
    events = tenant_events_after(tenant=tenant, after_event_id=after, limit=limit)
    return [event_to_json(event, job_public_id=event.job.public_id) for event in events]


class TenantEventsConsumer(_TenantConsumer):
    """`/ws/events/?after=<event id>`: every job event and job update of the caller's tenant, live. With `after` (the
    last event a reconnecting client saw), first every event of the tenant's jobs written after that one, in order:
    at most TENANT_REPLAY_LIMIT, then `{"type": "replay.truncated", "last_id": …}` when more remain."""

    replayed_event_ids: set[str]

    async def on_authenticated(self):
        self.replayed_event_ids = set()
        tenant = self.tenant_context.tenant
        # Join before replaying so nothing written in between is lost (see job_event for the duplicates).
        await self.join(tenant_group(tenant.pk))
        after = _query_param(self.scope, "after")
        if after is None:
            return
        backlog = await database_sync_to_async(_tenant_backlog)(tenant, after, TENANT_REPLAY_LIMIT + 1)
        for event in backlog[:TENANT_REPLAY_LIMIT]:
            await self.send_json(event)
            self.replayed_event_ids.add(event["id"])
        if len(backlog) > TENANT_REPLAY_LIMIT:
            await self.send_json({"type": "replay.truncated", "last_id": backlog[TENANT_REPLAY_LIMIT - 1]["id"]})

    async def job_event(self, message):
        # An event written while the backlog was read arrives twice, replayed and pushed: send it once.
        if message["event"]["id"] in getattr(self, "replayed_event_ids", ()):
            return
        await super().job_event(message)
