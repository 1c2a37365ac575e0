"""Settings of the serving process, read once from the environment (each with an embedded default)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

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
    device: str
    """Where models run, ``cpu`` or ``cuda`` (``SERVING_DEVICE``; ``auto``, the default, takes the GPU if any)."""
    dtype: torch.dtype
    """Loaded models' parameter type (``SERVING_DTYPE``: ``float32``, ``bfloat16`` or ``float16``; ``auto``, the
    default, is bfloat16 on a GPU that supports it, else float16 on a GPU; on a CPU bfloat16 where it has bfloat16
    instructions (AVX512-BF16 or AMX), else float32)."""
    instance_id: str
    """``host:pid:port``, the field this process writes in each ``serving:status:<endpoint>`` hash."""
    advertised_url: str = ""
    """This process's URL exactly as SERVING_URL lists it (``SERVING_ADVERTISE_URL``; ``python -m workers.serving``
    defaults it to ``http://HOST:PORT`` unless HOST is a wildcard address). Warm replicas (``min_replicas``) are placed
    on the first processes of each endpoint's rendezvous ranking of these URLs; empty: this process keeps one of every
    such endpoint, as a single process does."""
    registry_poll_seconds: float = 2.0
    """The registry hash is re-read this often, since pub/sub messages can be missed."""
    max_batch_size: int = 64
    """Sequences decoded together by one model's scheduler (causal LM) or in its batches in flight (seq2seq); further
    ones wait for a free slot."""
    classify_wait_seconds: float = 0.005
    """How long a classification batch collects requests before its forward pass."""
    seq2seq_gather_seconds: float = 0.005
    """How long a seq2seq runner waits after a request arrives before starting its batch, so that requests sent
    together share one."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, port: int = 0, host: str = "") -> ServingConfig:
        env = os.environ if environ is None else environ
        data_dir = Path(env.get("TUNEHOUSE_DATA_DIR") or REPOSITORY_ROOT / "var").resolve()
        default_threads = max(1, (os.cpu_count() or 2) // 2)
        device = device_from_setting(env.get("SERVING_DEVICE") or "auto")
        return cls(
            redis_url=env.get("REDIS_URL") or "redis://127.0.0.1:6379/0",
            token=env.get("SERVING_TOKEN", ""),
            data_dir=data_dir,
            cache_dir=Path(env.get("SERVING_CACHE_DIR") or data_dir / "serving-cache"),
            memory_budget_bytes=int(float(env.get("SERVING_MEMORY_BUDGET_MB") or 4096) * 1024 * 1024),
            threads=max(1, int(env.get("SERVING_THREADS") or default_threads)),
            device=device,
            dtype=dtype_from_setting(env.get("SERVING_DTYPE") or "auto", device),
            instance_id=f"{socket.gethostname()}:{os.getpid()}:{port}",
            advertised_url=(env.get("SERVING_ADVERTISE_URL") or default_advertised_url(host, port)).rstrip("/"),
            max_batch_size=_positive(env, "SERVING_MAX_BATCH_SIZE", int, cls.max_batch_size),
            classify_wait_seconds=_positive(env, "SERVING_CLASSIFY_WAIT_SECONDS", float, cls.classify_wait_seconds),
            seq2seq_gather_seconds=_positive(env, "SERVING_SEQ2SEQ_GATHER_SECONDS", float, cls.seq2seq_gather_seconds),
        )


def _positive(env: Mapping[str, str], name: str, kind: type, default):
    """A positive setting from the environment (unset or empty: ``default``); anything else stops the process at
    start with the variable's name, rather than serving with a value nobody meant."""
    raw = env.get(name) or ""
    if not raw.strip():
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or value <= 0:
        raise ValueError(f"{name} must be a positive {'whole ' if kind is int else ''}number, not {raw!r}.")
    return value


def default_advertised_url(host: str, port: int) -> str:
    """``http://HOST:PORT`` when that is an address others can use; empty for a wildcard or unknown one."""
    if not host or not port or host in ("0.0.0.0", "::", "[::]"):  # noqa: S104 - compared, not bound
        return ""
    return f"http://{'[' + host + ']' if ':' in host and not host.startswith('[') else host}:{port}"


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """``dtype`` as ``SERVING_DTYPE`` spells it (``bfloat16``, ...)."""
    return str(dtype).removeprefix("torch.")


def device_from_setting(value: str) -> str:
    """``SERVING_DEVICE``'s value resolved: ``cpu`` or ``cuda``."""
    choice = value.strip().lower()
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice not in ("cpu", "cuda"):
        raise ValueError(f"SERVING_DEVICE must be auto, cpu or cuda, not {value!r}.")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "SERVING_DEVICE is cuda, but torch sees no CUDA GPU here (no GPU or driver, a CPU-only torch build, or an "
            "empty CUDA_VISIBLE_DEVICES): set SERVING_DEVICE to cpu or auto."
        )
    return choice


def dtype_from_setting(value: str, device: str) -> torch.dtype:
    """``SERVING_DTYPE``'s value resolved for models running on ``device``."""
    choice = value.strip().lower()
    if choice == "auto":
        if device == "cpu":
            return torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32
        # Native support only: GPUs before Ampere emulate bfloat16, slower than float16.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if choice not in _DTYPES:
        raise ValueError(f"SERVING_DTYPE must be auto, float32, bfloat16 or float16, not {value!r}.")
    return _DTYPES[choice]


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), which oneDNN's matmuls use: there a
    bfloat16 model decodes faster than a float32 one (half the bytes of weights to stream, and the cache stays float32,
    see ``workers.serving.attention``). Elsewhere oneDNN emulates bfloat16 (never measured to pay) and auto keeps
    float32.
    (torch's checks are private functions of ``torch.cpu``: a build without them counts as no.)"""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)
