"""Atomic, pickle-free training checkpoints: real files, real optimizers, real RNGs; no Django."""

from __future__ import annotations

import copy
import hashlib
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.optimization import Adafactor

from workers.ml.checkpoint import (
    MANIFEST_NAME,
    CheckpointInfo,
    latest_checkpoint,
    list_checkpoints,
    load_optimizer_state,
    load_tensors,
    optimizer_state_to_files,
    read_json,
    restore_rng_state,
    rng_state_to_files,
    save_tensors,
    write_checkpoint,
    write_json,
)


def _write_text(files: dict[str, str]) -> Callable[[Path], None]:
    def write_files(folder: Path) -> None:
        for name, text in files.items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")

    return write_files


def _steps(root: Path) -> list[int]:
    return [info.step for info in list_checkpoints(root)]


def _leftovers(root: Path) -> list[str]:
    return sorted(entry.name for entry in root.iterdir() if entry.name.startswith(".tmp-"))


# --- Writing, listing, pruning ----------------------------------------------------------------------------------------


def test_write_checkpoint_renames_a_complete_folder_into_place_with_checksums(tmp_path):
    root = tmp_path / "checkpoints"  # does not exist yet

    info = write_checkpoint(
        root,
        step=7,
        write_files=_write_text({"model.txt": "weights", "sub/dir/extra.txt": "more"}),
        metrics={"train_loss": 1.25},
    )

    assert info.step == 7
    assert info.path == root / "step-00000007"
    assert info.metrics == {"train_loss": 1.25}
    assert sorted(info.files) == ["model.txt", "sub/dir/extra.txt"]  # the manifest does not list itself
    for name, entry in info.files.items():
        data = (info.path / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest = read_json(info.path / MANIFEST_NAME)
    assert manifest == {
        "format_version": 1,
        "step": 7,
        "files": info.files,
        "metrics": {"train_loss": 1.25},
        "created_at": info.created_at,
    }
    assert sorted(entry.name for entry in root.iterdir()) == ["step-00000007"]  # no staging folder left
    assert list_checkpoints(root) == [info]
    assert latest_checkpoint(root) == info


def test_write_files_failing_leaves_nothing_behind(tmp_path):
    def write_files(folder: Path) -> None:
        (folder / "model.txt").write_text("half", encoding="utf-8")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoint(tmp_path, step=1, write_files=write_files)

    assert list(tmp_path.iterdir()) == []


def test_keeps_only_the_newest_k_checkpoints(tmp_path):
    for step in range(1, 6):
        write_checkpoint(tmp_path, step=step * 10, write_files=_write_text({"m.txt": str(step)}), keep=2)

    assert _steps(tmp_path) == [40, 50]
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["step-00000040", "step-00000050"]

    with pytest.raises(ValueError, match="keep"):
        write_checkpoint(tmp_path, step=60, write_files=_write_text({"m.txt": "6"}), keep=0)


def test_the_checkpoint_just_written_is_never_pruned(tmp_path):
    # A job that resumed from step 10 (say step 20 was corrupt) writes step 15: with keep=1, the step-based "newest"
    # is 20, but deleting 15 would lose the only checkpoint of the run that is actually going on.
    write_checkpoint(tmp_path, step=10, write_files=_write_text({"m.txt": "10"}), keep=1)
    write_checkpoint(tmp_path, step=20, write_files=_write_text({"m.txt": "20"}), keep=1)
    write_checkpoint(tmp_path, step=15, write_files=_write_text({"m.txt": "15"}), keep=1)

    assert _steps(tmp_path) == [15, 20]


def test_writing_the_same_step_again_replaces_it(tmp_path):
    write_checkpoint(tmp_path, step=3, write_files=_write_text({"old.txt": "before the crash"}), metrics={"run": 1})
    info = write_checkpoint(tmp_path, step=3, write_files=_write_text({"new.txt": "after"}), metrics={"run": 2})

    assert [(c.step, c.metrics) for c in list_checkpoints(tmp_path)] == [(3, {"run": 2})]
    assert sorted(name.name for name in info.path.iterdir()) == [MANIFEST_NAME, "new.txt"]
    assert (info.path / "new.txt").read_text(encoding="utf-8") == "after"
    assert _leftovers(tmp_path) == []
    assert latest_checkpoint(tmp_path) == info


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to kill a writer mid-write")
def test_a_writer_killed_mid_write_leaves_a_folder_that_is_ignored_then_cleaned(tmp_path):
    write_checkpoint(tmp_path, step=1, write_files=_write_text({"m.txt": "one"}))

    def write_then_die(folder: Path) -> None:
        (folder / "model.txt").write_bytes(b"half a model")
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 between the data files and the manifest

    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        try:
            write_checkpoint(tmp_path, step=2, write_files=write_then_die)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    [leftover] = _leftovers(tmp_path)
    assert leftover.startswith(".tmp-step-2-")
    assert (tmp_path / leftover / "model.txt").exists() and not (tmp_path / leftover / MANIFEST_NAME).exists()
    assert _steps(tmp_path) == [1]
    assert latest_checkpoint(tmp_path).step == 1

    # A .tmp- folder newer than the next write belongs to some other write and is left alone.
    future = tmp_path / ".tmp-step-9-someone-else"
    future.mkdir()
    os.utime(future, (time.time() + 3600, time.time() + 3600))

    write_checkpoint(tmp_path, step=2, write_files=_write_text({"m.txt": "two"}))

    assert _leftovers(tmp_path) == [future.name]
    assert _steps(tmp_path) == [1, 2]


def test_folders_that_are_not_complete_checkpoints_are_ignored(tmp_path):
    write_checkpoint(tmp_path, step=1, write_files=_write_text({"m.txt": "one"}))
    info = write_checkpoint(tmp_path, step=2, write_files=_write_text({"m.txt": "two"}))

    (tmp_path / "step-00000003").mkdir()  # no manifest
    bad_json = tmp_path / "step-00000004"
    bad_json.mkdir()
    (bad_json / MANIFEST_NAME).write_text("{not json", encoding="utf-8")
    wrong_step = tmp_path / "step-00000005"
    wrong_step.mkdir()
    write_json(wrong_step / MANIFEST_NAME, read_json(info.path / MANIFEST_NAME))  # step 2's manifest, copied
    (wrong_step / "m.txt").write_text("two", encoding="utf-8")
    escaping = tmp_path / "step-00000006"
    escaping.mkdir()
    write_json(
        escaping / MANIFEST_NAME,
        {**read_json(info.path / MANIFEST_NAME), "step": 6, "files": {"../step-00000002/m.txt": info.files["m.txt"]}},
    )
    (tmp_path / "notes.txt").write_text("not a checkpoint", encoding="utf-8")

    assert _steps(tmp_path) == [1, 2]
    assert latest_checkpoint(tmp_path) == info
    assert list_checkpoints(tmp_path / "missing") == []
    assert latest_checkpoint(tmp_path / "missing") is None


def test_a_corrupt_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    previous = write_checkpoint(tmp_path, step=100, write_files=_write_text({"model.bin": "a" * 64}))
    newest = write_checkpoint(tmp_path, step=200, write_files=_write_text({"model.bin": "b" * 64}))

    # Bit rot: same size, different bytes. The cheap listing cannot see it; the checksums can.
    path = newest.path / "model.bin"
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))

    assert _steps(tmp_path) == [100, 200]
    assert latest_checkpoint(tmp_path, verify_checksums=False) == newest
    assert latest_checkpoint(tmp_path, verify_checksums=True) == previous

    # A file cut short is not even listed.
    path.write_bytes(b"b" * 10)
    assert _steps(tmp_path) == [100]

    (previous.path / "model.bin").unlink()
    assert latest_checkpoint(tmp_path) is None


# --- JSON and tensors -------------------------------------------------------------------------------------------------


def test_json_helpers_write_sorted_utf8_atomically(tmp_path):
    path = tmp_path / "data.json"
    write_json(path, {"b": 1, "a": "café"})
    write_json(path, {"b": 2, "a": "naïve"})

    assert read_json(path) == {"a": "naïve", "b": 2}
    assert path.read_text(encoding="utf-8").index('"a"') < path.read_text(encoding="utf-8").index('"b"')
    assert [entry.name for entry in tmp_path.iterdir()] == ["data.json"]  # no temp file left


def test_tensors_round_trip_through_safetensors(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"weight": base, "transposed_view": base.t(), "ints": torch.tensor([1, 2], dtype=torch.int64)}

    save_tensors(tmp_path / "t.safetensors", tensors)  # shared, non-contiguous storage is fine: copies are saved
    loaded = load_tensors(tmp_path / "t.safetensors")

    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype


# --- Optimizer state and a full resume --------------------------------------------------------------------------------

_OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=5e-2, momentum=0.9, nesterov=True),
    # Relative step: the learning rate itself comes from the int "step" in the state.
    "adafactor": lambda params: Adafactor(params),
    "adafactor_beta1": lambda params: Adafactor(
        params, lr=1e-2, beta1=0.9, relative_step=False, scale_parameter=False, warmup_init=False
    ),
}
_FEATURES = 6
_BATCH = 4
_DATASET = 24


def _model() -> torch.nn.Module:
    # Dropout makes the result depend on the torch RNG too, so a resume that forgot it would diverge.
    return torch.nn.Sequential(
        torch.nn.Linear(_FEATURES, 8), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 3)
    )


def _dataset() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    return torch.randn(_DATASET, _FEATURES, generator=generator), torch.randn(_DATASET, 3, generator=generator)


def _train(model, optimizer, sampler: torch.Generator, steps: int) -> None:
    inputs, targets = _dataset()
    for _ in range(steps):
        batch = torch.randperm(_DATASET, generator=sampler)[:_BATCH]
        loss = torch.nn.functional.mse_loss(model(inputs[batch]), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _assert_same_state_dict(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    assert actual["param_groups"] == expected["param_groups"]  # tuples stay tuples: (0.9, 0.999) != [0.9, 0.999]
    assert [type(v) for g in actual["param_groups"] for v in g.values()] == [
        type(v) for g in expected["param_groups"] for v in g.values()
    ]
    assert actual["state"].keys() == expected["state"].keys()
    for index, state in expected["state"].items():
        assert list(actual["state"][index]) == list(state)
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(actual["state"][index][name], value), (index, name)
                assert actual["state"][index][name].dtype == value.dtype
            else:
                assert actual["state"][index][name] == value and type(actual["state"][index][name]) is type(value)


@pytest.mark.parametrize("optimizer_name", sorted(_OPTIMIZERS))
def test_resuming_from_a_checkpoint_trains_exactly_like_never_stopping(tmp_path, optimizer_name):
    make_optimizer = _OPTIMIZERS[optimizer_name]
    torch.manual_seed(0)
    model = _model()
    optimizer = make_optimizer(list(model.parameters()))
    sampler = torch.Generator().manual_seed(42)
    _train(model, optimizer, sampler, steps=5)

    def write_files(folder: Path) -> None:
        save_tensors(folder / "model.safetensors", model.state_dict())
        optimizer_state_to_files(optimizer, folder)
        rng_state_to_files(folder, generators={"sampler": sampler})

    write_checkpoint(tmp_path, step=5, write_files=write_files)
    saved_optimizer_state = copy.deepcopy(optimizer.state_dict())  # state_dict() shares the live tensors
    _train(model, optimizer, sampler, steps=4)  # the run that never stopped

    torch.manual_seed(999)  # a new process: different weights, different RNG
    resumed_model = _model()
    resumed_optimizer = make_optimizer(list(resumed_model.parameters()))
    resumed_sampler = torch.Generator().manual_seed(7)
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.step == 5
    assert {Path(name).suffix for name in checkpoint.files} == {".json", ".safetensors"}  # nothing pickled
    resumed_model.load_state_dict(load_tensors(checkpoint.path / "model.safetensors"))
    load_optimizer_state(resumed_optimizer, checkpoint.path)
    restore_rng_state(checkpoint.path, generators={"sampler": resumed_sampler})
    _assert_same_state_dict(resumed_optimizer.state_dict(), saved_optimizer_state)
    _train(resumed_model, resumed_optimizer, resumed_sampler, steps=4)

    for (name, expected), actual in zip(model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(actual, expected), name


def test_sgd_momentum_buffer_of_none_round_trips(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for param in model.parameters():
        optimizer.state[param]["momentum_buffer"] = None  # how a buffer looks before the first step
    optimizer_state_to_files(optimizer, tmp_path)

    resumed = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.5, momentum=0.0)
    load_optimizer_state(resumed, tmp_path)

    _assert_same_state_dict(resumed.state_dict(), optimizer.state_dict())
    assert resumed.state_dict()["state"] == {0: {"momentum_buffer": None}, 1: {"momentum_buffer": None}}


def test_an_optimizer_value_json_cannot_hold_is_refused(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.state[model.weight]["callback"] = object()

    with pytest.raises(TypeError, match="without pickle"):
        optimizer_state_to_files(optimizer, tmp_path)


# --- Random number generators -----------------------------------------------------------------------------------------


def test_rng_state_round_trips(tmp_path):
    torch.manual_seed(11)
    random.seed(12)
    np.random.seed(13)
    sampler = torch.Generator().manual_seed(14)
    np.random.randn()  # leaves a cached Gaussian in NumPy's state, which must survive too
    random.gauss(0.0, 1.0)

    rng_state_to_files(tmp_path, generators={"sampler": sampler})
    expected = (torch.rand(3), random.random(), np.random.rand(3), torch.randperm(10, generator=sampler))

    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    sampler.manual_seed(0)
    restore_rng_state(tmp_path, generators={"sampler": sampler})
    actual = (torch.rand(3), random.random(), np.random.rand(3), torch.randperm(10, generator=sampler))

    assert torch.equal(actual[0], expected[0])
    assert actual[1] == expected[1]
    assert np.array_equal(actual[2], expected[2])
    assert torch.equal(actual[3], expected[3])
    assert {path.suffix for path in tmp_path.iterdir()} == {".json", ".safetensors"}

    with pytest.raises(KeyError, match="shuffler"):
        restore_rng_state(tmp_path, generators={"shuffler": torch.Generator()})


def test_checkpoint_info_is_frozen(tmp_path):
    info = write_checkpoint(tmp_path, step=1, write_files=_write_text({"m.txt": "x"}))
    assert isinstance(info, CheckpointInfo)
    with pytest.raises(AttributeError):
        info.step = 2  # type: ignore[misc]
