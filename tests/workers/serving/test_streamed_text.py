"""Streamed text is decoded a few tokens at a time, and adds up to what decoding every token at once gives."""

from __future__ import annotations

import pytest

from workers.ml.tokenizer_training import TokenizerSpec, train_tokenizer
from workers.serving.batching import SamplingParams, Sequence, TokenEvent, emit_progress

# Accents, CJK and emoji: byte-level BPE splits their bytes over several tokens; spaces and punctuation test how each
# algorithm's decoder joins words.
CORPUS = [
    "Le café est très bon, n'est-ce pas ? Oui, très très bon.",
    "東京の天気は晴れです。 明日も晴れるでしょう。",
    'Emoji too: 🙂 and 🚀 — with dashes, quotes "like this" and tabs\tand new\nlines.',
    "Plain English words about the weather, the market and the recipe for bread.",
]


@pytest.mark.parametrize("algorithm", ["bpe", "wordpiece", "unigram"])
def test_streamed_deltas_add_up_to_the_whole_decoded_text(algorithm):
    tokenizer = train_tokenizer(iter(CORPUS * 20), TokenizerSpec(algorithm=algorithm, vocab_size=300, min_frequency=1))
    text = " ".join(CORPUS) + " 🙂 café 東京"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    events: list[TokenEvent] = []
    sequence = Sequence(0, [0], SamplingParams(max_tokens=len(ids), temperature=0, top_p=1), events.append)

    for token in ids:
        sequence.generated_ids.append(token)
        emit_progress(sequence, token, tokenizer, eos_token_id=None)

    expected = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert "".join(event.text for event in events) == expected
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == len(ids)
    if algorithm == "bpe":  # byte-level: characters split over tokens are never sent half-made
        assert len(ids) > len(text.split()) and not any("\ufffd" in event.text for event in events)


def test_a_stop_token_ends_the_text_before_it_and_a_stop_string_is_cut():
    tokenizer = train_tokenizer(iter(CORPUS * 20), TokenizerSpec(algorithm="bpe", vocab_size=300, min_frequency=1))
    ids = tokenizer("Le café est très bon, n'est-ce pas", add_special_tokens=False)["input_ids"]
    stop_token = tokenizer.eos_token_id
    events: list[TokenEvent] = []
    sequence = Sequence(0, [0], SamplingParams(max_tokens=100, temperature=0, top_p=1), events.append)
    for token in [*ids, stop_token]:
        sequence.generated_ids.append(token)
        emit_progress(sequence, token, tokenizer, eos_token_id=stop_token)
    assert "".join(event.text for event in events) == "Le café est très bon, n'est-ce pas"
    assert events[-1].finish_reason == "stop"

    events.clear()
    params = SamplingParams(max_tokens=100, temperature=0, top_p=1, stop=("très bon",))
    sequence = Sequence(0, [0], params, events.append)
    for token in ids:
        sequence.generated_ids.append(token)
        emit_progress(sequence, token, tokenizer, eos_token_id=stop_token)
        if sequence.finished:
            break
    assert "".join(event.text for event in events) == "Le café est "
    assert events[-1].finish_reason == "stop"
