"""The tokenized Arrow cache: keys, hits without re-tokenising, identical rows, and no half cache after a crash."""

from __future__ import annotations

import copy
import json

import pytest
from transformers import PreTrainedTokenizerFast

from tests.corpus import english_corpus
from workers.ml.data import templates
from workers.ml.data.examples import DatasetTask, Example
from workers.ml.data.templates import ensure_template_tokens, tokenize_example
from workers.ml.data.tokenized_cache import (
    COMPLETE_MARKER,
    cache_hit,
    cache_key,
    tokenize_to_cache,
    tokenizer_fingerprint,
)
from workers.ml.tokenizer_training import TokenizerSpec, load_tokenizer, save_tokenizer, train_tokenizer

SENTENCES = english_corpus(sentences=300).splitlines()
KEY_INPUTS = {
    "dataset_sha256": "a" * 64,
    "tokenizer_fingerprint": "b" * 64,
    "template": "chatml",
    "train_on": "completions",
    "max_length": 1024,
    "task": "chat",
}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = train_tokenizer(SENTENCES, TokenizerSpec(algorithm="bpe", vocab_size=400))
    ensure_template_tokens(tokenizer, "chatml")
    return tokenizer


def chats(count: int) -> list[Example]:
    return [
        Example(
            line=index + 1,
            task=DatasetTask.CHAT,
            fields={
                "messages": [
                    {"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": SENTENCES[index % len(SENTENCES)]},
                    {"role": "assistant", "content": SENTENCES[(index * 7) % len(SENTENCES)]},
                    {"role": "user", "content": "And then?"},
                    {"role": "assistant", "content": SENTENCES[(index * 13) % len(SENTENCES)] * (1 + index % 4)},
                ]
            },
        )
        for index in range(count)
    ]


class CountingTokenizeBatch:
    """Wraps templates.tokenize_batch, the code every cached row goes through, to count the examples it sees."""

    def __init__(self, original):
        self.original = original
        self.examples = 0

    def __call__(self, examples, *args, **kwargs):
        self.examples += len(examples)
        return self.original(examples, *args, **kwargs)


def test_the_same_inputs_give_the_same_key():
    key = cache_key(**KEY_INPUTS)

    assert key == cache_key(**dict(reversed(list(KEY_INPUTS.items()))))
    assert len(key) == 64 and int(key, 16) >= 0


@pytest.mark.parametrize(
    ("field", "other"),
    [
        ("dataset_sha256", "c" * 64),
        ("tokenizer_fingerprint", "d" * 64),
        ("template", "llama3"),
        ("train_on", "all"),
        ("max_length", 512),
        ("task", "prompt_completion"),
    ],
)
def test_any_changed_input_changes_the_key(field, other):
    assert cache_key(**{**KEY_INPUTS, field: other}) != cache_key(**KEY_INPUTS)


def test_tokenizer_fingerprint_follows_what_the_tokenizer_does(tokenizer, tmp_path):
    fingerprint = tokenizer_fingerprint(tokenizer)
    other_vocabulary = train_tokenizer(SENTENCES, TokenizerSpec(algorithm="bpe", vocab_size=420))
    with_markers = copy.deepcopy(tokenizer)
    ensure_template_tokens(with_markers, "llama3")
    other_eos = copy.deepcopy(tokenizer)
    other_eos.eos_token = "<|im_end|>"
    save_tokenizer(tokenizer, tmp_path / "tok")

    assert len(fingerprint) == 64
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "tok")) == fingerprint
    # A call with truncation and padding leaves them switched on in the backend; tokenization is unchanged.
    tokenizer("The cat.", truncation=True, max_length=2, padding="max_length")
    assert tokenizer_fingerprint(tokenizer) == fingerprint
    assert tokenizer_fingerprint(other_vocabulary) != fingerprint
    assert tokenizer_fingerprint(with_markers) != fingerprint
    assert tokenizer_fingerprint(other_eos) != fingerprint


def test_cached_rows_are_exactly_tokenize_example_rows(tokenizer, tmp_path):
    examples = chats(230)

    dataset = tokenize_to_cache(
        examples, tokenizer, cache_dir=str(tmp_path), key="k1", template="chatml", train_on="completions",
        max_length=110, batch_rows=50,
    )  # fmt: skip

    assert dataset.num_rows == 230
    assert dataset.column_names == ["input_ids", "labels", "line", "truncated"]
    schema = dataset.data.schema
    assert str(schema.field("input_ids").type) == "list<item: int32>"
    assert str(schema.field("labels").type) == "list<item: int32>"
    assert str(schema.field("line").type) == "int32"
    assert str(schema.field("truncated").type) == "bool"
    expected = [tokenize_example(example, tokenizer, template="chatml", max_length=110) for example in examples]
    assert dataset.to_list() == [
        {"input_ids": row.input_ids, "labels": row.labels, "line": row.line, "truncated": row.truncated}
        for row in expected
    ]
    assert any(row.truncated for row in expected) and not all(row.truncated for row in expected)


def test_the_second_call_is_a_hit_that_tokenizes_nothing(tokenizer, tmp_path, monkeypatch):
    counting = CountingTokenizeBatch(templates.tokenize_batch)
    monkeypatch.setattr(templates, "tokenize_batch", counting)
    options = {"cache_dir": str(tmp_path), "template": "chatml", "train_on": "completions", "max_length": 128}
    key = cache_key(
        dataset_sha256="e" * 64, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), template="chatml",
        train_on="completions", max_length=128, task="chat",
    )  # fmt: skip

    assert cache_hit(str(tmp_path), key) is False
    first = tokenize_to_cache(chats(120), tokenizer, key=key, **options)
    tokenized_the_first_time = counting.examples

    def never_read():
        raise AssertionError("a cache hit must not read the examples")
        yield

    second = tokenize_to_cache(never_read(), tokenizer, key=key, **options)

    assert tokenized_the_first_time == 120
    assert counting.examples == 120
    assert cache_hit(str(tmp_path), key) is True
    assert second.to_list() == first.to_list()
    marker = json.loads((tmp_path / key / COMPLETE_MARKER).read_text())
    assert marker["key"] == key and marker["rows"] == 120


def test_a_failure_midway_leaves_no_cache(tokenizer, tmp_path):
    def crashing():
        yield from chats(120)
        raise OSError("the dataset file went away")

    with pytest.raises(OSError, match="went away"):
        tokenize_to_cache(
            crashing(), tokenizer, cache_dir=str(tmp_path), key="k2", template="chatml", train_on="completions",
            max_length=64, batch_rows=50,
        )  # fmt: skip

    assert list(tmp_path.iterdir()) == []
    assert cache_hit(str(tmp_path), "k2") is False
    again = tokenize_to_cache(
        chats(120), tokenizer, cache_dir=str(tmp_path), key="k2", template="chatml", train_on="completions",
        max_length=64,
    )  # fmt: skip
    assert again.num_rows == 120
    assert [path.name for path in tmp_path.iterdir()] == ["k2"]


def test_a_folder_without_the_marker_is_not_a_hit_and_is_replaced(tokenizer, tmp_path):
    debris = tmp_path / "k3"
    debris.mkdir()
    (debris / "data-00000-of-00001.arrow").write_bytes(b"half written")

    assert cache_hit(str(tmp_path), "k3") is False
    dataset = tokenize_to_cache(
        chats(10), tokenizer, cache_dir=str(tmp_path), key="k3", template="chatml", train_on="completions",
        max_length=64,
    )  # fmt: skip

    assert dataset.num_rows == 10
    assert cache_hit(str(tmp_path), "k3") is True


def test_no_examples_cache_an_empty_dataset(tokenizer, tmp_path):
    dataset = tokenize_to_cache(
        [], tokenizer, cache_dir=str(tmp_path), key="k4", template="chatml", train_on="completions", max_length=64
    )

    assert dataset.num_rows == 0
    assert dataset.column_names == ["input_ids", "labels", "line", "truncated"]


@pytest.mark.parametrize("key", ["", "../escape", "a/b", ".hidden"])
def test_a_key_that_is_not_a_plain_folder_name_is_refused(tokenizer, tmp_path, key):
    with pytest.raises(ValueError, match="plain folder name"):
        tokenize_to_cache(
            chats(1), tokenizer, cache_dir=str(tmp_path), key=key, template="chatml", train_on="completions",
            max_length=64,
        )  # fmt: skip
