"""How fast `validate_dataset` reads a ~100 MB chat JSONL file, with and without a real tokenizer.

Prints JSON. ``seconds_tokenizer`` counts tokens with the Rust tokenizer's ``encode_batch_fast``;
``seconds_tokenizer_hf_call`` with ``[len(ids) for ids in tokenizer(texts)["input_ids"]]``, for comparison. The
baseline is the cheapest possible pass over the same file in the same run: ``for line in open(...): json.loads(line)``.
The goal: at most 30 s for 100 MB with the tokenizer on a 2-core machine.

    python benchmarks/validation_speed.py [--megabytes 100]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
if str(REPOSITORY_ROOT) not in sys.path:
    sys.path.insert(0, str(REPOSITORY_ROOT))

from workers.ml.data.validation import validate_dataset  # noqa: E402
from workers.ml.tokenizer_training import train_byte_level_bpe  # noqa: E402

_WORD_SOURCE = (
    "the a model learns from every example and answers questions about data training tokens river harbour morning "
    "engineer quietly writes long letters before dawn while small boats drift near the old bridge because nobody "
    "remembers which lantern was lit first so we count again carefully with patience and a little humour"
)
_WORDS = _WORD_SOURCE.split()
_SYSTEM = "You are a helpful assistant that answers briefly and politely."
GOAL_SECONDS = 30


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + "."


def write_chat_jsonl(path: Path, megabytes: float, seed: int = 0) -> int:
    """Stream chat rows to ``path`` until it holds ``megabytes``; returns the row count."""
    rng = random.Random(seed)
    target = int(megabytes * 1024 * 1024)
    written = 0
    rows = 0
    with path.open("w", encoding="utf-8") as handle:
        while written < target:
            messages = [{"role": "system", "content": _SYSTEM}]
            for _ in range(rng.randint(1, 3)):
                messages.append({"role": "user", "content": _sentence(rng, rng.randint(5, 30))})
                messages.append({"role": "assistant", "content": _sentence(rng, rng.randint(10, 60))})
            line = json.dumps({"messages": messages}) + "\n"
            handle.write(line)
            written += len(line)
            rows += 1
    return rows


def _baseline_seconds(path: Path) -> float:
    started = time.perf_counter()
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            json.loads(line)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--megabytes", type=float, default=100)
    args = parser.parse_args()

    rng = random.Random(1)
    tokenizer = train_byte_level_bpe((_sentence(rng, 40) for _ in range(5000)), vocab_size=2000)
    backend = tokenizer.backend_tokenizer

    def count_tokens(texts: list[str]) -> list[int]:
        # The Rust tokenizer encodes the batch on all cores; len(encoding) avoids building Python id lists.
        return [len(encoding) for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]

    def count_tokens_hf_call(texts: list[str]) -> list[int]:
        # The plain transformers call, for comparison: it also builds Python lists of every token id.
        return [len(ids) for ids in tokenizer(texts)["input_ids"]]

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "chat.jsonl"
        rows_written = write_chat_jsonl(path, args.megabytes)
        file_mb = os.path.getsize(path) / (1024 * 1024)

        baseline = _baseline_seconds(path)

        started = time.perf_counter()
        word_report = validate_dataset(str(path), filename="chat.jsonl")
        seconds_word_count = time.perf_counter() - started

        started = time.perf_counter()
        token_report = validate_dataset(str(path), filename="chat.jsonl", token_counter=count_tokens)
        seconds_tokenizer = time.perf_counter() - started

        started = time.perf_counter()
        hf_report = validate_dataset(str(path), filename="chat.jsonl", token_counter=count_tokens_hf_call)
        seconds_tokenizer_hf_call = time.perf_counter() - started

    assert word_report["rows"] == token_report["rows"] == rows_written, (word_report["rows"], rows_written)
    assert token_report["token_lengths"] == hf_report["token_lengths"]
    print(
        json.dumps(
            {
                "file_mb": round(file_mb, 1),
                "rows": rows_written,
                "seconds_word_count": round(seconds_word_count, 2),
                "seconds_tokenizer": round(seconds_tokenizer, 2),
                "seconds_tokenizer_hf_call": round(seconds_tokenizer_hf_call, 2),
                "rows_per_second": round(rows_written / seconds_tokenizer),
                "goal_seconds": GOAL_SECONDS,
                "goal_met": seconds_tokenizer <= GOAL_SECONDS,
                "baseline": {
                    "what": "for line in open(path): json.loads(line)",
                    "seconds": round(baseline, 2),
                },
                "mean_tokens": token_report["token_lengths"]["mean"],
                "cpu_count": os.cpu_count(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
