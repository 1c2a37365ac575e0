"""The validation report on real files: the bad-input corpus, report contents, a real tokenizer, the samples."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.corpus import english_corpus
from tests.workers.ml.data.bad_inputs import (
    BAD_INPUTS,
    GZIP_BOMB_LIMIT,
    GZIP_BOMB_LINE,
    LONG_LINE_BYTES,
    LONG_LINE_NUMBER,
    BadInput,
    chat_line,
    write_gzip_bomb,
    write_long_line,
)
from workers.ml.data.formats import ColumnMapping, ReadLimits
from workers.ml.data.samples import write_sample_datasets
from workers.ml.data.validation import validate_dataset
from workers.ml.tokenizer_training import train_byte_level_bpe

REPOSITORY_ROOT = Path(__file__).resolve().parents[4]
REPORT_KEYS = {
    "ok", "format", "task", "columns", "column_mapping", "rows", "empty_rows", "error_count", "errors", "duplicates",
    "label_distribution", "labels_with_one_example", "token_lengths", "validation_overlap", "warnings",
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case.name for case in BAD_INPUTS])
def test_bad_input_corpus(tmp_path, case: BadInput):
    path = tmp_path / case.filename
    case.write(path)

    report = validate_dataset(str(path), filename=case.filename, limits=case.limits)

    assert set(report) == REPORT_KEYS
    json.dumps(report)  # storable as it is
    assert report["ok"] is False
    lines_with_code = [error["line"] for error in report["errors"] if error["code"] == case.code]
    assert lines_with_code, report["errors"]
    if case.line is not None:
        assert case.line in lines_with_code
    assert report["error_count"] >= len(report["errors"]) >= 1


def test_long_line_is_skipped_in_bounded_memory(tmp_path):
    """A 50 MiB line with a 1 MiB limit: the other lines are read and peak memory stays far below the line's size."""
    path = tmp_path / "long.jsonl"
    write_long_line(path)
    script = f"""
import json, tracemalloc
from workers.ml.data.formats import MIB, ReadLimits, iter_examples
tracemalloc.start()
items = [(item.line, getattr(item, "code", "example"))
         for item in iter_examples({str(path)!r}, filename="long.jsonl", limits=ReadLimits(max_line_bytes=MIB))]
print(json.dumps({{"peak": tracemalloc.get_traced_memory()[1], "items": items}}))
"""
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=REPOSITORY_ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    result = json.loads(completed.stdout)
    assert [tuple(item) for item in result["items"]] == [
        *((line, "example") for line in range(1, LONG_LINE_NUMBER)),
        (LONG_LINE_NUMBER, "line_too_long"),
        *((line, "example") for line in range(LONG_LINE_NUMBER + 1, LONG_LINE_NUMBER + 6)),
    ]
    assert result["peak"] < LONG_LINE_BYTES // 6, result["peak"]  # a few MiB at most, never the 50 MiB line


def test_gzip_bomb_stops_as_soon_as_the_limit_is_passed(tmp_path):
    path = tmp_path / "bomb.jsonl.gz"
    write_gzip_bomb(path)
    assert path.stat().st_size < 4 * 1024 * 1024  # ~1 GiB decompressed

    report = validate_dataset(
        str(path), filename="bomb.jsonl.gz", limits=ReadLimits(max_decompressed_bytes=GZIP_BOMB_LIMIT)
    )
    # Every line that fit under the limit was read, and not one more.
    assert report["rows"] == GZIP_BOMB_LIMIT // len(GZIP_BOMB_LINE)
    assert [error["code"] for error in report["errors"]] == ["decompressed_too_large"]


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    text = "text,label\n" + "".join(f"{text},{label}\n" for text, label in rows)
    path.write_bytes(gzip.compress(text.encode()) if path.name.endswith(".gz") else text.encode())
    return path


def test_report_contents_duplicates_empty_rows_labels_overlap(tmp_path):
    rows = [(f"sentence number {i}", "positive" if i % 3 else "negative") for i in range(30)]
    rows.insert(10, rows[2])  # line 12 repeats line 4
    rows.insert(20, rows[5])  # line 22 repeats line 7
    rows.insert(25, ("", ""))  # an empty row at line 27
    rows.append(("the only neutral one", "neutral"))
    train = _write_csv(tmp_path / "train.csv", rows)
    validation = _write_csv(
        tmp_path / "valid.csv.gz", [rows[0], rows[1], ("an unseen sentence", "positive"), ("another", "negative")]
    )

    report = validate_dataset(
        str(train), filename="train.csv", validation_path=str(validation), validation_filename="valid.csv.gz"
    )

    assert set(report) == REPORT_KEYS
    json.dumps(report)
    assert report["format"] == "csv" and report["task"] == "classification"
    assert report["columns"] == ["text", "label"]
    assert report["column_mapping"] == ColumnMapping(text="text", label="label").to_dict()
    assert report["rows"] == 33
    assert report["empty_rows"] == 1
    assert report["duplicates"] == {"count": 2, "examples": [12, 22]}
    assert report["label_distribution"] == {"negative": 10, "neutral": 1, "positive": 22}
    assert report["labels_with_one_example"] == ["neutral"]
    assert report["validation_overlap"] == {"count": 2, "rows": 4}
    assert report["ok"] is False
    assert [(error["line"], error["code"]) for error in report["errors"]] == [(0, "single_example_label")]
    assert "'neutral'" in report["errors"][0]["message"]
    assert report["error_count"] == 1
    warnings = " ".join(report["warnings"])
    assert "empty row" in warnings and "Duplicates" in warnings and "validation examples" in warnings


def test_clean_file_is_ok_and_errors_are_counted_beyond_the_reported_ones(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(chat_line(i) + "\n" for i in range(12)), encoding="utf-8")
    report = validate_dataset(str(good), filename="good.jsonl")
    assert report["ok"] is True
    assert (report["rows"], report["error_count"], report["errors"]) == (12, 0, [])
    assert report["format"] == "chat_jsonl" and report["task"] == "chat"
    assert report["columns"] is None and report["column_mapping"] is None
    assert report["label_distribution"] is None

    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(chat_line(i) + "\n" for i in range(12)) + "{oops\n" * 150, encoding="utf-8")
    report = validate_dataset(str(bad), filename="bad.jsonl", limits=ReadLimits(max_errors_reported=100))
    assert report["ok"] is False
    assert report["error_count"] == 150
    assert len(report["errors"]) == 100
    assert report["errors"][0] == {"line": 13, "code": "invalid_json", "message": report["errors"][0]["message"]}


def test_whole_file_error_is_a_report_not_an_exception(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"\x00\x01")
    report = validate_dataset(str(path), filename="x.bin")
    assert set(report) == REPORT_KEYS
    assert report["ok"] is False and report["format"] is None and report["task"] is None
    assert report["error_count"] == 1
    assert report["errors"][0]["line"] == 0 and report["errors"][0]["code"] == "unsupported_file_type"
    assert ".jsonl" in report["errors"][0]["message"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_byte_level_bpe(english_corpus(400).splitlines(), vocab_size=400)


def test_token_lengths_with_a_real_tokenizer(tmp_path, tokenizer):
    lines = english_corpus(2500, seed=11).splitlines()
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    batches: list[int] = []

    def count_tokens(texts: list[str]) -> list[int]:
        batches.append(len(texts))
        return [len(ids) for ids in tokenizer(texts)["input_ids"]]

    lengths = [len(tokenizer(line)["input_ids"]) for line in lines]
    max_length = sorted(lengths)[len(lengths) // 2]
    report = validate_dataset(str(path), filename="corpus.txt", token_counter=count_tokens, max_length=max_length)

    assert batches == [1000, 1000, 500]
    stats = report["token_lengths"]
    assert stats["tokenizer_used"] is True
    assert (stats["min"], stats["max"]) == (min(lengths), max(lengths))
    assert stats["mean"] == pytest.approx(sum(lengths) / len(lengths), abs=0.01)
    assert stats["p50"] <= stats["p95"] <= stats["max"]
    assert stats["over_max_length"] == sum(length > max_length for length in lengths) > 0
    assert stats["max_length"] == max_length
    histogram = stats["histogram"]
    assert len(histogram["bins"]) == len(histogram["counts"]) + 1
    assert 1 < len(histogram["counts"]) <= 20
    assert sum(histogram["counts"]) == report["rows"] == len(lines)
    assert histogram["bins"][0] == min(lengths) and histogram["bins"][-1] == max(lengths) + 1
    assert any("Over max_length" in warning for warning in report["warnings"])
    assert not any("word counts" in warning for warning in report["warnings"])


def test_texts_sent_to_the_counter_join_fields_in_a_stable_way(tmp_path):
    seen: list[str] = []

    def record(texts: list[str]) -> list[int]:
        seen.extend(texts)
        return [1] * len(texts)

    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "S"},
                    {"role": "user", "content": "U"},
                    {"role": "assistant", "content": "A"},
                ]
            }
        )
        + "\n",  # fmt: skip
        encoding="utf-8",
    )
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("source\ttarget\nhello\tbonjour\n", encoding="utf-8")
    prompts = tmp_path / "pc.jsonl"
    prompts.write_text(json.dumps({"prompt": "P:", "completion": " C"}) + "\n", encoding="utf-8")
    for path in (chat, pairs, prompts):
        validate_dataset(str(path), filename=path.name, token_counter=record)
    assert seen == ["S\nU\nA", "hello\nbonjour", "P: C"]


def test_word_counts_without_a_tokenizer(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("".join(f"word {'x ' * i}\n" for i in range(12)), encoding="utf-8")
    report = validate_dataset(str(path), filename="c.txt", max_length=5)
    stats = report["token_lengths"]
    assert stats["tokenizer_used"] is False
    assert (stats["min"], stats["max"], stats["over_max_length"]) == (1, 12, 7)
    assert any("word counts" in warning for warning in report["warnings"])


def test_unreadable_validation_file_is_a_warning(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(chat_line(i) + "\n" for i in range(12)), encoding="utf-8")
    junk = tmp_path / "valid.jsonl"
    junk.write_bytes(b"\x00" * 100)
    report = validate_dataset(
        str(train), filename="train.jsonl", validation_path=str(junk), validation_filename="valid.jsonl"
    )
    assert report["ok"] is True and report["validation_overlap"] is None
    assert any("validation file could not be read" in warning for warning in report["warnings"])


SAMPLE_TASKS = {
    "sentiment.csv": ("classification", 60),
    "chat.jsonl": ("chat", 30),
    "translation.tsv": ("seq2seq", 60),
    "prompt_completion.jsonl": ("prompt_completion", 30),
    "corpus.txt": ("causal_lm", 400),
}


def test_every_sample_dataset_validates(tmp_path, tokenizer):
    paths = write_sample_datasets(str(tmp_path / "samples"))
    assert set(paths) == set(SAMPLE_TASKS)
    for name, path in paths.items():
        task, minimum_rows = SAMPLE_TASKS[name]
        report = validate_dataset(
            path, filename=name, token_counter=lambda texts: [len(ids) for ids in tokenizer(texts)["input_ids"]]
        )
        assert report["ok"] is True, (name, report["errors"])
        assert report["task"] == task
        assert report["rows"] >= minimum_rows
        assert report["duplicates"]["count"] == 0
    assert set(validate_dataset(paths["sentiment.csv"], filename="sentiment.csv")["label_distribution"]) == {
        "positive",
        "negative",
        "neutral",
    }
    chats = [json.loads(line) for line in Path(paths["chat.jsonl"]).read_text(encoding="utf-8").splitlines()]
    assert all(chat["messages"][0]["role"] == "system" for chat in chats)
    assert all(sum(message["role"] == "assistant" for message in chat["messages"]) >= 2 for chat in chats)
    assert any(message.get("weight") == 0 for chat in chats for message in chat["messages"])


def test_sample_datasets_are_deterministic(tmp_path):
    first = write_sample_datasets(str(tmp_path / "one"))
    second = write_sample_datasets(str(tmp_path / "two"))
    for name in first:
        assert Path(first[name]).read_bytes() == Path(second[name]).read_bytes()
