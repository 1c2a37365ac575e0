"""Encoder-decoder models: HF ``generate`` per sequence on one thread (not batched; these models are rarely served)."""

from __future__ import annotations

import logging
import queue
import threading

import torch

from workers.serving.batching import Sequence, TokenEvent

logger = logging.getLogger(__name__)


class Seq2SeqRunner:
    def __init__(self, model: torch.nn.Module, tokenizer) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.tokenizer = tokenizer
        self.forward_passes = 0
        self.model_lock = threading.Lock()
        self._sequences: queue.Queue[Sequence | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="serving-seq2seq", daemon=True)
        self._thread.start()

    @property
    def active_sequences(self) -> int:
        return self._sequences.qsize()

    def submit(self, sequences: list[Sequence]) -> None:
        for sequence in sequences:
            self._sequences.put(sequence)

    def close(self) -> None:
        self._sequences.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while (sequence := self._sequences.get()) is not None:
            if sequence.cancelled:
                continue
            try:
                self._generate(sequence)
            except Exception:  # noqa: BLE001 - the request fails, the thread goes on
                logger.exception("seq2seq generation failed")
                sequence.emit(TokenEvent(sequence.index, "", "error", 0))

    def _generate(self, sequence: Sequence) -> None:
        params = sequence.params
        input_ids = torch.tensor([sequence.prompt_ids or [self.tokenizer.eos_token_id]], device=self.device)
        sampling = params.temperature > 0
        # generate samples with the global generator of the model's device: the seed must not leak out of this call.
        forked_devices = [] if self.device.type == "cpu" else [self.device]
        with self.model_lock, torch.inference_mode(), torch.random.fork_rng(devices=forked_devices):
            torch.manual_seed(params.seed if params.seed is not None else int(sequence.generator.initial_seed()))
            self.forward_passes += 1
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=params.max_tokens,
                do_sample=sampling,
                temperature=params.temperature if sampling else None,
                top_p=params.top_p if sampling else None,
                top_k=None,
            )
        new_ids = output[0].cpu().tolist()
        start = self.model.config.decoder_start_token_id
        if new_ids and new_ids[0] == start:
            new_ids = new_ids[1:]
        eos = self.tokenizer.eos_token_id
        finish_reason = "length"
        if eos in new_ids:
            new_ids, finish_reason = new_ids[: new_ids.index(eos) + 1], "stop"
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        for stop in params.stop:
            if stop in text:
                text, finish_reason = text[: text.index(stop)], "stop"
        sequence.finished = True
        sequence.emit(TokenEvent(sequence.index, text, finish_reason, len(new_ids)))
