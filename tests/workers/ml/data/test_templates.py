"""Chat templates and label masking with a real byte-level BPE tokenizer: exactly which tokens are trained."""

from __future__ import annotations

import copy
import itertools

import pytest
from transformers import PreTrainedTokenizerFast

from tests.corpus import english_corpus
from workers.ml.data.examples import DatasetTask, Example
from workers.ml.data.templates import (
    CHAT_TEMPLATES,
    IGNORE_INDEX,
    TEMPLATE_SPECIAL_TOKENS,
    ensure_template_tokens,
    preview_examples,
    render_text,
    tokenize_batch,
    tokenize_example,
)
from workers.ml.errors import TrainingDataError
from workers.ml.tokenizer_training import END_OF_TEXT, TokenizerSpec, train_tokenizer

THREE_TURN_CHAT = Example(
    line=7,
    task=DatasetTask.CHAT,
    fields={
        "messages": [
            {"role": "system", "content": "Answer in one sentence."},
            {"role": "user", "content": "Who paints the red kite?"},
            {"role": "assistant", "content": "The old sailor paints it."},
            {"role": "user", "content": "And after supper?"},
            {"role": "assistant", "content": "A quiet child finds it."},
        ]
    },
)

EXPECTED_RENDERING = {
    "chatml": (
        "<|im_start|>system\nAnswer in one sentence.<|im_end|>\n"
        "<|im_start|>user\nWho paints the red kite?<|im_end|>\n"
        "<|im_start|>assistant\nThe old sailor paints it.<|im_end|>\n"
        "<|im_start|>user\nAnd after supper?<|im_end|>\n"
        "<|im_start|>assistant\nA quiet child finds it.<|im_end|>\n"
    ),
    "llama3": (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nAnswer in one sentence.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWho paints the red kite?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nThe old sailor paints it.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd after supper?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA quiet child finds it.<|eot_id|>"
    ),
    "plain": (
        "System: Answer in one sentence.\n"
        "User: Who paints the red kite?\n"
        f"Assistant: The old sailor paints it.{END_OF_TEXT}\n"
        "User: And after supper?\n"
        f"Assistant: A quiet child finds it.{END_OF_TEXT}\n"
    ),
}
# Each assistant answer with its end-of-turn marker, nothing else: not the header, not the newline after the marker.
EXPECTED_TRAINED_SPANS = {
    "chatml": ["The old sailor paints it.<|im_end|>", "A quiet child finds it.<|im_end|>"],
    "llama3": ["The old sailor paints it.<|eot_id|>", "A quiet child finds it.<|eot_id|>"],
    # The space after "Assistant:" belongs to the answer: byte-level BPE writes it as part of the first word.
    "plain": [f" The old sailor paints it.{END_OF_TEXT}", f" A quiet child finds it.{END_OF_TEXT}"],
}


@pytest.fixture(scope="module")
def base_tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(english_corpus(sentences=2000).splitlines(), TokenizerSpec(algorithm="bpe", vocab_size=500))


@pytest.fixture
def tokenizer(base_tokenizer) -> PreTrainedTokenizerFast:
    """The BPE tokenizer with every template's markers added as special tokens, as the trainer prepares it."""
    tokenizer = copy.deepcopy(base_tokenizer)
    for template in CHAT_TEMPLATES:
        ensure_template_tokens(tokenizer, template)
    return tokenizer


def spans(tokenizer, tokenized, *, trained: bool) -> list[str]:
    """Decode each run of consecutive trained (or masked) positions; labels must equal input ids where trained."""
    runs: list[list[int]] = []
    previous = None
    for token_id, label in zip(tokenized.input_ids, tokenized.labels, strict=True):
        is_trained = label != IGNORE_INDEX
        if is_trained:
            assert label == token_id
        if is_trained == trained:
            if previous != trained:
                runs.append([])
            runs[-1].append(token_id)
        previous = is_trained
    return [tokenizer.decode(run) for run in runs]


def chat(*messages: tuple[str, str] | tuple[str, str, int], line: int = 1) -> Example:
    built = []
    for message in messages:
        entry = {"role": message[0], "content": message[1]}
        if len(message) == 3:
            entry["weight"] = message[2]
        built.append(entry)
    return Example(line=line, task=DatasetTask.CHAT, fields={"messages": built})


@pytest.mark.parametrize("template", CHAT_TEMPLATES)
def test_every_assistant_turn_and_its_end_marker_is_trained_and_nothing_else(tokenizer, template):
    tokenized = tokenize_example(THREE_TURN_CHAT, tokenizer, template=template)

    assert tokenizer.decode(tokenized.input_ids) == EXPECTED_RENDERING[template]
    assert spans(tokenizer, tokenized, trained=True) == EXPECTED_TRAINED_SPANS[template]
    masked = spans(tokenizer, tokenized, trained=False)
    # Masked and trained runs alternate, masked first: together they are the whole rendering, in order.
    assert len(masked) - len(EXPECTED_TRAINED_SPANS[template]) in (0, 1)
    pairs = itertools.zip_longest(masked, EXPECTED_TRAINED_SPANS[template], fillvalue="")
    interleaved = [span for pair in pairs for span in pair]
    assert "".join(interleaved) == EXPECTED_RENDERING[template]
    assert tokenized.line == 7 and tokenized.truncated is False


def test_chatml_masks_exactly_headers_other_roles_and_the_newline_after_the_end_marker(tokenizer):
    tokenized = tokenize_example(THREE_TURN_CHAT, tokenizer, template="chatml")

    assert spans(tokenizer, tokenized, trained=False) == [
        "<|im_start|>system\nAnswer in one sentence.<|im_end|>\n"
        "<|im_start|>user\nWho paints the red kite?<|im_end|>\n<|im_start|>assistant\n",
        "\n<|im_start|>user\nAnd after supper?<|im_end|>\n<|im_start|>assistant\n",
        "\n",
    ]


@pytest.mark.parametrize("template", CHAT_TEMPLATES)
def test_segments_tokenize_like_the_whole_rendered_text(tokenizer, template):
    # Masks are built segment by segment; for these texts the ids must still be what the whole string gives, so the
    # model sees at training time the tokens it will see when the same prompt is tokenized at inference time.
    tokenized = tokenize_example(THREE_TURN_CHAT, tokenizer, template=template)
    rendered = render_text(THREE_TURN_CHAT, tokenizer, template=template)

    assert rendered == EXPECTED_RENDERING[template]
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == tokenized.input_ids


@pytest.mark.parametrize("template", CHAT_TEMPLATES)
def test_weight_zero_masks_that_assistant_turn_only(tokenizer, template):
    example = chat(
        ("user", "Who paints the red kite?"),
        ("assistant", "The old sailor paints it.", 0),
        ("user", "And after supper?"),
        ("assistant", "A quiet child finds it.", 1),
    )

    tokenized = tokenize_example(example, tokenizer, template=template)

    assert spans(tokenizer, tokenized, trained=True) == EXPECTED_TRAINED_SPANS[template][1:]


@pytest.mark.parametrize("template", CHAT_TEMPLATES)
def test_train_on_all_trains_every_token_even_weight_zero_turns(tokenizer, template):
    example = chat(("system", "Be brief."), ("user", "Hello there"), ("assistant", "The cat paints.", 0))

    tokenized = tokenize_example(example, tokenizer, template=template, train_on="all")

    assert tokenized.labels == tokenized.input_ids
    assert IGNORE_INDEX not in tokenized.labels


def test_tool_turns_are_masked(tokenizer):
    example = chat(
        ("user", "What is the weather?"),
        ("assistant", "Let me check."),
        ("tool", "Rain before dawn."),
        ("assistant", "It rains before dawn."),
    )

    tokenized = tokenize_example(example, tokenizer, template="chatml")

    assert spans(tokenizer, tokenized, trained=True) == ["Let me check.<|im_end|>", "It rains before dawn.<|im_end|>"]
    assert "<|im_start|>tool\nRain before dawn.<|im_end|>\n" in "".join(spans(tokenizer, tokenized, trained=False))


def test_template_markers_absent_from_the_vocabulary_are_tokenized_as_text(base_tokenizer):
    tokenizer = copy.deepcopy(base_tokenizer)

    tokenized = tokenize_example(THREE_TURN_CHAT, tokenizer, template="chatml")

    assert "<|im_start|>" not in tokenizer.get_vocab()
    assert tokenizer.decode(tokenized.input_ids) == EXPECTED_RENDERING["chatml"]
    assert spans(tokenizer, tokenized, trained=True) == EXPECTED_TRAINED_SPANS["chatml"]


def test_ensure_template_tokens_adds_the_missing_markers_once(base_tokenizer):
    tokenizer = copy.deepcopy(base_tokenizer)
    size = len(tokenizer)

    added = ensure_template_tokens(tokenizer, "llama3")

    assert added == list(TEMPLATE_SPECIAL_TOKENS["llama3"])
    assert len(tokenizer) == size + len(added)
    assert ensure_template_tokens(tokenizer, "llama3") == []
    assert ensure_template_tokens(tokenizer, "plain") == []
    for marker in added:
        assert tokenizer(marker, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(marker)]
        assert marker in tokenizer.all_special_tokens
    assert END_OF_TEXT in tokenizer.all_special_tokens
    assert tokenizer.eos_token == END_OF_TEXT


def test_prompt_completion_trains_the_completion_and_eos(tokenizer):
    example = Example(
        line=2, task=DatasetTask.PROMPT_COMPLETION, fields={"prompt": "The cat watches", "completion": " a red kite."}
    )

    completions = tokenize_example(example, tokenizer)
    everything = tokenize_example(example, tokenizer, train_on="all")

    assert spans(tokenizer, completions, trained=False) == ["The cat watches"]
    assert spans(tokenizer, completions, trained=True) == [f" a red kite.{END_OF_TEXT}"]
    assert completions.input_ids[-1] == tokenizer.eos_token_id
    assert everything.input_ids == completions.input_ids
    assert everything.labels == everything.input_ids


def test_causal_lm_trains_every_token_and_ends_with_eos(tokenizer):
    example = Example(line=4, task=DatasetTask.CAUSAL_LM, fields={"text": "The river finds the long road."})

    tokenized = tokenize_example(example, tokenizer)

    assert tokenized.labels == tokenized.input_ids
    assert tokenized.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(tokenized.input_ids) == f"The river finds the long road.{END_OF_TEXT}"


@pytest.mark.parametrize(
    ("task", "fields"),
    [
        (DatasetTask.SEQ2SEQ, {"source": "a", "target": "b"}),
        (DatasetTask.CLASSIFICATION, {"text": "a", "label": "b"}),
    ],
)
def test_tasks_without_causal_labels_are_refused(tokenizer, task, fields):
    with pytest.raises(ValueError, match="no causal language-model labels") as raised:
        tokenize_example(Example(line=1, task=task, fields=fields), tokenizer)

    assert raised.value.param == "task"


def test_truncation_keeps_the_start(tokenizer):
    full = tokenize_example(THREE_TURN_CHAT, tokenizer, template="chatml")

    cut = tokenize_example(THREE_TURN_CHAT, tokenizer, template="chatml", max_length=20)
    exact = tokenize_example(THREE_TURN_CHAT, tokenizer, template="chatml", max_length=len(full.input_ids))

    assert cut.truncated is True
    assert cut.input_ids == full.input_ids[:20] and cut.labels == full.labels[:20]
    assert exact.truncated is False and exact.input_ids == full.input_ids


@pytest.mark.parametrize(
    ("arguments", "param"),
    [({"template": "alpaca"}, "template"), ({"train_on": "last"}, "train_on"), ({"max_length": 0}, "max_length")],
)
def test_bad_options_are_user_errors(tokenizer, arguments, param):
    with pytest.raises(TrainingDataError) as raised:
        tokenize_example(THREE_TURN_CHAT, tokenizer, **arguments)

    assert raised.value.param == param


def test_the_batch_path_gives_exactly_the_single_example_results(tokenizer):
    examples = [
        THREE_TURN_CHAT,
        chat(("user", "Hi"), ("assistant", "Hello", 0), ("assistant", "The cat."), line=9),
        Example(line=10, task=DatasetTask.CAUSAL_LM, fields={"text": "A small dog builds a warm loaf."}),
        Example(line=11, task=DatasetTask.PROMPT_COMPLETION, fields={"prompt": "Q", "completion": "A"}),
        chat(("user", ""), ("assistant", "Empty question."), line=12),
    ]

    batch = tokenize_batch(examples, tokenizer, template="llama3", max_length=40)

    assert batch == [tokenize_example(example, tokenizer, template="llama3", max_length=40) for example in examples]
    assert [item.line for item in batch] == [7, 9, 10, 11, 12]


@pytest.mark.parametrize("template", CHAT_TEMPLATES)
@pytest.mark.parametrize("train_on", ["completions", "all"])
def test_preview_flags_are_the_labels(tokenizer, template, train_on):
    examples = [
        THREE_TURN_CHAT,
        chat(("user", "Hi"), ("assistant", "The cat paints.", 0), ("assistant", "A red kite."), line=8),
        Example(line=9, task=DatasetTask.CAUSAL_LM, fields={"text": "The river."}),
    ]

    previews = preview_examples(iter(examples), tokenizer, template=template, train_on=train_on, max_length=30)

    assert len(previews) == 3
    for preview, example in zip(previews, examples, strict=True):
        tokenized = tokenize_example(example, tokenizer, template=template, train_on=train_on, max_length=30)
        assert preview["line"] == example.line
        assert preview["truncated"] == tokenized.truncated
        assert [token["id"] for token in preview["tokens"]] == tokenized.input_ids
        trained_flags = [label != IGNORE_INDEX for label in tokenized.labels]
        assert [token["trained"] for token in preview["tokens"]] == trained_flags
        assert preview["num_tokens"] == len(tokenized.input_ids)
        assert preview["num_trained"] == sum(label != IGNORE_INDEX for label in tokenized.labels)
        assert [token["token"] for token in preview["tokens"]] == tokenizer.convert_ids_to_tokens(tokenized.input_ids)
        assert "".join(token["text"] for token in preview["tokens"]) == tokenizer.decode(tokenized.input_ids)
    assert previews[0]["truncated"] is True


def test_preview_reads_only_the_examples_it_shows(tokenizer):
    def endless():
        line = 0
        while True:
            line += 1
            yield Example(line=line, task=DatasetTask.CAUSAL_LM, fields={"text": "The cat."})

    previews = preview_examples(endless(), tokenizer, limit=3)

    assert [preview["line"] for preview in previews] == [1, 2, 3]
    assert previews[0]["num_trained"] == previews[0]["num_tokens"]
    texts = [token["text"] for token in previews[0]["tokens"]]
    assert texts[-1] == END_OF_TEXT and "".join(texts) == f"The cat.{END_OF_TEXT}"
