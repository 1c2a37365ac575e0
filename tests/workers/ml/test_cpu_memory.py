"""CPU training keeps freed tensor memory in the process's heap for the next step (glibc's allocator settings)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.workers.ml.engine_fixtures import train
from workers.ml import cpu_memory
from workers.ml.data.samples import write_sample_datasets

REPOSITORY_ROOT = Path(__file__).resolve().parents[3]
# In a fresh interpreter: where does a 16 MB tensor's memory come from, the heap or a mapping of its own?
_WHERE_A_TENSOR_LIVES = """
import sys
import torch
from workers.ml import cpu_memory

def in_heap(address):
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            start, end = (int(bound, 16) for bound in line.split()[0].split("-"))
            if start <= address < end:
                return True
    return False

if sys.argv[1] == "kept":
    with cpu_memory.kept_for_reuse() as applied:
        assert applied
        print(in_heap(torch.empty(16 * 2**20, dtype=torch.uint8).data_ptr()))
else:
    print(in_heap(torch.empty(16 * 2**20, dtype=torch.uint8).data_ptr()))
"""


def _tensor_in_heap(arm: str) -> bool:
    completed = subprocess.run(
        [sys.executable, "-c", _WHERE_A_TENSOR_LIVES, arm],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return completed.stdout.strip() == "True"


@pytest.mark.skipif(cpu_memory._glibc() is None or not Path("/proc/self/maps").exists(), reason="needs Linux glibc")
def test_large_tensors_come_from_the_reused_heap_instead_of_fresh_mappings() -> None:
    """By default glibc maps a 16 MB block on its own and unmaps it when freed (the next step's tensor is new pages
    to fault in and zero); with the settings it comes from the heap, whose freed memory the next step reuses."""
    assert _tensor_in_heap("default") is False
    assert _tensor_in_heap("kept") is True


def test_a_cpu_run_keeps_freed_memory_for_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entered: list[bool] = []
    original = cpu_memory.kept_for_reuse

    def recording():
        entered.append(True)
        return original()

    monkeypatch.setattr(cpu_memory, "kept_for_reuse", recording)
    samples = write_sample_datasets(str(tmp_path / "samples"))
    run = train(samples["corpus.txt"], tmp_path / "model", max_steps=2)
    assert run.result.steps_completed == 2 and entered == [True]
