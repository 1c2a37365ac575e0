"""Encoder-decoder models (T5 and the like): dynamic batching, one runner thread per loaded model.

The thread takes every waiting sequence (up to ``max_batch_size``), encodes their sources in one right-padded pass
(with an attention mask, as T5 expects) and decodes them together, one token per row per forward pass, with a KV
cache (self-attention keys grow each step; cross-attention keys are computed once). Each row is sampled with its own
parameters and its own CPU generator (``sample_next_tokens``, shared with causal LM batching), so a row's text does
not depend on what else is in its batch. Rows leave the batch as they finish or are cancelled, each with its own
finish reason and token count; text is streamed token by token exactly as for causal LMs (``emit_progress``).

Dynamic batching with batches in flight side by side rather than continuous batching: every row of a batch starts
decoding at the same step, so all rows of a batch share one decoder position (no decoder padding, no per-row
positions, which an encoder-decoder's learned or relative decoder positions would need). A sequence that arrives while
batches decode does not wait for them to end: at the next step it starts a batch of its own (with everything else
that arrived meanwhile), and the thread then steps each batch in turn, up to ``max_concurrent_batches`` of them and
``max_batch_size`` rows in all; beyond that it waits for rows to finish.

When the thread was idle, it waits ``gather_seconds`` after the first arrival before encoding: requests sent
together reach the thread a few milliseconds apart, and without the wait the first would run alone and the others
in a batch of their own. Sequences that arrive while batches run are given the same time to gather.
"""

from __future__ import annotations

import logging
import threading
import time

import torch
from transformers import DynamicCache, EncoderDecoderCache

from workers.serving.batching import (
    Sequence,
    TokenEvent,
    emit_progress,
    host_values_on_device,
    sample_next_tokens,
)

logger = logging.getLogger(__name__)


class _Batch:
    """Rows that started decoding together: their encoder outputs and mask, decoder cache and pending tokens."""

    def __init__(self, rows: list[Sequence]) -> None:
        self.rows = rows
        self.encoder_outputs = None
        self.attention_mask: torch.Tensor | None = None
        self.cache: EncoderDecoderCache | None = None
        self.next_tokens: torch.Tensor | None = None


class Seq2SeqRunner:
    """Owns one encoder-decoder model and generates everything submitted to it, in batches."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        max_batch_size: int = 32,
        gather_seconds: float = 0.005,
        max_concurrent_batches: int = 4,
        name: str = "model",
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.gather_seconds = gather_seconds
        self.max_concurrent_batches = max_concurrent_batches
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.decoder_start_token_id = _decoder_start_token_id(model, self.pad_token_id)
        self.forward_passes = 0
        """Model forward passes so far (one encoder pass per batch, one per batch per decoding step): tests and
        /v1/deployments read it."""
        self.batches = 0
        """Batches started so far (failed ones included)."""
        self.model_lock = threading.Lock()
        """Held for each forward pass."""
        self._waiting: list[Sequence] = []
        self._waiting_since = 0.0
        self._running: list[Sequence] = []
        self._wakeup = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"serving-seq2seq-{name}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------------------------------
    # Called from other threads

    def submit(self, sequences: list[Sequence]) -> None:
        with self._wakeup:
            if self._closed:
                raise RuntimeError("the model was unloaded")
            if not self._waiting:
                self._waiting_since = time.monotonic()
            self._waiting.extend(sequences)
            self._wakeup.notify()

    @property
    def active_sequences(self) -> int:
        """Sequences waiting or generating: a model with any is not idle (eviction and unloading wait for it)."""
        with self._wakeup:
            waiting = sum(not sequence.cancelled for sequence in self._waiting)
            return waiting + sum(not sequence.finished for sequence in self._running)

    def close(self) -> None:
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    # ---------------------------------------------------------------------------------------------------------
    # The runner thread

    def _run(self) -> None:
        batches: list[_Batch] = []
        while (rows := self._next_rows(batches)) is not None:
            if rows:
                self.batches += 1
                batch = _Batch(rows)
                if self._guarded(batch, self._encode):
                    batches.append(batch)
            # Each batch in flight advances one token per round; a batch whose rows all finished (or that failed)
            # leaves.
            batches = [batch for batch in batches if self._guarded(batch, self._step) and batch.rows]
            with self._wakeup:
                self._running = [sequence for batch in batches for sequence in batch.rows]
        with self._wakeup:
            waiting, self._waiting = self._waiting, []
            self._running = []
        for sequence in waiting + [sequence for batch in batches for sequence in batch.rows]:
            _fail(sequence)

    def _guarded(self, batch: _Batch, work) -> bool:
        """Runs ``work(batch)``; if it raises, the batch's requests fail and the thread goes on with the others."""
        try:
            work(batch)
        except Exception:  # noqa: BLE001 - one batch's failure is its requests' answer, not the process's
            logger.exception("seq2seq generation failed")
            for sequence in batch.rows:
                _fail(sequence)
            return False
        return True

    def _next_rows(self, batches: list[_Batch]) -> list[Sequence] | None:
        """The sequences to start a batch with now (cancelled ones left out; none while the running batches leave no
        room), after waiting for work when there is none; None once the runner is closed."""
        with self._wakeup:
            while True:
                self._waiting = [sequence for sequence in self._waiting if not sequence.cancelled]
                if not self._waiting and not batches and not self._closed:
                    while not self._waiting and not self._closed:
                        self._wakeup.wait()
                    deadline = time.monotonic() + self.gather_seconds
                    while not self._closed and len(self._waiting) < self.max_batch_size:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._wakeup.wait(remaining)
                    continue  # some may have been cancelled while gathering
                if self._closed:
                    return None
                room = self.max_batch_size - sum(len(batch.rows) for batch in batches)
                gathered = not batches or time.monotonic() - self._waiting_since >= self.gather_seconds
                if not self._waiting or room <= 0 or len(batches) >= self.max_concurrent_batches or not gathered:
                    return []
                rows, self._waiting = self._waiting[:room], self._waiting[room:]
                self._waiting_since = time.monotonic()  # those left over wait for room, not for gathering
                self._running.extend(rows)
                return rows

    def _encode(self, batch: _Batch) -> None:
        sources = [sequence.prompt_ids or [self.eos_token_id] for sequence in batch.rows]
        longest = max(len(source) for source in sources)
        input_ids = host_values_on_device(
            [source + [self.pad_token_id] * (longest - len(source)) for source in sources], torch.long, self.device
        )
        batch.attention_mask = host_values_on_device(
            [[1] * len(source) + [0] * (longest - len(source)) for source in sources], torch.long, self.device
        )
        with self.model_lock, torch.inference_mode():
            self.forward_passes += 1
            batch.encoder_outputs = self.model.get_encoder()(
                input_ids=input_ids, attention_mask=batch.attention_mask, return_dict=True
            )
        batch.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        batch.next_tokens = host_values_on_device(
            [[self.decoder_start_token_id]] * len(batch.rows), torch.long, self.device
        )

    def _step(self, batch: _Batch) -> None:
        """One decoder pass for the batch's rows; finished and cancelled rows leave it."""
        with self.model_lock, torch.inference_mode():
            self.forward_passes += 1
            outputs = self.model(
                encoder_outputs=batch.encoder_outputs,
                attention_mask=batch.attention_mask,
                decoder_input_ids=batch.next_tokens,
                past_key_values=batch.cache,
                use_cache=True,
                return_dict=True,
            )
            batch.cache = outputs.past_key_values
            batch.next_tokens = sample_next_tokens(outputs.logits[:, -1, :], batch.rows, self.device)
        keep: list[int] = []
        for row, (sequence, token) in enumerate(zip(batch.rows, batch.next_tokens[:, 0].tolist(), strict=True)):
            if sequence.cancelled:
                sequence.finished = True
                continue
            sequence.generated_ids.append(token)
            emit_progress(sequence, token, self.tokenizer, eos_token_id=self.eos_token_id)
            if not sequence.finished:
                keep.append(row)
        if len(keep) == len(batch.rows):
            return
        batch.rows = [batch.rows[row] for row in keep]
        if not batch.rows:
            return
        # Finished rows leave the batch: the remaining rows' steps no longer pay for them.
        kept = host_values_on_device(keep, torch.long, self.device)
        batch.cache.batch_select_indices(kept)
        batch.encoder_outputs.last_hidden_state = batch.encoder_outputs.last_hidden_state[kept]
        batch.attention_mask = batch.attention_mask[kept]
        batch.next_tokens = batch.next_tokens[kept]


def _decoder_start_token_id(model: torch.nn.Module, pad_token_id: int) -> int:
    for config in (getattr(model, "generation_config", None), model.config):
        start = getattr(config, "decoder_start_token_id", None)
        if start is not None:
            return int(start)
    return pad_token_id  # T5's convention


def _fail(sequence: Sequence) -> None:
    if sequence.finished or sequence.cancelled:
        return
    sequence.finished = True
    sequence.emit(TokenEvent(sequence.index, "", "error", len(sequence.generated_ids)))
