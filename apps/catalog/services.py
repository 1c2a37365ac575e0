"""Writes of the base-model catalog: syncing the built-in entries, converting the offline models once into the model
cache folder, and importing a staff member's HF safetensors folder."""

import functools
import json
import logging
import shutil
from pathlib import Path

import torch
from django.conf import settings
from django.db import transaction
from safetensors import safe_open

from workers.ml import model_cache, modeling
from workers.ml.errors import TrainingDataError

from . import builtin
from .models import CatalogModel, EntryKind, EntryStatus

logger = logging.getLogger(__name__)

# Reference vocabularies for the parameter counts shown for from-scratch entries (the real count depends on the
# tokenizer a job trains; the catalog shows the classic size).
_REFERENCE_VOCAB = {"gpt2": 50_257, "bert": 30_522, "t5": 32_128}
# Files that can run code when loaded (pickle) or that we cannot vouch for: an import refuses a folder holding them.
_UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack", ".py")


class CatalogImportError(ValueError):
    """A folder that cannot join the catalog, with a sentence the staff member can act on."""


@functools.cache
def _architecture_parameters(architecture: str, size: str) -> int:
    task = builtin.ARCHITECTURE_TASKS[architecture][0]
    # Built on the meta device: shapes only, no memory and no time even for the 125M sizes.
    with torch.device("meta"):
        model = modeling.build_from_scratch(
            architecture=architecture,
            size=size,
            task=task,
            vocab_size=_REFERENCE_VOCAB[architecture],
            max_length=builtin.ARCHITECTURE_CONTEXT[architecture],
            init="normal",
            num_labels=2 if task == "classification" else None,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    return modeling.count_parameters(model)


def _folder_parameters(folder: Path) -> int:
    total = 0
    for weights in sorted(folder.glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                total += _numel(handle.get_slice(name))
    return total


def _numel(tensor_slice) -> int:
    count = 1
    for dimension in tensor_slice.get_shape():
        count *= dimension
    return count


def _context_length(folder: Path) -> int:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(config.get(key), int):
            return config[key]
    return 512


@transaction.atomic
def catalog_sync_builtin() -> list[CatalogModel]:
    """Create or refresh the built-in entries; a pretrained one is ``ready`` when its folder is in the cache."""
    entries = []
    for architecture in builtin.ARCHITECTURES:
        for size in builtin.ARCHITECTURE_SIZES:
            model_id = f"{architecture}-{size}"
            entry, _ = CatalogModel.objects.update_or_create(
                model_id=model_id,
                defaults={
                    "name": f"{architecture.upper()} {size} (from scratch)",
                    "description": f"{builtin.ARCHITECTURE_DESCRIPTIONS[architecture]} Size {size}: "
                    f"{builtin.SIZE_NOTES[size]}.",
                    "kind": EntryKind.ARCHITECTURE,
                    "model_type": architecture,
                    "tasks": list(builtin.ARCHITECTURE_TASKS[architecture]),
                    "default_mode": "from_scratch",
                    "parameter_count": _architecture_parameters(architecture, size),
                    "context_length": builtin.ARCHITECTURE_CONTEXT[architecture],
                    "licence": builtin.ARCHITECTURE_LICENCE,
                    "source": "architecture (random weights)",
                    "architecture": architecture,
                    "size": size,
                    "folder": "",
                    "status": EntryStatus.READY,
                    "builtin": True,
                },
            )
            entries.append(entry)
    cache = Path(settings.MODEL_CACHE_DIR)
    for pretrained in builtin.PRETRAINED:
        folder = cache / pretrained.model_id
        ready = model_cache.read_marker(folder) is not None and (folder / "config.json").is_file()
        defaults = {
            "name": pretrained.name,
            "description": pretrained.description,
            "kind": EntryKind.PRETRAINED,
            "model_type": pretrained.model_type,
            "tasks": list(pretrained.tasks),
            "default_mode": pretrained.default_mode,
            "licence": pretrained.licence,
            "source": pretrained.source,
            "folder": pretrained.model_id,
            "status": EntryStatus.READY if ready else EntryStatus.MISSING,
            "builtin": True,
        }
        if ready:
            defaults["parameter_count"] = _folder_parameters(folder)
            defaults["context_length"] = _context_length(folder)
        else:
            # Not converted yet: the card shows the shipped weights' figures until they can be measured here.
            defaults["parameter_count"] = pretrained.parameter_count
            defaults["context_length"] = pretrained.context_length
        entry, _ = CatalogModel.objects.update_or_create(model_id=pretrained.model_id, defaults=defaults)
        entries.append(entry)
    return entries


def catalog_prepare_offline(*, model_ids: list[str] | None = None) -> list[CatalogModel]:
    """Convert the offline models (from their wheels) into the model cache once, then sync the catalog."""
    for model_id in model_ids or [pretrained.model_id for pretrained in builtin.PRETRAINED]:
        model_cache.prepare_offline_model(model_id, settings.MODEL_CACHE_DIR)
    return catalog_sync_builtin()


def _check_importable(folder: Path) -> dict:
    if not folder.is_dir():
        raise CatalogImportError(f"{folder} is not a folder.")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CatalogImportError(f"{folder} has no config.json: it is not a Hugging Face model folder.")
    unsafe = sorted(path.name for path in folder.rglob("*") if path.suffix.lower() in _UNSAFE_SUFFIXES)
    if unsafe:
        raise CatalogImportError(
            f"{folder} holds files that can run code when loaded ({', '.join(unsafe[:5])}); only safetensors weights "
            "and JSON/text tokenizer files are accepted. Convert the weights to safetensors and remove them."
        )
    if not list(folder.glob("*.safetensors")):
        raise CatalogImportError(f"{folder} has no .safetensors weights.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CatalogImportError(f"{config_path} is not valid JSON: {error}") from error
    if config.get("auto_map"):
        raise CatalogImportError(
            "The model needs its own Python code (auto_map in config.json); Tunehouse never runs code from a model "
            "folder (trust_remote_code=False)."
        )
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise CatalogImportError(f"{folder} has no tokenizer (tokenizer.json or tokenizer_config.json).")
    return config


def catalog_import_folder(
    *, source: str | Path, model_id: str, name: str = "", licence: str, description: str = ""
) -> CatalogModel:
    """Copy an HF safetensors folder into the model cache and add it to the catalog (staff only: a command and
    the admin call this, never a tenant's request)."""
    folder = Path(source).resolve()
    config = _check_importable(folder)
    if CatalogModel.objects.filter(model_id=model_id).exists():
        raise CatalogImportError(f"The catalog already has an entry {model_id!r}; choose another id.")
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except (ValueError, KeyError, OSError) as error:
        raise CatalogImportError(f"transformers cannot read this model's config: {error}") from error
    tasks = modeling.supported_tasks(model_config)
    if not tasks:
        raise CatalogImportError(
            f"Model type {config.get('model_type')!r} cannot be trained for any task Tunehouse runs."
        )
    try:
        modeling.load_tokenizer(folder)
    except (TrainingDataError, ValueError, OSError) as error:
        raise CatalogImportError(f"The tokenizer of {folder} cannot be loaded: {error}") from error
    cache = Path(settings.MODEL_CACHE_DIR)
    cache.mkdir(parents=True, exist_ok=True)
    with modeling.writing_folder_atomically(cache / model_id) as staging:
        for path in folder.iterdir():
            if path.is_file():
                shutil.copy2(path, staging / path.name)
    return CatalogModel.objects.create(
        model_id=model_id,
        name=name or model_id,
        description=description or f"Imported {config.get('model_type')} model.",
        kind=EntryKind.PRETRAINED,
        model_type=str(config.get("model_type")),
        tasks=tasks,
        default_mode="lora" if "causal_lm" in tasks else "full",
        parameter_count=_folder_parameters(folder),
        context_length=_context_length(folder),
        licence=licence,
        source=f"import of {folder}",
        folder=model_id,
        status=EntryStatus.READY,
        builtin=False,
    )
