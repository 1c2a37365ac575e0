"""The bad-input corpus: hostile or broken uploads, each written by a generator, with the error it must produce.

Every file is generated in the test's temporary folder (no data in git); big ones are streamed to disk so the
generator itself stays small in memory. `test_validation.py` drives the whole table through one parametrized test.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from workers.ml.data.formats import MIB, ReadLimits


@dataclass(frozen=True)
class BadInput:
    name: str
    filename: str
    """The name the user uploaded it under (decides the format)."""
    write: Callable[[Path], None]
    """Writes the file at the given path."""
    code: str
    """The error code the validation report must contain."""
    line: int | None = None
    """The line that error must carry, when the case is about a specific line."""
    limits: ReadLimits = field(default_factory=ReadLimits)
    """Limits lowered for the case, so that big cases stay quick."""


def chat_line(index: int) -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"Question number {index}?"},
                {"role": "assistant", "content": f"Answer number {index}."},
            ]
        }
    )


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


GZIP_BOMB_DECOMPRESSED = 1024 * 1024 * 1024
GZIP_BOMB_LIMIT = 10 * MIB
GZIP_BOMB_LINE = (json.dumps({"text": "0" * 1000}) + "\n").encode()


def write_gzip_bomb(path: Path) -> None:
    """About 1 GiB of JSONL lines of zeros in ~2 MB of gzip. The 1 MiB block is compressed once and repeated as
    gzip members (a valid multi-member gzip file), which writes in milliseconds instead of compressing 1 GiB."""
    block = GZIP_BOMB_LINE * (MIB // len(GZIP_BOMB_LINE))
    member = gzip.compress(block, compresslevel=9)
    with path.open("wb") as handle:
        for _ in range(GZIP_BOMB_DECOMPRESSED // len(block)):
            handle.write(member)


def write_binary_junk(path: Path) -> None:
    junk = bytearray(random.Random(0).randbytes(100_000))
    junk[100:110] = b"\x00" * 10
    path.write_bytes(bytes(junk))


def write_binary_junk_without_nuls(path: Path) -> None:
    """Random bytes with every NUL replaced: no NUL test can catch it, only the UTF-8/control-character check."""
    path.write_bytes(random.Random(1).randbytes(100_000).replace(b"\x00", b"\x01"))


def write_utf16(path: Path) -> None:
    path.write_bytes("\n".join(chat_line(i) for i in range(20)).encode("utf-16"))


LONG_LINE_BYTES = 50 * MIB
LONG_LINE_NUMBER = 6


def write_long_line(path: Path) -> None:
    """Five good lines, one 50 MiB line (line 6), five good lines; the long line is streamed in 1 MiB pieces."""
    with path.open("w", encoding="utf-8") as handle:
        for index in range(5):
            handle.write(chat_line(index) + "\n")
        handle.write('{"messages": [{"role": "user", "content": "')
        piece = "a" * MIB
        for _ in range(LONG_LINE_BYTES // MIB):
            handle.write(piece)
        handle.write('"}]}\n')
        for index in range(5, 10):
            handle.write(chat_line(index) + "\n")


INVALID_UTF8_LINE = 11


def write_invalid_utf8_in_middle(path: Path) -> None:
    lines = [chat_line(index).encode() for index in range(20)]
    lines[INVALID_UTF8_LINE - 1] = b'{"messages": [{"role": "user", "content": "caf\xe9 \xff"}]}'
    path.write_bytes(b"\n".join(lines) + b"\n")


def write_long_csv_field(path: Path) -> None:
    """A 20 MiB text field on line 4 of an otherwise fine CSV."""
    with path.open("w", encoding="utf-8") as handle:
        handle.write("text,label\n")
        for index in range(2):
            handle.write(f"good row {index},positive\n")
        handle.write('"')
        piece = "b" * MIB
        for _ in range(20):
            handle.write(piece)
        handle.write('",negative\n')
        for index in range(12):
            handle.write(f"more rows {index},{'positive' if index % 2 else 'negative'}\n")


def write_truncated_parquet(path: Path) -> None:
    table = pa.table({"text": [f"sentence number {i}" for i in range(200)], "label": ["a", "b"] * 100})
    pq.write_table(table, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_not_parquet(path: Path) -> None:
    path.write_text("text,label\nhello,a\n", encoding="utf-8")


def write_empty(path: Path) -> None:
    path.write_bytes(b"")


def write_whitespace_only(path: Path) -> None:
    path.write_text("\n  \n\t\n", encoding="utf-8")


def write_too_few(path: Path) -> None:
    _write_lines(path, [chat_line(index) for index in range(5)])


def write_single_example_label(path: Path) -> None:
    rows = [f"happy sentence {i},positive" for i in range(10)] + [f"sad sentence {i},negative" for i in range(9)]
    rows.append("a strange sentence,surprised")
    _write_lines(path, ["text,label", *rows])


def write_truncated_gzip(path: Path) -> None:
    """Varied text (so it does not compress to nothing) well past the 64 KiB detection window, cut in half."""
    rng = random.Random(2)
    text = "".join(
        json.dumps({"text": " ".join(str(rng.randint(0, 10**9)) for _ in range(20))}) + "\n" for _ in range(20_000)
    )
    data = gzip.compress(text.encode())
    path.write_bytes(data[: len(data) // 2])


def write_not_gzip(path: Path) -> None:
    _write_lines(path, [chat_line(index) for index in range(20)])


def write_ambiguous_columns(path: Path) -> None:
    _write_lines(path, ["id,comment,score", *(f"{i},comment {i},{i % 5}" for i in range(20))])


def write_cut_json_array(path: Path) -> None:
    text = json.dumps([json.loads(chat_line(index)) for index in range(30)], indent=1)
    path.write_text(text[: len(text) - 200], encoding="utf-8")


def write_deeply_nested_json(path: Path) -> None:
    lines = [chat_line(index) for index in range(12)]
    lines[3] = "[" * 100_000 + "]" * 100_000
    _write_lines(path, lines)


def write_unsupported(path: Path) -> None:
    path.write_bytes(b"PK\x03\x04 not really a spreadsheet")


BAD_INPUTS: list[BadInput] = [
    BadInput("gzip bomb", "bomb.jsonl.gz", write_gzip_bomb, "decompressed_too_large", 0,
             ReadLimits(max_decompressed_bytes=GZIP_BOMB_LIMIT)),
    BadInput("binary junk with NULs", "junk.jsonl", write_binary_junk, "binary_content", 0),
    BadInput("binary junk without NULs", "junk.csv", write_binary_junk_without_nuls, "binary_content", 0),
    BadInput("UTF-16 text", "chat.jsonl", write_utf16, "binary_content", 0),
    BadInput("single 50 MiB line", "long.jsonl", write_long_line, "line_too_long", LONG_LINE_NUMBER,
             ReadLimits(max_line_bytes=MIB)),
    BadInput("invalid UTF-8 in the middle", "chat.jsonl", write_invalid_utf8_in_middle, "invalid_utf8",
             INVALID_UTF8_LINE),
    # The line limit is raised above the field: with equal limits a one-line field trips line_too_long first.
    BadInput("20 MiB CSV field", "reviews.csv", write_long_csv_field, "field_too_long", 4,
             ReadLimits(max_field_bytes=MIB, max_line_bytes=64 * MIB)),
    BadInput("truncated Parquet", "data.parquet", write_truncated_parquet, "invalid_parquet", 0),
    BadInput("CSV renamed to .parquet", "data.parquet", write_not_parquet, "invalid_parquet", 0),
    BadInput("empty file", "empty.jsonl", write_empty, "empty_file", 0),
    BadInput("empty Parquet name, empty bytes", "empty.parquet", write_empty, "empty_file", 0),
    BadInput("whitespace only", "blank.txt", write_whitespace_only, "empty_file", 0),
    BadInput("fewer than 10 examples", "few.jsonl", write_too_few, "too_few_examples", 0),
    BadInput("label with one example", "labels.csv", write_single_example_label, "single_example_label", 0),
    BadInput("truncated gzip", "cut.jsonl.gz", write_truncated_gzip, "invalid_gzip", 0),
    BadInput("plain text named .gz", "chat.jsonl.gz", write_not_gzip, "invalid_gzip", 0),
    BadInput("ambiguous columns", "scores.csv", write_ambiguous_columns, "column_mapping_required", 0),
    BadInput("JSON array cut off", "chats.json", write_cut_json_array, "invalid_json"),
    BadInput("deeply nested JSON", "chat.jsonl", write_deeply_nested_json, "invalid_json", 4),
    BadInput("unsupported extension", "data.xlsx", write_unsupported, "unsupported_file_type", 0),
]  # fmt: skip
