"""glibc's allocator settings for training on a CPU: freed tensor memory is kept for the next step.

A CPU training step allocates and frees the same large tensors every step (logits and gradients of a loss chunk: 8 MB
each for GPT-2 mini). With glibc's defaults, as soon as one of them is trimmed back to the kernel, the next step's
tensors are new pages that the kernel must fault in and zero: in a profile, the conversion of a 8,192 x 256 weight
gradient took 2.4 ms inside a step against 0.17 ms in a loop that reused its memory. Raising the mmap threshold to
its maximum (32 MB) and the trim threshold far above a step's churn keeps that memory in the heap: GPT-2 mini trained
7-8% faster on a 2-core AMD EPYC core (4,378-4,448 → 4,697-4,805 tokens/s), a SmolLM2 head's loss 6-7%. PyTorch's
CPU performance guides reach for jemalloc or tcmalloc for the same reason; these two settings need no other library.
(Setting the trim threshold alone is worse than the defaults: it also freezes glibc's adaptive mmap threshold at
128 KB, and every tensor then comes from a fresh mapping: 3,240 tokens/s.)

The settings stay for the rest of the process (a worker's next run profits too); at the end of each run the heap's
free memory is handed back (``malloc_trim``), so a worker does not keep a finished job's peak. Elsewhere than glibc
(macOS, musl) nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's ceiling for the mmap threshold on 64-bit systems (HEAP_MAX_SIZE / 2): larger blocks are always mapped.
_MMAP_THRESHOLD_MAX = 32 * 2**20
# Free memory at the top of the heap is kept up to this much during a run (mallopt takes a C int).
_TRIM_THRESHOLD = 2**30


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        library = ctypes.CDLL(name)
    except OSError:
        return None
    if not all(hasattr(library, symbol) for symbol in ("mallopt", "malloc_trim", "gnu_get_libc_version")):
        return None
    return library


@functools.cache
def _keep_freed_memory() -> bool:
    library = _glibc()
    return bool(
        library is not None
        and library.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        and library.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )


@contextlib.contextmanager
def kept_for_reuse() -> Iterator[bool]:
    """Freed memory stays in the process for reuse; on leaving, what is free goes back to the system. Yields whether
    the allocator took the settings (glibc only)."""
    applied = _keep_freed_memory()
    try:
        yield applied
    finally:
        library = _glibc()
        if applied and library is not None:
            library.malloc_trim(0)
