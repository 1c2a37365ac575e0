"""Tokenized datasets cached on disk in Arrow form, keyed by everything that decides their content.

A fine-tuning job tokenizes its dataset once; a retry, a resumed job or a second job with the same data, tokenizer
and template finds the cache and memory-maps it instead (``datasets.load_from_disk``). A cache folder only ever
appears complete: it is written under a temporary name in the same folder and renamed into place, so a crash leaves
no half cache behind. Nothing is pickled: Arrow for the rows, JSON for the marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from workers.ml.data import templates
from workers.ml.data.examples import Example

CACHE_FORMAT_VERSION = 1
"""Bumped whenever tokenization or the row layout changes, so caches written by older code are never reused."""
COMPLETE_MARKER = "tunehouse_tokenized_cache.json"

FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "line": datasets.Value("int32"),
        "truncated": datasets.Value("bool"),
    }
)
_ARROW_FILE = "tokens.arrow"


def cache_key(
    *, dataset_sha256: str, tokenizer_fingerprint: str, template: str, train_on: str, max_length: int, task: str
) -> str:
    """sha256 hex of a canonical JSON of every input that changes the tokenized rows."""
    canonical = json.dumps(
        {
            "cache_format_version": CACHE_FORMAT_VERSION,
            "dataset_sha256": dataset_sha256,
            "max_length": max_length,
            "task": str(task),
            "template": template,
            "tokenizer_fingerprint": tokenizer_fingerprint,
            "train_on": train_on,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's backend JSON and its special tokens: equal fingerprints tokenize identically."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    # transformers switches truncation and padding on the backend per call and leaves them set afterwards; they do
    # not change how text is tokenized here, and keeping them would change the fingerprint after any tokenizer call.
    backend.pop("truncation", None)
    backend.pop("padding", None)
    special = {"named": tokenizer.special_tokens_map, "all": list(tokenizer.all_special_tokens)}
    canonical = json.dumps({"backend": backend, "special_tokens": special}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def cache_hit(cache_dir: str, key: str) -> bool:
    """Whether a complete cache for ``key`` exists (the marker is written last, before the folder is renamed in)."""
    marker = Path(cache_dir) / key / COMPLETE_MARKER
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("key") == key
    except (OSError, ValueError):
        return False


def tokenize_to_cache(
    examples: Iterable[Example],
    tokenizer: PreTrainedTokenizerBase,
    *,
    cache_dir: str,
    key: str,
    template: str,
    train_on: str,
    max_length: int,
    batch_rows: int = 1000,
) -> datasets.Dataset:
    """Return the tokenized rows for ``key``: loaded from ``cache_dir/key`` if complete, else tokenized and cached.

    ``examples`` is read once, ``batch_rows`` at a time, so a dataset larger than memory can be cached. Rows are
    exactly ``templates.tokenize_example``'s (the same code, batched). Columns: input_ids and labels
    (list<int32>), line (int32), truncated (bool).
    """
    if not key or any(character in key for character in "/\\") or key.startswith("."):
        # The key names a folder; refusing separators keeps a bad key from writing outside cache_dir.
        raise ValueError(f"key must be a plain folder name such as cache_key() returns; got {key!r}.")
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be positive; got {batch_rows}.")
    final = Path(cache_dir) / key
    if cache_hit(cache_dir, key):
        return datasets.load_from_disk(str(final))

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    # The temporary folder sits beside the final one, on the same filesystem, so os.replace is an atomic rename.
    workspace = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=cache_dir))
    try:
        arrow_path = workspace / _ARROW_FILE
        rows = _write_arrow(
            _record_batches(
                examples, tokenizer, template=template, train_on=train_on, max_length=max_length, batch_rows=batch_rows
            ),
            arrow_path,
        )
        staged = workspace / "dataset"
        # from_file memory-maps the Arrow file; save_to_disk lays it out the way load_from_disk reads it back.
        with _quiet_progress_bars():
            # datasets writes no shard at all for zero rows and then cannot load its own folder; one empty shard can.
            datasets.Dataset.from_file(str(arrow_path)).save_to_disk(str(staged), num_shards=1 if rows == 0 else None)
        marker = {"key": key, "rows": rows, "cache_format_version": CACHE_FORMAT_VERSION}
        (staged / COMPLETE_MARKER).write_text(json.dumps(marker), encoding="utf-8")
        if final.exists() and not cache_hit(cache_dir, key):
            # Complete caches only ever arrive by rename, so a folder without the marker is debris (say, copied in
            # by hand); it would make the rename fail forever.
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(staged, final)
        except OSError:
            # Another worker renamed the same key in first (the target is then a non-empty folder); its rows are
            # identical by construction, so use them. Anything else (a stray half folder) is a real error.
            if not cache_hit(cache_dir, key):
                raise
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    return datasets.load_from_disk(str(final))


def _record_batches(
    examples: Iterable[Example],
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str,
    train_on: str,
    max_length: int,
    batch_rows: int,
) -> Iterator[pa.RecordBatch]:
    schema = FEATURES.arrow_schema
    pending: list[Example] = []

    def flush() -> pa.RecordBatch:
        rows = templates.tokenize_batch(pending, tokenizer, template=template, train_on=train_on, max_length=max_length)
        return pa.record_batch(
            [
                pa.array([row.input_ids for row in rows], type=pa.list_(pa.int32())),
                pa.array([row.labels for row in rows], type=pa.list_(pa.int32())),
                pa.array([row.line for row in rows], type=pa.int32()),
                pa.array([row.truncated for row in rows], type=pa.bool_()),
            ],
            schema=schema,
        )

    for example in examples:
        pending.append(example)
        if len(pending) == batch_rows:
            yield flush()
            pending = []
    if pending:
        yield flush()


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """save_to_disk draws a progress bar per call; in a worker's log that is noise. The global switch is restored."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _write_arrow(batches: Iterable[pa.RecordBatch], path: Path) -> int:
    """Write the batches as an Arrow stream (the file format ``datasets`` memory-maps); return the row count."""
    rows = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, FEATURES.arrow_schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows
