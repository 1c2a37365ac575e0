"""Chat templates, label masking and the token-level preview: one implementation for the preview and the trainer.

Every example is rendered into *segments* (a piece of text, or a token id, and whether the model learns to produce
it). Each segment is tokenized on its own (``add_special_tokens=False``) and the ids are concatenated, so a mask
boundary always falls exactly between two segments' tokens and never in the middle of a token that straddles a role
header and the content after it — the bug behind most "my labels are off by one" reports against fine-tuning tools.

What is trained (``train_on="completions"``, the default):

- chat: every assistant turn — not only the last — with its end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``, or
  eos for ``plain``), unless the message has ``"weight": 0``. Role headers, system, user and tool turns, and the
  newline after an end marker are masked. The model thus learns to answer and to stop, never to write the user's
  part.
- prompt_completion: the completion and an eos; the prompt is masked. Templates do not apply (the pair is joined as
  is, OpenAI's legacy fine-tuning format).
- causal_lm: the text and an eos.

``train_on="all"`` trains every token of every example, including headers, user turns and assistant turns whose
weight is 0: "all" is a request to model the whole conversation, so per-message weights do not apply to it.

classification and seq2seq examples have no causal labels (a classifier trains a head on a label, a seq2seq model
has separate encoder and decoder sequences); asking for them raises TrainingDataError, a ValueError.

Template markers that are not in the tokenizer's vocabulary are tokenized as plain text, which is correct but long;
``ensure_template_tokens`` adds them as special tokens (the trainer then resizes the embeddings).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import NamedTuple

from transformers import PreTrainedTokenizerBase

from workers.ml.data.examples import DatasetTask, Example
from workers.ml.errors import TrainingDataError

CHAT_TEMPLATES = ("chatml", "llama3", "plain")
TRAIN_ON = ("completions", "all")
IGNORE_INDEX = -100
"""Label of a masked position: PyTorch's cross-entropy ignores it."""

INVALID_CHAT_TEMPLATE = "invalid_chat_template"
INVALID_TRAIN_ON = "invalid_train_on"
UNSUPPORTED_TASK = "unsupported_task"
INVALID_MAX_LENGTH = "invalid_hyperparameter"

TEMPLATE_SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "plain": (),
}

_LLAMA3_BEGIN_OF_TEXT = "<|begin_of_text|>"
_PLAIN_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


@dataclass(frozen=True)
class TokenizedExample:
    """One example ready for a causal language model: inputs and the labels the loss sees."""

    input_ids: list[int]
    """Token ids of the rendered example, at most ``max_length`` of them."""
    labels: list[int]
    """Same length as ``input_ids``: the token id where the model is trained, ``IGNORE_INDEX`` (-100) where masked.
    Unshifted, as Hugging Face causal LM models expect (they shift internally)."""
    truncated: bool
    """True when the rendered example was longer than ``max_length`` and its end was cut off."""
    line: int
    """The source line (or row) of the example, for error messages and the preview."""


class _Segment(NamedTuple):
    # A NamedTuple, not a frozen dataclass: a dataset renders into millions of these, and a frozen dataclass's
    # __init__ (object.__setattr__ per field) costs several times what building a tuple does.
    text: str | None
    """Text to tokenize on its own; None when ``token_id`` is given instead."""
    trained: bool
    """Whether the model learns to produce this segment's tokens."""
    token_id: int | None = None
    """A single token appended as is (the eos), so it is right even if its text would not tokenize to it."""


def ensure_template_tokens(tokenizer: PreTrainedTokenizerBase, template: str) -> list[str]:
    """Add the template's markers (e.g. ``<|im_start|>``) as special tokens; return those that were missing.

    Special tokens are never split and ``decode(..., skip_special_tokens=True)`` drops them. When the returned list
    is not empty the caller must resize the model's embeddings to ``len(tokenizer)``.
    """
    _check_template(template)
    vocabulary = tokenizer.get_vocab()
    missing = [marker for marker in TEMPLATE_SPECIAL_TOKENS[template] if marker not in vocabulary]
    if missing:
        # replace_extra_special_tokens=False keeps the user's own special tokens registered beside the new ones.
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return missing


def tokenize_example(
    example: Example,
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str = "chatml",
    train_on: str = "completions",
    max_length: int = 1024,
) -> TokenizedExample:
    """Render, tokenize and mask one example (see the module docstring for exactly what is trained)."""
    return tokenize_batch([example], tokenizer, template=template, train_on=train_on, max_length=max_length)[0]


def tokenize_batch(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str = "chatml",
    train_on: str = "completions",
    max_length: int = 1024,
) -> list[TokenizedExample]:
    """``tokenize_example`` for many examples at once, with identical results.

    All segments of the batch go to the Rust tokenizer in one call (it encodes them on every core) and repeated
    segments (role headers, end markers) are encoded once; this is what makes the tokenized cache fast.
    """
    _check_template(template)
    if train_on not in TRAIN_ON:
        raise TrainingDataError(
            INVALID_TRAIN_ON, f"train_on must be one of {', '.join(TRAIN_ON)}; got {train_on!r}.", "train_on"
        )
    if max_length < 1:
        raise TrainingDataError(INVALID_MAX_LENGTH, f"max_length must be positive; got {max_length}.", "max_length")
    rendered = [_render(example, tokenizer, template=template, train_on=train_on) for example in examples]

    unique_texts = list(dict.fromkeys(text for segments in rendered for text, _, _ in segments if text is not None))
    encoded = dict(zip(unique_texts, _encode_texts(tokenizer, unique_texts), strict=True))

    results = []
    for example, segments in zip(examples, rendered, strict=True):
        input_ids: list[int] = []
        labels: list[int] = []
        for text, trained, token_id in segments:
            ids = encoded[text] if text is not None else [token_id]
            input_ids += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
        truncated = len(input_ids) > max_length
        if truncated:
            # Keeping the start keeps the system prompt and the first exchange, which the later turns depend on.
            del input_ids[max_length:], labels[max_length:]
        results.append(TokenizedExample(input_ids=input_ids, labels=labels, truncated=truncated, line=example.line))
    return results


def preview_examples(
    examples: Iterable[Example],
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str = "chatml",
    train_on: str = "completions",
    max_length: int = 1024,
    limit: int = 5,
) -> list[dict]:
    """What the trainer will see for the first ``limit`` examples, token by token, trained or masked.

    Built from ``tokenize_batch``, the trainer's own code path, so the preview cannot disagree with training. Each
    token carries its vocabulary piece (``token``, e.g. ``Ġthe``, ``##s``, ``▁the``) and its decoded ``text``
    (e.g. `` the``; a piece holding part of a multi-byte character decodes to ``�``).
    """
    chosen = list(islice(examples, max(limit, 0)))
    tokenized = tokenize_batch(chosen, tokenizer, template=template, train_on=train_on, max_length=max_length)
    previews = []
    for item in tokenized:
        pieces = tokenizer.convert_ids_to_tokens(item.input_ids)
        tokens = [
            {
                "id": token_id,
                "token": piece,
                "text": tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False),
                "trained": label != IGNORE_INDEX,
            }
            for token_id, piece, label in zip(item.input_ids, pieces, item.labels, strict=True)
        ]
        previews.append(
            {
                "line": item.line,
                "truncated": item.truncated,
                "num_tokens": len(item.input_ids),
                "num_trained": sum(token["trained"] for token in tokens),
                "tokens": tokens,
            }
        )
    return previews


def render_text(example: Example, tokenizer: PreTrainedTokenizerBase, *, template: str = "chatml") -> str:
    """The example as one string, exactly the text ``tokenize_example`` tokenizes (eos written as its text)."""
    _check_template(template)
    return "".join(
        segment.text if segment.text is not None else tokenizer.convert_ids_to_tokens(segment.token_id)
        for segment in _render(example, tokenizer, template=template, train_on="all")
    )


def _check_template(template: str) -> None:
    if template not in CHAT_TEMPLATES:
        raise TrainingDataError(
            INVALID_CHAT_TEMPLATE,
            f"template must be one of {', '.join(CHAT_TEMPLATES)}; got {template!r}.",
            "template",
        )


def _render(example: Example, tokenizer: PreTrainedTokenizerBase, *, template: str, train_on: str) -> list[_Segment]:
    train_all = train_on == "all"
    fields = example.fields
    if example.task == DatasetTask.CHAT:
        return _render_chat(fields["messages"], tokenizer, template=template, train_all=train_all)
    if example.task == DatasetTask.PROMPT_COMPLETION:
        return [
            _Segment(fields["prompt"], trained=train_all),
            _Segment(fields["completion"], trained=True),
            _Segment(None, trained=True, token_id=_eos_id(tokenizer)),
        ]
    if example.task == DatasetTask.CAUSAL_LM:
        return [_Segment(fields["text"], trained=True), _Segment(None, trained=True, token_id=_eos_id(tokenizer))]
    raise TrainingDataError(
        UNSUPPORTED_TASK,
        f"{example.task} examples have no causal language-model labels; only chat, prompt_completion and "
        "causal_lm examples can be tokenized this way.",
        "task",
    )


def _render_chat(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, *, template: str, train_all: bool
) -> list[_Segment]:
    segments: list[_Segment] = []
    if template == "llama3":
        segments.append(_Segment(_LLAMA3_BEGIN_OF_TEXT, trained=train_all))
    for message in messages:
        role = message["role"]
        content = message["content"]
        learned = train_all or (role == "assistant" and message.get("weight", 1) != 0)
        if template == "chatml":
            segments += [
                _Segment(f"<|im_start|>{role}\n", trained=train_all),
                _Segment(content, trained=learned),
                _Segment("<|im_end|>", trained=learned),
                # Generation stops at <|im_end|>, so the newline after it is never produced by the model.
                _Segment("\n", trained=train_all),
            ]
        elif template == "llama3":
            segments += [
                _Segment(f"<|start_header_id|>{role}<|end_header_id|>\n\n", trained=train_all),
                _Segment(content, trained=learned),
                _Segment("<|eot_id|>", trained=learned),
            ]
        else:
            name = _PLAIN_ROLE_NAMES.get(role, role.capitalize())
            # The space after the colon goes with the content: byte-level BPE merges a leading space into the
            # first word ("Ġhello"), so this is how the text tokenizes when the model writes it after "Assistant:".
            segments += [_Segment(f"{name}:", trained=train_all), _Segment(f" {content}", trained=learned)]
            if role == "assistant":
                # Plain text has no end-of-turn marker of its own; eos is what stops generation after an answer.
                segments.append(_Segment(None, trained=learned, token_id=_eos_id(tokenizer)))
            segments.append(_Segment("\n", trained=train_all))
    # An empty message tokenizes to nothing; dropping it keeps the batch encoder from seeing empty strings.
    return [segment for segment in segments if segment.text != ""]


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise TrainingDataError(
            "missing_eos_token",
            "The tokenizer has no end-of-sequence token, which teaches the model where an answer ends.",
            "tokenizer",
        )
    return eos_id


def _encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # The Rust backend directly skips building a BatchEncoding and the offsets nobody reads here; but a backend left
    # with truncation or padding switched on would apply them, so then the wrapper (which switches both off) is used.
    if backend is not None and backend.truncation is None and backend.padding is None:
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False, truncation=False, padding=False)["input_ids"]
