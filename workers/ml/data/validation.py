"""The validation report of an uploaded dataset: one streaming pass, bounded memory, JSON out.

`validate_dataset` never raises for a bad file: whole-file problems (unsupported type, binary content, broken
Parquet, ambiguous columns…) become a report with ``ok`` False and one error at line 0, so the caller can store the
report whatever the upload was.

Report keys (all JSON-serialisable):

- ``ok`` (bool): True when the file can be trained on: no errors at all (``error_count == 0``). Dataset-level
  problems count as errors: fewer than 10 valid examples (``too_few_examples``), a label with a single example
  (``single_example_label``, one per label), and whole-file errors (line 0).
- ``format`` (str | None): the `DatasetFormat` value detected, None when detection itself failed.
- ``task`` (str | None): the `DatasetTask` value the examples train, None when it could not be decided.
- ``columns`` (list[str] | None): CSV/TSV header, Parquet schema or keys of the first JSON record; None for chat
  and prompt/completion JSONL and for TXT.
- ``column_mapping`` (dict | None): the `ColumnMapping` used (given or detected) as a dict; None where no mapping
  applies.
- ``rows`` (int): valid examples read.
- ``empty_rows`` (int): blank lines / rows with no text; skipped, not errors (reported in ``warnings``).
- ``error_count`` (int): every error found, row errors and dataset-level errors alike (empty rows excluded).
- ``errors`` (list): the first ``ReadLimits.max_errors_reported`` errors as ``{"line", "code", "message"}``:
  whole-file and dataset-level errors (line 0) first, then row errors in file order. ``line`` is 1-based (the row
  number for Parquet, the element number for a JSON array file).
- ``duplicates``: ``{"count": int, "examples": [int, ...]}``: examples identical to an earlier one and the lines of
  the first few of them.
- ``label_distribution`` (dict[str, int] | None): examples per label for classification, else None.
- ``labels_with_one_example`` (list[str]): labels with exactly one example (a stratified split needs two).
- ``token_lengths`` (dict | None): length statistics of each example's text (None when there are no examples):
  ``tokenizer_used`` (False: whitespace-separated word counts, no tokenizer was given), ``min``, ``max``, ``mean``,
  ``p50``, ``p95``, ``histogram`` (``{"bins": [edges...], "counts": [...]}``, about 20 bins; bin i covers
  ``[bins[i], bins[i+1])``), ``over_max_length`` (examples longer than ``max_length``) and ``max_length``.
- ``validation_overlap`` (``{"count": int, "rows": int}`` | None): with a validation file, how many of its
  ``rows`` valid examples also occur in the training file; None without one or when it could not be read.
- ``warnings`` (list[str]): sentences about things that do not block training (duplicates, empty rows, lengths
  over ``max_length``, word counts instead of tokens, overlap, label imbalance…).

Duplicates and overlap compare a 16-byte BLAKE2b digest of each example's normalised fields (canonical JSON), so
memory grows by 20 bytes per example (digest + line number): about 200 MB at the 10-million-row limit.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from workers.ml.data.examples import DatasetTask, Example, RowError
from workers.ml.data.formats import (
    ColumnMapping,
    ReadLimits,
    UnsupportedFormat,
    detect_format,
    iter_examples,
    resolve_columns,
)

MIN_EXAMPLES = 10
"""OpenAI's minimum for a fine-tuning file; fewer examples cannot train anything useful."""
TOKEN_BATCH_SIZE = 1000
HISTOGRAM_BINS = 20
DUPLICATE_LINES_SHOWN = 5
MAX_DISTINCT_LABELS = 10_000
"""Distinct labels tracked; a 'label' column with more values is almost certainly free text."""
IMBALANCE_RATIO = 10

TokenCounter = Callable[[list[str]], list[int]]


def example_text(example: Example) -> str:
    """The text whose length decides truncation: the example's fields joined in a stable order."""
    fields = example.fields
    task = example.task
    if task == DatasetTask.CHAT:
        return "\n".join(message["content"] for message in fields["messages"])
    if task == DatasetTask.PROMPT_COMPLETION:
        return fields["prompt"] + fields["completion"]
    if task == DatasetTask.SEQ2SEQ:
        return fields["source"] + "\n" + fields["target"]
    return fields["text"]


def example_digest(example: Example) -> bytes:
    """16-byte BLAKE2b of the normalised fields (sorted-key JSON); the sensitive attribute is not content."""
    fields = example.fields
    if "sensitive" in fields:
        fields = {key: value for key, value in fields.items() if key != "sensitive"}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))  # ASCII: lone surrogates cannot break it
    return hashlib.blake2b(canonical.encode("ascii"), digest_size=16).digest()


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _word_counts(texts: list[str]) -> list[int]:
    return [len(text.split()) for text in texts]


class _ErrorLog:
    def __init__(self, keep: int):
        self.keep = keep
        self.count = 0
        self.kept: list[RowError] = []
        self.whole_file = False

    def add(self, error: RowError) -> None:
        self.count += 1
        if error.line == 0:
            self.whole_file = True
        if len(self.kept) < self.keep:
            self.kept.append(error)


def _report(fmt: Any = None, task: Any = None) -> dict[str, Any]:
    return {
        "ok": False,
        "format": str(fmt) if fmt is not None else None,
        "task": str(task) if task is not None else None,
        "columns": None,
        "column_mapping": None,
        "rows": 0,
        "empty_rows": 0,
        "error_count": 0,
        "errors": [],
        "duplicates": {"count": 0, "examples": []},
        "label_distribution": None,
        "labels_with_one_example": [],
        "token_lengths": None,
        "validation_overlap": None,
        "warnings": [],
    }


def _open_dataset(
    path: str, filename: str, column_mapping: ColumnMapping | None, limits: ReadLimits
) -> tuple[Any, list[str] | None, ColumnMapping | None, DatasetTask, Iterator[Example | RowError]]:
    fmt = detect_format(path, filename=filename)
    columns, mapping, task = resolve_columns(path, filename=filename, fmt=fmt, column_mapping=column_mapping)
    rows = iter_examples(path, filename=filename, fmt=fmt, column_mapping=mapping, limits=limits)
    return fmt, columns, mapping, task, rows


def _length_stats(lengths: array, *, tokenizer_used: bool, max_length: int) -> dict[str, Any] | None:
    if not lengths:
        return None
    values = np.frombuffer(lengths, dtype=np.uint32).astype(np.int64)
    low, high = int(values.min()), int(values.max())
    bins = min(HISTOGRAM_BINS, high - low + 1)
    counts, edges = np.histogram(values, bins=bins, range=(low, high + 1))
    p50, p95 = np.percentile(values, [50, 95])
    return {
        "tokenizer_used": tokenizer_used,
        "min": low,
        "max": high,
        "mean": round(float(values.mean()), 2),
        "p50": round(float(p50), 2),
        "p95": round(float(p95), 2),
        "histogram": {"bins": [round(float(edge), 2) for edge in edges], "counts": [int(c) for c in counts]},
        "over_max_length": int((values > max_length).sum()),
        "max_length": max_length,
    }


def _duplicates(digests: bytearray, lines: array) -> tuple[int, list[int], np.ndarray]:
    """Count of examples equal to an earlier one, the lines of the first few, and the sorted unique digests."""
    keys = np.frombuffer(bytes(digests), dtype="V16")
    if not len(keys):
        return 0, [], keys
    order = np.argsort(keys, kind="stable")  # stable: within a group the first occurrence in the file comes first
    ordered = keys[order]
    repeated = np.zeros(len(keys), dtype=bool)
    repeated[1:] = ordered[1:] == ordered[:-1]
    duplicate_positions = np.sort(order[repeated])
    line_numbers = np.frombuffer(lines, dtype=np.uint32)
    shown = [int(line_numbers[i]) for i in duplicate_positions[:DUPLICATE_LINES_SHOWN]]
    return int(repeated.sum()), shown, ordered[~repeated]


def _validation_overlap(
    train_digests: np.ndarray,
    train_task: DatasetTask,
    path: str,
    filename: str,
    column_mapping: ColumnMapping | None,
    limits: ReadLimits,
    warnings: list[str],
) -> dict[str, int] | None:
    try:
        _, _, _, task, rows = _open_dataset(path, filename, column_mapping, limits)
    except UnsupportedFormat as error:
        warnings.append(f"The validation file could not be read: {error.message}")
        return None
    if task != train_task:
        warnings.append(f"The validation file holds {task} examples but the training file holds {train_task}.")
    digests = bytearray()
    errors = 0
    for item in rows:
        if isinstance(item, RowError):
            errors += item.code != "empty_row"
            continue
        digests += example_digest(item)
    if errors:
        warnings.append(f"The validation file has {_count(errors, 'bad row')}; validate it on its own to see them.")
    keys = np.frombuffer(bytes(digests), dtype="V16")
    count = int(np.isin(keys, train_digests).sum()) if len(keys) and len(train_digests) else 0
    if count:
        warnings.append(f"{count} of {len(keys)} validation examples also appear in the training file.")
    return {"count": count, "rows": len(keys)}


def validate_dataset(
    path: str,
    *,
    filename: str,
    column_mapping: ColumnMapping | None = None,
    token_counter: TokenCounter | None = None,
    max_length: int = 1024,
    validation_path: str | None = None,
    validation_filename: str | None = None,
    limits: ReadLimits = ReadLimits(),  # noqa: B008 - frozen, so one shared default is safe
) -> dict[str, Any]:
    """Read the whole file once and return its report (keys documented in the module docstring).

    ``token_counter`` maps a batch of texts to their token counts (called with about 1000 texts at a time); without
    it lengths are whitespace-separated word counts. ``validation_path`` (named ``validation_filename``, defaulting
    to ``filename``'s format) is read too, to count examples shared with the training file.
    """
    try:
        fmt, columns, mapping, task, rows = _open_dataset(path, filename, column_mapping, limits)
    except UnsupportedFormat as error:
        report = _report()
        report.update(error_count=1, errors=[error.to_row_error().to_dict()])
        return report
    report = _report(fmt, task)
    report["columns"] = columns
    report["column_mapping"] = mapping.to_dict() if mapping is not None else None

    count_tokens = token_counter or _word_counts
    errors = _ErrorLog(limits.max_errors_reported)
    digests = bytearray()
    lines = array("I")
    lengths = array("I")
    labels: Counter[str] = Counter()
    labels_dropped = 0
    pending_texts: list[str] = []
    valid = 0
    empty = 0

    def flush_texts() -> None:
        counts = count_tokens(pending_texts)
        if len(counts) != len(pending_texts):
            raise ValueError(f"token_counter returned {len(counts)} counts for {len(pending_texts)} texts.")
        lengths.extend(counts)
        pending_texts.clear()

    for item in rows:
        if isinstance(item, RowError):
            if item.code == "empty_row":
                empty += 1
            else:
                errors.add(item)
            continue
        valid += 1
        digests += example_digest(item)
        lines.append(item.line)
        if task == DatasetTask.CLASSIFICATION:
            label = item.fields["label"]
            if label in labels or len(labels) < MAX_DISTINCT_LABELS:
                labels[label] += 1
            else:
                labels_dropped += 1
        pending_texts.append(example_text(item))
        if len(pending_texts) >= TOKEN_BATCH_SIZE:
            flush_texts()
    if pending_texts:
        flush_texts()

    warnings: list[str] = report["warnings"]
    dataset_errors: list[RowError] = []
    if valid < MIN_EXAMPLES and not errors.whole_file:
        dataset_errors.append(
            RowError(
                0,
                "too_few_examples",
                f"OpenAI requires at least {MIN_EXAMPLES} examples; the file has {valid} valid ones.",
            )
        )
    single = sorted(label for label, count in labels.items() if count == 1)
    for label in single:
        dataset_errors.append(
            RowError(
                0,
                "single_example_label",
                f"Label {label!r} has a single example; add more examples of it or remove it.",
            )
        )

    duplicate_count, duplicate_lines, unique_digests = _duplicates(digests, lines)
    del digests, lines

    report["rows"] = valid
    report["empty_rows"] = empty
    report["duplicates"] = {"count": duplicate_count, "examples": duplicate_lines}
    report["error_count"] = errors.count + len(dataset_errors)
    all_kept = [error for error in errors.kept if error.line == 0] + dataset_errors
    all_kept += [error for error in errors.kept if error.line != 0]
    report["errors"] = [error.to_dict() for error in all_kept[: limits.max_errors_reported]]
    if task == DatasetTask.CLASSIFICATION:
        report["label_distribution"] = dict(sorted(labels.items()))
        report["labels_with_one_example"] = single
    report["token_lengths"] = _length_stats(lengths, tokenizer_used=token_counter is not None, max_length=max_length)

    if empty:
        warnings.append(f"Skipped {_count(empty, 'empty row')}.")
    if duplicate_count:
        warnings.append(
            f"Duplicates: {_count(duplicate_count, 'example')} repeating an earlier one (first at line "
            f"{duplicate_lines[0]}); duplicates weigh those examples more in training."
        )
    if labels_dropped:
        warnings.append(
            f"The label column has more than {MAX_DISTINCT_LABELS:,} distinct values ({labels_dropped} examples "
            "not counted); check the column mapping."
        )
    if labels and len(labels) > 1 and max(labels.values()) >= IMBALANCE_RATIO * min(labels.values()):
        warnings.append(
            "The labels are imbalanced: the most frequent has at least 10 times the examples of the rarest."
        )
    token_lengths = report["token_lengths"]
    if token_lengths is not None:
        if not token_lengths["tokenizer_used"]:
            warnings.append("Lengths are whitespace-separated word counts, not tokens: no tokenizer was given.")
        if token_lengths["over_max_length"]:
            warnings.append(
                f"Over max_length {max_length}: {_count(token_lengths['over_max_length'], 'example')}, which training "
                "will truncate."
            )
    if validation_path is not None:
        report["validation_overlap"] = _validation_overlap(
            unique_digests,
            task,
            validation_path,
            validation_filename or filename,
            column_mapping,
            limits,
            warnings,
        )
    report["ok"] = report["error_count"] == 0
    return report
