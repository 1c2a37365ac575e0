"""From a training file to the tensors each task trains on: read, split, tokenize, then batch.

Causal LM rows are packed: several examples share a row and each attends only to itself, because its position ids
restart at 0 (transformers turns restarting position ids into a block-diagonal attention mask when no attention
mask is given). The target of position t is the label of position t + 1 of the same example; across an example
boundary, and on the padding that fills a row's tail, the target is IGNORE_INDEX. Classification and seq2seq
examples are padded per batch, and batches are grouped by length so that little of each batch is padding.

The data order is a pure function of (seed, epoch): a resumed run finds the very batches the interrupted one would
have seen next without saving any sampler state.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from workers.ml.callbacks import TrainingCallback, TrainingEvent
from workers.ml.data import formats, templates
from workers.ml.data.examples import DatasetFormat, DatasetTask, Example, RowError, example_text
from workers.ml.data.split import split_indices
from workers.ml.data.templates import IGNORE_INDEX
from workers.ml.errors import TrainingDataError

TRAINING_FILE_PARAM = "training_file"
VALIDATION_FILE_PARAM = "validation_file"
TOO_LITTLE_DATA = "too_little_data"
TOO_LITTLE_VALIDATION_DATA = "too_little_validation_data"
VALIDATION_MISMATCH = "validation_file_mismatch"
WRONG_TASK = "training_file_task_mismatch"
NOTHING_TO_TRAIN = "nothing_to_train"
# A run reads at most this much text: far more than a model trained on this platform's workers uses per job, and
# it bounds the memory a huge upload can take. Larger files are read from the start and the rest is left out.
MAX_TRAINING_TEXT_BYTES = 64 * 1024 * 1024
_CAUSAL_TASKS = (DatasetTask.CAUSAL_LM, DatasetTask.CHAT, DatasetTask.PROMPT_COMPLETION)
_ENGINE_TASK_OF = {
    DatasetTask.CAUSAL_LM: "causal_lm",
    DatasetTask.CHAT: "causal_lm",
    DatasetTask.PROMPT_COMPLETION: "causal_lm",
    DatasetTask.CLASSIFICATION: "classification",
    DatasetTask.SEQ2SEQ: "seq2seq",
}
_TOKENIZE_BATCH = 1000
# Batches are cut from windows of this many batches sorted by length (HF's "group_by_length" idea): padding then
# costs little, and the order between windows stays random.
_LENGTH_GROUPING_WINDOW = 50
_MIN_EXAMPLES_TO_SPLIT = 2
# Below this many documents a held-out share of a plain text is taken by lines, not documents.
_MIN_DOCUMENTS_TO_SPLIT = 10


@dataclass(frozen=True)
class ExampleSets:
    """The examples a run trains and evaluates on, in file order."""

    task: DatasetTask
    """What the training file holds (plain text reads as causal_lm)."""
    plain_text: bool
    """True for a .txt file: its documents are cut into pieces of max_length, never truncated."""
    train: list[Example]
    validation: list[Example] | None
    skipped_rows: int
    """Rows of the training file that could not be read as an example."""
    validation_from_file: bool


@dataclass
class TokenizedSet:
    """Token sequences of one side (training or validation), not yet batched."""

    input_ids: list[list[int]]
    """Causal LM: the example's tokens; classification: the text's; seq2seq: the source's."""
    labels: list[list[int]] | None
    """Causal LM: per-token labels, IGNORE_INDEX where masked (unshifted); seq2seq: the target's tokens."""
    class_ids: list[int] | None
    """Classification: the index of each example's label."""
    inputs_text: list[str]
    """Each example's input as text, for the table of sample predictions."""
    references: list[str]
    """Classification: the label; seq2seq: the target text; causal LM: empty strings."""
    truncated: int
    """Examples cut at max_length."""


@dataclass(frozen=True)
class Batch:
    """One micro-batch, on the CPU."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    """None for packed causal rows: their position ids select the block-diagonal mask."""
    position_ids: torch.Tensor | None
    targets: torch.Tensor
    """Causal LM: [rows, length] next-token targets; seq2seq: [rows, target length] labels; classification: [rows]."""
    trained_targets: int
    """Targets that are not IGNORE_INDEX: the loss of the batch is a sum over these."""
    useful_tokens: int
    """Tokens that are not padding (inputs, plus targets for seq2seq): what tokens per second counts."""


def engine_task_of(task: DatasetTask) -> str:
    return _ENGINE_TASK_OF[task]


def read_example_sets(config, callback: TrainingCallback) -> ExampleSets:
    """The training examples and, when the config asks for it, the validation examples (file or seeded split)."""
    mapping = formats.ColumnMapping.from_dict(config.column_mapping) if config.column_mapping else None
    filename = config.train_filename or os.path.basename(config.train_file)
    data_format, task = _detect(config.train_file, filename, mapping, param=TRAINING_FILE_PARAM)
    wanted = config.task
    if _ENGINE_TASK_OF[task] != wanted:
        raise TrainingDataError(
            WRONG_TASK,
            f"The training file holds {task} examples, which train a {_ENGINE_TASK_OF[task]} model, but the job "
            f"asks for {wanted}. Pick the {_ENGINE_TASK_OF[task]} task or another file"
            + (" (or map its columns: text + label, or source + target)" if data_format != DatasetFormat.TEXT else "")
            + ".",
            TRAINING_FILE_PARAM,
        )
    validation_format = None
    validation_filename = None
    if config.validation_file is not None:
        # Checked before the training file is read, so a wrong validation file fails in a moment, not minutes.
        validation_filename = config.validation_filename or os.path.basename(config.validation_file)
        validation_format, validation_task = _detect(
            config.validation_file, validation_filename, mapping, param=VALIDATION_FILE_PARAM
        )
        # The validation examples are tokenized the way the training examples are, so they must be of the very same
        # task, not merely of the same engine task: a chat validation file for a plain text crashed on the missing
        # "text" field (KeyError) instead of naming the file.
        if validation_task != task:
            raise TrainingDataError(
                VALIDATION_MISMATCH,
                f"The validation file holds {validation_task} examples but the training file holds {task} examples; "
                "the validation data must be of the same kind.",
                VALIDATION_FILE_PARAM,
            )
    plain_text = data_format == DatasetFormat.TEXT
    train, skipped = _read_examples(config.train_file, filename, data_format, mapping, callback, TRAINING_FILE_PARAM)
    if plain_text:
        lines = train
        train = _documents(lines)
        if config.validation_file is None and config.validation_fraction > 0 and len(train) < _MIN_DOCUMENTS_TO_SPLIT:
            # A text with few blank lines is one or two long documents: hold out a share of its lines instead (the
            # remaining lines keep their place, so their documents stay contiguous).
            kept, held_out = _split(lines, config, DatasetTask.CAUSAL_LM)
            return ExampleSets(
                task=task,
                plain_text=True,
                train=_documents(kept),
                validation=_documents(held_out),
                skipped_rows=skipped,
                validation_from_file=False,
            )
    validation = None
    if config.validation_file is not None:
        assert validation_filename is not None and validation_format is not None
        validation, _ = _read_examples(
            config.validation_file, validation_filename, validation_format, mapping, callback, VALIDATION_FILE_PARAM
        )
        if validation_format == DatasetFormat.TEXT:
            validation = _documents(validation)
    elif config.validation_fraction > 0:
        train, validation = _split(train, config, task)
    return ExampleSets(
        task=task,
        plain_text=plain_text,
        train=train,
        validation=validation,
        skipped_rows=skipped,
        validation_from_file=config.validation_file is not None,
    )


def _detect(
    path: str, filename: str, mapping: formats.ColumnMapping | None, *, param: str
) -> tuple[DatasetFormat, DatasetTask]:
    try:
        data_format = formats.detect_format(path, filename=filename)
        _, _, task = formats.resolve_columns(path, filename=filename, fmt=data_format, column_mapping=mapping)
    except formats.UnsupportedFormat as error:
        code = TOO_LITTLE_VALIDATION_DATA if param == VALIDATION_FILE_PARAM and error.code == "empty_file" else None
        raise TrainingDataError(code or error.code, error.message, param) from error
    return data_format, task


def _read_examples(
    path: str,
    filename: str,
    data_format: DatasetFormat,
    mapping: formats.ColumnMapping | None,
    callback: TrainingCallback,
    param: str,
) -> tuple[list[Example], int]:
    label = "training file" if param == TRAINING_FILE_PARAM else "validation file"
    examples: list[Example] = []
    skipped: list[RowError] = []
    text_bytes = 0
    try:
        with contextlib.closing(
            formats.iter_examples(path, filename=filename, fmt=data_format, column_mapping=mapping)
        ) as rows:
            for item in rows:
                if isinstance(item, RowError):
                    if item.line == 0:
                        raise TrainingDataError(item.code, item.message, param)
                    if item.code != "empty_row":
                        skipped.append(item)
                    continue
                examples.append(item)
                text_bytes += len(example_text(item).encode("utf-8"))
                if text_bytes >= MAX_TRAINING_TEXT_BYTES:
                    if param == TRAINING_FILE_PARAM:
                        callback.on_event(
                            TrainingEvent(
                                level="warning",
                                message=f"The {label} holds more than {MAX_TRAINING_TEXT_BYTES // 2**20} MB of text; "
                                f"training uses its first {len(examples):,} examples.",
                            )
                        )
                    break
    except formats.UnsupportedFormat as error:
        raise TrainingDataError(error.code, error.message, param) from error
    if skipped:
        callback.on_event(
            TrainingEvent(
                level="warning",
                message=f"{len(skipped):,} rows of the {label} could not be read and were skipped "
                f"(first: line {skipped[0].line}: {skipped[0].message})",
                data={"skipped_rows": len(skipped), "first_error": skipped[0].to_dict()},
            )
        )
    if not examples:
        code = TOO_LITTLE_DATA if param == TRAINING_FILE_PARAM else TOO_LITTLE_VALIDATION_DATA
        raise TrainingDataError(code, f"The {label} has no example to use.", param)
    return examples, len(skipped)


def _documents(lines: list[Example]) -> list[Example]:
    """Plain text: consecutive lines form one document and a blank line ends it, so a paragraph keeps its context
    (each document ends with the end-of-text token and attends only to itself when packed)."""
    documents: list[Example] = []
    current: list[Example] = []
    for line in lines:
        if current and line.line != current[-1].line + 1:
            documents.append(_join(current))
            current = []
        current.append(line)
    if current:
        documents.append(_join(current))
    return documents


def _join(lines: list[Example]) -> Example:
    return Example(lines[0].line, DatasetTask.CAUSAL_LM, {"text": "\n".join(line.fields["text"] for line in lines)})


def _split(examples: list[Example], config, task: DatasetTask) -> tuple[list[Example], list[Example]]:
    if len(examples) < _MIN_EXAMPLES_TO_SPLIT:
        raise TrainingDataError(
            TOO_LITTLE_VALIDATION_DATA,
            "The training file has too few examples to hold some out for validation; add more or give a "
            "validation_file.",
            "validation_fraction",
        )
    # Stratified for classification: every label keeps examples on both sides in about the same proportion.
    labels = [example.fields["label"] for example in examples] if task == DatasetTask.CLASSIFICATION else None
    train_indices, held_out = split_indices(
        labels if labels is not None else len(examples),
        validation_fraction=config.validation_fraction,
        seed=config.seed,
        stratify=labels is not None,
    )
    if not held_out or not train_indices:
        raise TrainingDataError(
            TOO_LITTLE_VALIDATION_DATA,
            f"validation_fraction {config.validation_fraction} of {len(examples)} examples holds out none; raise "
            "it, add examples, or give a validation_file.",
            "validation_fraction",
        )
    return [examples[index] for index in train_indices], [examples[index] for index in held_out]


def tokenizer_texts(sets: ExampleSets) -> Iterator[str]:
    """The training side's text, for training a tokenizer from scratch (validation text never shapes it)."""
    for example in sets.train:
        yield example_text(example)


def tokenize(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    *,
    task: DatasetTask,
    plain_text: bool,
    max_length: int,
    chat_template: str,
    train_on: str,
    label_ids: dict[str, int] | None = None,
) -> TokenizedSet:
    """Token sequences for ``examples``; causal-LM labels come from `templates.tokenize_batch`, the function the
    dashboard's token preview shows, so the preview is exactly what the loss sees."""
    if plain_text:
        return _tokenize_documents(examples, tokenizer, max_length=max_length)
    if task in _CAUSAL_TASKS:
        input_ids: list[list[int]] = []
        labels: list[list[int]] = []
        truncated = 0
        for start in range(0, len(examples), _TOKENIZE_BATCH):
            for item in templates.tokenize_batch(
                examples[start : start + _TOKENIZE_BATCH],
                tokenizer,
                template=chat_template,
                train_on=train_on,
                max_length=max_length,
            ):
                input_ids.append(item.input_ids)
                labels.append(item.labels)
                truncated += item.truncated
        return TokenizedSet(input_ids, labels, None, [""] * len(input_ids), [""] * len(input_ids), truncated)
    if task == DatasetTask.CLASSIFICATION:
        assert label_ids is not None
        texts = [example.fields["text"] for example in examples]
        encoded = _encode(tokenizer, texts, max_length=max_length)
        truncated = sum(full > max_length for full in encoded.full_lengths)
        references = [example.fields["label"] for example in examples]
        class_ids = [label_ids[label] for label in references]
        return TokenizedSet(encoded.ids, None, class_ids, texts, references, truncated)
    sources = [example.fields["source"] for example in examples]
    targets = [example.fields["target"] for example in examples]
    encoded_sources = _encode(tokenizer, sources, max_length=max_length, append_eos=True)
    encoded_targets = _encode(tokenizer, targets, max_length=max_length, append_eos=True)
    truncated = sum(
        source > max_length or target > max_length
        for source, target in zip(encoded_sources.full_lengths, encoded_targets.full_lengths, strict=True)
    )
    return TokenizedSet(encoded_sources.ids, encoded_targets.ids, None, sources, targets, truncated)


def tokenize_causal_examples_cached(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    *,
    cache_dir: str,
    examples_fingerprint: str,
    task: DatasetTask,
    max_length: int,
    chat_template: str,
    train_on: str,
) -> tuple[TokenizedSet, bool]:
    """`tokenize` for chat / prompt-completion / text examples through the tokenized cache, keyed by the examples,
    the tokenizer, the template, train_on, the maximum length and the task: a retry, a resumed job or a search trial
    on the same data reuses the rows (the same `templates.tokenize_batch` output). Returns the set and whether the
    cache was hit."""
    # Imported here: `datasets` takes a second to import and only this path needs it.
    from workers.ml.data import tokenized_cache

    key = tokenized_cache.cache_key(
        dataset_sha256=examples_fingerprint,
        tokenizer_fingerprint=tokenized_cache.tokenizer_fingerprint(tokenizer),
        template=chat_template,
        train_on=train_on,
        max_length=max_length,
        task=str(task),
    )
    hit = tokenized_cache.cache_hit(cache_dir, key)
    dataset = tokenized_cache.tokenize_to_cache(
        examples,
        tokenizer,
        cache_dir=cache_dir,
        key=key,
        template=chat_template,
        train_on=train_on,
        max_length=max_length,
        batch_rows=_TOKENIZE_BATCH,
    )
    columns = dataset.data
    input_ids = columns.column("input_ids").to_pylist()
    labels = columns.column("labels").to_pylist()
    truncated = sum(columns.column("truncated").to_pylist())
    empty = [""] * len(input_ids)
    return TokenizedSet(input_ids, labels, None, empty, list(empty), truncated), hit


def tokenize_like_config(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    *,
    config,
    sets: ExampleSets,
    label_ids: dict[str, int] | None = None,
) -> TokenizedSet:
    """`tokenize` with the reading and templating settings of a training config (max_length, chat_template,
    train_on) and the kind of data ``sets`` holds: training, validation and evaluation all go through here."""
    return tokenize(
        examples,
        tokenizer,
        task=sets.task,
        plain_text=sets.plain_text,
        max_length=config.max_length,
        chat_template=config.chat_template,
        train_on=config.train_on,
        label_ids=label_ids,
    )


@dataclass(frozen=True)
class _Encoded:
    ids: list[list[int]]
    full_lengths: list[int]


def _encode(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], *, max_length: int, append_eos: bool = False
) -> _Encoded:
    # The tokenizer's own post-processor adds what its model expects ([CLS] ... [SEP] for BERT); seq2seq sides end
    # with the end-of-sequence token so the decoder learns where to stop.
    ids: list[list[int]] = []
    lengths: list[int] = []
    eos = tokenizer.eos_token_id
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        batch = tokenizer(texts[start : start + _TOKENIZE_BATCH], add_special_tokens=True, verbose=False)["input_ids"]
        for sequence in batch:
            if append_eos and eos is not None and (not sequence or sequence[-1] != eos):
                sequence = [*sequence, eos]
            lengths.append(len(sequence))
            if len(sequence) > max_length:
                sequence = sequence[: max_length - 1] + [sequence[-1]] if append_eos else sequence[:max_length]
            ids.append(sequence)
    return _Encoded(ids, lengths)


def _tokenize_documents(
    documents: Sequence[Example], tokenizer: PreTrainedTokenizerBase, *, max_length: int
) -> TokenizedSet:
    """Plain text: each document ends with the end-of-text token and is cut into pieces of max_length tokens."""
    eos = tokenizer.eos_token_id
    pieces: list[list[int]] = []
    for start in range(0, len(documents), _TOKENIZE_BATCH):
        texts = [document.fields["text"] for document in documents[start : start + _TOKENIZE_BATCH]]
        for sequence in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            if eos is not None:
                sequence = [*sequence, eos]
            for offset in range(0, len(sequence), max_length):
                piece = sequence[offset : offset + max_length]
                # A one-token piece has no next token to predict; it would only cost a row slot.
                if len(piece) > 1:
                    pieces.append(piece)
    return TokenizedSet(pieces, [list(piece) for piece in pieces], None, [""] * len(pieces), [""] * len(pieces), 0)


@dataclass(frozen=True)
class PackedRows:
    """Causal LM rows of exactly ``max_length`` tokens, each holding one or more whole examples."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    examples_per_row: torch.Tensor
    tokens_per_row: torch.Tensor
    """Tokens of real examples in each row; the rest of the row is padding."""


def pack(tokenized: TokenizedSet, *, max_length: int, pad_token_id: int) -> PackedRows:
    """First-fit-decreasing packing: longest examples first, each into the first row with room, so rows end up
    nearly full. Examples are never split (plain text was already cut into pieces)."""
    assert tokenized.labels is not None
    order = sorted(range(len(tokenized.input_ids)), key=lambda index: -len(tokenized.input_ids[index]))
    rows: list[list[int]] = []
    room: list[int] = []
    for index in order:
        length = len(tokenized.input_ids[index])
        # Scanning for room is linear in rows, but the rows that still have room for a given length are few: most
        # rows fill up within a handful of examples. Starting the scan at the first row with room keeps it cheap.
        placed = False
        for row_index in range(len(rows)):
            if room[row_index] >= length:
                rows[row_index].append(index)
                room[row_index] -= length
                placed = True
                break
        if not placed:
            rows.append([index])
            room.append(max_length - length)
    count = len(rows)
    input_ids = torch.full((count, max_length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((count, max_length), dtype=torch.long)
    targets = torch.full((count, max_length), IGNORE_INDEX, dtype=torch.long)
    for row_index, members in enumerate(rows):
        offset = 0
        # Within a row the examples keep file order, so a row reads like the file.
        for index in sorted(members):
            ids = tokenized.input_ids[index]
            labels = tokenized.labels[index]
            length = len(ids)
            input_ids[row_index, offset : offset + length] = torch.tensor(ids)
            position_ids[row_index, offset : offset + length] = torch.arange(length)
            if length > 1:
                targets[row_index, offset : offset + length - 1] = torch.tensor(labels[1:])
            offset += length
        # The padded tail is one more "example" with positions from 0, so it attends only to itself.
        position_ids[row_index, offset:] = torch.arange(max_length - offset)
    return PackedRows(
        input_ids,
        position_ids,
        targets,
        torch.tensor([len(members) for members in rows]),
        torch.tensor([max_length - left for left in room]),
    )


class BatchSource:
    """Micro-batches in a seeded order per epoch; the n-th micro-batch of the run is always the same batch."""

    def __init__(
        self,
        tokenized: TokenizedSet,
        *,
        task: str,
        batch_size: int,
        seed: int,
        packing: bool,
        max_length: int,
        pad_token_id: int,
    ):
        self.task = task
        self.batch_size = batch_size
        self.seed = seed
        self.pad_token_id = pad_token_id
        self.tokenized = tokenized
        self.packed = (
            pack(tokenized, max_length=max_length, pad_token_id=pad_token_id)
            if task == "causal_lm" and packing
            else None
        )
        self.row_count = self.packed.input_ids.shape[0] if self.packed is not None else len(tokenized.input_ids)
        self.batches_per_epoch = math.ceil(self.row_count / batch_size)
        self._epoch_batches: tuple[int, list[torch.Tensor]] | None = None

    def batch(self, global_index: int) -> Batch:
        """The micro-batch at position ``global_index`` of the run (epoch after epoch)."""
        epoch, position = divmod(global_index, self.batches_per_epoch)
        if self._epoch_batches is None or self._epoch_batches[0] != epoch:
            self._epoch_batches = (epoch, self._order(epoch))
        return self.collate(self._epoch_batches[1][position])

    def _order(self, epoch: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        permutation = torch.randperm(self.row_count, generator=generator)
        if self.packed is not None:
            return list(permutation.split(self.batch_size))
        lengths = torch.tensor([len(ids) for ids in self.tokenized.input_ids])
        window = self.batch_size * _LENGTH_GROUPING_WINDOW
        batches: list[torch.Tensor] = []
        for start in range(0, self.row_count, window):
            chunk = permutation[start : start + window]
            chunk = chunk[torch.argsort(lengths[chunk], descending=True, stable=True)]
            batches.extend(chunk.split(self.batch_size))
        # Shuffle the batches too, so the run does not go from long to short batches inside every window.
        shuffled = torch.randperm(len(batches), generator=generator)
        return [batches[index] for index in shuffled]

    def collate(self, indices: torch.Tensor) -> Batch:
        if self.packed is not None:
            input_ids = self.packed.input_ids[indices]
            targets = self.packed.targets[indices]
            trained = int((targets != IGNORE_INDEX).sum())
            useful = int(self.packed.tokens_per_row[indices].sum())
            return Batch(input_ids, None, self.packed.position_ids[indices], targets, trained, useful)
        return collate_padded(self.tokenized, indices.tolist(), task=self.task, pad_token_id=self.pad_token_id)


def collate_padded(tokenized: TokenizedSet, indices: list[int], *, task: str, pad_token_id: int) -> Batch:
    """Examples padded to the longest of the batch (right padding, with an attention mask)."""
    sequences = [tokenized.input_ids[index] for index in indices]
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(indices), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
    useful = int(attention_mask.sum())
    if task == "classification":
        assert tokenized.class_ids is not None
        targets = torch.tensor([tokenized.class_ids[index] for index in indices], dtype=torch.long)
        return Batch(input_ids, attention_mask, None, targets, len(indices), useful)
    assert tokenized.labels is not None
    labels = [tokenized.labels[index] for index in indices]
    if task == "seq2seq":
        target_width = max(len(label) for label in labels)
        targets = torch.full((len(indices), target_width), IGNORE_INDEX, dtype=torch.long)
        for row, label in enumerate(labels):
            targets[row, : len(label)] = torch.tensor(label)
        trained = int((targets != IGNORE_INDEX).sum())
        return Batch(input_ids, attention_mask, None, targets, trained, useful + trained)
    targets = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
    for row, label in enumerate(labels):
        if len(label) > 1:
            targets[row, : len(label) - 1] = torch.tensor(label[1:])
    return Batch(input_ids, attention_mask, None, targets, int((targets != IGNORE_INDEX).sum()), useful)


def evaluation_batches(tokenized: TokenizedSet, *, task: str, batch_size: int, pad_token_id: int) -> list[Batch]:
    """The validation set in file order, padded per batch (never packed: each example's numbers stay its own)."""
    count = len(tokenized.input_ids)
    return [
        collate_padded(
            tokenized, list(range(start, min(start + batch_size, count))), task=task, pad_token_id=pad_token_id
        )
        for start in range(0, count, batch_size)
    ]


def limit(tokenized: TokenizedSet, count: int) -> TokenizedSet:
    """The first ``count`` examples: every evaluation of a run measures the very same ones."""
    return TokenizedSet(
        tokenized.input_ids[:count],
        None if tokenized.labels is None else tokenized.labels[:count],
        None if tokenized.class_ids is None else tokenized.class_ids[:count],
        tokenized.inputs_text[:count],
        tokenized.references[:count],
        tokenized.truncated,
    )


def trained_target_count(tokenized: TokenizedSet, task: str) -> int:
    """How many targets the loss covers over the whole set (0 means there is nothing to learn)."""
    if task == "classification":
        return len(tokenized.input_ids)
    assert tokenized.labels is not None
    if task == "seq2seq":
        return sum(len(label) for label in tokenized.labels)
    return sum(sum(1 for value in label[1:] if value != IGNORE_INDEX) for label in tokenized.labels)
