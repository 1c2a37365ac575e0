"""Training a tokenizer from a user's own text."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"


def train_byte_level_bpe(
    texts: Iterable[str],
    *,
    vocab_size: int,
    special_tokens: Sequence[str] = (END_OF_TEXT,),
) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE tokenizer on ``texts``.

    Every byte is in the base alphabet, so any text encodes without unknown tokens; the vocabulary therefore never
    has fewer than 256 + len(special_tokens) entries even when ``vocab_size`` asks for fewer. The first special
    token is the bos, eos and pad token.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive; got {vocab_size}.")
    if not special_tokens:
        raise ValueError("special_tokens needs at least one token, used as end of text.")
    end_of_text = special_tokens[0]

    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(text)) == text, which generation relies on.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=end_of_text,
        eos_token=end_of_text,
        pad_token=end_of_text,
        additional_special_tokens=list(special_tokens[1:]),
        clean_up_tokenization_spaces=False,
    )
