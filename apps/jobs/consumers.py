"""Websockets: a job's live event log, and a tenant-wide feed. Both push exactly the REST API's JSON objects."""

from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from .realtime import job_group, tenant_group
from .selectors import job_events_after, job_get
from .serialization import event_to_json, job_to_json

# Close codes in the 4000 range mirror HTTP: the client learns why without a response body.
CLOSE_UNAUTHENTICATED = 4401
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
        await self.on_authenticated()

    async def on_authenticated(self):
        raise NotImplementedError

    async def join(self, group: str):
        await self.channel_layer.group_add(group, self.channel_name)
        self.groups_joined.append(group)

    async def disconnect(self, code):
        for group in getattr(self, "groups_joined", []):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive_json(self, content, **kwargs):
        """The only client message is a ping, so clients can detect a dead connection."""
        if isinstance(content, dict) and content.get("type") == "ping":
            await self.send_json({"type": "pong"})

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
        after = parse_qs(self.scope.get("query_string", b"").decode()).get("after", [None])[0]
        await self.send_json(await database_sync_to_async(job_to_json)(job))
        # The backlog goes out page by page, so a long job's replay never sits whole in memory.
        while backlog := await database_sync_to_async(_backlog_page)(job, after):
            for event in backlog:
                await self.send_json(event)
            after = backlog[-1]["id"]


_REPLAY_PAGE_SIZE = 500


def _backlog_page(job, after: str | None) -> list[dict]:
    events = job_events_after(job=job, after_event_id=after, limit=_REPLAY_PAGE_SIZE)
    return [event_to_json(event, job_public_id=job.public_id) for event in events]


class TenantEventsConsumer(_TenantConsumer):
    """`/ws/events/`: every job event and job update of the caller's tenant, live."""

    async def on_authenticated(self):
        await self.join(tenant_group(self.tenant_context.tenant.pk))
