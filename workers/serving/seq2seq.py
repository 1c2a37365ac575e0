"""Encoder-decoder models (T5 and the like): dynamic batching, one runner thread per loaded model.

The thread takes every waiting sequence (up to ``max_batch_size``), encodes their sources in one right-padded pass
(with an attention mask, as T5 expects) and decodes them together, one token per row per forward pass, with a KV
cache (self-attention keys grow each step; cross-attention keys are computed once). Each row is sampled with its own
parameters and its own CPU generator (``sample_next_tokens``, shared with causal LM batching), so a row's text does
not depend on what else is in its batch. Rows leave the batch as they finish or are cancelled, each with its own
finish reason and token count; text is streamed token by token exactly as for causal LMs (``emit_progress``).

Dynamic rather than continuous batching: every row of a batch starts decoding at the same step, so all rows share
one decoder position (no decoder padding, no per-row positions for the relative position bias). A sequence that
arrives while a batch decodes waits for that batch to end, then goes in the next one with everything else that
arrived meanwhile.

When the thread was idle, it waits ``gather_seconds`` after the first arrival before encoding: requests sent
together reach the thread a few milliseconds apart, and without the wait the first would run alone and the others
would wait for its whole generation. Sequences that piled up while a batch ran have waited already: they go at once.
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


class Seq2SeqRunner:
    """Owns one encoder-decoder model and generates everything submitted to it, in batches."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        max_batch_size: int = 32,
        gather_seconds: float = 0.005,
        name: str = "model",
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.gather_seconds = gather_seconds
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.decoder_start_token_id = _decoder_start_token_id(model, self.pad_token_id)
        self.forward_passes = 0
        """Model forward passes so far (one encoder pass per batch, one per decoding step): tests and
        /v1/deployments read it."""
        self.batches = 0
        """Batches run so far (failed ones included)."""
        self.model_lock = threading.Lock()
        """Held for each forward pass."""
        self._waiting: list[Sequence] = []
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
        while (batch := self._next_batch()) is not None:
            self.batches += 1
            try:
                self._generate(batch)
            except Exception:  # noqa: BLE001 - the batch's requests fail, the thread goes on with the next batch
                logger.exception("seq2seq generation failed")
                for sequence in batch:
                    _fail(sequence)
            finally:
                with self._wakeup:
                    self._running = []
        with self._wakeup:
            waiting, self._waiting = self._waiting, []
        for sequence in waiting:
            _fail(sequence)

    def _next_batch(self) -> list[Sequence] | None:
        """The next sequences to run together (cancelled ones left out); None once the runner is closed."""
        with self._wakeup:
            while True:
                self._waiting = [sequence for sequence in self._waiting if not sequence.cancelled]
                if not self._waiting and not self._closed:
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
                batch, self._waiting = self._waiting[: self.max_batch_size], self._waiting[self.max_batch_size :]
                self._running = batch
                return batch

    def _generate(self, batch: list[Sequence]) -> None:
        sources = [sequence.prompt_ids or [self.eos_token_id] for sequence in batch]
        longest = max(len(source) for source in sources)
        input_ids = host_values_on_device(
            [source + [self.pad_token_id] * (longest - len(source)) for source in sources], torch.long, self.device
        )
        attention_mask = host_values_on_device(
            [[1] * len(source) + [0] * (longest - len(source)) for source in sources], torch.long, self.device
        )
        with self.model_lock, torch.inference_mode():
            self.forward_passes += 1
            encoder_outputs = self.model.get_encoder()(
                input_ids=input_ids, attention_mask=attention_mask, return_dict=True
            )
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        next_tokens = host_values_on_device([[self.decoder_start_token_id]] * len(batch), torch.long, self.device)
        rows = list(batch)
        while rows:
            if self._closed:
                raise RuntimeError("the model was unloaded while generating")
            with self.model_lock, torch.inference_mode():
                self.forward_passes += 1
                outputs = self.model(
                    encoder_outputs=encoder_outputs,
                    attention_mask=attention_mask,
                    decoder_input_ids=next_tokens,
                    past_key_values=cache,
                    use_cache=True,
                    return_dict=True,
                )
                cache = outputs.past_key_values
                next_tokens = sample_next_tokens(outputs.logits[:, -1, :], rows, self.device)
            keep: list[int] = []
            for row, (sequence, token) in enumerate(zip(rows, next_tokens[:, 0].tolist(), strict=True)):
                if sequence.cancelled:
                    sequence.finished = True
                    continue
                sequence.generated_ids.append(token)
                emit_progress(sequence, token, self.tokenizer, eos_token_id=self.eos_token_id)
                if not sequence.finished:
                    keep.append(row)
            if len(keep) == len(rows):
                continue
            rows = [rows[row] for row in keep]
            if not rows:
                break
            # Finished rows leave the batch: the remaining rows' steps no longer pay for them.
            kept = host_values_on_device(keep, torch.long, self.device)
            cache.batch_select_indices(kept)
            encoder_outputs.last_hidden_state = encoder_outputs.last_hidden_state[kept]
            attention_mask = attention_mask[kept]
            next_tokens = next_tokens[kept]


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
