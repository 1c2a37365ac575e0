"""The normalised form every dataset format is read into, whatever its file looked like.

Readers (formats.py) produce `Example`s; validation, preview, label masking and tokenisation consume them. Fields per
task:

- chat:              {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str, "weight": 0|1?}]}
- prompt_completion: {"prompt": str, "completion": str}
- causal_lm:         {"text": str}
- classification:    {"text": str, "label": str}
- seq2seq:           {"source": str, "target": str}
"""

from dataclasses import dataclass
from enum import StrEnum


class DatasetFormat(StrEnum):
    CHAT_JSONL = "chat_jsonl"
    PROMPT_COMPLETION_JSONL = "prompt_completion_jsonl"
    TEXT_JSONL = "text_jsonl"
    CSV = "csv"
    TSV = "tsv"
    PARQUET = "parquet"
    TEXT = "text"


class DatasetTask(StrEnum):
    CAUSAL_LM = "causal_lm"
    CHAT = "chat"
    PROMPT_COMPLETION = "prompt_completion"
    CLASSIFICATION = "classification"
    SEQ2SEQ = "seq2seq"


@dataclass(frozen=True)
class Example:
    line: int
    """1-based line of the file (JSONL, CSV, TSV, text) or 1-based row (Parquet) the example came from."""
    task: DatasetTask
    """What the example trains: decides which fields exist (see the module docstring)."""
    fields: dict
    """The normalised content."""


@dataclass(frozen=True)
class RowError:
    line: int
    """1-based line or row; 0 for an error about the whole file."""
    code: str
    """Stable machine-readable code, e.g. invalid_json, missing_role, empty_assistant_message."""
    message: str
    """A sentence the user can act on."""

    def to_dict(self) -> dict:
        return {"line": self.line, "code": self.code, "message": self.message}


def example_text(example: Example) -> str:
    """All the text of an example in one string, for tokenizer training and length statistics."""
    fields = example.fields
    if example.task == DatasetTask.CHAT:
        return "\n".join(message.get("content") or "" for message in fields["messages"])
    if example.task == DatasetTask.PROMPT_COMPLETION:
        return fields["prompt"] + fields["completion"]
    if example.task == DatasetTask.SEQ2SEQ:
        return fields["source"] + "\n" + fields["target"]
    return fields["text"]
