"""Training checkpoints that a resumed job can trust, written without pickle.

A checkpoint is a folder ``<root>/step-<step:08d>`` holding whatever files the trainer writes plus a ``manifest.json``
that lists every file with its sha256 and size. The folder is built under a ``.tmp-*`` name and renamed into place
only once complete, and the manifest is written last: a process killed at any moment leaves either a ``.tmp-*``
folder (ignored, cleaned by the next write) or a whole checkpoint, never something that looks like one but isn't.

No pickle anywhere: ``torch.load`` on a checkpoint of a tenant's job would run whatever code the file carries, so
tensors go to safetensors and everything else to JSON.

One writer per ``root`` at a time is assumed (one training job owns its checkpoint folder); readers may run alongside.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
OPTIMIZER_TENSORS_NAME = "optimizer.safetensors"
OPTIMIZER_JSON_NAME = "optimizer.json"
RNG_TENSORS_NAME = "rng.safetensors"
RNG_JSON_NAME = "rng.json"

_TMP_PREFIX = ".tmp-"
# Eight digits or more: ``f"{step:08d}"`` only pads, so step 123456789 is nine digits.
_STEP_FOLDER = re.compile(r"step-(\d{8,})")


def checkpoint_folder_name(step: int) -> str:
    """The name of the folder of a step's checkpoint under the checkpoint root."""
    return f"step-{step:08d}"


_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint on disk, as its manifest describes it."""

    step: int
    path: Path
    """The ``step-<step:08d>`` folder."""
    metrics: dict
    """Whatever the trainer passed to :func:`write_checkpoint` (e.g. the loss at that step)."""
    created_at: float
    """Unix time the manifest was written."""
    files: dict[str, dict]
    """Relative POSIX path → ``{"sha256": hex, "size": bytes}``; the manifest itself is not listed."""


# --- JSON -------------------------------------------------------------------------------------------------------------


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as UTF-8 JSON so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    text = json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    # Same folder as the target: os.replace is only atomic within one filesystem.
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{uuid.uuid4().hex}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            # Without this, a power cut after the rename can leave the new name pointing at empty blocks.
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def read_json(path: str | Path) -> Any:
    """Read a UTF-8 JSON file."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# --- Checkpoint folders -----------------------------------------------------------------------------------------------


def write_checkpoint(
    root: str | Path,
    *,
    step: int,
    write_files: Callable[[Path], None],
    metrics: dict | None = None,
    keep: int = 3,
) -> CheckpointInfo:
    """Write the checkpoint for ``step`` under ``root`` atomically, then prune old ones.

    ``write_files(folder)`` writes the checkpoint's files (subfolders allowed) into an empty staging folder; it must
    not write ``manifest.json``. A checkpoint already there for the same step (a re-run after a crash) is replaced.
    Afterwards the newest ``keep`` complete checkpoints by step are kept (the one just written always is), older
    ones are deleted, and so are ``.tmp-*`` leftovers of writes killed before this one started.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep < 1:
        # keep=0 would delete the checkpoint we just wrote.
        raise ValueError(f"keep must be at least 1, got {keep!r}")
    # Round-tripped now: a metric JSON cannot hold fails before the trainer spends time writing files, and the
    # returned info holds what list_checkpoints will read back (tuples become lists).
    metrics = json.loads(json.dumps(metrics or {}))
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    started_at = time.time()
    staging = root / f"{_TMP_PREFIX}step-{step}-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        write_files(staging)
        if (staging / MANIFEST_NAME).exists():
            raise ValueError(f"write_files must not write {MANIFEST_NAME}: the checkpoint writes it last")
        files = _hash_and_sync_files(staging)
        created_at = time.time()
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "files": files,
            "metrics": metrics,
            "created_at": created_at,
        }
        # Last, so that a folder without a valid manifest can only be an unfinished one.
        write_json(staging / MANIFEST_NAME, manifest)
        final = root / checkpoint_folder_name(step)
        _move_into_place(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(root)

    info = CheckpointInfo(step=step, path=final, metrics=metrics, created_at=created_at, files=files)
    _prune(root, just_written=final, keep=keep, started_at=started_at)
    return info


def list_checkpoints(root: str | Path) -> list[CheckpointInfo]:
    """The complete checkpoints under ``root``, oldest step first.

    Complete means: a ``step-XXXXXXXX`` folder with a readable manifest for that step whose files all exist with the
    recorded size. Contents are not hashed here; :func:`latest_checkpoint` does that.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_FOLDER.fullmatch(entry.name)
        if match is None or not entry.is_dir():
            continue
        info = _read_manifest(entry, int(match.group(1)))
        if info is not None and _files_have_recorded_sizes(info):
            found.append(info)
    return sorted(found, key=lambda info: info.step)


def latest_checkpoint(root: str | Path, *, verify_checksums: bool = True) -> CheckpointInfo | None:
    """The newest checkpoint to resume from, or ``None``.

    With ``verify_checksums`` every file is hashed and a checkpoint whose bytes changed (a bad disk, a copy cut
    short with the size kept) is skipped for the one before it: resuming from an older step wastes minutes, resuming
    from garbage wastes the run.
    """
    for info in reversed(list_checkpoints(root)):
        if not verify_checksums or _files_match_checksums(info):
            return info
    return None


def _hash_and_sync_files(folder: Path) -> dict[str, dict]:
    files: dict[str, dict] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            # A link's target is outside the checkpoint's control: it can change or vanish after the checksum.
            raise ValueError(f"checkpoint files must be regular files, {path} is a symbolic link")
        if path.is_dir():
            _fsync_dir(path)
            continue
        digest = hashlib.sha256()
        size = 0
        with open(path, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
            # The writer may not have synced; the manifest must never be on disk before the bytes it vouches for.
            os.fsync(handle.fileno())
        files[path.relative_to(folder).as_posix()] = {"sha256": digest.hexdigest(), "size": size}
    _fsync_dir(folder)
    return files


def _move_into_place(staging: Path, final: Path) -> None:
    if not final.exists():
        os.rename(staging, final)
        return
    # A re-run of a step after a crash. There is no atomic swap of two folders, so the old one goes aside under a
    # .tmp- name first: if we are killed in between, the step is missing (earlier checkpoints remain) and the next
    # write cleans the leftover; there is never a half-old half-new folder.
    aside = final.with_name(f"{_TMP_PREFIX}replaced-{final.name}-{uuid.uuid4().hex}")
    os.rename(final, aside)
    os.rename(staging, final)
    _fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _prune(root: Path, *, just_written: Path, keep: int, started_at: float) -> None:
    checkpoints = list_checkpoints(root)
    kept = {info.path for info in checkpoints[-keep:]} | {just_written}
    doomed = [info.path for info in checkpoints if info.path not in kept]
    for entry in root.iterdir():
        # Only leftovers older than this write: a .tmp- folder that is newer belongs to a write we know nothing
        # about and is not ours to delete.
        if entry.name.startswith(_TMP_PREFIX) and _mtime(entry) < started_at:
            doomed.append(entry)
    for path in doomed:
        _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        # Renamed out of the way first, so a kill during rmtree leaves a .tmp- leftover rather than a step- folder
        # with files missing.
        if not path.name.startswith(_TMP_PREFIX):
            doomed = path.with_name(f"{_TMP_PREFIX}pruned-{path.name}-{uuid.uuid4().hex}")
            os.rename(path, doomed)
            path = doomed
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _read_manifest(folder: Path, step: int) -> CheckpointInfo | None:
    try:
        manifest = read_json(folder / MANIFEST_NAME)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        return None
    files = manifest.get("files")
    metrics = manifest.get("metrics")
    created_at = manifest.get("created_at")
    # A manifest copied into the wrong folder would resume the wrong step.
    if manifest.get("step") != step or folder.name != checkpoint_folder_name(step):
        return None
    if not isinstance(files, dict) or not isinstance(metrics, dict) or not isinstance(created_at, int | float):
        return None
    for name, entry in files.items():
        if not _is_safe_relative_path(name):
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            return None
        if not isinstance(entry.get("size"), int) or isinstance(entry.get("size"), bool):
            return None
    return CheckpointInfo(step=step, path=folder, metrics=metrics, created_at=float(created_at), files=files)


def _is_safe_relative_path(name: object) -> bool:
    # The manifest must not make us read files outside the checkpoint.
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def _files_have_recorded_sizes(info: CheckpointInfo) -> bool:
    for name, entry in info.files.items():
        path = info.path / name
        try:
            if not path.is_file() or path.is_symlink() or path.stat().st_size != entry["size"]:
                return False
        except OSError:
            return False
    return True


def _files_match_checksums(info: CheckpointInfo) -> bool:
    for name, entry in info.files.items():
        digest = hashlib.sha256()
        try:
            with open(info.path / name, "rb") as handle:
                while chunk := handle.read(_HASH_CHUNK):
                    digest.update(chunk)
        except OSError:
            return False
        if digest.hexdigest() != entry["sha256"]:
            return False
    return True


def _fsync_dir(path: Path) -> None:
    # A rename or a new file is only durable once its directory entry is; Windows cannot open a folder to sync it.
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- Tensors ----------------------------------------------------------------------------------------------------------


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save tensors to a safetensors file (copies to CPU, contiguous, sharing no memory)."""
    # safetensors refuses tensors that share storage (tied weights, views) and non-contiguous ones: separate copies.
    save_file({name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in tensors.items()}, str(path))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file onto the CPU."""
    return load_file(str(path), device="cpu")


# --- Optimizer state --------------------------------------------------------------------------------------------------
#
# ``optimizer.state_dict()`` mixes tensors with Python values (ints, floats, None, tuples such as AdamW's ``betas``).
# Values are written to JSON with tensors replaced by ``{"__tensor__": key}`` references into the safetensors file,
# and tuples tagged so that they come back as tuples rather than lists.

_TENSOR_TAG = "__tensor__"
_TUPLE_TAG = "__tuple__"
_DICT_TAG = "__dict__"


def optimizer_state_to_files(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Write ``optimizer.state_dict()`` to ``optimizer.safetensors`` and ``optimizer.json`` in ``folder``."""
    folder = Path(folder)
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state = [
        {
            "index": index,
            # A list of pairs keeps the state's key order, which sort_keys would otherwise lose.
            "values": [[name, _encode(value, f"{index}.{name}", tensors)] for name, value in param_state.items()],
        }
        for index, param_state in state_dict["state"].items()
    ]
    param_groups = [
        [[name, _encode(value, f"param_groups.{group_index}.{name}", tensors)] for name, value in group.items()]
        for group_index, group in enumerate(state_dict["param_groups"])
    ]
    save_tensors(folder / OPTIMIZER_TENSORS_NAME, tensors)
    write_json(
        folder / OPTIMIZER_JSON_NAME,
        {
            "format_version": FORMAT_VERSION,
            "optimizer": type(optimizer).__name__,
            "state": state,
            "param_groups": param_groups,
            "tensor_keys": sorted(tensors),
        },
    )


def load_optimizer_state(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Load the state written by :func:`optimizer_state_to_files` into ``optimizer`` (built over the same params)."""
    folder = Path(folder)
    data = read_json(folder / OPTIMIZER_JSON_NAME)
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported optimizer state format {data.get('format_version')!r} in {folder}")
    tensors = load_tensors(folder / OPTIMIZER_TENSORS_NAME)
    state_dict = {
        "state": {
            int(entry["index"]): {name: _decode(value, tensors) for name, value in entry["values"]}
            for entry in data["state"]
        },
        "param_groups": [{name: _decode(value, tensors) for name, value in group} for group in data["param_groups"]],
    }
    # load_state_dict moves each tensor to its parameter's device and dtype (AdamW's step stays a CPU float).
    optimizer.load_state_dict(state_dict)


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[key] = value
        return {_TENSOR_TAG: key}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple):
        return {_TUPLE_TAG: [_encode(item, f"{key}.{i}", tensors) for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, f"{key}.{i}", tensors) for i, item in enumerate(value)]
    if isinstance(value, dict):
        return {_DICT_TAG: [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    # Refusing is better than a checkpoint that silently resumes with a different optimizer.
    raise TypeError(f"cannot checkpoint optimizer value {key!r} of type {type(value).__name__} without pickle")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if isinstance(value, dict):
        if _TENSOR_TAG in value:
            return tensors[value[_TENSOR_TAG]]
        if _TUPLE_TAG in value:
            return tuple(_decode(item, tensors) for item in value[_TUPLE_TAG])
        if _DICT_TAG in value:
            return {k: _decode(v, tensors) for k, v in value[_DICT_TAG]}
        raise ValueError(f"unexpected object in optimizer state: {value!r}")
    return value


# --- Random number generators -----------------------------------------------------------------------------------------


def rng_state_to_files(folder: Path, *, generators: dict[str, torch.Generator] | None = None) -> None:
    """Save every RNG a training step draws from, so a resumed run draws the same numbers (dropout, shuffling).

    Torch CPU and (when available) every CUDA device, Python's ``random``, NumPy's global RNG, and each named
    ``torch.Generator`` (e.g. the data sampler's) go to ``rng.safetensors`` and ``rng.json``.
    """
    folder = Path(folder)
    tensors = {"torch_cpu": torch.get_rng_state()}
    cuda_devices = 0
    if torch.cuda.is_available():
        for device, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{device}"] = state
            cuda_devices += 1
    for name, generator in (generators or {}).items():
        tensors[f"generator.{name}"] = generator.get_state()

    version, internal_state, gauss_next = random.getstate()
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    save_tensors(folder / RNG_TENSORS_NAME, tensors)
    write_json(
        folder / RNG_JSON_NAME,
        {
            "format_version": FORMAT_VERSION,
            "python_random": {"version": version, "state": list(internal_state), "gauss_next": gauss_next},
            "numpy": {
                "bit_generator": bit_generator,
                "keys": [int(key) for key in keys],
                "position": int(position),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached_gaussian),
            },
            "cuda_devices": cuda_devices,
            "generators": sorted(generators or {}),
        },
    )


def restore_rng_state(folder: Path, *, generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore the RNG states saved by :func:`rng_state_to_files`.

    CUDA states are restored for the devices present both now and then (a job may resume on a machine with a
    different GPU count). Every generator passed must have been saved: silently leaving one unseeded would make
    the resumed run diverge without a trace.
    """
    folder = Path(folder)
    data = read_json(folder / RNG_JSON_NAME)
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported RNG state format {data.get('format_version')!r} in {folder}")
    tensors = load_tensors(folder / RNG_TENSORS_NAME)
    missing = sorted(set(generators or {}) - set(data["generators"]))
    if missing:
        raise KeyError(f"no saved RNG state for generator(s) {', '.join(missing)} in {folder}")

    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        for device in range(min(data["cuda_devices"], torch.cuda.device_count())):
            torch.cuda.set_rng_state(tensors[f"cuda.{device}"], device)
    for name, generator in (generators or {}).items():
        generator.set_state(tensors[f"generator.{name}"])

    python_state = data["python_random"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss_next"]))
    numpy_state = data["numpy"]
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            np.asarray(numpy_state["keys"], dtype=np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
