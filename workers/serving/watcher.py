"""Keeps the manager in step with the Redis registry (pub/sub wake-ups plus a full re-read every ~2 s) and tells
the web process, on the same beat, that this instance is alive and what it holds."""

from __future__ import annotations

import logging
import threading
import time

import redis

from workers.serving.manager import ModelManager
from workers.serving.registry import (
    CHANGED_CHANNEL,
    DEPLOYMENTS_KEY,
    INSTANCE_KEY_PREFIX,
    INSTANCES_KEY,
    STATUS_KEY_PREFIX,
    Deployment,
    status_value,
)

logger = logging.getLogger(__name__)


class RegistryWatcher:
    def __init__(
        self, redis_url: str, instance_id: str, *, poll_seconds: float = 2.0, advertised_url: str = ""
    ) -> None:
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        self.instance_id = instance_id
        self.advertised_url = advertised_url
        self.poll_seconds = poll_seconds
        self.manager: ModelManager | None = None
        self.registry_read = threading.Event()
        """Set once the registry was read; cleared while Redis does not answer (``/readyz``)."""
        self.registry_loaded = threading.Event()
        """Set the first time the registry was read, never cleared: from then on the deployments in memory can
        answer requests, even while Redis is away (before it, every endpoint would look unknown)."""
        # Several missed beats in a row before the web process stops counting this instance's reports.
        self.alive_seconds = max(10, int(5 * poll_seconds))
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serving-registry", daemon=True)

    def start(self, manager: ModelManager) -> None:
        self.manager = manager
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        try:
            # Its reports stop counting at once, and its peers take its warm replicas over at their next beat.
            self.redis.delete(INSTANCE_KEY_PREFIX + self.instance_id)
            self.redis.srem(INSTANCES_KEY, self.instance_id)
        except redis.RedisError:
            logger.warning("could not withdraw instance %s", self.instance_id, exc_info=True)

    def report_status(self, endpoint: str, revision: int, state: str, error: str | None) -> None:
        try:
            value = status_value(revision=revision, state=state, error=error)
            self.redis.hset(f"{STATUS_KEY_PREFIX}{endpoint}", self.instance_id, value)
        except redis.RedisError:
            logger.warning("could not report %s of %s revision %s", state, endpoint, revision, exc_info=True)

    def read_registry(self) -> dict[str, Deployment]:
        deployments = {}
        for endpoint, raw in self.redis.hgetall(DEPLOYMENTS_KEY).items():
            try:
                deployments[endpoint.decode()] = Deployment.from_json(raw)
            except (ValueError, KeyError, TypeError):
                logger.warning("ignoring a malformed registry entry for %r", endpoint)
        return deployments

    def refresh(self) -> None:
        assert self.manager is not None
        self.manager.update_registry(self.read_registry())
        self.registry_read.set()
        self.registry_loaded.set()

    def heartbeat(self) -> None:
        """Renews this instance's liveness key, rewrites its current states (a report lost while Redis was away, or
        cleared by the web process, comes back within one beat) and tells the manager which processes are alive."""
        assert self.manager is not None
        pipeline = self.redis.pipeline(transaction=False)
        pipeline.set(INSTANCE_KEY_PREFIX + self.instance_id, self.advertised_url, ex=self.alive_seconds)
        pipeline.sadd(INSTANCES_KEY, self.instance_id)
        for endpoint, revision, state, error in self.manager.current_states():
            value = status_value(revision=revision, state=state, error=error)
            pipeline.hset(f"{STATUS_KEY_PREFIX}{endpoint}", self.instance_id, value)
        pipeline.execute()
        self.manager.set_live_processes(self.live_urls())

    def live_urls(self) -> set[str]:
        """The advertised URLs of the processes whose liveness key has not expired (the expired ones are dropped)."""
        instances = sorted(member.decode() for member in self.redis.smembers(INSTANCES_KEY))
        if not instances:
            return set()
        values = self.redis.mget([INSTANCE_KEY_PREFIX + instance for instance in instances])
        gone = [instance for instance, value in zip(instances, values, strict=True) if value is None]
        if gone:
            self.redis.srem(INSTANCES_KEY, *gone)
        return {value.decode() for value in values if value}

    def _run(self) -> None:
        pubsub = None
        while not self._stopping.is_set():
            try:
                if pubsub is None:
                    pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(CHANGED_CHANNEL)
                self.heartbeat()  # before the registry: eager loads need to know the live peers
                self.refresh()
                deadline = time.monotonic() + self.poll_seconds
                while not self._stopping.is_set() and time.monotonic() < deadline:
                    message = pubsub.get_message(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
                    if message is not None:
                        break  # re-read at once: the hash holds the whole truth, the message only says "look"
                self.manager.sweep()
            except (redis.RedisError, OSError):
                logger.warning("the registry could not be read; retrying", exc_info=True)
                self.registry_read.clear()
                pubsub = None
                self._stopping.wait(1.0)
        if pubsub is not None:
            pubsub.close()
