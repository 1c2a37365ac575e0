"""Reads of endpoints and their usage; every one takes the tenant first and never yields another tenant's rows."""

import math
from dataclasses import dataclass
from datetime import timedelta

from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import TruncHour, TruncMinute
from django.utils import timezone

from apps.tenancy.models import ApiKey, Tenant

from .models import Endpoint, EndpointRequest, EndpointStatus


def endpoints_visible(*, tenant: Tenant, api_key: ApiKey | None = None) -> QuerySet[Endpoint]:
    """The tenant's endpoints, narrowed to a key's own list when the key has one (blank: all of them)."""
    endpoints = (
        Endpoint.objects.for_tenant(tenant).select_related("job", "checkpoint", "tenant").prefetch_related("api_keys")
    )
    if api_key is not None and api_key.endpoints.exists():
        endpoints = endpoints.filter(api_keys=api_key)
    return endpoints


def endpoint_get(*, tenant: Tenant, public_id: str, api_key: ApiKey | None = None) -> Endpoint | None:
    return endpoints_visible(tenant=tenant, api_key=api_key).filter(public_id=public_id).first()


def endpoint_for_model(*, tenant: Tenant, model: str, api_key: ApiKey | None = None) -> Endpoint | None:
    """The endpoint a caller's `model` names: its name, its id, or the fine-tuned model name it serves (the newest
    running endpoint of that model when several serve it)."""
    endpoints = endpoints_visible(tenant=tenant, api_key=api_key)
    found = endpoints.filter(Q(name=model) | Q(public_id=model)).first()
    if found is not None:
        return found
    serving_model = endpoints.filter(job__fine_tuned_model=model, checkpoint__isnull=True)
    return serving_model.exclude(status=EndpointStatus.STOPPED).first() or serving_model.first()


def endpoints_ready(*, tenant: Tenant, api_key: ApiKey | None = None) -> QuerySet[Endpoint]:
    """The endpoints that answer requests now (GET /v1/models lists them), narrowed like ``endpoints_visible``."""
    return endpoints_visible(tenant=tenant, api_key=api_key).filter(status=EndpointStatus.READY)


USAGE_WINDOWS = {
    # window: (length, bucket of the chart series, its truncation)
    "1h": (timedelta(hours=1), "minute", TruncMinute),
    "24h": (timedelta(hours=24), "hour", TruncHour),
    "7d": (timedelta(days=7), "hour", TruncHour),
}


@dataclass(frozen=True)
class EndpointUsage:
    window: str
    bucket: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    time_to_first_token_p50_ms: float | None
    series: list[dict]


def percentile(values: list[int], fraction: float) -> float | None:
    """Nearest-rank percentile; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(fraction * len(ordered))))
    return float(ordered[rank - 1])


def endpoint_usage(*, endpoint: Endpoint, window: str, now=None) -> EndpointUsage:
    length, bucket, trunc = USAGE_WINDOWS[window]
    since = (now or timezone.now()) - length
    rows = EndpointRequest.objects.for_tenant(endpoint.tenant_id).filter(endpoint=endpoint, created_at__gte=since)
    errors = Q(status_code__gte=400)
    totals = rows.aggregate(
        requests=Count("id"),
        errors=Count("id", filter=errors),
        prompt_tokens=Sum("prompt_tokens", default=0),
        completion_tokens=Sum("completion_tokens", default=0),
    )
    # Percentiles in Python over the window's latencies: portable across SQLite and PostgreSQL. A week of one
    # endpoint's rows is read as one integer column.
    latencies = list(rows.filter(status_code__lt=400).values_list("latency_ms", flat=True))
    first_tokens = list(
        rows.filter(status_code__lt=400, time_to_first_token_ms__isnull=False).values_list(
            "time_to_first_token_ms", flat=True
        )
    )
    per_bucket = (
        rows.annotate(at=trunc("created_at"))
        .values("at")
        .annotate(
            requests=Count("id"),
            errors=Count("id", filter=errors),
            prompt_tokens=Sum("prompt_tokens", default=0),
            completion_tokens=Sum("completion_tokens", default=0),
        )
        .order_by("at")
    )
    series = [
        {
            "at": int(point["at"].timestamp()),
            "requests": point["requests"],
            "errors": point["errors"],
            "prompt_tokens": point["prompt_tokens"],
            "completion_tokens": point["completion_tokens"],
        }
        for point in per_bucket
    ]
    return EndpointUsage(
        window=window,
        bucket=bucket,
        requests=totals["requests"],
        errors=totals["errors"],
        prompt_tokens=totals["prompt_tokens"],
        completion_tokens=totals["completion_tokens"],
        latency_p50_ms=percentile(latencies, 0.5),
        latency_p95_ms=percentile(latencies, 0.95),
        time_to_first_token_p50_ms=percentile(first_tokens, 0.5),
        series=series,
    )
