"""JSON of API keys and of a tenant's inference limits, for the REST API."""

from .models import INFERENCE_LIMIT_FIELDS, ApiKey, Tenant


def _unix(moment) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def api_key_to_json(api_key: ApiKey, *, secret: str | None = None) -> dict:
    data = {
        "object": "api_key",
        "id": api_key.public_id,
        "name": api_key.name,
        "prefix": api_key.prefix,
        "created_at": _unix(api_key.created_at),
        "last_used_at": _unix(api_key.last_used_at),
        "revoked_at": _unix(api_key.revoked_at),
        "status": "active" if api_key.is_active else "revoked",
        "permissions": api_key.permissions,  # all, inference or read_only
        # The key's own caps; null: none of its own (the organization's limits, and for requests per minute the
        # platform's per-key default, still apply).
        **{name: getattr(api_key, name) for name in INFERENCE_LIMIT_FIELDS},
    }
    if secret is not None:
        data["key"] = secret  # shown once, at creation: only its hash is stored
    return data


def tenant_limits_to_json(tenant: Tenant, effective) -> dict:
    """`effective`: apps.endpoints.limits.TenantInferenceLimits, what is enforced now."""
    return {
        "object": "organization.limits",
        "organization": tenant.slug,
        # What staff stored (null: not set here, so INFERENCE_TENANT_LIMITS or the platform default applies).
        "stored": {name: getattr(tenant, name) for name in INFERENCE_LIMIT_FIELDS},
        "effective": {
            "requests_per_minute": effective.requests_per_minute,
            "tokens_per_minute": effective.tokens_per_minute,
            "tokens_per_day": effective.tokens_per_day,
            "requests_per_minute_per_key": effective.requests_per_minute_per_key,
        },
    }
