"""Channel-layer group names and publishing. Every group name carries the tenant id."""

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

logger = logging.getLogger(__name__)


def tenant_group(tenant_id: int) -> str:
    return f"tenant.{tenant_id}"


def job_group(tenant_id: int, job_public_id: str) -> str:
    return f"tenant.{tenant_id}.job.{job_public_id}"


def publish_job_event(*, tenant_id: int, job_public_id: str, event: dict) -> None:
    """Pushes an event already stored in the database; a client that misses it replays it from the REST log."""
    _publish(tenant_id, job_public_id, {"type": "job.event", "event": event})


def publish_job_update(*, tenant_id: int, job_public_id: str, job: dict) -> None:
    """Pushes the job object after a status change, so pages update their status without polling."""
    _publish(tenant_id, job_public_id, {"type": "job.updated", "job": job})


def _publish(tenant_id: int, job_public_id: str, message: dict) -> None:
    layer = get_channel_layer()
    try:
        async_to_sync(layer.group_send)(job_group(tenant_id, job_public_id), message)
        async_to_sync(layer.group_send)(tenant_group(tenant_id), message)
    except Exception:  # a Redis hiccup must not fail a training step; the event is stored and replayable
        logger.warning("could not publish %s for job %s", message["type"], job_public_id, exc_info=True)
