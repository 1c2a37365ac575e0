"""Where an endpoint lives when several serving processes run: rendezvous (highest-random-weight) hashing of its id
over the processes' URLs. The web process routes requests with the same ranking (apps/endpoints/routing.py), so the
processes that keep an endpoint's warm replicas (``min_replicas``) are the ones its requests go to first."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence


def _weight(key: str, url: str) -> int:
    # blake2b rather than hash(): the ranking must agree across processes (hash() is salted per process).
    return int.from_bytes(hashlib.blake2b(f"{key}\0{url}".encode(), digest_size=8).digest(), "big")


def serving_urls(setting: str) -> tuple[str, ...]:
    """SERVING_URL's processes: one URL or a comma-separated list; blanks and duplicates dropped, order kept."""
    urls: list[str] = []
    for part in setting.split(","):
        url = part.strip().rstrip("/")
        if url and url not in urls:
            urls.append(url)
    return tuple(urls)


def advertised_url_mismatch(advertised_url: str, serving_url_setting: str) -> str | None:
    """Why warm placement will miss, when this process's advertised URL is not an entry of SERVING_URL (when both
    are known): the web ranks SERVING_URL's entries, the processes rank the advertised URLs, and the two rankings
    agree only when they are the same strings."""
    listed = serving_urls(serving_url_setting)
    if not listed or not advertised_url or advertised_url in listed:
        return None
    return (
        f"this process advertises {advertised_url!r}, which SERVING_URL ({', '.join(listed)}) does not list: the web "
        "will send its warm endpoints' requests to other processes first. Set SERVING_ADVERTISE_URL to this "
        "process's entry in SERVING_URL."
    )


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
