"""Training BPE, WordPiece and Unigram tokenizers from generated text: real tokenizers, real files; no Django."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from tests.corpus import english_corpus
from workers.ml.errors import TrainingDataError
from workers.ml.tokenizer_training import (
    END_OF_TEXT,
    TOKENIZER_ALGORITHMS,
    TokenizerSpec,
    load_tokenizer,
    save_tokenizer,
    tokenizer_report,
    train_byte_level_bpe,
    train_tokenizer,
)

_SYLLABLES = ["ka", "to", "ri", "men", "sa", "lo", "vi", "dan", "pe", "qu", "zor", "el", "th", "ing", "str", "ow"]


def varied_corpus(lines: int = 1500, seed: int = 3) -> list[str]:
    """English sentences plus sentences of made-up words, so each trainer has enough distinct words to merge."""
    chooser = random.Random(seed)
    words = ["".join(chooser.choice(_SYLLABLES) for _ in range(chooser.randint(1, 4))) for _ in range(1500)]
    made_up = [" ".join(chooser.choice(words) for _ in range(chooser.randint(5, 14))) + "." for _ in range(lines)]
    return english_corpus().splitlines() + made_up


SIXTY_TOKENS = tuple(f"<t{i}>" for i in range(60))
EXPECTED_NAMED_TOKENS = {
    "bpe": {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "pad_token": END_OF_TEXT, "unk_token": None},
    "wordpiece": {
        "unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
        "mask_token": "[MASK]", "bos_token": "[CLS]", "eos_token": "[SEP]",
    },
    "unigram": {"unk_token": "<unk>", "pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"},
}  # fmt: skip


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return varied_corpus()


@pytest.fixture(scope="module")
def trained(corpus) -> dict[str, PreTrainedTokenizerFast]:
    return {
        algorithm: train_tokenizer(
            iter(corpus), TokenizerSpec(algorithm=algorithm, vocab_size=600, special_tokens=("<|user|>", "<tool>"))
        )
        for algorithm in TOKENIZER_ALGORITHMS
    }


@pytest.mark.parametrize("algorithm", TOKENIZER_ALGORITHMS)
def test_each_algorithm_trains_with_its_special_tokens_and_the_users(trained, corpus, algorithm):
    tokenizer = trained[algorithm]
    vocabulary = tokenizer.get_vocab()

    for attribute, token in EXPECTED_NAMED_TOKENS[algorithm].items():
        assert getattr(tokenizer, attribute) == token, attribute
        if token is not None:
            assert token in vocabulary
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    for user_token in ("<|user|>", "<tool>"):
        assert user_token in tokenizer.all_special_tokens
        # A special token is never split, wherever it sits in the text.
        ids = tokenizer(f"the cat{user_token}finds", add_special_tokens=False)["input_ids"]
        assert vocabulary[user_token] in ids
    # Learned merges, not just characters: words here average 6 characters but take well under 3 tokens.
    assert tokenizer_report(tokenizer, corpus[-200:])["fertility"] < 2.5


@pytest.mark.parametrize("algorithm", TOKENIZER_ALGORITHMS)
@pytest.mark.parametrize("vocab_size", [300, 600])
def test_vocabulary_never_exceeds_vocab_size(corpus, algorithm, vocab_size):
    tokenizer = train_tokenizer(corpus, TokenizerSpec(algorithm=algorithm, vocab_size=vocab_size))

    assert len(tokenizer) <= vocab_size
    # The corpus holds far more than 600 distinct pieces, so the trainer fills the vocabulary (give or take the
    # pieces unigram prunes in its last step).
    assert len(tokenizer) >= vocab_size * 0.9


def test_wordpiece_keeps_the_vocab_bound_even_when_the_alphabet_is_larger(corpus):
    many_characters = corpus + ["".join(chr(code) for code in range(0x4E00, 0x4E00 + 200))] * 3

    tokenizer = train_tokenizer(many_characters, TokenizerSpec(algorithm="wordpiece", vocab_size=128))

    assert len(tokenizer) <= 128


def test_byte_level_bpe_round_trips_any_text_exactly(trained):
    tokenizer = trained["bpe"]
    text = "  The old sailor\tfinds žluťoučký kůň 😀 and 日本語,\n\nthen <|user|> leaves.  "

    ids = tokenizer(text)["input_ids"]

    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id is None


def test_wordpiece_round_trips_to_the_normalised_text(corpus):
    tokenizer = train_tokenizer(corpus, TokenizerSpec(algorithm="wordpiece", vocab_size=600, lowercase=True))

    ids = tokenizer("The Old Sailor finds a red kite.")["input_ids"]

    assert tokenizer.convert_ids_to_tokens(ids)[0] == "[CLS]" and tokenizer.convert_ids_to_tokens(ids)[-1] == "[SEP]"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the old sailor finds a red kite."


def test_wordpiece_keeps_case_unless_asked_to_lowercase(trained):
    tokenizer = trained["wordpiece"]

    ids = tokenizer("The Tall Man", add_special_tokens=False)["input_ids"]

    assert tokenizer.decode(ids) == "The Tall Man"


def test_unigram_round_trips_text_of_known_characters(trained):
    tokenizer = trained["unigram"]
    text = "The old sailor finds a red kite before dawn."

    ids = tokenizer(text)["input_ids"]

    assert tokenizer.convert_ids_to_tokens(ids)[0].startswith("▁")
    assert tokenizer.decode(ids) == text


def test_lowercase_bpe_decodes_to_lowercase(corpus):
    tokenizer = train_tokenizer(corpus, TokenizerSpec(algorithm="bpe", vocab_size=400, lowercase=True))

    assert tokenizer.decode(tokenizer("The Old SAILOR")["input_ids"]) == "the old sailor"


def test_the_texts_are_read_once_in_a_single_pass(corpus):
    class OnePass:
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            if self.passes > 1:
                raise AssertionError("the texts were read twice")
            yield from corpus

    texts = OnePass()
    train_tokenizer(texts, TokenizerSpec(algorithm="unigram", vocab_size=300))

    assert texts.passes == 1


def test_min_frequency_drops_rare_merges(corpus):
    frequent_only = train_tokenizer(corpus, TokenizerSpec(vocab_size=5000, min_frequency=50))
    everything = train_tokenizer(corpus, TokenizerSpec(vocab_size=5000, min_frequency=1))

    assert len(frequent_only) < len(everything)


@pytest.mark.parametrize(
    ("arguments", "param"),
    [
        ({"algorithm": "sentencepiece"}, "algorithm"),
        ({"vocab_size": 63}, "vocab_size"),
        ({"vocab_size": 262_145}, "vocab_size"),
        ({"vocab_size": True}, "vocab_size"),
        ({"vocab_size": "8000"}, "vocab_size"),
        # Byte-level BPE cannot hold fewer than 256 bytes + <|endoftext|>.
        ({"algorithm": "bpe", "vocab_size": 256}, "vocab_size"),
        ({"algorithm": "wordpiece", "vocab_size": 64, "special_tokens": SIXTY_TOKENS}, "vocab_size"),
        ({"special_tokens": ("",)}, "special_tokens"),
        ({"special_tokens": ("   ",)}, "special_tokens"),
        ({"special_tokens": ("x" * 65,)}, "special_tokens"),
        ({"special_tokens": (7,)}, "special_tokens"),
        ({"special_tokens": "<|user|>"}, "special_tokens"),
        ({"special_tokens": tuple(f"<t{i}>" for i in range(101))}, "special_tokens"),
        ({"min_frequency": 0}, "min_frequency"),
        ({"lowercase": "yes"}, "lowercase"),
    ],
)  # fmt: skip
def test_a_bad_spec_is_refused_with_the_field_it_is_about(arguments, param):
    with pytest.raises(TrainingDataError) as raised:
        TokenizerSpec(**arguments)

    assert raised.value.code == "invalid_tokenizer_spec"
    assert raised.value.param == param
    assert raised.value.message


def test_bounds_that_are_allowed():
    TokenizerSpec(algorithm="wordpiece", vocab_size=64)
    TokenizerSpec(algorithm="unigram", vocab_size=262_144, special_tokens=tuple(f"<t{i}>" for i in range(100)))
    spec = TokenizerSpec(algorithm="bpe", vocab_size=258, special_tokens=["x" * 64])

    assert spec.special_tokens == ("x" * 64,)


def test_unigram_with_more_characters_than_vocabulary_is_a_user_error(corpus):
    many_characters = corpus + ["".join(chr(code) for code in range(0x4E00, 0x4E00 + 200))]

    with pytest.raises(TrainingDataError) as raised:
        train_tokenizer(many_characters, TokenizerSpec(algorithm="unigram", vocab_size=100))

    assert raised.value.param == "vocab_size"


@pytest.mark.parametrize("algorithm", TOKENIZER_ALGORITHMS)
def test_no_text_is_a_user_error(algorithm):
    with pytest.raises(TrainingDataError) as raised:
        train_tokenizer(iter(["", ""]), TokenizerSpec(algorithm=algorithm, vocab_size=300))

    assert raised.value.code == "empty_training_data"


def test_report_on_byte_level_bpe_has_no_unknown_tokens(trained):
    tokenizer = trained["bpe"]
    sample = ["The old sailor finds a red kite.", "žluťoučký kůň 😀 " * 30, "A quiet child"]

    report = tokenizer_report(tokenizer, sample, examples=2)

    assert report["algorithm"] == "bpe"
    assert report["vocab_size"] == len(tokenizer)
    assert report["unknown_rate"] == 0.0
    assert report["sample_words"] == 7 + 90 + 3
    assert report["sample_tokens"] == sum(len(tokenizer(text)["input_ids"]) for text in sample)
    assert report["fertility"] == pytest.approx(report["sample_tokens"] / report["sample_words"])
    assert report["fertility"] >= 1
    assert set(report["special_tokens"]) == {END_OF_TEXT, "<|user|>", "<tool>"}
    assert len(report["examples"]) == 2
    assert report["examples"][0]["text"] == sample[0]
    assert "Ġold" in report["examples"][0]["tokens"]
    assert len(report["examples"][1]["text"]) == 200


def test_report_on_wordpiece_counts_unknown_characters(trained):
    tokenizer = trained["wordpiece"]

    clean = tokenizer_report(tokenizer, ["the old sailor finds a red kite."])
    unknown = tokenizer_report(tokenizer, ["the old sailor finds ž and 😀 here."])

    assert clean["unknown_rate"] == 0.0
    # 8 words, two of them unknown: "ž" and "😀" each become one [UNK] out of 9 tokens (the "." is a token too).
    assert unknown["unknown_rate"] == pytest.approx(2 / unknown["sample_tokens"])
    assert unknown["unknown_rate"] > 0
    assert unknown["fertility"] >= 1
    assert unknown["algorithm"] == "wordpiece"
    assert {"[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"} <= set(unknown["special_tokens"])


def test_report_on_unigram_shows_metaspace_markers(trained):
    report = tokenizer_report(trained["unigram"], ["The old sailor finds ž."])

    assert report["algorithm"] == "unigram"
    assert report["unknown_rate"] > 0
    assert report["examples"][0]["tokens"][0].startswith("▁")


def test_report_on_no_sample_is_zeroes(trained):
    report = tokenizer_report(trained["bpe"], [])

    assert report["fertility"] == 0.0 and report["unknown_rate"] == 0.0 and report["examples"] == []


@pytest.mark.parametrize("algorithm", TOKENIZER_ALGORITHMS)
def test_save_and_load_round_trip(trained, tmp_path, algorithm):
    tokenizer = trained[algorithm]
    folder = tmp_path / "tok"
    text = "The old sailor <|user|> finds a red kite."

    save_tokenizer(tokenizer, folder)
    loaded = load_tokenizer(folder)

    assert sorted(path.name for path in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.all_special_tokens == tokenizer.all_special_tokens
    assert loaded.special_tokens_map == tokenizer.special_tokens_map
    assert loaded.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_loading_a_missing_folder_never_reaches_for_a_hub(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "gpt2")


def test_train_byte_level_bpe_is_unchanged(corpus):
    tokenizer = train_byte_level_bpe(corpus, vocab_size=300)

    assert tokenizer.eos_token == tokenizer.pad_token == tokenizer.bos_token == END_OF_TEXT
    assert len(tokenizer) == 300
    assert tokenizer.decode(tokenizer("A quiet child.\n")["input_ids"]) == "A quiet child.\n"


_TRAIN_IN_A_NEW_PROCESS = """
import sys
from tests.workers.ml.test_tokenizer_training import varied_corpus
from workers.ml.tokenizer_training import TokenizerSpec, train_tokenizer

texts = varied_corpus() + ["Café naïve façade — déjà vu? 東京 日本語 🙂 " + line for line in varied_corpus(60, 5)]
spec = TokenizerSpec(algorithm=sys.argv[1], vocab_size=int(sys.argv[2]), special_tokens=("<|user|>",))
sys.stdout.write(train_tokenizer(iter(texts), spec).backend_tokenizer.to_str())
"""


@pytest.mark.parametrize(
    ("algorithm", "vocab_size"), [("bpe", 600), ("wordpiece", 600), ("wordpiece", 90), ("unigram", 600)]
)
def test_the_same_texts_train_the_same_tokenizer_in_every_process(algorithm, vocab_size):
    """A from-scratch model trained twice on the same data must see the same ids. The Rust trainers iterate hash maps
    whose order changes with every process (WordPiece numbered its continuation pieces, and so broke ties between
    merges, in that order; Unigram listed equally probable pieces in it), so this trains in three fresh processes and
    compares the whole tokenizer file. The small WordPiece vocabulary also caps the alphabet."""
    files = {
        subprocess.run(
            [sys.executable, "-c", _TRAIN_IN_A_NEW_PROCESS, algorithm, str(vocab_size)],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[3],
        ).stdout
        for _ in range(3)
    }
    assert len(files) == 1
