"""Training a tokenizer from a user's own text.

Three algorithms, each built the way its best-known model family builds it, so a tokenizer trained here behaves like
the one users already know: ``bpe`` is GPT-2 style byte-level BPE, ``wordpiece`` is BERT style, ``unigram`` is
SentencePiece style. Everything is trained with the Rust ``tokenizers`` library and wrapped in a
``PreTrainedTokenizerFast`` whose pad and eos tokens are always set, so downstream code (templates, collators,
generation) never has to special-case the algorithm.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from workers.ml.errors import TrainingDataError

END_OF_TEXT = "<|endoftext|>"

TOKENIZER_ALGORITHMS = ("bpe", "wordpiece", "unigram")
INVALID_TOKENIZER_SPEC = "invalid_tokenizer_spec"
EMPTY_TRAINING_DATA = "empty_training_data"

MIN_TOKENIZER_VOCAB_SIZE = 64
MAX_TOKENIZER_VOCAB_SIZE = 262_144
MAX_SPECIAL_TOKENS = 100
MAX_SPECIAL_TOKEN_LENGTH = 64
# Every byte is a base token of byte-level BPE, so its vocabulary can never be smaller than this plus the specials.
BYTE_ALPHABET_SIZE = 256
# WordPiece and Unigram need some room beside the special tokens for the characters of the text itself.
_MIN_ROOM_FOR_CHARACTERS = 16
# train_from_iterator takes lists: batching cuts the Python->Rust crossings without holding the corpus in memory.
_TRAINING_BATCH_TEXTS = 1_000

WORDPIECE_SPECIAL_TOKENS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
UNIGRAM_SPECIAL_TOKENS = ("<unk>", "<pad>", "<s>", "</s>")
_WORDPIECE_UNKNOWN, _UNIGRAM_UNKNOWN = WORDPIECE_SPECIAL_TOKENS[0], UNIGRAM_SPECIAL_TOKENS[0]
_CONTINUATION = "##"
# A frequent word goes to the WordPiece trainer as several texts of at most this many copies (bounded memory).
_REPEATS_PER_TEXT = 1_000
# Unigram log probabilities keep this many decimals: far finer than training can resolve, far coarser than the
# last-digit noise of the trainer's summation order.
_UNIGRAM_SCORE_DECIMALS = 10
# The Unigram trainer's score step between the characters it adds after training (see _ladder_in_character_order).
_UNIGRAM_LADDER_STEP = 0.0001
# Which special token plays which role, per algorithm: pad and eos are always set so collators and templates can rely
# on them. Byte-level BPE has no unknown token (every byte is in its alphabet); BERT has no bos/eos of its own, so
# [CLS]/[SEP], which open and close its sequences, stand in.
NAMED_SPECIAL_TOKENS: dict[str, dict[str, str]] = {
    "bpe": {"bos": END_OF_TEXT, "eos": END_OF_TEXT, "pad": END_OF_TEXT},
    "wordpiece": {
        "unk": "[UNK]", "pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]",
        "bos": "[CLS]", "eos": "[SEP]",
    },
    "unigram": {"unk": "<unk>", "pad": "<pad>", "bos": "<s>", "eos": "</s>"},
}  # fmt: skip
_BACKEND_MODEL_ALGORITHMS = {"BPE": "bpe", "WordPiece": "wordpiece", "Unigram": "unigram", "WordLevel": "wordlevel"}
_REPORT_EXAMPLE_CHARS = 200


@dataclass(frozen=True)
class TokenizerSpec:
    """What tokenizer to train; validated on construction so a bad request fails before any text is read."""

    algorithm: str = "bpe"
    """``"bpe"`` (GPT-2 byte-level BPE, never an unknown token), ``"wordpiece"`` (BERT) or ``"unigram"``
    (SentencePiece)."""
    vocab_size: int = 8000
    """Largest vocabulary the trainer may build, special tokens included; a small corpus can give fewer. Byte-level
    BPE needs at least 256 + the number of special tokens."""
    special_tokens: tuple[str, ...] = ()
    """The user's own special tokens (never split, e.g. ``"<|user|>"``), added on top of the algorithm's own."""
    lowercase: bool = False
    """Lowercase text before tokenizing (then decode gives lowercase text back)."""
    min_frequency: int = 2
    """A merge must be seen at least this often to enter the vocabulary (bpe and wordpiece; unigram ignores it)."""

    def __post_init__(self) -> None:
        if self.algorithm not in TOKENIZER_ALGORITHMS:
            raise TrainingDataError(
                INVALID_TOKENIZER_SPEC,
                f"algorithm must be one of {', '.join(TOKENIZER_ALGORITHMS)}; got {self.algorithm!r}.",
                "algorithm",
            )
        # bool is an int subclass; True as a vocabulary size is a bug, not a request for one token.
        if not isinstance(self.vocab_size, int) or isinstance(self.vocab_size, bool):
            raise TrainingDataError(INVALID_TOKENIZER_SPEC, "vocab_size must be an integer.", "vocab_size")
        if not MIN_TOKENIZER_VOCAB_SIZE <= self.vocab_size <= MAX_TOKENIZER_VOCAB_SIZE:
            raise TrainingDataError(
                INVALID_TOKENIZER_SPEC,
                f"vocab_size must be between {MIN_TOKENIZER_VOCAB_SIZE} and {MAX_TOKENIZER_VOCAB_SIZE}; "
                f"got {self.vocab_size}.",
                "vocab_size",
            )
        if not isinstance(self.special_tokens, tuple | list):
            raise TrainingDataError(
                INVALID_TOKENIZER_SPEC, "special_tokens must be a list of strings.", "special_tokens"
            )
        if len(self.special_tokens) > MAX_SPECIAL_TOKENS:
            raise TrainingDataError(
                INVALID_TOKENIZER_SPEC,
                f"At most {MAX_SPECIAL_TOKENS} special tokens are allowed; got {len(self.special_tokens)}.",
                "special_tokens",
            )
        for token in self.special_tokens:
            if not isinstance(token, str) or not token.strip() or len(token) > MAX_SPECIAL_TOKEN_LENGTH:
                raise TrainingDataError(
                    INVALID_TOKENIZER_SPEC,
                    f"Each special token must be a non-empty string of at most {MAX_SPECIAL_TOKEN_LENGTH} "
                    f"characters; got {token!r}.",
                    "special_tokens",
                )
        # A list from JSON is accepted but stored as a tuple so the frozen spec stays hashable.
        object.__setattr__(self, "special_tokens", tuple(self.special_tokens))
        if not isinstance(self.lowercase, bool):
            raise TrainingDataError(INVALID_TOKENIZER_SPEC, "lowercase must be true or false.", "lowercase")
        if not isinstance(self.min_frequency, int) or isinstance(self.min_frequency, bool) or self.min_frequency < 1:
            raise TrainingDataError(
                INVALID_TOKENIZER_SPEC, f"min_frequency must be a positive integer; got {self.min_frequency!r}.",
                "min_frequency",
            )  # fmt: skip
        minimum = _minimum_vocab_size(self)
        if self.vocab_size < minimum:
            reason = (
                f"256 bytes plus {len(all_special_tokens(self))} special tokens"
                if self.algorithm == "bpe"
                else f"{len(all_special_tokens(self))} special tokens plus room for the characters of the text"
            )
            raise TrainingDataError(
                INVALID_TOKENIZER_SPEC,
                f"vocab_size {self.vocab_size} is too small for {self.algorithm}: it needs at least {minimum} "
                f"({reason}).",
                "vocab_size",
            )


def all_special_tokens(spec: TokenizerSpec) -> tuple[str, ...]:
    """The algorithm's own special tokens first (their ids are stable: 0, 1, ...), then the user's, deduplicated."""
    own = {"bpe": (END_OF_TEXT,), "wordpiece": WORDPIECE_SPECIAL_TOKENS, "unigram": UNIGRAM_SPECIAL_TOKENS}
    return tuple(dict.fromkeys((*own[spec.algorithm], *spec.special_tokens)))


def _minimum_vocab_size(spec: TokenizerSpec) -> int:
    room = BYTE_ALPHABET_SIZE if spec.algorithm == "bpe" else _MIN_ROOM_FOR_CHARACTERS
    return len(all_special_tokens(spec)) + room


def train_tokenizer(texts: Iterable[str], spec: TokenizerSpec) -> PreTrainedTokenizerFast:
    """Train the tokenizer ``spec`` describes on ``texts``, reading the iterable once (it may be a stream).

    Raises TrainingDataError when the texts are empty or, for unigram, hold more distinct characters than
    ``vocab_size`` leaves room for.
    """
    counter = _CountingTexts(texts)
    special_tokens = all_special_tokens(spec)
    user_special_tokens = [token for token in special_tokens if token in spec.special_tokens]
    if spec.algorithm == "bpe":
        tokenizer = _byte_level_bpe_backend(lowercase=spec.lowercase)
        trainer = trainers.BpeTrainer(
            vocab_size=spec.vocab_size,
            special_tokens=list(special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            min_frequency=spec.min_frequency,
            show_progress=False,
        )
    elif spec.algorithm == "wordpiece":
        tokenizer = _train_wordpiece(counter, spec, special_tokens)
    else:
        tokenizer = Tokenizer(models.Unigram())
        if spec.lowercase:
            tokenizer.normalizer = normalizers.Lowercase()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(
            vocab_size=spec.vocab_size,
            special_tokens=list(special_tokens),
            unk_token=_UNIGRAM_UNKNOWN,
            show_progress=False,
        )

    try:
        if spec.algorithm != "wordpiece":  # trained above, on its own word counts
            tokenizer.train_from_iterator(_batched(counter, _TRAINING_BATCH_TEXTS), trainer=trainer)
    except Exception as error:
        # The Rust trainer only raises a bare Exception; this one is the user's to fix, anything else is ours.
        if "not large enough to contain all chars" in str(error):
            raise TrainingDataError(
                INVALID_TOKENIZER_SPEC,
                f"vocab_size {spec.vocab_size} is smaller than the number of distinct characters in the text plus "
                "the special tokens, which a unigram vocabulary must hold. Raise vocab_size or use bpe.",
                "vocab_size",
            ) from error
        raise
    if counter.non_empty == 0:
        raise TrainingDataError(EMPTY_TRAINING_DATA, "There is no text to train the tokenizer on.", "texts")

    if spec.algorithm == "unigram":
        tokenizer = _canonical_unigram(tokenizer, special_tokens)
    if spec.algorithm == "wordpiece":
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[(token, tokenizer.token_to_id(token)) for token in ("[CLS]", "[SEP]")],
        )
    named = {f"{role}_token": token for role, token in NAMED_SPECIAL_TOKENS[spec.algorithm].items()}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        **named,
        extra_special_tokens=user_special_tokens,
        # BERT's clean-up glues "do n't" back together; it also edits user text, which round trips must not.
        clean_up_tokenization_spaces=False,
    )


def _train_wordpiece(texts: Iterable[str], spec: TokenizerSpec, special_tokens: Sequence[str]) -> Tokenizer:
    """A BERT-style WordPiece tokenizer trained on ``texts``, the same vocabulary from the same texts in every process.

    The Rust trainer alone is not reproducible: it numbers continuation pieces (``##e``) in the order it meets them
    while iterating a hash map of words, whose order changes from one process to the next, and it breaks ties between
    equally frequent merges by those numbers, so two runs on the same data could learn different vocabularies (and a
    from-scratch BERT, different loss curves). Here the words are counted first, the alphabet is chosen by frequency
    with ties broken by character, and every continuation piece is given to the trainer up front, in sorted order, so
    every number it uses is fixed before its hash map is iterated; the words then go to the trainer with their
    counts.
    """
    normalizer = normalizers.BertNormalizer(lowercase=spec.lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    word_counts: Counter[str] = Counter()
    for text in texts:
        word_counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))

    # WordPiece keeps every character twice (``c`` and ``##c``) whatever vocab_size says; capping the alphabet (most
    # frequent characters win, the rest become [UNK]) is what keeps the vocabulary bound.
    alphabet_limit = (spec.vocab_size - len(special_tokens)) // 2
    character_counts: Counter[str] = Counter()
    for word, count in word_counts.items():
        for character in word:
            character_counts[character] += count
    ranked = sorted(character_counts.items(), key=lambda item: (-item[1], item[0]))
    alphabet = {character for character, _ in ranked[:alphabet_limit]}
    kept_words: Counter[str] = Counter()
    for word, count in word_counts.items():
        kept = "".join(character for character in word if character in alphabet)
        if kept:
            kept_words[kept] += count
    continuations = sorted({_CONTINUATION + character for word in kept_words for character in word[1:]})

    scratch = Tokenizer(models.WordPiece(unk_token=_WORDPIECE_UNKNOWN))
    scratch.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # the words are already split, and hold no whitespace
    trainer = trainers.WordPieceTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=[*special_tokens, *continuations],
        min_frequency=spec.min_frequency,
        continuing_subword_prefix=_CONTINUATION,
        show_progress=False,
    )
    scratch.train_from_iterator(_batched(_repeated_words(kept_words), _TRAINING_BATCH_TEXTS), trainer=trainer)

    # The continuation pieces were handed over as special tokens only to fix their numbers: the tokenizer is rebuilt
    # from the trained vocabulary so they are ordinary pieces again, and only the real special tokens are special.
    tokenizer = Tokenizer(
        models.WordPiece(
            vocab=scratch.get_vocab(), unk_token=_WORDPIECE_UNKNOWN, continuing_subword_prefix=_CONTINUATION
        )
    )
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece(prefix=_CONTINUATION)
    tokenizer.add_special_tokens(list(special_tokens))
    return tokenizer


def _repeated_words(word_counts: Counter[str]) -> Iterator[str]:
    """Texts that hold each word as often as it was counted, in a fixed order, in strings of bounded length."""
    for word, count in sorted(word_counts.items()):
        while count > 0:
            repeats = min(count, _REPEATS_PER_TEXT)
            yield " ".join([word] * repeats)
            count -= repeats


def _canonical_unigram(tokenizer: Tokenizer, special_tokens: Sequence[str]) -> Tokenizer:
    """The trained Unigram tokenizer, the same file from the same texts in every process.

    The Unigram trainer sums log probabilities in a hash map's order, so their last digits change from one process to
    the next, and it lists equally probable pieces in that order too, so their ids change: a from-scratch model would
    then see other ids for the same text. The scores are rounded and the pieces after the special tokens (whose ids
    stay 0, 1, ...) are listed by score, ties by the piece itself.
    """
    serialized = json.loads(tokenizer.to_str())
    pieces = serialized["model"]["vocab"]
    specials = len(special_tokens)
    if [piece for piece, _ in pieces[:specials]] != list(special_tokens):
        raise RuntimeError("the Unigram trainer did not list the special tokens first")
    scored = _ladder_in_character_order(
        [(piece, round(score, _UNIGRAM_SCORE_DECIMALS)) for piece, score in pieces[specials:]]
    )
    rest = sorted(scored, key=lambda item: (-item[1], item[0]))
    serialized["model"]["vocab"] = [*pieces[:specials], *map(list, rest)]
    return Tokenizer.from_str(json.dumps(serialized))


def _ladder_in_character_order(pieces: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The pieces with the trainer's penalty ladder handed out in character order.

    Characters of the text that the trained model has no piece for are added at the end, each 0.0001 below the
    previous one, starting at the lowest score, in the order of a hash set: which character gets which rung (and so
    which id) changes from one process to the next. The ladder is found from the bottom (single characters whose
    scores step by 0.0001; pieces of several characters may score between its rungs) and its rungs are given to its
    characters in sorted order.
    """
    characters_ascending = sorted(
        (index for index, (piece, _) in enumerate(pieces) if len(piece) == 1), key=lambda index: pieces[index][1]
    )
    ladder = characters_ascending[:1]
    for index in characters_ascending[1:]:
        if abs(pieces[index][1] - pieces[ladder[-1]][1] - _UNIGRAM_LADDER_STEP) > 1e-7:
            break
        ladder.append(index)
    if len(ladder) < 2:
        return pieces
    rungs = sorted((pieces[index][1] for index in ladder), reverse=True)
    characters = sorted(pieces[index][0] for index in ladder)
    on_ladder = set(ladder)
    return [piece for index, piece in enumerate(pieces) if index not in on_ladder] + list(
        zip(characters, rungs, strict=True)
    )


def tokenizer_report(tokenizer: PreTrainedTokenizerFast, sample_texts: Sequence[str], *, examples: int = 5) -> dict:
    """Numbers a user looks at to judge a tokenizer on their own text.

    ``fertility`` is tokens per whitespace-separated word (1.0 would be one token per word; higher means words are
    split more); ``unknown_rate`` is the share of tokens that are the unknown token, which byte-level BPE never
    produces. Special tokens the post-processor adds (e.g. BERT's [CLS]/[SEP]) are not counted.
    """
    unk_id = tokenizer.unk_token_id if tokenizer.unk_token is not None else None
    texts = list(sample_texts)
    sample_words = sum(len(text.split()) for text in texts)
    encodings = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    sample_tokens = sum(len(ids) for ids in encodings)
    unknown_tokens = sum(ids.count(unk_id) for ids in encodings) if unk_id is not None else 0
    shown = []
    for text in texts[: max(examples, 0)]:
        head = text[:_REPORT_EXAMPLE_CHARS]
        ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        shown.append({"text": head, "tokens": tokenizer.convert_ids_to_tokens(ids)})
    backend_model = type(tokenizer.backend_tokenizer.model).__name__ if hasattr(tokenizer, "backend_tokenizer") else ""
    return {
        "vocab_size": len(tokenizer),
        "algorithm": _BACKEND_MODEL_ALGORITHMS.get(backend_model),
        "special_tokens": list(tokenizer.all_special_tokens),
        "fertility": sample_tokens / sample_words if sample_words else 0.0,
        "unknown_rate": unknown_tokens / sample_tokens if sample_tokens else 0.0,
        "examples": shown,
        "sample_words": sample_words,
        "sample_tokens": sample_tokens,
    }


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | PathLike[str]) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (JSON only, nothing pickled) into ``folder``."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))


def load_tokenizer(folder: str | PathLike[str]) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by ``save_tokenizer``; only ever reads the local folder, never a hub."""
    path = Path(folder)
    if not (path / "tokenizer.json").is_file():
        # Without this check a missing folder name would be tried as a hub repository id.
        raise FileNotFoundError(f"No tokenizer.json in {path}.")
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


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

    tokenizer = _byte_level_bpe_backend(lowercase=False)
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


def _byte_level_bpe_backend(*, lowercase: bool) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    if lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    # add_prefix_space=False keeps decode(encode(text)) == text, which generation relies on.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


class _CountingTexts:
    """Passes texts through once, counting the non-empty ones, so emptiness is known without a second pass."""

    def __init__(self, texts: Iterable[str]):
        self._texts = texts
        self.non_empty = 0

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            if text:
                self.non_empty += 1
            yield text


def _batched(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
