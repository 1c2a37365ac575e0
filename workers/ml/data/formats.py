"""Recognising a dataset file and streaming it as normalised `Example`s, without ever holding the whole file.

Files may be gigabytes, gzip bombs, binary junk renamed to ``.jsonl`` or a single 2 GB line, so every reader here
works on bounded pieces:

- JSONL, CSV, TSV and TXT are read from a binary stream one line at a time with ``readline(limit)``; a line longer
  than ``ReadLimits.max_line_bytes`` is reported as ``line_too_long`` and skipped in fixed-size chunks up to the next
  newline, so it is never buffered. Each line is then decoded as UTF-8 on its own: the newline byte never occurs
  inside a multi-byte UTF-8 sequence, so this is what an incremental decoder reset at every line does, and it lets
  one bad byte be blamed on its line (``invalid_utf8``) while the next line reads normally.
- A ``.json`` file that starts with ``[`` is a JSON array, decoded element by element from 1 MiB chunks through an
  incremental UTF-8 decoder; otherwise ``.json`` is read as JSON Lines.
- Parquet is read by record batches (``ParquetFile.iter_batches``), only the mapped columns.
- ``.gz`` files are decompressed as a stream; once more than ``max_decompressed_bytes`` came out, reading stops with
  one whole-file ``decompressed_too_large`` error.

Bad rows never raise: `iter_examples` yields a `RowError` for them and carries on. Whole-file problems found before
any row (unknown extension, binary content, broken Parquet, no obvious column mapping) raise `UnsupportedFormat`;
whole-file problems found while reading (gzip bomb, corrupt gzip stream, missing mapped column) are yielded as a
`RowError` with line 0, after which the reader stops.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any, BinaryIO

from workers.ml.data.examples import DatasetFormat, DatasetTask, Example, RowError

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

_BASE_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
SUPPORTED_EXTENSIONS: tuple[str, ...] = _BASE_EXTENSIONS + tuple(
    f"{extension}.gz" for extension in _BASE_EXTENSIONS if extension != ".parquet"
)
"""Accepted file name endings; Parquet compresses its own pages, so ``.parquet.gz`` is not accepted."""

CHAT_ROLES = ("system", "user", "assistant", "tool")

_SNIFF_BYTES = 64 * KIB
# Detection reads at most this many decompressed bytes / lines looking for the first JSON object, so detecting a
# gzip bomb or a file of junk lines costs milliseconds.
_DETECT_MAX_BYTES = 16 * MIB
_DETECT_MAX_ROWS = 1000
_READ_BUFFER = 1 * MIB
_SKIP_CHUNK = 1 * MIB
_PARQUET_BATCH_ROWS = 1024
_PARQUET_MAGIC = b"PAR1"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

_TEXT_COLUMNS = ("text", "sentence", "review", "content")
_LABEL_COLUMNS = ("label", "labels", "sentiment", "class")
_SOURCE_COLUMNS = ("source", "src", "input")
_TARGET_COLUMNS = ("target", "tgt", "output", "translation", "summary")


class UnsupportedFormat(ValueError):
    """The whole file cannot be read as a dataset; ``code`` is stable, ``message`` is a sentence the user acts on."""

    def __init__(self, message: str, *, code: str = "unsupported_file_type"):
        super().__init__(message)
        self.code = code
        self.message = message

    def to_row_error(self) -> RowError:
        return RowError(line=0, code=self.code, message=self.message)


@dataclass(frozen=True)
class ColumnMapping:
    """Which column (CSV/TSV/Parquet) or key (JSON records) holds each field of the normalised example."""

    text: str | None = None
    """The input text: the whole example for causal_lm, the text to classify for classification."""
    label: str | None = None
    """The class of a classification example."""
    source: str | None = None
    """The input of a seq2seq pair (e.g. the English sentence of a translation)."""
    target: str | None = None
    """The output of a seq2seq pair."""
    sensitive: str | None = None
    """Optional: a sensitive attribute (e.g. a demographic group) kept in ``fields["sensitive"]`` for bias audits."""

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ColumnMapping:
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown column mapping keys: {', '.join(unknown)}; use {', '.join(sorted(known))}.")
        for key, value in data.items():
            if value is not None and not isinstance(value, str):
                raise ValueError(f"Column mapping {key!r} must be a column name (a string) or null.")
        return cls(**{key: value or None for key, value in data.items()})

    def columns(self) -> list[str]:
        """The mapped column names, in field order, without repeats."""
        names = [getattr(self, field.name) for field in fields(self)]
        return list(dict.fromkeys(name for name in names if name))


@dataclass(frozen=True)
class ReadLimits:
    """Bounds that keep one hostile or broken upload from exhausting a worker's memory or time."""

    max_line_bytes: int = 8 * MIB
    """Longest accepted line (JSONL, CSV, TSV, TXT) or JSON array element; longer ones are ``line_too_long`` and
    skipped without being buffered."""
    max_field_bytes: int = 8 * MIB
    """Longest accepted CSV/TSV field (counted in characters by the csv module); longer ones are
    ``field_too_long``."""
    max_decompressed_bytes: int = 10 * GIB
    """Most bytes a ``.gz`` upload may decompress to; past it reading stops with ``decompressed_too_large``."""
    max_rows: int = 10_000_000
    """Most rows (lines, records) read; past it reading stops with ``too_many_rows``."""
    max_errors_reported: int = 100
    """Errors kept in a validation report; all errors are still counted."""

    def __post_init__(self) -> None:
        for field in fields(self):
            if getattr(self, field.name) < 1:
                raise ValueError(f"ReadLimits.{field.name} must be positive.")


class _ByteBudgetExceeded(Exception):
    """More bytes came out of the stream than the reader's budget allows (a gzip bomb, or detection reading on)."""


class _CorruptJson(Exception):
    """A JSON array that cannot be resynchronised after an error; carries the RowError to report."""

    def __init__(self, error: RowError):
        super().__init__(error.message)
        self.error = error


_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


# ---------------------------------------------------------------------------------------------------------------------
# Detection


def _split_extension(filename: str) -> tuple[str, bool]:
    """The base extension (``.csv``) and whether the file is gzip-compressed; unknown names raise."""
    name = os.path.basename(filename.strip()).lower()
    compressed = name.endswith(".gz")
    base = name[:-3] if compressed else name
    extension = os.path.splitext(base)[1]
    if extension not in _BASE_EXTENSIONS or (compressed and extension == ".parquet"):
        raise UnsupportedFormat(
            f"{os.path.basename(filename)!r} is not a supported dataset file; upload one of "
            f"{', '.join(SUPPORTED_EXTENSIONS)}.",
            code="unsupported_file_type",
        )
    return extension, compressed


@contextmanager
def _open_binary(path: str, compressed: bool) -> Iterator[BinaryIO]:
    with open(path, "rb", buffering=_READ_BUFFER) as raw:
        if not compressed:
            yield raw
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
            yield unzipped  # type: ignore[misc]


def _sniff(path: str, compressed: bool) -> tuple[bytes, bool]:
    """The first 64 KiB of (decompressed) content and whether that is the whole file."""
    try:
        with _open_binary(path, compressed) as stream:
            sample = stream.read(_SNIFF_BYTES)
            at_end = len(sample) < _SNIFF_BYTES or not stream.read(1)
    except _GZIP_ERRORS as error:
        raise UnsupportedFormat(
            f"The file is named .gz but is not a readable gzip file ({error}); compress it with gzip or upload it "
            "uncompressed.",
            code="invalid_gzip",
        ) from error
    return sample, at_end


def _check_text(sample: bytes, at_end: bool) -> None:
    """Refuse binary content and empty files before reading rows from them."""
    if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise UnsupportedFormat(
            "The file is UTF-16 encoded; save it as UTF-8 and upload it again.", code="binary_content"
        )
    if b"\x00" in sample:
        raise UnsupportedFormat(
            "The file contains binary data (NUL bytes), not text; upload a UTF-8 text file.", code="binary_content"
        )
    # final=False: a multi-byte character cut by the 64 KiB window is not a decoding error.
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(sample, final=at_end)
    # A few bad bytes are per-line invalid_utf8 errors; a sample that is mostly undecodable or control
    # characters is not text at all.
    suspicious = sum(1 for char in text if char == "\ufffd" or (char < " " and char not in "\t\n\r\f\v"))
    if text and suspicious > max(4, len(text) // 20):
        raise UnsupportedFormat(
            "The file does not look like UTF-8 text (mostly undecodable bytes); upload a UTF-8 text file.",
            code="binary_content",
        )
    if at_end and not sample.removeprefix(codecs.BOM_UTF8).strip():
        raise UnsupportedFormat("The file is empty; upload a file with at least 10 examples.", code="empty_file")


def _parquet_file(path: str) -> Any:
    """Open a Parquet file after checking both magic markers, so truncated uploads fail with a clear code."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    invalid = UnsupportedFormat(
        "The file is not a valid Parquet file (it may be truncated or another format renamed to .parquet); "
        "export it again with pyarrow or pandas.",
        code="invalid_parquet",
    )
    size = os.path.getsize(path)
    if size == 0:
        raise UnsupportedFormat("The file is empty; upload a file with at least 10 examples.", code="empty_file")
    with open(path, "rb") as raw:
        head = raw.read(4)
        raw.seek(max(0, size - 4))
        tail = raw.read(4)
    if head != _PARQUET_MAGIC or tail != _PARQUET_MAGIC or size < 12:
        raise invalid
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as error:
        raise invalid from error
    if parquet.metadata.num_rows == 0:
        raise UnsupportedFormat("The Parquet file has no rows; upload a file with at least 10 examples.",
                                code="empty_file")  # fmt: skip
    return parquet


def _json_is_array(path: str, compressed: bool) -> bool:
    sample, _ = _sniff(path, compressed)
    return sample.removeprefix(codecs.BOM_UTF8).lstrip()[:1] == b"["


def _first_json_object(path: str, compressed: bool, is_array: bool) -> dict | None:
    """The first row that parses as a JSON object, looking at a bounded start of the file."""
    limits = ReadLimits(max_decompressed_bytes=_DETECT_MAX_BYTES, max_line_bytes=_DETECT_MAX_BYTES)
    try:
        # The byte budget applies to plain files too: detection must stay cheap on a file of junk lines.
        for index, item in enumerate(_iter_json_values(path, compressed, limits, is_array, _DETECT_MAX_BYTES)):
            if index >= _DETECT_MAX_ROWS:
                break
            if not isinstance(item, RowError) and isinstance(item[1], dict):
                return item[1]
    except (_ByteBudgetExceeded, _CorruptJson, *_GZIP_ERRORS):
        pass
    return None


def detect_format(path: str, *, filename: str) -> DatasetFormat:
    """The format of the file at ``path``, judged by the user's ``filename`` extension and, for JSON, its rows.

    JSON rows decide between chat (``messages``), prompt/completion (``prompt`` + ``completion``) and records
    (``text`` or any other keys: `detect_columns` then maps them). A JSON file whose first rows do not parse is
    treated as chat, OpenAI's format, so that reading it reports ``invalid_json`` line by line.
    Raises `UnsupportedFormat` (codes ``unsupported_file_type``, ``binary_content``, ``invalid_parquet``,
    ``invalid_gzip``, ``empty_file``).
    """
    extension, compressed = _split_extension(filename)
    if extension == ".parquet":
        _parquet_file(path)
        return DatasetFormat.PARQUET
    sample, at_end = _sniff(path, compressed)
    _check_text(sample, at_end)
    if extension == ".csv":
        return DatasetFormat.CSV
    if extension == ".tsv":
        return DatasetFormat.TSV
    if extension == ".txt":
        return DatasetFormat.TEXT
    is_array = extension == ".json" and sample.removeprefix(codecs.BOM_UTF8).lstrip()[:1] == b"["
    first = _first_json_object(path, compressed, is_array)
    if first is None or "messages" in first:
        return DatasetFormat.CHAT_JSONL
    if "prompt" in first and "completion" in first:
        return DatasetFormat.PROMPT_COMPLETION_JSONL
    return DatasetFormat.TEXT_JSONL


def _read_header(path: str, compressed: bool, delimiter: str) -> list[str]:
    limits = ReadLimits()
    csv.field_size_limit(limits.max_field_bytes)
    with _open_binary(path, compressed) as stream:
        for line_no, raw in _iter_raw_lines(stream, limits, _byte_budget(limits, compressed)):
            if raw is None:
                raise UnsupportedFormat(f"The header (line {line_no}) is too long.", code="invalid_csv")
            text = raw.decode("utf-8", errors="replace")
            if line_no == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                continue
            # A header with a quoted newline in it is not worth supporting: one line is one header.
            try:
                header = next(csv.reader([text], **_csv_dialect(delimiter)))
            except csv.Error as error:
                raise UnsupportedFormat(f"The header line cannot be parsed ({error}).", code="invalid_csv") from error
            return [name.strip() for name in header]
    raise UnsupportedFormat("The file is empty; upload a file with at least 10 examples.", code="empty_file")


def _csv_dialect(delimiter: str) -> dict[str, Any]:
    if delimiter == "\t":
        # TSV has no quoting convention: a stray quote must stay a character, not swallow the following lines.
        return {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    return {"delimiter": delimiter}


def _columns_of(path: str, filename: str, fmt: DatasetFormat) -> list[str]:
    _, compressed = _split_extension(filename)
    if fmt == DatasetFormat.CSV:
        return _read_header(path, compressed, ",")
    if fmt == DatasetFormat.TSV:
        return _read_header(path, compressed, "\t")
    if fmt == DatasetFormat.PARQUET:
        return list(_parquet_file(path).schema_arrow.names)
    if fmt in (DatasetFormat.TEXT_JSONL, DatasetFormat.CHAT_JSONL, DatasetFormat.PROMPT_COMPLETION_JSONL):
        first = _first_json_object(path, compressed, _is_json_name(filename) and _json_is_array(path, compressed))
        return list(first) if first else []
    return []


def _is_json_name(filename: str) -> bool:
    return _split_extension(filename)[0] == ".json"


def _obvious_mapping(columns: list[str]) -> tuple[ColumnMapping, DatasetTask]:
    by_lower: dict[str, str] = {}
    for name in columns:
        by_lower.setdefault(name.strip().lower(), name)

    def present(candidates: tuple[str, ...]) -> list[str]:
        return [by_lower[name] for name in candidates if name in by_lower]

    texts, labels = present(_TEXT_COLUMNS), present(_LABEL_COLUMNS)
    sources, targets = present(_SOURCE_COLUMNS), present(_TARGET_COLUMNS)
    if len(texts) == 1 and len(labels) == 1 and not sources and not targets:
        return ColumnMapping(text=texts[0], label=labels[0]), DatasetTask.CLASSIFICATION
    if len(sources) == 1 and len(targets) == 1 and not texts and not labels:
        return ColumnMapping(source=sources[0], target=targets[0]), DatasetTask.SEQ2SEQ
    if len(texts) == 1 and not labels and not sources and not targets:
        return ColumnMapping(text=texts[0]), DatasetTask.CAUSAL_LM
    if len(columns) == 1:
        return ColumnMapping(text=columns[0]), DatasetTask.CAUSAL_LM
    listed = ", ".join(repr(name) for name in columns) or "(none)"
    raise UnsupportedFormat(
        f"Cannot tell which columns to train on; the file's columns are {listed}. Choose a column mapping: "
        "text (+ label for classification), or source + target for seq2seq.",
        code="column_mapping_required",
    )


def task_for_mapping(mapping: ColumnMapping) -> DatasetTask:
    """The task an explicit mapping describes; raises `UnsupportedFormat` (``invalid_column_mapping``) if none."""
    if mapping.source or mapping.target:
        if mapping.source and mapping.target and not mapping.text and not mapping.label:
            return DatasetTask.SEQ2SEQ
    elif mapping.text:
        return DatasetTask.CLASSIFICATION if mapping.label else DatasetTask.CAUSAL_LM
    raise UnsupportedFormat(
        "The column mapping must name text (optionally with label), or both source and target.",
        code="invalid_column_mapping",
    )


def _structured_task(columns: list[str]) -> DatasetTask | None:
    """Chat and prompt/completion stored as records (Parquet, JSON) keep their own fixed field names."""
    if "messages" in columns:
        return DatasetTask.CHAT
    if "prompt" in columns and "completion" in columns:
        return DatasetTask.PROMPT_COMPLETION
    return None


def detect_columns(path: str, *, filename: str, fmt: DatasetFormat) -> tuple[list[str], ColumnMapping, DatasetTask]:
    """The file's columns (CSV/TSV header, Parquet schema, keys of the first JSON record), the obvious mapping and
    the task it implies.

    text|sentence|review|content + label|labels|sentiment|class → classification; source|src|input +
    target|tgt|output|translation|summary → seq2seq; one text column (or a file with a single column) →
    causal_lm. Parquet/JSON records with ``messages`` are chat, with ``prompt`` + ``completion`` prompt/completion
    (an empty mapping: those names are fixed). Chat/prompt-completion JSONL and TXT need no mapping.
    Raises `UnsupportedFormat` with code ``column_mapping_required`` (listing the columns) when it is ambiguous.
    """
    if fmt == DatasetFormat.TEXT:
        return [], ColumnMapping(), DatasetTask.CAUSAL_LM
    columns = _columns_of(path, filename, fmt)
    if fmt == DatasetFormat.CHAT_JSONL:
        return columns, ColumnMapping(), DatasetTask.CHAT
    if fmt == DatasetFormat.PROMPT_COMPLETION_JSONL:
        return columns, ColumnMapping(), DatasetTask.PROMPT_COMPLETION
    structured = _structured_task(columns)
    # A CSV cell holds a string, never a list of messages, so only records (Parquet, JSON) can be chat.
    if structured == DatasetTask.PROMPT_COMPLETION or (
        structured == DatasetTask.CHAT and fmt in (DatasetFormat.PARQUET, DatasetFormat.TEXT_JSONL)
    ):
        return columns, ColumnMapping(), structured
    mapping, task = _obvious_mapping(columns)
    return columns, mapping, task


def resolve_columns(
    path: str, *, filename: str, fmt: DatasetFormat, column_mapping: ColumnMapping | None
) -> tuple[list[str] | None, ColumnMapping | None, DatasetTask]:
    """Columns, mapping and task to read with: the caller's mapping when given (for formats that use one), else
    `detect_columns`. Columns and mapping are None for formats without columns (chat/prompt-completion JSONL, TXT).
    """
    fixed_tasks = {
        DatasetFormat.CHAT_JSONL: DatasetTask.CHAT,
        DatasetFormat.PROMPT_COMPLETION_JSONL: DatasetTask.PROMPT_COMPLETION,
        DatasetFormat.TEXT: DatasetTask.CAUSAL_LM,
    }
    if fmt in fixed_tasks:
        return None, None, fixed_tasks[fmt]
    if column_mapping is not None and column_mapping.columns():
        return _columns_of(path, filename, fmt), column_mapping, task_for_mapping(column_mapping)
    columns, mapping, task = detect_columns(path, filename=filename, fmt=fmt)
    if task in (DatasetTask.CHAT, DatasetTask.PROMPT_COMPLETION):
        return columns, None, task
    return columns, mapping, task


# ---------------------------------------------------------------------------------------------------------------------
# Line reading


def _byte_budget(limits: ReadLimits, compressed: bool) -> int | None:
    """Most bytes a reader may pull out of the stream: only decompressed data needs a cap (a plain file's size is
    already known and was accepted at upload)."""
    return limits.max_decompressed_bytes if compressed else None


def _iter_raw_lines(stream: BinaryIO, limits: ReadLimits, budget: int | None) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, line bytes with their newline) pairs; None instead of the bytes for a line longer than
    ``max_line_bytes``, which is skipped chunk by chunk, never held whole. Raises _ByteBudgetExceeded."""
    consumed = 0
    line_no = 0
    read_limit = limits.max_line_bytes + 1  # the newline itself does not count against the line
    readline = stream.readline
    while True:
        line = readline(read_limit)
        if not line:
            return
        line_no += 1
        if budget is not None:
            consumed += len(line)
            if consumed > budget:
                raise _ByteBudgetExceeded
        if len(line) == read_limit and line[-1:] != b"\n":
            while True:
                chunk = readline(_SKIP_CHUNK)
                if budget is not None:
                    consumed += len(chunk)
                    if consumed > budget:
                        raise _ByteBudgetExceeded
                if not chunk or chunk[-1:] == b"\n":
                    break
            yield line_no, None
            continue
        yield line_no, line


def _line_too_long(line_no: int, limits: ReadLimits) -> RowError:
    return RowError(
        line_no,
        "line_too_long",
        f"Line {line_no} is longer than {limits.max_line_bytes:,} bytes; shorten or split it.",
    )


def _invalid_utf8(line_no: int, error: UnicodeDecodeError) -> RowError:
    return RowError(
        line_no,
        "invalid_utf8",
        f"Line {line_no} is not valid UTF-8 (bad byte at position {error.start}); save the file as UTF-8.",
    )


def _empty_row(line_no: int) -> RowError:
    return RowError(line_no, "empty_row", f"Line {line_no} is empty.")


def _decode_line(line_no: int, raw: bytes) -> str | RowError:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return _invalid_utf8(line_no, error)
    if line_no == 1:
        text = text.removeprefix("\ufeff")
    return text.rstrip("\r\n")


def _iter_json_values(
    path: str, compressed: bool, limits: ReadLimits, is_array: bool, budget: int | None
) -> Iterator[tuple[int, Any] | RowError]:
    """Parsed JSON values with their line (JSONL) or element number (JSON array), or RowErrors for bad lines."""
    with _open_binary(path, compressed) as stream:
        if is_array:
            yield from _iter_json_array(stream, limits, budget)
            return
        loads = json.loads
        for line_no, raw in _iter_raw_lines(stream, limits, budget):
            if raw is None:
                yield _line_too_long(line_no, limits)
                continue
            text = _decode_line(line_no, raw)
            if isinstance(text, RowError):
                yield text
                continue
            if not text.strip():
                yield _empty_row(line_no)
                continue
            try:
                value = loads(text)
            except (ValueError, RecursionError) as error:
                yield RowError(line_no, "invalid_json", f"Line {line_no} is not valid JSON: {error}.")
                continue
            # Lone surrogates (\ud800) are valid JSON but not text: tokenizers and UTF-8 writers reject them later.
            if "\\u" in text and _SURROGATE_ESCAPE.search(text) and not _encodable(value):
                yield RowError(
                    line_no,
                    "invalid_unicode",
                    f"Line {line_no} contains an unpaired surrogate escape (\\ud800-\\udfff).",
                )
                continue
            yield line_no, value


def _encodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _iter_json_array(stream: BinaryIO, limits: ReadLimits, budget: int | None) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array, numbered from 1, decoded from bounded chunks. An error inside the array
    cannot be skipped reliably, so it raises _CorruptJson (reported as a whole-file error at that element)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    raw_decode = json.JSONDecoder().raw_decode
    buffer = ""
    position = 0
    at_end = False
    consumed = 0
    element = 0

    def fill() -> bool:
        nonlocal buffer, position, at_end, consumed
        if at_end:
            return False
        chunk = stream.read(_READ_BUFFER)
        consumed += len(chunk)
        if budget is not None and consumed > budget:
            raise _ByteBudgetExceeded
        try:
            text = decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as error:
            raise _CorruptJson(
                RowError(
                    element + 1,
                    "invalid_utf8",
                    f"Element {element + 1} of the JSON array is not valid UTF-8 "
                    f"({error.reason}); save the file as UTF-8.",
                )  # fmt: skip
            ) from error
        at_end = not chunk
        buffer = buffer[position:] + text
        position = 0
        return True

    def skip_space() -> str:
        nonlocal position
        while True:
            while position < len(buffer) and buffer[position] in " \t\r\n\ufeff":
                position += 1
            if position < len(buffer):
                return buffer[position]
            if not fill():
                return ""

    def broken(reason: str) -> _CorruptJson:
        number = element + 1
        return _CorruptJson(RowError(number, "invalid_json", f"Element {number} of the JSON array {reason}."))

    if skip_space() != "[":
        raise broken("does not start with '['")
    position += 1
    while True:
        char = skip_space()
        if char == "]":
            return
        if char == "":
            raise broken("is cut off: the file ends before the closing ']'")
        if element:
            if char != ",":
                raise broken(f"is not followed by ',' or ']' (found {char!r})")
            position += 1
            skip_space()
        while True:
            try:
                value, end = raw_decode(buffer, position)
                break
            except (ValueError, RecursionError) as error:
                # Usually only the chunk boundary cut the element: read on, within the element size limit.
                if len(buffer) - position > limits.max_line_bytes:
                    number = element + 1
                    raise _CorruptJson(
                        RowError(
                            number,
                            "line_too_long",
                            f"Element {number} of the JSON array is longer than "
                            f"{limits.max_line_bytes:,} bytes or is not valid JSON.",
                        )  # fmt: skip
                    ) from error
                if not fill():
                    raise broken(f"is not valid JSON: {error}") from error
        position = end
        element += 1
        yield element, value


# ---------------------------------------------------------------------------------------------------------------------
# Rows → examples


def chat_example(row: Mapping[str, Any], line: int) -> Example | RowError:
    """A chat example from one record with a ``messages`` list, or the first problem found in it."""
    if "messages" not in row or row["messages"] is None:
        return RowError(line, "missing_messages", f'Line {line} has no "messages" list.')
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return RowError(
            line, "invalid_messages", f'Line {line}: "messages" must be a non-empty list of {{role, content}} objects.'
        )
    normalised = []
    has_assistant = False
    for index, message in enumerate(messages):
        where = f"Line {line}, messages[{index}]"
        if not isinstance(message, dict):
            return RowError(line, "invalid_message", f"{where} is not an object with role and content.")
        role = message.get("role")
        if role is None:
            return RowError(line, "missing_role", f'{where} has no "role".')
        if not isinstance(role, str) or role not in CHAT_ROLES:
            return RowError(line, "unknown_role", f"{where} has role {role!r}; use one of {', '.join(CHAT_ROLES)}.")
        content = message.get("content")
        if not isinstance(content, str):
            return RowError(line, "missing_content", f'{where} has no text "content" (it must be a string).')
        item: dict[str, Any] = {"role": role, "content": content}
        weight = message.get("weight")
        if weight is not None:
            if isinstance(weight, bool) or not isinstance(weight, int | float) or weight not in (0, 1):
                return RowError(line, "invalid_weight", f'{where} has weight {weight!r}; "weight" must be 0 or 1.')
            item["weight"] = int(weight)
        if role == "assistant":
            has_assistant = True
            if not content.strip():
                return RowError(line, "empty_assistant_message", f"{where} is an assistant message with no content.")
        normalised.append(item)
    if not has_assistant:
        return RowError(line, "no_assistant_message", f"Line {line} has no assistant message to learn from.")
    return Example(line, DatasetTask.CHAT, {"messages": normalised})


def prompt_completion_example(row: Mapping[str, Any], line: int) -> Example | RowError:
    """A prompt/completion example from one record, or the first problem found in it."""
    for key in ("prompt", "completion"):
        if row.get(key) is None:
            return RowError(line, f"missing_{key}", f'Line {line} has no "{key}".')
        if not isinstance(row[key], str):
            return RowError(line, f"invalid_{key}", f'Line {line}: "{key}" must be a string.')
    if not row["completion"].strip():
        return RowError(line, "empty_completion", f'Line {line} has an empty "completion".')
    return Example(line, DatasetTask.PROMPT_COMPLETION, {"prompt": row["prompt"], "completion": row["completion"]})


def _text_value(value: Any, column: str, line: int) -> str | None | RowError:
    """The string in a text-like column; None when it is empty or null."""
    if value is None:
        return None
    if not isinstance(value, str):
        return RowError(line, "invalid_field_type", f"Line {line}: column {column!r} must hold text.")
    return value if value.strip() else None


def _label_value(value: Any, column: str, line: int) -> str | None | RowError:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        label = str(value).strip()
        return label or None
    return RowError(line, "invalid_field_type", f"Line {line}: label column {column!r} must hold a string or number.")


def mapped_example(row: Mapping[str, Any], line: int, task: DatasetTask, mapping: ColumnMapping) -> Example | RowError:
    """An example from one record (CSV row, Parquet row, JSON object) through a column mapping."""
    for column in mapping.columns():
        if column not in row and column != mapping.sensitive:
            return RowError(line, "missing_field", f"Line {line} has no {column!r} field.")
    fields_out: dict[str, Any]
    if task == DatasetTask.SEQ2SEQ:
        source = _text_value(row[mapping.source], mapping.source, line)
        target = _text_value(row[mapping.target], mapping.target, line)
        for value in (source, target):
            if isinstance(value, RowError):
                return value
        if source is None and target is None:
            return _empty_row(line)
        if source is None:
            return RowError(line, "empty_source", f"Line {line} has an empty source ({mapping.source!r}).")
        if target is None:
            return RowError(line, "empty_target", f"Line {line} has an empty target ({mapping.target!r}).")
        fields_out = {"source": source, "target": target}
    else:
        text = _text_value(row[mapping.text], mapping.text, line)
        if isinstance(text, RowError):
            return text
        if text is None:
            return _empty_row(line)
        fields_out = {"text": text}
        if task == DatasetTask.CLASSIFICATION:
            label = _label_value(row[mapping.label], mapping.label, line)
            if isinstance(label, RowError):
                return label
            if label is None:
                return RowError(line, "missing_label", f"Line {line} has no label ({mapping.label!r}).")
            fields_out["label"] = label
    if mapping.sensitive:
        sensitive = row.get(mapping.sensitive)
        fields_out["sensitive"] = None if sensitive is None else str(sensitive)
    return Example(line, task, fields_out)


def _row_parser(task: DatasetTask, mapping: ColumnMapping | None) -> Callable[[Mapping[str, Any], int], Any]:
    if task == DatasetTask.CHAT:
        return chat_example
    if task == DatasetTask.PROMPT_COMPLETION:
        return prompt_completion_example
    assert mapping is not None

    def parse(row: Mapping[str, Any], line: int) -> Example | RowError:
        return mapped_example(row, line, task, mapping)

    return parse


# ---------------------------------------------------------------------------------------------------------------------
# Readers


def _iter_json_rows(
    path: str, compressed: bool, limits: ReadLimits, is_array: bool, parse: Callable[[Mapping[str, Any], int], Any]
) -> Iterator[Example | RowError]:
    for item in _iter_json_values(path, compressed, limits, is_array, _byte_budget(limits, compressed)):
        if isinstance(item, RowError):
            yield item
            continue
        line, value = item
        if not isinstance(value, dict):
            yield RowError(line, "invalid_row", f"Line {line} is not a JSON object.")
            continue
        yield parse(value, line)


def _iter_text(path: str, compressed: bool, limits: ReadLimits) -> Iterator[Example | RowError]:
    with _open_binary(path, compressed) as stream:
        for line_no, raw in _iter_raw_lines(stream, limits, _byte_budget(limits, compressed)):
            if raw is None:
                yield _line_too_long(line_no, limits)
                continue
            text = _decode_line(line_no, raw)
            if isinstance(text, RowError):
                yield text
            elif not text.strip():
                yield _empty_row(line_no)
            else:
                yield Example(line_no, DatasetTask.CAUSAL_LM, {"text": text})


class _CsvLineFeed:
    """Feeds decoded lines to csv.reader while remembering where each row started and what went wrong on the way
    (too-long lines are left out of the row, undecodable lines taint it)."""

    def __init__(self, raw_lines: Iterator[tuple[int, bytes | None]], limits: ReadLimits):
        self._raw_lines = raw_lines
        self._limits = limits
        self.pending: list[RowError] = []
        self.row_start = 0
        self.last_line = 0
        self.bad_utf8: RowError | None = None

    def start_row(self) -> None:
        self.row_start = 0
        self.bad_utf8 = None

    def __iter__(self) -> _CsvLineFeed:
        return self

    def __next__(self) -> str:
        while True:
            line_no, raw = next(self._raw_lines)
            self.last_line = line_no
            if raw is None:
                self.pending.append(_line_too_long(line_no, self._limits))
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                if self.bad_utf8 is None:
                    self.bad_utf8 = _invalid_utf8(line_no, error)
                text = raw.decode("utf-8", errors="replace")
            if line_no == 1:
                text = text.removeprefix("\ufeff")
            if not self.row_start:
                self.row_start = line_no
            return text


def _iter_delimited(
    path: str,
    compressed: bool,
    limits: ReadLimits,
    delimiter: str,
    task: DatasetTask,
    mapping: ColumnMapping,
) -> Iterator[Example | RowError]:
    # The limit is process-wide state in the csv module; every reader sets its own before reading.
    csv.field_size_limit(limits.max_field_bytes)
    parse = _row_parser(task, mapping)
    with _open_binary(path, compressed) as stream:
        feed = _CsvLineFeed(_iter_raw_lines(stream, limits, _byte_budget(limits, compressed)), limits)
        reader = csv.reader(feed, **_csv_dialect(delimiter))
        header: list[str] | None = None
        wanted: list[tuple[str, int]] = []
        while True:
            feed.start_row()
            try:
                row = next(reader)
            except StopIteration:
                yield from feed.pending
                return
            except csv.Error as error:
                yield from feed.pending
                feed.pending.clear()
                line = feed.row_start or feed.last_line
                if "field larger than field limit" in str(error):
                    yield RowError(
                        line,
                        "field_too_long",
                        f"Line {line} has a field longer than {limits.max_field_bytes:,} characters.",
                    )
                else:
                    yield RowError(line, "invalid_csv", f"Line {line} cannot be parsed: {error}.")
                continue
            yield from feed.pending
            feed.pending.clear()
            line = feed.row_start
            if feed.bad_utf8 is not None:
                yield feed.bad_utf8
                continue
            if header is None:
                if not any(value.strip() for value in row):
                    continue  # blank lines before the header
                header = [name.strip() for name in row]
                positions = {}
                for position, name in enumerate(header):
                    positions.setdefault(name, position)
                needed = mapping.columns() or ["prompt", "completion"]
                missing = [name for name in needed if name not in positions]
                if missing:
                    yield _missing_columns(missing, header)
                    return
                wanted = [(name, positions[name]) for name in needed]
                continue
            if not any(value.strip() for value in row):
                yield _empty_row(line)
                continue
            if len(row) != len(header):
                yield RowError(
                    line,
                    "wrong_field_count",
                    f"Line {line} has {len(row)} fields but the header has {len(header)}; check the delimiters "
                    "and quoting.",
                )
                continue
            yield parse({name: row[position] for name, position in wanted}, line)


def _missing_columns(missing: list[str], columns: list[str]) -> RowError:
    listed = ", ".join(repr(name) for name in columns)
    return RowError(
        0,
        "missing_column",
        f"The file has no column {', '.join(repr(name) for name in missing)}; its columns are {listed}.",
    )


def _iter_parquet(parquet: Any, task: DatasetTask, mapping: ColumnMapping | None) -> Iterator[Example | RowError]:
    import pyarrow as pa

    names = list(parquet.schema_arrow.names)
    if task == DatasetTask.CHAT:
        needed = ["messages"]
    elif task == DatasetTask.PROMPT_COMPLETION:
        needed = ["prompt", "completion"]
    else:
        assert mapping is not None
        needed = mapping.columns()
    missing = [name for name in needed if name not in names]
    if missing:
        yield _missing_columns(missing, names)
        return
    parse = _row_parser(task, mapping)
    row_number = 0
    batches = parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=needed)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as error:
            yield RowError(0, "invalid_parquet", f"The Parquet file is damaged after row {row_number}: {error}.")
            return
        columns = [batch.column(name).to_pylist() for name in needed]
        for values in zip(*columns, strict=True):
            row_number += 1
            yield parse(dict(zip(needed, values, strict=True)), row_number)


def iter_examples(
    path: str,
    *,
    filename: str,
    fmt: DatasetFormat | None = None,
    column_mapping: ColumnMapping | None = None,
    limits: ReadLimits = ReadLimits(),  # noqa: B008 - frozen, so one shared default is safe
) -> Iterator[Example | RowError]:
    """Examples in file order, and a `RowError` for every bad row (``empty_row`` for blank lines and rows).

    Format, columns and task are detected here, before any row, so whole-file problems raise `UnsupportedFormat`
    from this call; problems found while reading are yielded as line-0 RowErrors and end the iteration
    (``decompressed_too_large``, ``invalid_gzip``, ``missing_column``, ``too_many_rows``, ``invalid_parquet``).
    """
    extension, compressed = _split_extension(filename)
    if fmt is None:
        fmt = detect_format(path, filename=filename)
    _, mapping, task = resolve_columns(path, filename=filename, fmt=fmt, column_mapping=column_mapping)

    if fmt == DatasetFormat.PARQUET:
        rows = _iter_parquet(_parquet_file(path), task, mapping)  # opened here: a broken file raises now
    elif fmt == DatasetFormat.TEXT:
        rows = _iter_text(path, compressed, limits)
    elif fmt in (DatasetFormat.CSV, DatasetFormat.TSV):
        assert mapping is not None or task in (DatasetTask.CHAT, DatasetTask.PROMPT_COMPLETION)
        delimiter = "," if fmt == DatasetFormat.CSV else "\t"
        rows = _iter_delimited(path, compressed, limits, delimiter, task, mapping or ColumnMapping())
    else:
        is_array = extension == ".json" and _json_is_array(path, compressed)
        rows = _iter_json_rows(path, compressed, limits, is_array, _row_parser(task, mapping))
    return _bounded(rows, limits)


def _bounded(rows: Iterator[Example | RowError], limits: ReadLimits) -> Iterator[Example | RowError]:
    """Applies max_rows and turns failures of the decompression stream into one whole-file error."""
    count = 0
    try:
        for item in rows:
            if item.line:
                count += 1
                if count > limits.max_rows:
                    yield RowError(
                        0,
                        "too_many_rows",
                        f"The file has more than {limits.max_rows:,} rows; split it into smaller files.",
                    )
                    return
            yield item
    except _ByteBudgetExceeded:
        yield RowError(
            0,
            "decompressed_too_large",
            f"The file decompresses to more than {limits.max_decompressed_bytes:,} bytes; upload a smaller file.",
        )
    except _CorruptJson as error:
        yield error.error
    except _GZIP_ERRORS as error:
        yield RowError(0, "invalid_gzip", f"The gzip stream is damaged or cut off ({error}); compress it again.")
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()
