"""Fetching a deployment's model folder from the object store and loading it for inference (safetensors only)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from workers.serving.registry import CAUSAL_LM, CLASSIFICATION, SEQ2SEQ, Deployment
from workers.storage import ObjectStore

_LOCAL_ONLY: dict[str, Any] = {"trust_remote_code": False, "local_files_only": True}
_MODEL_CLASSES = {
    CAUSAL_LM: AutoModelForCausalLM,
    CLASSIFICATION: AutoModelForSequenceClassification,
    SEQ2SEQ: AutoModelForSeq2SeqLM,
}
ADAPTER_CONFIG = "adapter_config.json"


# transformers and peft patch process-wide state while they build a model (torch's default dtype; peft's
# init_empty_weights swaps nn.Module.register_parameter): two loads interleaved on two threads can leave the patch
# in place for good, and every model built afterwards gets meta tensors. So loads take turns, process-wide.
MODEL_LOADING_LOCK = threading.Lock()


class ModelLoadError(RuntimeError):
    """The deployment's model cannot be loaded; the message is shown to whoever asks for it."""


def local_model_folder(store: ObjectStore, cache_dir: Path, deployment: Deployment) -> Path:
    """The deployment's model folder on this machine, downloaded once per prefix and revision (atomically)."""
    digest = hashlib.sha256(deployment.model_prefix.encode()).hexdigest()[:24]
    target = cache_dir / f"{digest}-r{deployment.revision}"
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".download-"))
    try:
        keys = store.download_dir(deployment.model_prefix, staging)
        if not keys:
            raise ModelLoadError(f"No model files are stored under {deployment.model_prefix!r}.")
        try:
            os.replace(staging, target)
        except OSError:
            if not target.is_dir():  # another process won the race: its copy is as good as ours
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def is_adapter_folder(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file()


def load_tokenizer(folder: Path, fallback_folder: Path | None = None):
    source = folder if (folder / "tokenizer.json").is_file() or fallback_folder is None else fallback_folder
    tokenizer = AutoTokenizer.from_pretrained(source, **_LOCAL_ONLY)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_plain_model(folder: Path, task: str) -> torch.nn.Module:
    if task not in _MODEL_CLASSES:
        raise ModelLoadError(f"Unknown task {task!r}.")
    if not any(folder.glob("*.safetensors")):
        raise ModelLoadError("The model folder has no safetensors weights; only safetensors models are served.")
    try:
        with MODEL_LOADING_LOCK:
            model = _MODEL_CLASSES[task].from_pretrained(folder, use_safetensors=True, **_LOCAL_ONLY)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"The model could not be loaded as {task}: {error}") from error
    model.config.use_cache = True
    return model.eval()


def place_model(model: torch.nn.Module, *, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The model (adapters included) moved to the serving device and cast to the serving dtype, in eval mode."""
    return model.to(device=device, dtype=dtype).eval()


def base_model_folder(folder: Path, deployment: Deployment) -> Path:
    """The base folder of an adapter: the deployment's ``base_model_dir``, else the one its adapter config names."""
    base = deployment.base_model_dir
    if not base:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        base = config.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise ModelLoadError(f"The adapter's base model folder {base!r} is not on this machine.")
    return Path(base)


def model_memory_bytes(model: torch.nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    # Tied weights (GPT-2's embedding and head) are one tensor: count each storage once.
    seen: dict[int, int] = {}
    for tensor in tensors:
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None) or AutoConfig
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
