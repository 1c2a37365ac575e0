"""Training data made ready ahead of training: read, split, tokenizer trained or loaded, tokenized.

The platform prepares a job's data on a `cpu` worker (``engine.prepare_training_data``) and hands the folder to the
`gpu` worker, which starts training at once: an accelerator never waits on tokenization, and data errors (too few
examples, unknown labels, nothing to train) fail the job before it takes a GPU slot.

A folder holds ``tokenizer/`` (``save_pretrained``), ``prepared.json`` (what it was made from, label names, counts)
and per side (``train``, ``validation``) the token sequences as flat int32 arrays with offsets (``.npy``, read with
``allow_pickle=False``: no pickle) and the texts as JSON lines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from workers.ml.data.training_sets import TokenizedSet

MANIFEST = "prepared.json"
TOKENIZER_FOLDER = "tokenizer"
FORMAT_VERSION = 1


@dataclass
class PreparedData:
    tokenizer: PreTrainedTokenizerBase
    label_names: list[str] | None
    train: TokenizedSet
    validation: TokenizedSet | None
    plain_text: bool
    dataset_task: str
    skipped_rows: int = 0
    data_fingerprint: str = ""
    """What the data was prepared from: the files' contents and every setting that changes preparation."""
    source_fingerprints: dict[str, str] = field(default_factory=dict)
    """SHA-256 of the training (and validation) file, which a resumed run's fingerprint includes."""


def save_prepared(data: PreparedData, folder: str | Path) -> dict[str, Any]:
    """Writes ``data`` into ``folder`` (created; expected empty) and returns its manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data.tokenizer.save_pretrained(folder / TOKENIZER_FOLDER)
    sides = {"train": data.train, **({"validation": data.validation} if data.validation is not None else {})}
    for name, tokenized in sides.items():
        _save_side(tokenized, folder, name)
    manifest = {
        "format_version": FORMAT_VERSION,
        "data_fingerprint": data.data_fingerprint,
        "source_fingerprints": data.source_fingerprints,
        "label_names": data.label_names,
        "plain_text": data.plain_text,
        "dataset_task": data.dataset_task,
        "skipped_rows": data.skipped_rows,
        "sides": {
            name: {"examples": len(tokenized.input_ids), "truncated": tokenized.truncated}
            for name, tokenized in sides.items()
        },
    }
    # Written last: a folder without its manifest is incomplete and never read.
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    return manifest if manifest.get("format_version") == FORMAT_VERSION else None


def load_prepared(folder: str | Path, *, load_tokenizer) -> PreparedData | None:
    """The data prepared in ``folder``, or None when it holds no complete preparation."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    return PreparedData(
        tokenizer=load_tokenizer(str(folder / TOKENIZER_FOLDER)),
        label_names=manifest["label_names"],
        train=_load_side(folder, "train", manifest["sides"]["train"]["truncated"]),
        validation=(
            _load_side(folder, "validation", manifest["sides"]["validation"]["truncated"])
            if "validation" in manifest["sides"]
            else None
        ),
        plain_text=manifest["plain_text"],
        dataset_task=manifest["dataset_task"],
        data_fingerprint=manifest["data_fingerprint"],
        source_fingerprints=manifest["source_fingerprints"],
        skipped_rows=manifest["skipped_rows"],
    )


def _save_ragged(sequences: list[list[int]], folder: Path, stem: str) -> None:
    lengths = np.fromiter((len(sequence) for sequence in sequences), dtype=np.int64, count=len(sequences))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.fromiter((token for sequence in sequences for token in sequence), dtype=np.int32, count=int(offsets[-1]))
    np.save(folder / f"{stem}.offsets.npy", offsets, allow_pickle=False)
    np.save(folder / f"{stem}.values.npy", flat, allow_pickle=False)


def _load_ragged(folder: Path, stem: str) -> list[list[int]]:
    offsets = np.load(folder / f"{stem}.offsets.npy", allow_pickle=False)
    flat = np.load(folder / f"{stem}.values.npy", allow_pickle=False).tolist()
    return [flat[start:end] for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]


def _save_side(tokenized: TokenizedSet, folder: Path, name: str) -> None:
    _save_ragged(tokenized.input_ids, folder, f"{name}.input_ids")
    if tokenized.labels is not None:
        _save_ragged(tokenized.labels, folder, f"{name}.labels")
    if tokenized.class_ids is not None:
        np.save(folder / f"{name}.class_ids.npy", np.asarray(tokenized.class_ids, dtype=np.int64), allow_pickle=False)
    with (folder / f"{name}.texts.jsonl").open("w", encoding="utf-8") as handle:
        for text, reference in zip(tokenized.inputs_text, tokenized.references, strict=True):
            handle.write(json.dumps([text, reference], ensure_ascii=False) + "\n")


def _load_side(folder: Path, name: str, truncated: int) -> TokenizedSet:
    class_ids_path = folder / f"{name}.class_ids.npy"
    texts, references = [], []
    with (folder / f"{name}.texts.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            text, reference = json.loads(line)
            texts.append(text)
            references.append(reference)
    return TokenizedSet(
        input_ids=_load_ragged(folder, f"{name}.input_ids"),
        labels=_load_ragged(folder, f"{name}.labels") if (folder / f"{name}.labels.offsets.npy").exists() else None,
        class_ids=np.load(class_ids_path, allow_pickle=False).tolist() if class_ids_path.exists() else None,
        inputs_text=texts,
        references=references,
        truncated=truncated,
    )
