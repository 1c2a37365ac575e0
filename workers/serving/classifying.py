"""Classification requests batched together: collected for a few milliseconds, then one forward pass."""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    scores: dict[str, float]


@dataclass
class _Request:
    texts: list[str]
    result: concurrent.futures.Future


class ClassificationBatcher:
    """One thread per loaded classifier; ``submit`` returns a future of (predictions, prompt tokens)."""

    def __init__(
        self, model: torch.nn.Module, tokenizer, *, max_length: int, wait_seconds: float, max_batch_texts: int = 64
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.wait_seconds = wait_seconds
        self.max_batch_texts = max_batch_texts
        self.forward_passes = 0
        id2label = getattr(model.config, "id2label", None) or {}
        self.labels = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(model.config.num_labels)]
        self._requests: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="serving-classifier", daemon=True)
        self._thread.start()

    @property
    def active_sequences(self) -> int:
        return self._requests.qsize()

    def submit(self, texts: list[str]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._requests.put(_Request(texts, future))
        return future

    def close(self) -> None:
        self._requests.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self._requests.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.wait_seconds
            stopping = False
            while sum(len(r.texts) for r in batch) < self.max_batch_texts:
                try:
                    request = self._requests.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if request is None:
                    stopping = True
                    break
                batch.append(request)
            try:
                self._classify(batch)
            except Exception as error:  # noqa: BLE001 - the requests get the error, the thread goes on
                logger.exception("classification failed")
                for request in batch:
                    if not request.result.done():
                        request.result.set_exception(error)
            if stopping:
                return

    def _classify(self, batch: list[_Request]) -> None:
        texts = [text for request in batch for text in request.texts]
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        token_counts = encoded["attention_mask"].sum(-1).tolist()
        with torch.inference_mode():
            self.forward_passes += 1
            logits = self.model(**encoded.to(self.device)).logits.float()
        probabilities = torch.softmax(logits, dim=-1).cpu().tolist()
        start = 0
        for request in batch:
            rows = range(start, start + len(request.texts))
            predictions = []
            for row in rows:
                scores = dict(zip(self.labels, probabilities[row], strict=True))
                best = max(range(len(self.labels)), key=lambda i, row=row: probabilities[row][i])
                predictions.append(Prediction(self.labels[best], probabilities[row][best], scores))
            request.result.set_result((predictions, int(sum(token_counts[row] for row in rows))))
            start += len(request.texts)
