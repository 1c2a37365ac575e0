"""The JSON of endpoints and their usage (REST API and dashboard)."""

from .models import Endpoint
from .selectors import EndpointUsage


def _unix(value) -> int | None:
    return int(value.timestamp()) if value else None


def endpoint_to_json(endpoint: Endpoint) -> dict:
    job = endpoint.job
    return {
        "object": "endpoint",
        "id": endpoint.public_id,
        "name": endpoint.name,
        "model": job.fine_tuned_model or job.public_id,
        "fine_tuning_job": job.public_id,
        "checkpoint": endpoint.checkpoint.public_id if endpoint.checkpoint_id else None,
        "task": endpoint.task,
        "status": endpoint.status,
        "error": endpoint.error,
        "revision": endpoint.revision,
        "generation_defaults": endpoint.generation_defaults,
        "min_replicas": endpoint.min_replicas,
        "max_replicas": endpoint.max_replicas,
        "idle_unload_seconds": endpoint.idle_unload_seconds,
        # Keys limited to this endpoint (among others). Keys on no endpoint's list reach every endpoint, this one too.
        "api_keys": sorted(key.public_id for key in endpoint.api_keys.all()),
        "created_at": _unix(endpoint.created_at),
        "updated_at": _unix(endpoint.updated_at),
    }


def endpoint_model_json(endpoint: Endpoint) -> dict:
    """An OpenAI Model object for a ready endpoint: its name is what callers put in `model`."""
    return {
        "id": endpoint.name,
        "object": "model",
        "created": _unix(endpoint.created_at),
        "owned_by": endpoint.tenant.slug,
        "endpoint": endpoint.public_id,
        "fine_tuned_model": endpoint.job.fine_tuned_model or None,
        "task": endpoint.task,
    }


def usage_to_json(endpoint: Endpoint, usage: EndpointUsage) -> dict:
    return {
        "object": "endpoint.usage",
        "endpoint": endpoint.public_id,
        "window": usage.window,
        "bucket": usage.bucket,
        "requests": usage.requests,
        "errors": usage.errors,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "latency_ms": {"p50": usage.latency_p50_ms, "p95": usage.latency_p95_ms},
        "time_to_first_token_ms": {"p50": usage.time_to_first_token_p50_ms},
        "series": usage.series,
    }
