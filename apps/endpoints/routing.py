"""Which serving process answers an endpoint's request, when SERVING_URL lists several.

Rendezvous (highest-random-weight) hashing ranks the processes for each endpoint id: every web process computes
the same ranking without talking to the others, and adding or losing a process moves only the endpoints it ranked
first. So an endpoint's model is loaded in few processes (each loads on demand and unloads when idle), while its
requests can fail over to the next one in its ranking.

An endpoint spreads over the first ``max_replicas`` processes that are up: the least busy of them (requests this web
process has in flight there) goes first, ties to the higher rank, so a lightly used endpoint stays on one process.
A process that failed to connect is skipped for ``backoff_seconds`` (remembered per web process), then tried again.

Pure Python, no Django: the unit tests drive it with a fake clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

# The serving processes place warm replicas with the same ranking, so the web sends requests where they are.
from workers.serving.placement import rendezvous_order, serving_urls

__all__ = ["ServingPool", "rendezvous_order", "serving_pool", "serving_urls"]


class ServingPool:
    """The serving processes one web process knows, with what it remembers about them (thread-safe: sync views call
    serving through ``async_to_sync``, each on its own event loop)."""

    def __init__(
        self, urls: Sequence[str], *, backoff_seconds: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.urls = tuple(urls)
        self.backoff_seconds = backoff_seconds
        self.clock = clock
        self._failed_until: dict[str, float] = {}
        self._in_flight: dict[str, int] = dict.fromkeys(self.urls, 0)
        self._lock = threading.Lock()

    def candidates(self, key: str, *, spread: int = 1) -> list[str]:
        """Every process in the order to try it for ``key``: the chosen one among the first ``spread`` that are up,
        the other live ones by rank, then the ones in their backoff (by rank: better a late try than a sure 503)."""
        ranked = rendezvous_order(key, self.urls)
        with self._lock:
            now = self.clock()
            up = [url for url in ranked if self._failed_until.get(url, 0.0) <= now]
            down = [url for url in ranked if url not in up]
            head = up[: max(1, spread)]
            if not head:
                return down
            rank = {url: index for index, url in enumerate(head)}
            first = min(head, key=lambda url: (self._in_flight[url], rank[url]))
        return [first, *(url for url in up if url != first), *down]

    def mark_failed(self, url: str) -> None:
        with self._lock:
            self._failed_until[url] = self.clock() + self.backoff_seconds

    def mark_up(self, url: str) -> None:
        with self._lock:
            self._failed_until.pop(url, None)

    def is_up(self, url: str) -> bool:
        with self._lock:
            return self._failed_until.get(url, 0.0) <= self.clock()

    def in_flight(self, url: str) -> int:
        with self._lock:
            return self._in_flight[url]

    @contextmanager
    def counting(self, url: str) -> Iterator[None]:
        """Counts a request as in flight at ``url`` while the block runs."""
        self.begin(url)
        try:
            yield
        finally:
            self.end(url)

    def begin(self, url: str) -> None:
        with self._lock:
            self._in_flight[url] += 1

    def end(self, url: str) -> None:
        with self._lock:
            self._in_flight[url] -= 1


_pools: dict[tuple[str, float], ServingPool] = {}
_pools_lock = threading.Lock()


def serving_pool(setting: str, *, backoff_seconds: float) -> ServingPool:
    """The web process's one pool for this SERVING_URL (kept per value, so tests that change the setting get their
    own and the failure memory of one list never leaks into another)."""
    with _pools_lock:
        pool = _pools.get((setting, backoff_seconds))
        if pool is None:
            pool = _pools[(setting, backoff_seconds)] = ServingPool(
                serving_urls(setting), backoff_seconds=backoff_seconds
            )
        return pool
