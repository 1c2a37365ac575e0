"""Continuous batching: one scheduler thread per loaded model decodes every active sequence in one forward pass.

New sequences are admitted between decode steps: their prompts are prefilled together (left-padded) and their
key/value caches are written as new rows of the running batch's (``_SlottedLayer``, left-padded to the batch's
width), so a sequence never waits for the others to finish. Finished sequences leave the batch: the last rows move
into their places, and columns that are padding in every row are trimmed.

Each row keeps its own sampling parameters and its own ``torch.Generator``, so a seeded request gives
the same text whoever shares its batch; generators and draws stay on the CPU, so a seed draws the same numbers on
any device.

On a GPU the scheduler waits for the device once per step, when it reads the sampled tokens back (transformers'
mask building may wait once more, before the forward pass's kernels are queued): which rows sample and which rows
stay is decided from the sequences' Python state, and host tensors reach the device by non-blocking copies. Tokens go
back to the caller through a callback (the web side puts them on an asyncio queue with ``call_soon_threadsafe``).

LoRA deployments that share a base model share one scheduler: each adapter has its own batch, and the scheduler
switches the adapter (``set_adapter``) before each batch's step.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from workers.ml import transfer
from workers.serving import attention

logger = logging.getLogger(__name__)

# Every decode step has a new key length and a padding mask. On an H200 (torch 2.11) a cProfile of the scheduler showed
# each attention call holding the CPU 3-5 ms (GPT-2 124M: 45-85 ms per step, against 7 ms per token for HF generate,
# which passes no mask): cuDNN's attention builds a plan per new shape. It is left out here (the memory-efficient
# kernel takes any shape and mask as is): on the same GPU one client then got 100 tokens/s instead of 22, and 64
# clients 3,619 instead of 956.
_DECODE_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is sampled; every row of a batch may differ."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class TokenEvent:
    """New text of one sequence; ``finish_reason`` is set on its last event."""

    index: int
    text: str
    finish_reason: str | None
    completion_tokens: int


@dataclass(eq=False)
class Sequence:
    """One choice being generated: its prompt, sampling state and where its text goes."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[TokenEvent], None]
    adapter_name: str | None = None
    stop_token_ids: frozenset[int] = frozenset()
    generated_ids: list[int] = field(default_factory=list)
    emitted_chars: int = 0
    text: str = ""
    """The decoded text of ``generated_ids[:read_offset]`` (``emit_progress`` extends it a few tokens at a time)."""
    prefix_offset: int = 0
    read_offset: int = 0
    finished: bool = False
    cancelled: bool = False
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator()
        if self.params.seed is not None:
            self.generator.manual_seed(self.params.seed)
        else:
            self.generator.seed()

    def cancel(self) -> None:
        """The client went away: the scheduler drops the row at its next step."""
        self.cancelled = True


class _Batch:
    """The rows decoded together: their caches (left-padded to one length) and attention mask."""

    def __init__(self) -> None:
        self.sequences: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.attention_mask: torch.Tensor | None = None  # [rows, cached positions]
        self.next_tokens: torch.Tensor | None = None  # [rows, 1]: sampled, not yet fed to the model


class _SlottedLayer(DynamicLayer):
    """One layer's keys and values for the rows of a batch, in buffers with spare rows and spare positions.

    Rows are left-padded so that every row's newest position is the same column; ``keys`` and ``values`` are views
    of the live region ``[:rows, :, start:end]``. Each change costs only what it touches: a decode step writes one
    column in place, joining rows writes the new rows, dropping rows moves the last rows into the gaps and trimming
    padding moves ``start``. (``DynamicLayer`` concatenates every step, and rebuilding the whole cache at every join
    or drop took a fifth of the serving process's time at 32 clients on a CPU.) Padding columns hold zeros or an
    old row's finite values: the attention mask gives them no weight.

    ``storage_dtype`` (None: the incoming keys' dtype) stores keys and values wider than the model computes them:
    float32 for a half-precision model on a CPU (see ``workers.serving.attention``)."""

    spare_positions = 64
    spare_rows = 8

    def __init__(self, storage_dtype: torch.dtype | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.storage_dtype = storage_dtype

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = self.storage_dtype or key_states.dtype, key_states.device
        self.is_initialized = True
        self._rows = key_states.shape[0]
        self._start = self._end = 0
        self._key_buffer = self._value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        added = key_states.shape[-2]
        if self._key_buffer is None or self._end + added > self._key_buffer.shape[-2]:
            self._reallocate(like=key_states, rows=self._rows, positions=self._end - self._start + added)
        self._key_buffer[: self._rows, :, self._end : self._end + added] = key_states
        self._value_buffer[: self._rows, :, self._end : self._end + added] = value_states
        self._end += added
        return self._refresh_views()

    def append_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Join rows whose keys and values (``[new rows, heads, positions, head size]``) end at this layer's newest
        column, left-padded to the batch's width (or widening the batch on the left when they are longer)."""
        positions = keys.shape[-2]
        widen_by = max(0, positions - (self._end - self._start))
        rows = self._rows + keys.shape[0]
        if widen_by > self._start or rows > self._key_buffer.shape[0]:
            self._reallocate(
                like=keys,
                rows=rows + self.spare_rows,
                positions=self._end - self._start,
                left=widen_by,
            )
        self._start -= widen_by
        for buffer, new in ((self._key_buffer, keys), (self._value_buffer, values)):
            buffer[self._rows : rows, :, self._start : self._end - positions] = 0
            buffer[self._rows : rows, :, self._end - positions : self._end] = new
        self._rows = rows
        self._refresh_views()

    def keep_rows(self, sources: torch.Tensor | None, destinations: torch.Tensor | None, rows: int) -> None:
        """Keep the first ``rows`` rows, after moving rows ``sources`` into the gaps at ``destinations``."""
        if sources is not None:
            live = slice(self._start, self._end)
            for buffer in (self._key_buffer, self._value_buffer):
                buffer[destinations, :, live] = buffer[sources, :, live]
        self._rows = rows
        self._refresh_views()

    def trim_left(self, positions: int) -> None:
        """Forget the first ``positions`` columns (padding in every row)."""
        self._start += positions
        self._refresh_views()

    def _reallocate(self, *, like: torch.Tensor, rows: int, positions: int, left: int = 0) -> None:
        """New buffers for ``rows`` rows and ``left + positions`` positions plus spare room, the live region copied
        to start at column ``left``."""
        width = self._end - self._start
        shape = (max(rows, self._rows), like.shape[1], left + positions + self.spare_positions, like.shape[-1])
        key_buffer, value_buffer = like.new_zeros(shape, dtype=self.dtype), like.new_zeros(shape, dtype=self.dtype)
        if self._key_buffer is not None and width:
            live = (slice(None, self._rows), slice(None), slice(self._start, self._end))
            key_buffer[: self._rows, :, left : left + width] = self._key_buffer[live]
            value_buffer[: self._rows, :, left : left + width] = self._value_buffer[live]
        self._key_buffer, self._value_buffer = key_buffer, value_buffer
        self._start, self._end = left, left + width

    def _refresh_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = self._key_buffer[: self._rows, :, self._start : self._end]
        self.values = self._value_buffer[: self._rows, :, self._start : self._end]
        return self.keys, self.values


def _new_cache(storage_dtype: torch.dtype | None = None) -> DynamicCache:
    cache = DynamicCache()
    cache.layer_class_to_replicate = functools.partial(_SlottedLayer, storage_dtype=storage_dtype)
    return cache


def _pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def host_values_on_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor built on the host and copied to ``device`` without waiting for the device (a blocking copy would
    stall the calling thread until the queued forward pass is done; see ``workers.ml.transfer``)."""
    return transfer.to_device(torch.tensor(values, dtype=dtype), device)


def sample_next_tokens(logits: torch.Tensor, sequences: list[Sequence], device: torch.device) -> torch.Tensor:
    """One token per row of ``logits`` ([rows, vocabulary]), each with its sequence's temperature, top_p and
    generator: ``[rows, 1]`` on ``device``. A row's token depends on its own logits and generator only, never on the
    other rows."""
    logits = logits.float()
    greedy_tokens = logits.argmax(-1)
    params = [s.params for s in sequences]
    plain_rows = [row for row, p in enumerate(params) if p.temperature > 0 and p.top_p >= 1]
    nucleus_rows = [row for row, p in enumerate(params) if p.temperature > 0 and p.top_p < 1]
    if not plain_rows and not nucleus_rows:
        return greedy_tokens[:, None]
    temperatures = host_values_on_device([max(p.temperature, 1e-5) for p in params], torch.float32, device)
    probabilities = torch.softmax(logits / temperatures[:, None], dim=-1)
    # One uniform draw per row from the row's own generator (on the CPU, so a seed means the same draws on any
    # device), then inverse-CDF sampling for the whole batch.
    uniforms = host_values_on_device(
        [torch.rand((), generator=s.generator).item() for s in sequences], torch.float32, device
    )
    tokens = greedy_tokens.clone()
    if plain_rows:
        rows = host_values_on_device(plain_rows, torch.long, device)
        cumulative = probabilities[rows].cumsum(-1)
        targets = uniforms[rows, None] * cumulative[:, -1:]
        picks = torch.searchsorted(cumulative, targets).clamp(max=logits.shape[-1] - 1)
        tokens[rows] = picks.squeeze(1)
    if nucleus_rows:
        rows = host_values_on_device(nucleus_rows, torch.long, device)
        top_ps = host_values_on_device([params[row].top_p for row in nucleus_rows], torch.float32, device)
        sorted_probabilities, sorted_ids = probabilities[rows].sort(dim=-1, descending=True)
        cumulative = sorted_probabilities.cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (always the most likely token).
        sorted_probabilities.masked_fill_((cumulative - sorted_probabilities) >= top_ps[:, None], 0)
        cumulative = sorted_probabilities.cumsum(-1)
        targets = uniforms[rows, None] * cumulative[:, -1:]
        picks = torch.searchsorted(cumulative, targets).clamp(max=logits.shape[-1] - 1)
        tokens[rows] = sorted_ids.gather(1, picks).squeeze(1)
    return tokens[:, None]


def extend_text(sequence: Sequence, ids: list[int], tokenizer, *, final: bool) -> str:
    """``sequence.text`` brought up to ``ids`` (the sequence's generated ids, all or all but a stop token), decoding
    only the tokens since the last few: decoding every id at every step costs time that grows with the text (a
    thousand tokens into a reply, more than the step itself at 64 rows). The new text is what decoding from
    ``prefix_offset`` adds beyond the already decoded tokens ``prefix_offset:read_offset``: starting a few tokens back
    keeps what a token decodes to in context (a SentencePiece word's leading space, a byte-level BPE character split
    over tokens). A tail that decodes to an unfinished character (``\ufffd``) waits for the next token, unless
    ``final``."""
    decode = functools.partial(tokenizer.decode, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    decoded = decode(ids[sequence.prefix_offset : sequence.read_offset])
    extended = decode(ids[sequence.prefix_offset :])
    if len(extended) > len(decoded) and (final or not extended.endswith("\ufffd")):
        sequence.text += extended[len(decoded) :]
        sequence.prefix_offset, sequence.read_offset = sequence.read_offset, len(ids)
    return sequence.text


def emit_progress(
    sequence: Sequence, token: int, tokenizer, *, eos_token_id: int | None, max_positions: int | None = None
) -> None:
    """Send the new text of ``sequence`` after ``token`` joined its ``generated_ids``: the last event on
    EOS, a stop token or a stop string (``stop``, the stop text left out) or at max_tokens / ``max_positions``
    (``length``). Text that may be the start of a stop string is held back until it is known not to be one."""
    ids = sequence.generated_ids
    finish_reason = None
    if token == eos_token_id or token in sequence.stop_token_ids:
        finish_reason = "stop"
        ids = ids[:-1]
    elif len(ids) >= sequence.params.max_tokens or (
        max_positions and len(sequence.prompt_ids) + len(ids) >= max_positions
    ):
        finish_reason = "length"
    text = extend_text(sequence, ids, tokenizer, final=finish_reason is not None)
    for stop in sequence.params.stop:
        found = text.find(stop, max(0, sequence.emitted_chars - len(stop)))
        if found != -1:
            text, finish_reason = text[:found], "stop"
    if finish_reason is None:
        # Hold back what may be the start of a stop string or an unfinished multi-byte character.
        held_back = max((len(stop) - 1 for stop in sequence.params.stop), default=0)
        safe_end = len(text) - held_back
        if text.endswith("\ufffd"):
            safe_end = min(safe_end, len(text) - 1)
        if safe_end <= sequence.emitted_chars:
            return
        delta = text[sequence.emitted_chars : safe_end]
        sequence.emitted_chars = safe_end
    else:
        delta = text[sequence.emitted_chars :]
        sequence.emitted_chars = len(text)
        sequence.finished = True
    sequence.emit(TokenEvent(sequence.index, delta, finish_reason, len(sequence.generated_ids)))


# Where the scheduler thread's time goes, in seconds summed since it started (``GenerationScheduler.timings``):
# "prefill" and "forward" are the model's forward passes of admissions and decode steps as the host sees them (on a
# GPU, the time to queue their kernels, unless something in them waits for the device), "sampling" queues the draws,
# "wait" reads the sampled tokens back (on a GPU, mostly waiting for the device to finish the step), "emit" detokenizes
# and hands text to the callers and drops finished rows. "busy" is the whole of the scheduler's working time; what it
# has beyond the others is bookkeeping. A step whose "wait" is small next to "forward" is host-bound.
TIMING_PARTS = ("prefill", "forward", "sampling", "wait", "emit", "busy")


class GenerationScheduler:
    """Owns one causal LM (possibly a PeftModel with several adapters) and decodes everything submitted to it."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        max_batch_size: int = 64,
        name: str = "model",
        max_positions: int | None = None,
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_positions = max_positions
        self.eos_token_id = tokenizer.eos_token_id
        base_model = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel's base
        self._supports_logits_to_keep = "logits_to_keep" in inspect.signature(base_model.forward).parameters
        self.cache_dtype = attention.prepare_cache_dtype(base_model)
        """The key/value cache's dtype where it differs from the model's (float32 for bf16 on a CPU), else None."""
        self.forward_passes = 0
        """Model forward passes so far (prefills and decode steps): tests and /v1/deployments read it."""
        self.sequences_finished = 0
        self.timings: dict[str, float] = dict.fromkeys(TIMING_PARTS, 0.0)
        self.decode_steps = 0
        self.decoded_rows = 0
        """Rows summed over decode steps: ``decoded_rows / decode_steps`` is the mean batch."""
        self.prefills = 0
        self.prefilled_rows = 0
        """Prompts summed over prefills: ``prefilled_rows / prefills`` is the mean admission."""
        self._pending: list[Sequence] = []
        self._batches: dict[str | None, _Batch] = {}
        self._wakeup = threading.Condition()
        self._closed = False
        self.model_lock = threading.Lock()
        """Held for each step; loading or deleting an adapter of a shared base takes it too."""
        self._thread = threading.Thread(target=self._run, name=f"serving-scheduler-{name}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------------------------------
    # Called from other threads

    def submit(self, sequences: list[Sequence]) -> None:
        with self._wakeup:
            if self._closed:
                raise RuntimeError("the model was unloaded")
            self._pending.extend(sequences)
            self._wakeup.notify()

    @property
    def active_sequences(self) -> int:
        """Sequences still generating. A finished one may sit in its batch until the end of the step that finished
        it, after its caller already has the answer: it does not count (else the model could not be evicted or
        unloaded right after its last request)."""
        with self._wakeup:
            waiting = sum(not sequence.cancelled for sequence in self._pending)
            return waiting + sum(not s.finished for batch in self._batches.values() for s in batch.sequences)

    def timing_report(self) -> dict[str, float | int]:
        """The counters above as /v1/deployments shows them."""
        report: dict[str, float | int] = {
            "decode_steps": self.decode_steps,
            "decoded_rows": self.decoded_rows,
            "prefills": self.prefills,
            "prefilled_rows": self.prefilled_rows,
        }
        report.update({f"{part}_seconds": round(seconds, 4) for part, seconds in self.timings.items()})
        return report

    def close(self) -> None:
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    # ---------------------------------------------------------------------------------------------------------
    # The scheduler thread

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._closed and not self._pending and not any(b.sequences for b in self._batches.values()):
                    self._wakeup.wait()
                if self._closed:
                    pending, self._pending = self._pending, []
                    break
                admitted = self._take_pending()
            try:
                with self.model_lock, torch.inference_mode(), self._timed("busy"):
                    for adapter_name, sequences in admitted.items():
                        self._admit(adapter_name, sequences)
                    for adapter_name, batch in list(self._batches.items()):
                        if batch.sequences:
                            self._decode_step(adapter_name, batch)
            except Exception as error:  # noqa: BLE001 - a failed step fails its requests, not the process
                logger.exception("generation step failed")
                self._fail_everything(error)
        for sequence in pending + [s for b in self._batches.values() for s in b.sequences]:
            self._finish(sequence, "length", error=True)
        self._batches.clear()

    @contextmanager
    def _timed(self, part: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[part] += time.perf_counter() - started

    def _take_pending(self) -> dict[str | None, list[Sequence]]:
        admitted: dict[str | None, list[Sequence]] = {}
        waiting: list[Sequence] = []
        for sequence in self._pending:
            batch = self._batches.get(sequence.adapter_name)
            in_batch = len(batch.sequences) if batch else 0
            group = admitted.setdefault(sequence.adapter_name, [])
            if sequence.cancelled:
                continue
            if in_batch + len(group) < self.max_batch_size:
                group.append(sequence)
            else:
                waiting.append(sequence)
        self._pending = waiting
        return {name: group for name, group in admitted.items() if group}

    def _select_adapter(self, adapter_name: str | None) -> None:
        if adapter_name is not None:
            self.model.set_adapter(adapter_name)

    def _forward(self, **inputs):
        self.forward_passes += 1
        with sdpa_kernel(_DECODE_ATTENTION_BACKENDS):
            return self.model(**inputs, use_cache=True, return_dict=True)

    def _admit(self, adapter_name: str | None, sequences: list[Sequence]) -> None:
        """Prefill the new prompts together, sample their first tokens and join them to the adapter's batch."""
        self._select_adapter(adapter_name)
        longest = max(len(s.prompt_ids) for s in sequences)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (self.eos_token_id or 0)
        paddings = [longest - len(s.prompt_ids) for s in sequences]
        input_ids = self._on_device(
            [[pad_id] * padding + s.prompt_ids for padding, s in zip(paddings, sequences, strict=True)], torch.long
        )
        attention_mask = self._on_device(
            [[0] * padding + [1] * (longest - padding) for padding in paddings], torch.long
        )
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        # Only the last position's logits are sampled: a model that can skip the others (as HF generate asks it to)
        # spares the language-model head on every prompt position.
        last_logits_only = {"logits_to_keep": 1} if self._supports_logits_to_keep else {}
        self.prefills += 1
        self.prefilled_rows += len(sequences)
        with self._timed("prefill"):
            outputs = self._forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=_new_cache(self.cache_dtype),
                **last_logits_only,
            )
        with self._timed("sampling"):
            next_tokens = sample_next_tokens(outputs.logits[:, -1, :], sequences, self.device)
        batch = self._batches.setdefault(adapter_name, _Batch())
        first_new_row = len(batch.sequences)  # joined rows go below the running ones
        self._join(batch, sequences, outputs.past_key_values, attention_mask, next_tokens)
        self._after_sampling(batch, first_new_row)

    def _join(self, batch: _Batch, sequences, cache: DynamicCache, attention_mask, next_tokens) -> None:
        if batch.cache is None or not batch.sequences:
            batch.sequences, batch.cache, batch.attention_mask, batch.next_tokens = (
                list(sequences),
                cache,
                attention_mask,
                next_tokens,
            )
            return
        for running, joining in zip(batch.cache.layers, cache.layers, strict=True):
            running.append_rows(joining.keys, joining.values)
        length = max(batch.attention_mask.shape[1], attention_mask.shape[1])
        batch.attention_mask = torch.cat(
            [_pad_left(batch.attention_mask, length, 1), _pad_left(attention_mask, length, 1)]
        )
        batch.next_tokens = torch.cat([batch.next_tokens, next_tokens])
        batch.sequences.extend(sequences)

    def _decode_step(self, adapter_name: str | None, batch: _Batch) -> None:
        self._select_adapter(adapter_name)
        attention_mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones((len(batch.sequences), 1))], 1)
        position_ids = attention_mask.sum(-1, keepdim=True) - 1
        self.decode_steps += 1
        self.decoded_rows += len(batch.sequences)
        with self._timed("forward"):
            outputs = self._forward(
                input_ids=batch.next_tokens,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=batch.cache,
            )
        batch.cache = outputs.past_key_values
        batch.attention_mask = attention_mask
        with self._timed("sampling"):
            batch.next_tokens = sample_next_tokens(outputs.logits[:, -1, :], batch.sequences, self.device)
        self._after_sampling(batch)

    def _on_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return host_values_on_device(values, dtype, self.device)

    def _after_sampling(self, batch: _Batch, first_new_row: int = 0) -> None:
        """Hand each new token (rows from ``first_new_row`` on) to its request; drop finished and cancelled rows.

        After an admission only the joined rows have new tokens: the running rows' pending tokens went out at the
        step that sampled them."""
        with self._timed("wait"):
            new_tokens = batch.next_tokens[first_new_row:, 0].tolist()  # the step's one wait for the device
        with self._timed("emit"):
            self._hand_out_and_drop(batch, first_new_row, new_tokens)

    def _hand_out_and_drop(self, batch: _Batch, first_new_row: int, new_tokens: list[int]) -> None:
        keep: list[int] = []
        for row, sequence in enumerate(batch.sequences):
            if sequence.cancelled:
                sequence.finished = True
                continue
            if row >= first_new_row:
                token = new_tokens[row - first_new_row]
                sequence.generated_ids.append(token)
                emit_progress(
                    sequence,
                    token,
                    self.tokenizer,
                    eos_token_id=self.eos_token_id,
                    max_positions=self.max_positions,
                )
            if not sequence.finished:
                keep.append(row)
        if len(keep) == len(batch.sequences):
            return
        self.sequences_finished += len(batch.sequences) - len(keep)
        if not keep:
            batch.sequences, batch.cache, batch.attention_mask, batch.next_tokens = [], None, None, None
            return
        # The last kept rows move into the gaps, so only they are copied; everything else stays where it is.
        remaining = len(keep)
        order = list(range(remaining))
        kept = set(keep)
        gaps = [row for row in order if row not in kept]
        movers = [row for row in keep if row >= remaining]
        for gap, mover in zip(gaps, movers, strict=True):
            order[gap] = mover
        sources = self._on_device(movers, torch.long) if movers else None
        destinations = self._on_device(gaps, torch.long) if gaps else None
        for layer in batch.cache.layers:
            layer.keep_rows(sources, destinations, remaining)
        rows = self._on_device(order, torch.long)
        # Columns that are padding in every remaining row carry nothing: cut them so the batch does not grow wide.
        # Each row is padding then its prompt and every token fed back so far (all generated but the newest), so
        # the widest remaining row is known here without reading the mask back from the device.
        widest = max(len(s.prompt_ids) + len(s.generated_ids) - 1 for s in (batch.sequences[row] for row in keep))
        first_used = batch.attention_mask.shape[1] - widest
        batch.attention_mask = batch.attention_mask[rows, first_used:]
        if first_used:
            for layer in batch.cache.layers:
                layer.trim_left(first_used)
        batch.next_tokens = batch.next_tokens[rows]
        batch.sequences = [batch.sequences[row] for row in order]

    def _finish(self, sequence: Sequence, reason: str, *, error: bool = False) -> None:
        if sequence.finished:
            return
        sequence.finished = True
        sequence.emit(TokenEvent(sequence.index, "", reason if not error else "error", len(sequence.generated_ids)))

    def _fail_everything(self, error: Exception) -> None:
        with self._wakeup:
            pending, self._pending = self._pending, []
        for sequence in pending + [s for b in self._batches.values() for s in b.sequences]:
            self._finish(sequence, "error", error=True)
        self._batches.clear()
