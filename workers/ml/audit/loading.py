"""Loading a model folder for an audit: a plain safetensors folder or a LoRA adapter folder the trainer exported.

Local files only, safetensors only, no remote code; models come back in eval mode on the chosen device.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from workers.ml import modeling

_LOCAL = {"local_files_only": True, "trust_remote_code": False}
_REPORT_FILENAME = "training_report.json"  # written next to the model by workers.ml.engine
# Below this many parameters a forward pass is a handful of tiny matrix products, and spreading each over several
# CPU threads costs more in hand-offs than it saves (measured: a 100k-parameter GPT-2 audit ran 3-4x faster on 1).
_SINGLE_THREAD_PARAMETERS = 5_000_000


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: torch.device
    labels: list[str] | None
    """Class names by index, for a classifier."""

    @contextlib.contextmanager
    def cpu_threads(self) -> Iterator[None]:
        """Run a tiny model's work on one CPU thread (see ``_SINGLE_THREAD_PARAMETERS``), restoring the count."""
        small = sum(parameter.numel() for parameter in self.model.parameters()) < _SINGLE_THREAD_PARAMETERS
        if self.device.type != "cpu" or not small or torch.get_num_threads() == 1:
            yield
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def release(self) -> None:
        """Drop the weights (and the accelerator's cached memory) once the audit is done with this model."""
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file() and not (folder / modeling.ADAPTER_MARKER).is_file():
        raise FileNotFoundError(f"No model folder (config.json) at {folder}.")
    names = {path.name for path in folder.iterdir()}
    if not any(name.endswith(".safetensors") for name in names):
        raise FileNotFoundError(f"No safetensors weights in {folder}; only safetensors models are audited.")


def _tokenizer(folder: Path, *, padding_side: str) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(folder, **_LOCAL)
    if tokenizer.pad_token is None:
        # As in training: padded positions are masked out, so reusing eos (else unk) for them is harmless.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ValueError(f"The tokenizer in {folder} has no pad, end-of-text or unknown token to pad batches with.")
    tokenizer.padding_side = padding_side
    return tokenizer


def _adapter_base(folder: Path) -> Path | None:
    marker = folder / modeling.ADAPTER_MARKER
    if not marker.is_file():
        return None
    return Path(json.loads(marker.read_text(encoding="utf-8"))["base_model"])


def _report_labels(folder: Path) -> list[str] | None:
    report = folder / _REPORT_FILENAME
    if not report.is_file():
        return None
    labels = json.loads(report.read_text(encoding="utf-8")).get("labels")
    return [str(label) for label in labels] if labels else None


def load_causal_lm(model_dir: str | Path, device: torch.device) -> LoadedModel:
    """A causal LM and its tokenizer (padding on the left, for batched generation)."""
    folder = Path(model_dir).resolve()
    _check_folder(folder)
    base = _adapter_base(folder)
    if base is None:
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, dtype=torch.float32, **_LOCAL)
    else:
        from peft import PeftModel

        base_model = modeling.load_pretrained(base, task=modeling.CAUSAL_LM)
        model = PeftModel.from_pretrained(base_model, str(folder)).merge_and_unload()
    model.config.use_cache = True
    model.to(device).eval()
    return LoadedModel(model, _tokenizer(folder, padding_side="left"), device, None)


def load_classifier(model_dir: str | Path, device: torch.device) -> LoadedModel:
    """A sequence classifier, its tokenizer and its class names (``id2label`` in index order)."""
    folder = Path(model_dir).resolve()
    _check_folder(folder)
    tokenizer = _tokenizer(folder, padding_side="right")
    base = _adapter_base(folder)
    if base is None:
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, use_safetensors=True, dtype=torch.float32, **_LOCAL
        )
    else:
        from peft import PeftModel

        labels = _report_labels(folder)
        if not labels:
            raise ValueError(f"The adapter in {folder} has no {_REPORT_FILENAME} naming its labels.")
        base_model = modeling.load_pretrained(
            base, task=modeling.CLASSIFICATION, num_labels=len(labels), id2label=dict(enumerate(labels))
        )
        model = PeftModel.from_pretrained(base_model, str(folder)).merge_and_unload()
    if model.config.pad_token_id is None:
        # Decoder classifiers pool the last token that is not padding, so they must know the pad id.
        model.config.pad_token_id = tokenizer.pad_token_id
    id2label = {int(index): str(name) for index, name in (model.config.id2label or {}).items()}
    labels = [id2label.get(index, f"LABEL_{index}") for index in range(model.config.num_labels)]
    model.to(device).eval()
    return LoadedModel(model, tokenizer, device, labels)
