"""Request rate limits and token quotas for inference, counted in Redis windows shared by every web process.

Windows: per tenant, requests per minute, tokens per minute and tokens per UTC day; per API key, requests per minute
(the key's own cap, else the platform's per-key default) and, where the key has its own caps, tokens per minute and
per day. A key's caps only ever narrow what the tenant allows: both sets of windows are checked.

Tokens are reserved, then settled. At admission one Lua script checks every window involved and, only if all of
them have room, adds the request (1) and its worst case in tokens (the prompt's upper bound plus max_tokens × n) to
each of them: concurrent requests cannot all pass a check that none of them has charged yet. After the answer the
unused part is given back (`inference_settle`), so a later request fits.

Where a limit comes from, first found wins: the tenant's (or key's) row in the database, then the tenant's entry in
INFERENCE_TENANT_LIMITS (by slug; kept for deployments configured that way), then the INFERENCE_* defaults.

Minute windows slide: a counter per clock minute, and what a request sees as used is this minute's counter plus the
previous minute's, weighted by the share of the previous minute still inside the last 60 seconds (the sliding-window
counter that Cloudflare and others use). With fixed minutes, a burst at the end of one minute and another at the
start of the next passed twice the limit within a few seconds. The day's quota is a UTC calendar day, as documented.
"""

import math
import time
from dataclasses import dataclass, field

from django.conf import settings

from apps.core.api.errors import ApiError
from apps.tenancy.models import ApiKey, Tenant

from .registry import redis_client

MINUTE, DAY = 60, 86_400

clock = time.time
"""Seconds since the epoch; the tests set it to walk a window's edge."""

# KEYS: two per window, this period's counter then the previous period's. ARGV: four per window: the amount to add,
# its limit, the counter's TTL and the previous period's weight (0 for calendar windows). Either every window takes
# its amount or none does (a refused request charges nothing, not even its request count).
# Returns {admitted (1/0), this period's counts (after when admitted, before when refused), the previous periods'
# counts, the 1-based indexes of full windows}.
_RESERVE_SCRIPT = """
local currents, previouses, full = {}, {}, {}
local windows = #KEYS / 2
for i = 1, windows do
  local current = tonumber(redis.call('GET', KEYS[2 * i - 1]) or '0')
  local previous = tonumber(redis.call('GET', KEYS[2 * i]) or '0')
  currents[i], previouses[i] = current, previous
  local used = current + previous * tonumber(ARGV[4 * i])
  if used + tonumber(ARGV[4 * i - 3]) > tonumber(ARGV[4 * i - 2]) then table.insert(full, i) end
end
if #full > 0 then return {0, currents, previouses, full} end
for i = 1, windows do
  currents[i] = redis.call('INCRBY', KEYS[2 * i - 1], ARGV[4 * i - 3])
  if redis.call('TTL', KEYS[2 * i - 1]) < 0 then redis.call('EXPIRE', KEYS[2 * i - 1], ARGV[4 * i - 1]) end
end
return {1, currents, previouses, full}
"""

# KEYS: the token counters a reservation was taken in (the period's; when the answer comes back in the next minute,
# that counter is the previous period's and still counts, weighted). ARGV[1]: tokens to give back (negative: tokens
# to add, when the answer used more than the estimate). A counter that has expired meanwhile is left alone:
# recreating it would leave a counter without a TTL. Never below zero.
_SETTLE_SCRIPT = """
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    local left = redis.call('DECRBY', key, ARGV[1])
    if left < 0 then redis.call('INCRBY', key, -left) end
  end
end
return 0
"""


@dataclass(frozen=True)
class TenantInferenceLimits:
    """A tenant's limits in force, and whether each is its own (database or INFERENCE_TENANT_LIMITS) or the
    platform default: for the dashboard and the staff API."""

    requests_per_minute: int
    tokens_per_minute: int
    tokens_per_day: int
    requests_per_minute_per_key: int
    overridden: frozenset[str] = frozenset()


_DEFAULT_SETTINGS = {
    "requests_per_minute": "INFERENCE_REQUESTS_PER_MINUTE_PER_TENANT",
    "tokens_per_minute": "INFERENCE_TOKENS_PER_MINUTE_PER_TENANT",
    "tokens_per_day": "INFERENCE_TOKENS_PER_DAY_PER_TENANT",
    "requests_per_minute_per_key": "INFERENCE_REQUESTS_PER_MINUTE_PER_KEY",
}


def tenant_inference_limits(tenant: Tenant) -> TenantInferenceLimits:
    """Read from the tenant row each time (the row is loaded per request), so staff changes apply without a
    restart."""
    env_override = (settings.INFERENCE_TENANT_LIMITS or {}).get(tenant.slug, {})
    values, overridden = {}, set()
    for name, setting in _DEFAULT_SETTINGS.items():
        stored = getattr(tenant, name, None)  # the per-key default has no column: it is a platform setting
        if stored is not None:
            values[name] = stored
            overridden.add(name)
        elif name in env_override:
            values[name] = int(env_override[name])
            overridden.add(name)
        else:
            values[name] = int(getattr(settings, setting))
    return TenantInferenceLimits(**values, overridden=frozenset(overridden))


@dataclass(frozen=True)
class LimitWindow:
    scope: str  # "key" or "tenant": who the limit belongs to, for messages
    unit: str  # "requests" or "tokens"
    seconds: int  # MINUTE or DAY
    limit: int

    @property
    def per(self) -> str:
        return "minute" if self.seconds == MINUTE else "day"

    @property
    def slides(self) -> bool:
        """Minute windows slide; the day's quota is a UTC calendar day."""
        return self.seconds == MINUTE

    def describe(self) -> str:
        owner = "this API key" if self.scope == "key" else "your organization"
        return f"{self.limit} {self.unit} per {self.per} for {owner}"


def inference_windows(*, tenant: Tenant, api_key: ApiKey | None) -> list[LimitWindow]:
    tenant_limits = tenant_inference_limits(tenant)
    windows = []
    if api_key is not None:
        windows.append(
            LimitWindow(
                "key", "requests", MINUTE, api_key.requests_per_minute or tenant_limits.requests_per_minute_per_key
            )
        )
        if api_key.tokens_per_minute is not None:
            windows.append(LimitWindow("key", "tokens", MINUTE, api_key.tokens_per_minute))
        if api_key.tokens_per_day is not None:
            windows.append(LimitWindow("key", "tokens", DAY, api_key.tokens_per_day))
    windows += [
        LimitWindow("tenant", "requests", MINUTE, tenant_limits.requests_per_minute),
        LimitWindow("tenant", "tokens", MINUTE, tenant_limits.tokens_per_minute),
        LimitWindow("tenant", "tokens", DAY, tenant_limits.tokens_per_day),
    ]
    return windows


def _seconds_left(seconds: int, now: float) -> float:
    """Until the current period of ``seconds`` ends."""
    return (int(now // seconds) + 1) * seconds - now


def _previous_weight(window: LimitWindow, now: float) -> float:
    """How much of the previous period still counts: the share of it inside the last ``window.seconds`` (0 for a
    calendar window)."""
    return _seconds_left(window.seconds, now) / window.seconds if window.slides else 0.0


@dataclass(frozen=True)
class _WindowState:
    """One window's counters at ``now``: this period's, the previous period's, and that one's weight."""

    window: LimitWindow
    current: int
    previous: int
    now: float

    @property
    def previous_weight(self) -> float:
        return _previous_weight(self.window, self.now)

    @property
    def used(self) -> int:
        return math.ceil(self.current + self.previous * self.previous_weight)

    def seconds_until_room(self, amount: int) -> float:
        """How long until ``amount`` more fits, if nothing else is added meanwhile."""
        period, left = self.window.seconds, _seconds_left(self.window.seconds, self.now)
        excess = self.current + self.previous * self.previous_weight + amount - self.window.limit
        if excess <= 0:
            return 0.0
        if not self.window.slides:
            return left
        # Within this period only the previous period's share decays, by previous/period per second.
        if self.previous * self.previous_weight >= excess:
            return excess / self.previous * period
        # Then this period's count becomes the previous one and decays over the next period.
        excess_then = self.current + amount - self.window.limit
        if excess_then <= 0 or not self.current:
            return left
        return left + excess_then / self.current * period

    def seconds_until_reset(self) -> float:
        """How long until nothing counted now counts any more (OpenAI's x-ratelimit-reset-*)."""
        left = _seconds_left(self.window.seconds, self.now)
        if not self.window.slides:
            return left
        if self.current:
            return left + self.window.seconds
        return left if self.previous else 0.0


def _redis_keys(window: LimitWindow, *, tenant: Tenant, api_key: ApiKey | None, now: float) -> tuple[str, str]:
    """This period's counter and the previous period's."""
    # Tenant id in every key: one tenant's traffic never fills another's window. The period's number ends the key,
    # so a new period starts from zero and an old counter simply expires.
    owner = f"tenant:{tenant.pk}" if window.scope == "tenant" else f"key:{tenant.pk}:{api_key.pk}"
    short = {"requests": "rpm", "tokens": "tpm" if window.seconds == MINUTE else "tpd"}[window.unit]
    period = int(now // window.seconds)
    return f"ratelimit:{owner}:{short}:{period}", f"ratelimit:{owner}:{short}:{period - 1}"


def _duration(seconds: int) -> str:
    """OpenAI's way of writing a reset time: 45s, 6m0s, 3h2m10s."""
    hours, rest = divmod(max(0, seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def rate_limit_headers(states: list[_WindowState]) -> dict[str, str]:
    """x-ratelimit-* for the tightest window of each unit: the one with the fewest requests (tokens) left."""
    headers = {}
    for unit in ("requests", "tokens"):
        candidates = [state for state in states if state.window.unit == unit]
        if not candidates:
            continue
        tightest = min(
            candidates,
            key=lambda state: (max(0, state.window.limit - state.used), -state.seconds_until_reset()),
        )
        headers[f"x-ratelimit-limit-{unit}"] = str(tightest.window.limit)
        headers[f"x-ratelimit-remaining-{unit}"] = str(max(0, tightest.window.limit - tightest.used))
        headers[f"x-ratelimit-reset-{unit}"] = _duration(math.ceil(tightest.seconds_until_reset()))
    return headers


class RateLimited(ApiError):
    status_code = 429

    def __init__(self, message: str, *, code: str, retry_after: int, headers: dict | None = None):
        super().__init__(message, code=code, status_code=429)
        self.retry_after = max(1, retry_after)
        # DRF's exception handler turns `wait` into the Retry-After header.
        self.wait = self.retry_after
        self.headers = headers or {}


class RequestTooLarge(ApiError):
    """A request whose worst case alone exceeds a token limit: no amount of waiting lets it pass.

    400, not 429, on purpose: SDKs (openai included) retry a 429 by themselves after Retry-After, which would only
    repeat a refusal that no wait can lift; a 400 tells the caller to change the request (lower max_tokens or n,
    shorten the prompt)."""

    def __init__(self, message: str, *, headers: dict | None = None):
        super().__init__(message, code="request_too_large", param="max_tokens", status_code=400)
        self.headers = headers or {}


@dataclass
class Reservation:
    """What admission reserved; `inference_settle` gives the unused tokens back exactly once."""

    token_keys: list[str]
    tokens: int
    headers: dict[str, str] = field(default_factory=dict)
    settled: bool = False


def inference_reserve(*, tenant: Tenant, api_key: ApiKey | None, tokens: int) -> Reservation:
    """Counts the request and reserves `tokens` (its worst case) in every window, or raises: RequestTooLarge (400)
    when the worst case alone exceeds a token limit, RateLimited (429, Retry-After: the seconds until every full
    window has room for it, if nothing else comes) when a window has no room now."""
    windows = inference_windows(tenant=tenant, api_key=api_key)
    now = clock()
    key_pairs = [_redis_keys(window, tenant=tenant, api_key=api_key, now=now) for window in windows]
    keys = [key for pair in key_pairs for key in pair]
    amounts = [1 if window.unit == "requests" else tokens for window in windows]
    too_small = [window for window in windows if window.unit == "tokens" and 0 < window.limit < tokens]
    if too_small:
        values = [int(value or 0) for value in redis_client().mget(keys)]
        states = [_WindowState(window, values[2 * i], values[2 * i + 1], now) for i, window in enumerate(windows)]
        raise RequestTooLarge(
            f"This request may use up to {tokens} tokens (the prompt plus max_tokens × n), more than the "
            f"{too_small[0].describe()}. Lower max_tokens (or n), or shorten the prompt.",
            headers=rate_limit_headers(states),
        )
    arguments = []
    for window, amount in zip(windows, amounts, strict=True):
        # A sliding window's counter must outlive its minute: it is the next minute's previous one.
        ttl = window.seconds * (2 if window.slides else 1) + 1
        arguments += [amount, window.limit, ttl, repr(_previous_weight(window, now))]
    admitted, currents, previouses, full = redis_client().eval(_RESERVE_SCRIPT, len(keys), *keys, *arguments)
    states = [
        _WindowState(window, int(current), int(previous), now)
        for window, current, previous in zip(windows, currents, previouses, strict=True)
    ]
    headers = rate_limit_headers(states)
    if not admitted:
        blocking = [windows[index - 1] for index in full]
        # The day's quota is spent (or set to 0): OpenAI's code for that, so callers can tell it from a busy minute.
        code = "insufficient_quota" if any(window.seconds == DAY for window in blocking) else "rate_limit_exceeded"
        wait = max(states[index - 1].seconds_until_room(amounts[index - 1]) for index in full)
        raise RateLimited(
            f"Rate limit reached: {'; '.join(window.describe() for window in blocking)}. Try again later.",
            code=code,
            retry_after=math.ceil(wait),
            headers=headers,
        )
    token_keys = [pair[0] for pair, window in zip(key_pairs, windows, strict=True) if window.unit == "tokens"]
    return Reservation(token_keys=token_keys, tokens=tokens, headers=headers)


def inference_settle(reservation: Reservation, *, used_tokens: int | None) -> None:
    """Gives back what the answer did not use. `used_tokens=None` (the answer's usage is unknown, e.g. a stream the
    client dropped after tokens were generated) keeps the whole reservation: a caller must not be able to spend
    tokens for free by hanging up."""
    if reservation.settled:
        return
    reservation.settled = True
    if used_tokens is None or used_tokens == reservation.tokens or not reservation.token_keys:
        return
    unused = reservation.tokens - used_tokens
    redis_client().eval(_SETTLE_SCRIPT, len(reservation.token_keys), *reservation.token_keys, unused)
