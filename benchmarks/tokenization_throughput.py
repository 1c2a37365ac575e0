"""Throughput of the tokenized cache against the naive loop, on generated chat data; prints one JSON object.

    python benchmarks/tokenization_throughput.py [--rows 20000]

``row_by_row_rows_per_second`` is the baseline: ``tokenizer(text)`` called once per example on the already rendered
conversation, with no masking at all (rendering is not timed, which flatters the baseline).
``cached_rows_per_second`` is a cold ``tokenize_to_cache``: rendering, masking, Arrow writing and reloading included.
``tokenize_example_rows_per_second`` is ``tokenize_example`` in a loop, the same rows without batching.
``cache_hit_seconds`` is the second call, which loads the cache instead of tokenizing.
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

from workers.ml.data.examples import DatasetTask, Example  # noqa: E402
from workers.ml.data.templates import ensure_template_tokens, render_text, tokenize_example  # noqa: E402
from workers.ml.data.tokenized_cache import cache_key, tokenize_to_cache, tokenizer_fingerprint  # noqa: E402
from workers.ml.tokenizer_training import TokenizerSpec, train_tokenizer  # noqa: E402

_WORDS = [
    "the", "a", "an", "old", "young", "quiet", "red", "blue", "long", "short", "river", "harbour", "road", "letter",
    "kite", "boat", "loaf", "light", "morning", "evening", "sailor", "child", "engineer", "neighbour", "dog", "cat",
    "teacher", "baker", "gardener", "mayor", "paints", "follows", "remembers", "carries", "finds", "builds",
    "answers", "watches", "writes", "reads", "explains", "because", "although", "before", "after", "without", "with",
    "near", "under", "over", "question", "answer", "model", "training", "data", "token", "budget", "cluster",
    "latency", "throughput", "memory", "gradient",
]  # fmt: skip
_TEMPLATE = "chatml"
_MAX_LENGTH = 1024


def generate_chats(rows: int, *, seed: int = 11) -> list[Example]:
    chooser = random.Random(seed)

    def sentence() -> str:
        return " ".join(chooser.choice(_WORDS) for _ in range(chooser.randint(6, 24))).capitalize() + "."

    examples = []
    for line in range(1, rows + 1):
        messages = [{"role": "system", "content": "You are a helpful assistant."}]
        for _ in range(chooser.randint(1, 3)):
            messages.append({"role": "user", "content": " ".join(sentence() for _ in range(chooser.randint(1, 3)))})
            messages.append(
                {"role": "assistant", "content": " ".join(sentence() for _ in range(chooser.randint(1, 6)))}
            )
        examples.append(Example(line=line, task=DatasetTask.CHAT, fields={"messages": messages}))
    return examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    arguments = parser.parse_args()

    examples = generate_chats(arguments.rows)
    corpus = [message["content"] for example in examples[:2000] for message in example.fields["messages"]]
    tokenizer = train_tokenizer(corpus, TokenizerSpec(algorithm="bpe", vocab_size=8000))
    ensure_template_tokens(tokenizer, _TEMPLATE)

    rendered = [render_text(example, tokenizer, template=_TEMPLATE) for example in examples]
    started = time.perf_counter()
    baseline_tokens = 0
    for text in rendered:
        baseline_tokens += len(tokenizer(text, add_special_tokens=False)["input_ids"])
    row_by_row_seconds = time.perf_counter() - started

    started = time.perf_counter()
    for example in examples:
        tokenize_example(example, tokenizer, template=_TEMPLATE, max_length=_MAX_LENGTH)
    tokenize_example_seconds = time.perf_counter() - started

    key = cache_key(
        dataset_sha256="benchmark",
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        template=_TEMPLATE,
        train_on="completions",
        max_length=_MAX_LENGTH,
        task=DatasetTask.CHAT,
    )
    options = {"key": key, "template": _TEMPLATE, "train_on": "completions", "max_length": _MAX_LENGTH}
    with tempfile.TemporaryDirectory() as cache_dir:
        started = time.perf_counter()
        dataset = tokenize_to_cache(examples, tokenizer, cache_dir=cache_dir, **options)
        cached_seconds = time.perf_counter() - started
        started = time.perf_counter()
        tokenize_to_cache(examples, tokenizer, cache_dir=cache_dir, **options)
        cache_hit_seconds = time.perf_counter() - started
        cached_tokens = sum(len(ids) for ids in dataset["input_ids"])

    rows = len(examples)
    print(
        json.dumps(
            {
                "rows": rows,
                "cached_rows_per_second": round(rows / cached_seconds, 1),
                "row_by_row_rows_per_second": round(rows / row_by_row_seconds, 1),
                "speedup": round(row_by_row_seconds / cached_seconds, 2),
                "cache_hit_seconds": round(cache_hit_seconds, 4),
                "tokenize_example_rows_per_second": round(rows / tokenize_example_seconds, 1),
                "tokens": cached_tokens,
                "baseline_tokens": baseline_tokens,
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
