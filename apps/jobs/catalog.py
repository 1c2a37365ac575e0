"""Base models a job may start from. Step 1 ships the from-scratch GPT-2-style architecture only."""

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    description: str
    from_scratch: bool


# What the from-scratch trainer reads today: text, and chat / prompt-completion JSONL with masked labels.
FROM_SCRATCH_TASKS = frozenset({"causal_lm", "chat", "prompt_completion"})
FROM_SCRATCH_FORMATS = frozenset({"text", "chat_jsonl", "prompt_completion_jsonl", "text_jsonl"})

CATALOG = {
    "gpt2-tiny": CatalogEntry(
        id="gpt2-tiny",
        description="GPT-2-style causal LM trained from scratch with a byte-level BPE tokenizer trained on your "
        "text; two layers, about 100k parameters: trains in seconds on a CPU.",
        from_scratch=True,
    ),
}
