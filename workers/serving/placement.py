"""Where an endpoint lives when several serving processes run: rendezvous (highest-random-weight) hashing of its id
over the processes' URLs. The web process routes requests with the same ranking (apps/endpoints/routing.py), so the
processes that keep an endpoint's warm replicas (``min_replicas``) are the ones its requests go to first."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence


def _weight(key: str, url: str) -> int:
    # blake2b rather than hash(): the ranking must agree across processes (hash() is salted per process).
    return int.from_bytes(hashlib.blake2b(f"{key}\0{url}".encode(), digest_size=8).digest(), "big")


def rendezvous_order(key: str, urls: Sequence[str] | Collection[str]) -> list[str]:
    """``urls`` from the highest weight for ``key`` to the lowest; the URL breaks (improbable) ties."""
    return sorted(urls, key=lambda url: (_weight(key, url), url), reverse=True)


def keeps_warm_replica(*, endpoint: str, min_replicas: int, own_url: str, live_urls: Collection[str]) -> bool:
    """Whether this process keeps the endpoint loaded even when idle: when it is among the endpoint's first
    ``min_replicas`` live processes. A process that does not know its own URL (or is not yet listed among the live
    ones) cannot be placed, so it keeps one, as a single process always did."""
    if min_replicas < 1:
        return False
    if not own_url or own_url not in live_urls:
        return True
    return own_url in rendezvous_order(endpoint, live_urls)[:min_replicas]
