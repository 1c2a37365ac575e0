"""The packed GPT-2 body replayed as CUDA graphs (``workers.ml.engine``, compile mode "reduce-overhead") trains like
the same body compiled without them, with one micro-batch per step and with gradient accumulation (whose gradients
then live in buffers outside the graphs' memory pool). CUDA only: benchmarks/gpu/checks.sh runs this file on a GPU
machine; the CPU side of the bookkeeping is tested in test_engine.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.workers.ml.engine_fixtures import dropout_free_models, train
from workers.ml import engine
from workers.ml.data.samples import write_sample_datasets

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def test_cuda_graphs_train_like_the_compiled_body_without_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    samples = write_sample_datasets(str(tmp_path / "samples"))
    common = {"max_steps": 6, "max_length": 128, "compile": "on", "device": "cuda", "precision": "bf16"}
    with dropout_free_models():
        monkeypatch.setenv(engine.CUDA_GRAPHS_VARIABLE, "0")
        plain = train(samples["corpus.txt"], tmp_path / "plain", batch_size=4, gradient_accumulation_steps=2, **common)
        monkeypatch.delenv(engine.CUDA_GRAPHS_VARIABLE)
        graphs = {
            accumulation: train(
                samples["corpus.txt"],
                tmp_path / f"graphs-{accumulation}",
                batch_size=8 // accumulation,
                gradient_accumulation_steps=accumulation,
                **common,
            )  # fmt: skip
            for accumulation in (1, 2)
        }
    assert plain.recorder.start["cuda_graphs"] is False
    for run in graphs.values():
        assert run.recorder.start["cuda_graphs"] is True
        assert len(run.recorder.losses) == 6
        # bf16 matmuls over another split of the same 8 rows: equal to bf16 rounding, and learning alike.
        assert run.recorder.losses == pytest.approx(plain.recorder.losses, rel=2e-2)
        assert run.recorder.losses[-1] < run.recorder.losses[0]
    assert graphs[2].recorder.losses == pytest.approx(plain.recorder.losses, rel=1e-3)
