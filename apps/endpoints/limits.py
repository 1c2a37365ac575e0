"""Request and token limits for inference, counted in Redis fixed windows shared by every web process.

Per API key and per tenant: requests per minute. Per tenant: tokens per minute and per day. A request is admitted
when none of its request windows is full and its tenant's token windows still have room; the tokens it used are
charged after it answers (a request cannot know its completion length before it runs). Settings hold the defaults,
INFERENCE_TENANT_LIMITS overrides them per tenant slug.
"""

import math
import time
from dataclasses import dataclass

from django.conf import settings

from apps.core.api.errors import ApiError
from apps.tenancy.models import ApiKey, Tenant

from .registry import redis_client

# INCR then EXPIRE only on the window's first hit, in one atomic step: a crash between the two cannot leave a
# counter that never expires. Returns the count after this hit and the seconds left in the window.
_HIT_SCRIPT = """
local count = redis.call('INCRBY', KEYS[1], ARGV[1])
if count == tonumber(ARGV[1]) then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
local ttl = redis.call('TTL', KEYS[1])
return {count, ttl}
"""


@dataclass(frozen=True)
class InferenceLimits:
    requests_per_minute_per_key: int
    requests_per_minute: int
    tokens_per_minute: int
    tokens_per_day: int


def inference_limits(tenant: Tenant) -> InferenceLimits:
    override = (settings.INFERENCE_TENANT_LIMITS or {}).get(tenant.slug, {})
    return InferenceLimits(
        requests_per_minute_per_key=int(
            override.get("requests_per_minute_per_key", settings.INFERENCE_REQUESTS_PER_MINUTE_PER_KEY)
        ),
        requests_per_minute=int(override.get("requests_per_minute", settings.INFERENCE_REQUESTS_PER_MINUTE_PER_TENANT)),
        tokens_per_minute=int(override.get("tokens_per_minute", settings.INFERENCE_TOKENS_PER_MINUTE_PER_TENANT)),
        tokens_per_day=int(override.get("tokens_per_day", settings.INFERENCE_TOKENS_PER_DAY_PER_TENANT)),
    )


class RateLimited(ApiError):
    status_code = 429

    def __init__(self, message: str, *, code: str, retry_after: int):
        super().__init__(message, code=code, status_code=429)
        self.retry_after = max(1, retry_after)
        # DRF's exception handler turns `wait` into the Retry-After header.
        self.wait = self.retry_after


def _window(seconds: int, now: float) -> tuple[int, int]:
    """The window's number and the seconds left in it."""
    index = int(now // seconds)
    return index, max(1, math.ceil((index + 1) * seconds - now))


def _key(*parts) -> str:
    # Tenant id in every key: one tenant's traffic never fills another's window.
    return "ratelimit:" + ":".join(str(part) for part in parts)


def _hit(key: str, *, amount: int, ttl: int) -> tuple[int, int]:
    count, left = redis_client().eval(_HIT_SCRIPT, 1, key, amount, ttl)
    return int(count), int(left)


def inference_admit(*, tenant: Tenant, api_key: ApiKey | None) -> None:
    """Counts this request; raises RateLimited (429, with the seconds to wait) when a window is full."""
    limits = inference_limits(tenant)
    now = time.time()
    minute, minute_left = _window(60, now)
    day, day_left = _window(86_400, now)
    if api_key is not None:
        count, left = _hit(_key("key", tenant.pk, api_key.pk, "rpm", minute), amount=1, ttl=minute_left + 1)
        if count > limits.requests_per_minute_per_key:
            raise RateLimited(
                f"Rate limit reached for this API key: {limits.requests_per_minute_per_key} requests per minute.",
                code="rate_limit_exceeded",
                retry_after=left,
            )
    count, left = _hit(_key("tenant", tenant.pk, "rpm", minute), amount=1, ttl=minute_left + 1)
    if count > limits.requests_per_minute:
        raise RateLimited(
            f"Rate limit reached for your organization: {limits.requests_per_minute} requests per minute.",
            code="rate_limit_exceeded",
            retry_after=left,
        )
    client = redis_client()
    used_minute, used_day = client.mget(_key("tenant", tenant.pk, "tpm", minute), _key("tenant", tenant.pk, "tpd", day))
    if int(used_day or 0) >= limits.tokens_per_day:
        raise RateLimited(
            f"Daily token quota reached for your organization: {limits.tokens_per_day} tokens per day.",
            code="insufficient_quota",
            retry_after=day_left,
        )
    if int(used_minute or 0) >= limits.tokens_per_minute:
        raise RateLimited(
            f"Token rate limit reached for your organization: {limits.tokens_per_minute} tokens per minute.",
            code="rate_limit_exceeded",
            retry_after=minute_left,
        )


def inference_charge_tokens(*, tenant: Tenant, tokens: int) -> None:
    if tokens <= 0:
        return
    now = time.time()
    minute, minute_left = _window(60, now)
    day, day_left = _window(86_400, now)
    _hit(_key("tenant", tenant.pk, "tpm", minute), amount=tokens, ttl=minute_left + 1)
    _hit(_key("tenant", tenant.pk, "tpd", day), amount=tokens, ttl=day_left + 1)
