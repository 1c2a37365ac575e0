"""Turning chat messages into a prompt: the tokenizer's own chat template, else one of the training templates."""

from __future__ import annotations

from workers.ml.data.examples import DatasetTask, Example
from workers.ml.data.templates import CHAT_TEMPLATES, render_text

# What opens the assistant's turn after the conversation, per training template (see workers.ml.data.templates).
_ASSISTANT_OPENING = {
    "chatml": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "plain": "Assistant:",
}
# The marker that ends an assistant turn: generation stops there.
_END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "plain": None}


class ChatTemplateError(ValueError):
    pass


def render_chat_prompt(messages: list[dict], tokenizer, template: str | None) -> tuple[str, list[str]]:
    """The prompt text with the assistant turn opened, and the end-of-turn markers that stop generation."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        end_markers = [token for token in ("<|im_end|>", "<|eot_id|>", "<|end|>") if token in tokenizer.get_vocab()]
        return prompt, end_markers
    if template is None:
        raise ChatTemplateError("This model has no chat template; send a prompt instead of messages.")
    if template not in CHAT_TEMPLATES:
        raise ChatTemplateError(f"Unknown chat template {template!r}.")
    example = Example(line=0, task=DatasetTask.CHAT, fields={"messages": messages})
    text = render_text(example, tokenizer, template=template)
    end = _END_OF_TURN[template]
    return text + _ASSISTANT_OPENING[template], [end] if end else []
