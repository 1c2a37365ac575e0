"""`GET /metrics`: Prometheus text built at scrape time from the EndpointRequest rows, so every web process
answers the same figures (a per-process counter would show only that process's share).

Operator-only: it names every tenant. `Authorization: Bearer <METRICS_TOKEN>`, or, with no token configured,
callers on the loopback interface only.
"""

import hmac
import ipaddress

from django.conf import settings
from django.db.models import Count, Q, Sum
from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from .models import Endpoint, EndpointRequest

LATENCY_BUCKETS_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)


class EndpointRequestCollector:
    """Reads the aggregates from the database on each collect()."""

    def collect(self):
        requests = CounterMetricFamily(
            "tunehouse_inference_requests", "Inference requests answered.", labels=["tenant", "endpoint", "kind"]
        )
        errors = CounterMetricFamily(
            "tunehouse_inference_errors", "Inference requests answered with an error.", labels=["tenant", "endpoint"]
        )
        prompt_tokens = CounterMetricFamily(
            "tunehouse_inference_prompt_tokens", "Prompt tokens processed.", labels=["tenant", "endpoint"]
        )
        completion_tokens = CounterMetricFamily(
            "tunehouse_inference_completion_tokens", "Completion tokens generated.", labels=["tenant", "endpoint"]
        )
        latency = HistogramMetricFamily(
            "tunehouse_inference_latency_seconds",
            "Latency of successful inference requests.",
            labels=["tenant", "endpoint"],
        )
        bucket_counts = {
            f"le_{bound}": Count("id", filter=Q(status_code__lt=400, latency_ms__lte=bound))
            for bound in LATENCY_BUCKETS_MS
        }
        rows = (
            EndpointRequest.objects.order_by()
            .values("tenant__slug", "endpoint_public_id", "kind")
            .annotate(
                requests=Count("id"),
                errors=Count("id", filter=Q(status_code__gte=400)),
                ok=Count("id", filter=Q(status_code__lt=400)),
                latency_sum=Sum("latency_ms", filter=Q(status_code__lt=400), default=0),
                prompt=Sum("prompt_tokens", default=0),
                completion=Sum("completion_tokens", default=0),
                **bucket_counts,
            )
        )
        per_endpoint: dict[tuple[str, str], dict] = {}
        for row in rows:
            labels = (row["tenant__slug"], row["endpoint_public_id"])
            requests.add_metric([*labels, row["kind"]], row["requests"])
            totals = per_endpoint.setdefault(
                labels, {"errors": 0, "ok": 0, "latency_sum": 0, "prompt": 0, "completion": 0, "buckets": {}}
            )
            for name in ("errors", "ok", "latency_sum", "prompt", "completion"):
                totals[name] += row[name]
            for bound in LATENCY_BUCKETS_MS:
                totals["buckets"][bound] = totals["buckets"].get(bound, 0) + row[f"le_{bound}"]
        for labels, totals in per_endpoint.items():
            errors.add_metric(list(labels), totals["errors"])
            prompt_tokens.add_metric(list(labels), totals["prompt"])
            completion_tokens.add_metric(list(labels), totals["completion"])
            buckets = [(str(bound / 1000), totals["buckets"][bound]) for bound in LATENCY_BUCKETS_MS]
            latency.add_metric(list(labels), [*buckets, ("+Inf", totals["ok"])], totals["latency_sum"] / 1000)
        endpoints = GaugeMetricFamily("tunehouse_endpoints", "Endpoints by status.", labels=["tenant", "status"])
        for row in Endpoint.objects.order_by().values("tenant__slug", "status").annotate(count=Count("id")):
            endpoints.add_metric([row["tenant__slug"], row["status"]], row["count"])
        yield from (requests, errors, prompt_tokens, completion_tokens, latency, endpoints)


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EndpointRequestCollector())
    return registry


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def metrics_allowed(request: HttpRequest) -> bool:
    if settings.METRICS_TOKEN:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), settings.METRICS_TOKEN)
    return _is_loopback(request.META.get("REMOTE_ADDR"))


def metrics_view(request: HttpRequest) -> HttpResponse:
    if request.method != "GET":
        return HttpResponse(status=405, headers={"Allow": "GET"})
    if not metrics_allowed(request):
        return HttpResponse("Forbidden\n", status=403, content_type="text/plain")
    return HttpResponse(generate_latest(_registry()), content_type=CONTENT_TYPE_LATEST)
