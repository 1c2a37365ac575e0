"""Detection and streaming readers on real files of every format, plain and gzip-compressed; no Django."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers.ml.data.examples import DatasetFormat, DatasetTask, Example, RowError
from workers.ml.data.formats import (
    SUPPORTED_EXTENSIONS,
    ColumnMapping,
    ReadLimits,
    UnsupportedFormat,
    detect_columns,
    detect_format,
    iter_examples,
)

CHATS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris.", "weight": 0},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome.", "weight": 1},
        ],
        "tools": [],  # extra top-level keys are ignored
    },
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "name": "bot"}]},
]
CHAT_FIELDS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris.", "weight": 0},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome.", "weight": 1},
        ]
    },
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
]
PROMPTS = [{"prompt": "2 + 2 =", "completion": " 4"}, {"prompt": "", "completion": " café ☕"}]
TEXTS = ["The cat sat on the mat.", "Ünïcödé lines work too — 日本語."]
REVIEWS = [("Great film, loved it", "positive"), ('He said "meh"', "neutral"), ("Awful,\nwould not return", "negative")]
PAIRS = [("the red cat", "le chat rouge"), ('a "quoted" car', 'une voiture "bleue"')]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _jsonl(rows: list) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def _csv(header: list[str], rows: list[tuple], delimiter: str = ",") -> bytes:
    lines = [delimiter.join(header)]
    for row in rows:
        if delimiter == "\t":
            lines.append("\t".join(row))
        else:
            lines.append(",".join('"' + value.replace('"', '""') + '"' for value in row))
    return ("\r\n".join(lines) + "\r\n").encode()


def _examples(task: DatasetTask, fields: list[dict], lines: list[int]) -> list[Example]:
    return [Example(line, task, item) for line, item in zip(lines, fields, strict=True)]


CLASSIFICATION_FIELDS = [{"text": text, "label": label} for text, label in REVIEWS]
SEQ2SEQ_FIELDS = [{"source": source, "target": target} for source, target in PAIRS]

# (filename, file bytes, format, task, expected examples)
CASES = [
    ("chat.jsonl", _jsonl(CHATS), DatasetFormat.CHAT_JSONL, DatasetTask.CHAT,
     _examples(DatasetTask.CHAT, CHAT_FIELDS, [1, 2])),
    ("chat.jsonl.gz", _jsonl(CHATS), DatasetFormat.CHAT_JSONL, DatasetTask.CHAT,
     _examples(DatasetTask.CHAT, CHAT_FIELDS, [1, 2])),
    ("chat.json", _jsonl(CHATS), DatasetFormat.CHAT_JSONL, DatasetTask.CHAT,
     _examples(DatasetTask.CHAT, CHAT_FIELDS, [1, 2])),
    # A JSON array: examples are numbered by element.
    ("chat.json", json.dumps(CHATS, indent=2).encode(), DatasetFormat.CHAT_JSONL, DatasetTask.CHAT,
     _examples(DatasetTask.CHAT, CHAT_FIELDS, [1, 2])),
    ("chat.json.gz", b"\xef\xbb\xbf" + json.dumps(CHATS).encode(), DatasetFormat.CHAT_JSONL, DatasetTask.CHAT,
     _examples(DatasetTask.CHAT, CHAT_FIELDS, [1, 2])),
    ("pc.jsonl", _jsonl(PROMPTS), DatasetFormat.PROMPT_COMPLETION_JSONL, DatasetTask.PROMPT_COMPLETION,
     _examples(DatasetTask.PROMPT_COMPLETION, PROMPTS, [1, 2])),
    ("pc.jsonl.gz", _jsonl(PROMPTS), DatasetFormat.PROMPT_COMPLETION_JSONL, DatasetTask.PROMPT_COMPLETION,
     _examples(DatasetTask.PROMPT_COMPLETION, PROMPTS, [1, 2])),
    ("text.jsonl", _jsonl([{"text": t, "id": i} for i, t in enumerate(TEXTS)]), DatasetFormat.TEXT_JSONL,
     DatasetTask.CAUSAL_LM, _examples(DatasetTask.CAUSAL_LM, [{"text": t} for t in TEXTS], [1, 2])),
    ("labelled.jsonl.gz", _jsonl([{"text": t, "label": label} for t, label in REVIEWS]), DatasetFormat.TEXT_JSONL,
     DatasetTask.CLASSIFICATION, _examples(DatasetTask.CLASSIFICATION, CLASSIFICATION_FIELDS, [1, 2, 3])),
    ("pairs.jsonl", _jsonl([{"input": s, "output": t} for s, t in PAIRS]), DatasetFormat.TEXT_JSONL,
     DatasetTask.SEQ2SEQ, _examples(DatasetTask.SEQ2SEQ, SEQ2SEQ_FIELDS, [1, 2])),
    # CRLF line ends and a quoted newline: the third review starts on line 4 and spans two lines.
    ("reviews.csv", _csv(["text", "label"], REVIEWS), DatasetFormat.CSV, DatasetTask.CLASSIFICATION,
     _examples(DatasetTask.CLASSIFICATION, CLASSIFICATION_FIELDS, [2, 3, 4])),
    ("reviews.csv.gz", b"\xef\xbb\xbf" + _csv(["Sentence", "Sentiment"], REVIEWS), DatasetFormat.CSV,
     DatasetTask.CLASSIFICATION, _examples(DatasetTask.CLASSIFICATION, CLASSIFICATION_FIELDS, [2, 3, 4])),
    # TSV has no quoting: quotes are plain characters.
    ("pairs.tsv", _csv(["src", "tgt"], PAIRS, "\t"), DatasetFormat.TSV, DatasetTask.SEQ2SEQ,
     _examples(DatasetTask.SEQ2SEQ, SEQ2SEQ_FIELDS, [2, 3])),
    ("pairs.tsv.gz", _csv(["source", "translation"], PAIRS, "\t"), DatasetFormat.TSV, DatasetTask.SEQ2SEQ,
     _examples(DatasetTask.SEQ2SEQ, SEQ2SEQ_FIELDS, [2, 3])),
    ("lines.csv", _csv(["content"], [(t,) for t in TEXTS]), DatasetFormat.CSV, DatasetTask.CAUSAL_LM,
     _examples(DatasetTask.CAUSAL_LM, [{"text": t} for t in TEXTS], [2, 3])),
    ("pc.csv", _csv(["prompt", "completion"], [(p["prompt"], p["completion"]) for p in PROMPTS]), DatasetFormat.CSV,
     DatasetTask.PROMPT_COMPLETION, _examples(DatasetTask.PROMPT_COMPLETION, PROMPTS, [2, 3])),
    ("corpus.txt", ("\n".join(TEXTS[:1] + [""] + TEXTS[1:]) + "\n").encode(), DatasetFormat.TEXT,
     DatasetTask.CAUSAL_LM, _examples(DatasetTask.CAUSAL_LM, [{"text": t} for t in TEXTS], [1, 3])),
    ("corpus.txt.gz", ("\r\n".join(TEXTS)).encode(), DatasetFormat.TEXT, DatasetTask.CAUSAL_LM,
     _examples(DatasetTask.CAUSAL_LM, [{"text": t} for t in TEXTS], [1, 2])),
]  # fmt: skip


@pytest.mark.parametrize(("filename", "data", "fmt", "task", "expected"), CASES, ids=[c[0] for c in CASES])
def test_every_format_reads_into_normalised_examples(tmp_path, filename, data, fmt, task, expected):
    path = _write(tmp_path / filename, data)

    assert detect_format(str(path), filename=filename) == fmt
    _, _, detected_task = detect_columns(str(path), filename=filename, fmt=fmt)
    assert detected_task == task
    examples = [item for item in iter_examples(str(path), filename=filename) if isinstance(item, Example)]
    assert examples == expected


def test_txt_blank_lines_are_empty_rows_not_examples(tmp_path):
    path = _write(tmp_path / "c.txt", b"one\n\n   \ntwo\n")
    items = list(iter_examples(str(path), filename="c.txt"))
    assert [(item.line, type(item).__name__, getattr(item, "code", None)) for item in items] == [
        (1, "Example", None),
        (2, "RowError", "empty_row"),
        (3, "RowError", "empty_row"),
        (4, "Example", None),
    ]


def _parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=2)
    return path


def test_parquet_classification_by_rows_across_row_groups(tmp_path):
    path = _parquet(tmp_path / "d.parquet", {"id": [1, 2, 3, 4, 5], "review": ["a", "b", None, "d", "e"],
                                             "class": [0, 1, 1, 0, None]})  # fmt: skip
    assert detect_format(str(path), filename="d.parquet") == DatasetFormat.PARQUET
    columns, mapping, task = detect_columns(str(path), filename="d.parquet", fmt=DatasetFormat.PARQUET)
    assert columns == ["id", "review", "class"]
    assert mapping == ColumnMapping(text="review", label="class")
    assert task == DatasetTask.CLASSIFICATION
    items = list(iter_examples(str(path), filename="d.parquet"))
    assert items[0] == Example(1, DatasetTask.CLASSIFICATION, {"text": "a", "label": "0"})
    assert items[1] == Example(2, DatasetTask.CLASSIFICATION, {"text": "b", "label": "1"})
    assert (items[2].line, items[2].code) == (3, "empty_row")
    assert items[3] == Example(4, DatasetTask.CLASSIFICATION, {"text": "d", "label": "0"})
    assert (items[4].line, items[4].code) == (5, "missing_label")


def test_parquet_chat_column_with_optional_weight(tmp_path):
    path = _parquet(tmp_path / "chat.parquet", {"messages": [CHAT_FIELDS[0]["messages"], CHAT_FIELDS[1]["messages"]]})
    assert detect_columns(str(path), filename="chat.parquet", fmt=DatasetFormat.PARQUET)[2] == DatasetTask.CHAT
    # Parquet gives every struct a weight field (null where absent); null means "no weight".
    assert list(iter_examples(str(path), filename="chat.parquet")) == _examples(DatasetTask.CHAT, CHAT_FIELDS, [1, 2])


@pytest.mark.parametrize(
    ("header", "mapping", "task"),
    [
        (["text", "label"], ColumnMapping(text="text", label="label"), DatasetTask.CLASSIFICATION),
        (["id", "Review", "labels"], ColumnMapping(text="Review", label="labels"), DatasetTask.CLASSIFICATION),
        (["sentence", "class"], ColumnMapping(text="sentence", label="class"), DatasetTask.CLASSIFICATION),
        (["input", "output"], ColumnMapping(source="input", target="output"), DatasetTask.SEQ2SEQ),
        (["src", "summary"], ColumnMapping(source="src", target="summary"), DatasetTask.SEQ2SEQ),
        (["content", "id"], ColumnMapping(text="content"), DatasetTask.CAUSAL_LM),
        (["body"], ColumnMapping(text="body"), DatasetTask.CAUSAL_LM),
    ],
)
def test_obvious_column_mappings(tmp_path, header, mapping, task):
    path = _write(tmp_path / "d.csv", (",".join(header) + "\n" + ",".join("x" for _ in header) + "\n").encode())
    assert detect_columns(str(path), filename="d.csv", fmt=DatasetFormat.CSV) == (header, mapping, task)


@pytest.mark.parametrize("header", [["id", "comment"], ["text", "sentence", "label"], ["text", "source", "target"]])
def test_ambiguous_columns_require_a_mapping_and_list_the_columns(tmp_path, header):
    path = _write(tmp_path / "d.csv", (",".join(header) + "\n" + ",".join("x" for _ in header) + "\n").encode())
    with pytest.raises(UnsupportedFormat) as raised:
        detect_columns(str(path), filename="d.csv", fmt=DatasetFormat.CSV)
    assert raised.value.code == "column_mapping_required"
    assert all(repr(name) in raised.value.message for name in header)
    with pytest.raises(UnsupportedFormat):
        iter_examples(str(path), filename="d.csv")


def test_explicit_mapping_and_sensitive_column(tmp_path):
    path = _write(tmp_path / "d.csv", b"id,comment,stars,group\n1,nice,5,a\n2,bad,1,b\n")
    mapping = ColumnMapping(text="comment", label="stars", sensitive="group")
    items = list(iter_examples(str(path), filename="d.csv", column_mapping=mapping))
    assert items == [
        Example(2, DatasetTask.CLASSIFICATION, {"text": "nice", "label": "5", "sensitive": "a"}),
        Example(3, DatasetTask.CLASSIFICATION, {"text": "bad", "label": "1", "sensitive": "b"}),
    ]


def test_missing_mapped_column_is_one_whole_file_error(tmp_path):
    path = _write(tmp_path / "d.tsv", b"a\tb\nx\ty\nz\tw\n")
    items = list(iter_examples(str(path), filename="d.tsv", column_mapping=ColumnMapping(text="a", label="label")))
    assert [(item.line, item.code) for item in items] == [(0, "missing_column")]
    assert "'label'" in items[0].message and "'a'" in items[0].message


def test_invalid_mapping_is_refused(tmp_path):
    path = _write(tmp_path / "d.csv", b"a,b\nx,y\n")
    with pytest.raises(UnsupportedFormat) as raised:
        iter_examples(str(path), filename="d.csv", column_mapping=ColumnMapping(label="a"))
    assert raised.value.code == "invalid_column_mapping"


def test_csv_row_errors_keep_their_lines(tmp_path):
    data = b'text,label\ngood,pos\n\n,neg\nno label,\none,two,three\n"quoted\nacross lines",neg\nlast,pos\n'
    path = _write(tmp_path / "d.csv", data)
    items = list(iter_examples(str(path), filename="d.csv"))
    assert [(item.line, getattr(item, "code", "example")) for item in items] == [
        (2, "example"),
        (3, "empty_row"),
        (4, "empty_row"),
        (5, "missing_label"),
        (6, "wrong_field_count"),
        (7, "example"),
        (9, "example"),
    ]


CHAT_ERROR_LINES = [
    ({"messages": []}, "invalid_messages"),
    ({"messages": "hello"}, "invalid_messages"),
    ({"conversation": []}, "missing_messages"),
    ({"messages": ["hello"]}, "invalid_message"),
    ({"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}, "missing_role"),
    ({"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown_role"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "missing_content"),
    ({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]}, "missing_content"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no_assistant_message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]},
     "empty_assistant_message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]},
     "invalid_weight"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": True}]},
     "invalid_weight"),
    ([1, 2], "invalid_row"),
    ("not json {", "invalid_json"),
]  # fmt: skip


def test_every_chat_error_code_with_its_line(tmp_path):
    good = json.dumps(CHATS[1])
    lines = [good]
    for row, _ in CHAT_ERROR_LINES:
        lines.append(row if isinstance(row, str) else json.dumps(row))
    lines.append(good)
    path = _write(tmp_path / "chat.jsonl", ("\n".join(lines) + "\n").encode())

    items = list(iter_examples(str(path), filename="chat.jsonl"))
    expected = [(1, "example")] + [(index + 2, code) for index, (_, code) in enumerate(CHAT_ERROR_LINES)]
    expected.append((len(lines), "example"))
    assert [(item.line, getattr(item, "code", "example")) for item in items] == expected
    assert all(str(item.line) in item.message for item in items if isinstance(item, RowError))


def test_every_prompt_completion_error_code_with_its_line(tmp_path):
    rows = [
        {"prompt": "a", "completion": "b"},
        {"completion": "b"},
        {"prompt": 3, "completion": "b"},
        {"prompt": "a"},
        {"prompt": "a", "completion": None},
        {"prompt": "a", "completion": 5},
        {"prompt": "a", "completion": " \n"},
    ]
    path = _write(tmp_path / "pc.jsonl", _jsonl(rows))
    items = list(iter_examples(str(path), filename="pc.jsonl"))
    assert [(item.line, getattr(item, "code", "example")) for item in items] == [
        (1, "example"),
        (2, "missing_prompt"),
        (3, "invalid_prompt"),
        (4, "missing_completion"),
        (5, "missing_completion"),
        (6, "invalid_completion"),
        (7, "empty_completion"),
    ]


def test_text_jsonl_record_errors(tmp_path):
    rows = [{"text": "ok"}, {"text": ""}, {"text": 12}, {"body": "no text key"}]
    path = _write(tmp_path / "t.jsonl", _jsonl(rows))
    items = list(iter_examples(str(path), filename="t.jsonl"))
    assert [(item.line, getattr(item, "code", "example")) for item in items] == [
        (1, "example"),
        (2, "empty_row"),
        (3, "invalid_field_type"),
        (4, "missing_field"),
    ]


def test_lone_surrogate_is_a_row_error(tmp_path):
    path = _write(tmp_path / "t.jsonl", b'{"text": "a \\ud800 b"}\n{"text": "ok \\ud83d\\ude00"}\n')
    items = list(iter_examples(str(path), filename="t.jsonl"))
    assert (items[0].line, items[0].code) == (1, "invalid_unicode")
    assert items[1] == Example(2, DatasetTask.CAUSAL_LM, {"text": "ok 😀"})


def test_long_line_is_skipped_and_reading_goes_on(tmp_path):
    path = _write(tmp_path / "t.jsonl", b'{"text": "a"}\n{"text": "' + b"x" * 5000 + b'"}\n{"text": "b"}\n')
    items = list(iter_examples(str(path), filename="t.jsonl", limits=ReadLimits(max_line_bytes=1000)))
    assert [(item.line, getattr(item, "code", "example")) for item in items] == [
        (1, "example"),
        (2, "line_too_long"),
        (3, "example"),
    ]


def test_max_rows_stops_with_a_whole_file_error(tmp_path):
    path = _write(tmp_path / "c.txt", "".join(f"line {i}\n" for i in range(50)).encode())
    items = list(iter_examples(str(path), filename="c.txt", limits=ReadLimits(max_rows=20)))
    assert len(items) == 21
    assert (items[-1].line, items[-1].code) == (0, "too_many_rows")


def test_unsupported_extension_names_the_accepted_ones(tmp_path):
    path = _write(tmp_path / "d.xlsx", b"whatever")
    for name in ("d.xlsx", "d.parquet.gz", "noextension"):
        with pytest.raises(UnsupportedFormat) as raised:
            detect_format(str(path), filename=name)
        assert raised.value.code == "unsupported_file_type"
        assert all(extension in raised.value.message for extension in SUPPORTED_EXTENSIONS)
    assert {".jsonl.gz", ".csv.gz", ".txt.gz", ".json.gz", ".tsv.gz"} <= set(SUPPORTED_EXTENSIONS)
    assert ".parquet.gz" not in SUPPORTED_EXTENSIONS


def test_unparseable_json_start_reads_as_chat_and_reports_lines(tmp_path):
    path = _write(tmp_path / "d.jsonl", b"nope\n{broken\n")
    assert detect_format(str(path), filename="d.jsonl") == DatasetFormat.CHAT_JSONL
    assert [item.code for item in iter_examples(str(path), filename="d.jsonl")] == ["invalid_json", "invalid_json"]


def test_column_mapping_dict_round_trip():
    mapping = ColumnMapping(text="review", label="stars")
    assert mapping.to_dict() == {"text": "review", "label": "stars", "source": None, "target": None,
                                 "sensitive": None}  # fmt: skip
    assert ColumnMapping.from_dict(mapping.to_dict()) == mapping
    assert ColumnMapping.from_dict({"text": "t", "label": ""}) == ColumnMapping(text="t")
    with pytest.raises(ValueError, match="colour"):
        ColumnMapping.from_dict({"colour": "x"})
    with pytest.raises(ValueError):
        ColumnMapping.from_dict({"text": 3})


def test_read_limits_defaults_and_validation():
    limits = ReadLimits()
    assert limits.max_line_bytes == limits.max_field_bytes == 8 * 1024 * 1024
    assert limits.max_decompressed_bytes == 10 * 1024**3
    assert (limits.max_rows, limits.max_errors_reported) == (10_000_000, 100)
    with pytest.raises(ValueError):
        ReadLimits(max_rows=0)


def test_csv_module_sees_the_field_limit(tmp_path):
    path = _write(tmp_path / "d.csv", b"text,label\n" + b"y" * 3000 + b",a\nshort,b\n")
    items = list(iter_examples(str(path), filename="d.csv", limits=ReadLimits(max_field_bytes=1000)))
    assert [(item.line, getattr(item, "code", "example")) for item in items] == [(2, "field_too_long"), (3, "example")]
    assert csv.field_size_limit() == 1000
