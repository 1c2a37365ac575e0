"""Settings of the serving process, read once from the environment (each with an embedded default)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ServingConfig:
    """How one serving process runs; several processes may run side by side with the same values."""

    redis_url: str
    """Where the deployment registry lives (``REDIS_URL``)."""
    token: str
    """Shared secret the web process sends as ``X-Serving-Token`` (``SERVING_TOKEN``); empty disables the check."""
    data_dir: Path
    """The platform's data folder (``TUNEHOUSE_DATA_DIR``), home of the defaults below."""
    cache_dir: Path
    """Downloaded model folders, one per object-store prefix and revision (``SERVING_CACHE_DIR``)."""
    memory_budget_bytes: int
    """Loaded models' parameters and buffers stay under this (``SERVING_MEMORY_BUDGET_MB``): idle ones are evicted."""
    threads: int
    """torch intra-op threads (``SERVING_THREADS``, default half the cores)."""
    instance_id: str
    """``host:pid:port``, the field this process writes in each ``serving:status:<endpoint>`` hash."""
    registry_poll_seconds: float = 2.0
    """The registry hash is re-read this often, since pub/sub messages can be missed."""
    max_batch_size: int = 64
    """Sequences decoded together by one model's scheduler; further ones wait for a free slot."""
    classify_wait_seconds: float = 0.005
    """How long a classification batch collects requests before its forward pass."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, port: int = 0) -> ServingConfig:
        env = os.environ if environ is None else environ
        data_dir = Path(env.get("TUNEHOUSE_DATA_DIR") or REPOSITORY_ROOT / "var").resolve()
        default_threads = max(1, (os.cpu_count() or 2) // 2)
        return cls(
            redis_url=env.get("REDIS_URL") or "redis://127.0.0.1:6379/0",
            token=env.get("SERVING_TOKEN", ""),
            data_dir=data_dir,
            cache_dir=Path(env.get("SERVING_CACHE_DIR") or data_dir / "serving-cache"),
            memory_budget_bytes=int(float(env.get("SERVING_MEMORY_BUDGET_MB") or 4096) * 1024 * 1024),
            threads=max(1, int(env.get("SERVING_THREADS") or default_threads)),
            instance_id=f"{socket.gethostname()}:{os.getpid()}:{port}",
        )
