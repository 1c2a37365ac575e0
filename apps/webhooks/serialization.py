"""JSON of webhook endpoints (the fields of OpenAI's `webhook_endpoint` object, plus `enabled`) and deliveries."""

from .models import WebhookDelivery, WebhookEndpoint
from .signing import SECRET_PREFIX


def _unix(value) -> int | None:
    return int(value.timestamp()) if value else None


def endpoint_to_json(endpoint: WebhookEndpoint, *, include_secret: bool = False) -> dict:
    body = {
        "object": "webhook_endpoint",
        "id": endpoint.public_id,
        "name": endpoint.name,
        "url": endpoint.url,
        "event_types": list(endpoint.event_types),
        "enabled": endpoint.enabled,
        "created_at": _unix(endpoint.created_at),
        # Enough to tell two secrets apart, far too little to sign with.
        "signing_secret_hint": f"{SECRET_PREFIX}…{endpoint.secret[-4:]}",
    }
    if include_secret:
        body["signing_secret"] = endpoint.secret
    return body


def delivery_to_json(delivery: WebhookDelivery) -> dict:
    return {
        "object": "webhook_endpoint.delivery",
        "id": delivery.public_id,
        "endpoint_id": delivery.endpoint.public_id,
        "event_type": delivery.event_type,
        "event": delivery.payload,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "last_status_code": delivery.last_status_code,
        "last_error": delivery.last_error or None,
        "next_attempt_at": _unix(delivery.next_attempt_at) if delivery.status == "pending" else None,
        "delivered_at": _unix(delivery.delivered_at),
        "created_at": _unix(delivery.created_at),
    }
