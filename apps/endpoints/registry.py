"""The deployment registry shared with the serving process (workers/serving), in Redis.

This side writes `serving:deployments` (one JSON entry per endpoint) and announces each change on
`serving:deployments:changed`; each serving process writes what it is doing in its own field of
`serving:status:<endpoint id>` and keeps `serving:instance:<instance id>` alive while it runs. Several serving
processes run side by side: only the reports of live ones count. The shapes are the contract with workers/serving
(workers/serving/registry.py): change them only together.
"""

import json
import logging
from functools import lru_cache

import redis
from django.conf import settings

from apps.catalog.selectors import catalog_get, catalog_model_folder

from .models import Endpoint, EndpointStatus

logger = logging.getLogger(__name__)

DEPLOYMENTS_KEY = "serving:deployments"
DEPLOYMENTS_CHANGED_CHANNEL = "serving:deployments:changed"
STATUS_KEY_PREFIX = "serving:status:"
INSTANCE_KEY_PREFIX = "serving:instance:"
LORA_MODES = ("lora", "qlora")


@lru_cache(maxsize=4)
def _client_for(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=5, socket_connect_timeout=5)


def redis_client() -> redis.Redis:
    """One pooled client per REDIS_URL (tests and operators may point at another Redis while a process runs)."""
    return _client_for(settings.REDIS_URL)


def _job_mode(endpoint: Endpoint, entry) -> str:
    return endpoint.job.hyperparameters.get("mode") or (entry.default_mode if entry else "full")


def deployment_entry(endpoint: Endpoint) -> dict:
    """The registry value serving loads an endpoint from."""
    job = endpoint.job
    entry = catalog_get(model_id=job.model)
    lora = _job_mode(endpoint, entry) in LORA_MODES
    if endpoint.checkpoint_id:
        # A LoRA run's checkpoints hold the adapters only, never a copy of the frozen base model.
        model_prefix, adapter = endpoint.checkpoint.storage_prefix, lora
    else:
        model_prefix = job.model_storage_prefix
        adapter = lora and job.hyperparameters.get("lora_export", "merged") == "adapter"
    base_model_dir = str(catalog_model_folder(entry)) if adapter and entry is not None and entry.folder else None
    return {
        "endpoint": endpoint.public_id,
        "tenant_id": endpoint.tenant_id,
        "revision": endpoint.revision,
        "task": endpoint.task,
        "model_prefix": model_prefix,
        "adapter": adapter,
        "base_model_dir": base_model_dir,
        "chat_template": job.hyperparameters.get("chat_template"),
        "generation_defaults": endpoint.generation_defaults,
        "max_context": model_context_length(endpoint),
        "idle_unload_seconds": endpoint.idle_unload_seconds,
        "min_replicas": endpoint.min_replicas,
        "state": "stopped" if endpoint.status == EndpointStatus.STOPPED else "active",
    }


def model_context_length(endpoint: Endpoint) -> int:
    """The catalog's context length of the job's base model or architecture; the job's own max_length when the
    catalog entry is gone (the longest sequence the model was trained on is then the safest bound)."""
    entry = catalog_get(model_id=endpoint.job.model)
    if entry is not None and entry.context_length:
        return entry.context_length
    return int(endpoint.job.hyperparameters.get("max_length") or 512)


def registry_publish(*, endpoint_pk: int) -> None:
    """Writes the endpoint's current row to the registry (or removes it once deleted) and announces the change.

    Run after the transaction commits, so serving never reads a deployment the database rolled back."""
    endpoint = Endpoint.objects.select_related("job", "checkpoint").filter(pk=endpoint_pk).first()
    client = redis_client()
    if endpoint is None:
        return
    client.hset(DEPLOYMENTS_KEY, endpoint.public_id, json.dumps(deployment_entry(endpoint)))
    client.publish(DEPLOYMENTS_CHANGED_CHANNEL, endpoint.public_id)


def registry_remove(*, endpoint_public_id: str) -> None:
    client = redis_client()
    client.hdel(DEPLOYMENTS_KEY, endpoint_public_id)
    client.delete(STATUS_KEY_PREFIX + endpoint_public_id)
    client.publish(DEPLOYMENTS_CHANGED_CHANNEL, endpoint_public_id)


def registry_entry(*, endpoint_public_id: str) -> dict | None:
    raw = redis_client().hget(DEPLOYMENTS_KEY, endpoint_public_id)
    return json.loads(raw) if raw else None


def instance_reports(*, endpoint_public_id: str) -> list[dict]:
    """What each live serving instance last said about this endpoint. The fields of instances whose liveness key
    expired (a killed or stopped process) are removed: their "ready" no longer serves anyone, and a restarted process
    comes back under a new id. Unreadable values are skipped, not fatal."""
    client = redis_client()
    key = STATUS_KEY_PREFIX + endpoint_public_id
    raw_reports = client.hgetall(key)
    if not raw_reports:
        return []
    instances = list(raw_reports)
    pipeline = client.pipeline(transaction=False)
    for instance in instances:
        pipeline.exists(INSTANCE_KEY_PREFIX + instance)
    alive = dict(zip(instances, pipeline.execute(), strict=True))
    gone = [instance for instance in instances if not alive[instance]]
    if gone:
        client.hdel(key, *gone)
    reports = []
    for instance in instances:
        if not alive[instance]:
            continue
        try:
            report = json.loads(raw_reports[instance])
        except ValueError:
            logger.warning("Unreadable serving status for %s from %s", endpoint_public_id, instance)
            continue
        if isinstance(report, dict):
            reports.append({"instance": instance, **report})
    return reports
