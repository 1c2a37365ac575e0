"""Sampling text from a model folder written by the training library (a quick try-out, not the serving engine)."""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

MAX_NEW_TOKENS_LIMIT = 512
_MODEL_FILE_NAME = "model.safetensors"
_LOADED_MODELS_KEPT = 4


@dataclass(frozen=True)
class GenerationResult:
    """Text sampled after a prompt."""

    text: str
    """Only the new text, without the prompt and without the end-of-text token."""
    prompt_tokens: int
    """Prompt tokens the model was given: an empty prompt counts 0, a prompt too long for the context keeps its end."""
    completion_tokens: int
    """Tokens the model produced, the end-of-text token included when it stopped on one."""
    finish_reason: str
    """``"stop"`` when the model produced its end-of-text token, ``"length"`` when it ran out of tokens."""


@dataclass
class _LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    # HF generate samples from torch's global generator, so a seeded call must not interleave with another.
    generate_lock: threading.Lock


_loaded_models: OrderedDict[tuple[str, int], _LoadedModel] = OrderedDict()
_loaded_models_lock = threading.Lock()


def generate_text(
    model_dir: str,
    prompt: str,
    *,
    max_new_tokens: int = 48,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int | None = None,
) -> GenerationResult:
    """Continue ``prompt`` with text sampled from the model in ``model_dir``.

    ``temperature`` 0 is greedy decoding; above 0 it samples with nucleus (``top_p``) filtering. The same ``seed``
    gives the same text. Generation stops at the end-of-text token or after ``max_new_tokens``, and never runs past
    the model's context length.
    """
    if type(max_new_tokens) is not int or not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise ValueError(f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS_LIMIT}; got {max_new_tokens!r}.")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be 0 or more; got {temperature!r}.")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be above 0 and at most 1; got {top_p!r}.")

    loaded = _load_model(model_dir)
    tokenizer = loaded.tokenizer
    end_of_text_id = tokenizer.eos_token_id
    prompt_ids: list[int] = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"] if prompt else []

    context_length = getattr(loaded.model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    if len(prompt_ids) + max_new_tokens > context_length:
        # Both do not fit: the prompt keeps its end (what the continuation depends on), at least half the context
        # of it, and generation ends with "length" when the context is full.
        prompt_ids = prompt_ids[-max(context_length - max_new_tokens, context_length // 2) :]
    model_input_ids = prompt_ids or [tokenizer.bos_token_id]
    new_token_budget = min(max_new_tokens, context_length - len(model_input_ids))
    if new_token_budget < 1:
        raise ValueError(f"The model's context of {context_length} tokens leaves no room for new tokens.")

    generation_config = GenerationConfig(
        max_new_tokens=new_token_budget,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None,
        top_k=None,
        eos_token_id=end_of_text_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_text_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    input_ids = torch.tensor([model_input_ids], dtype=torch.long, device=loaded.device)
    with loaded.generate_lock, torch.inference_mode(), _seeded(seed, loaded.device):
        output_ids = loaded.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=generation_config,
        )
    new_ids = output_ids[0, input_ids.shape[1] :].tolist()
    stopped_at_end_of_text = end_of_text_id in new_ids
    if stopped_at_end_of_text:
        new_ids = new_ids[: new_ids.index(end_of_text_id) + 1]
    text_ids = new_ids[:-1] if stopped_at_end_of_text else new_ids
    return GenerationResult(
        text=tokenizer.decode(text_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False),
        prompt_tokens=len(prompt_ids),
        completion_tokens=len(new_ids),
        finish_reason="stop" if stopped_at_end_of_text else "length",
    )


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's global generator for one call and restore its previous state afterwards."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _load_model(model_dir: str) -> _LoadedModel:
    folder = str(Path(model_dir).resolve())
    model_file = os.path.join(folder, _MODEL_FILE_NAME)
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"No {_MODEL_FILE_NAME} in {folder}; only safetensors models are loaded.")
    # The mtime in the key makes a retrained model in the same folder load afresh instead of serving stale weights.
    cache_key = (folder, os.stat(model_file).st_mtime_ns)
    with _loaded_models_lock:
        loaded = _loaded_models.get(cache_key)
        if loaded is not None:
            _loaded_models.move_to_end(cache_key)
            return loaded
        # Loading under the lock keeps two threads from loading the same model twice; these models are small.
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, trust_remote_code=False, use_safetensors=True, local_files_only=True
        )
        model.to(device).eval()
        loaded = _LoadedModel(model=model, tokenizer=tokenizer, device=device, generate_lock=threading.Lock())
        _loaded_models[cache_key] = loaded
        while len(_loaded_models) > _LOADED_MODELS_KEPT:
            _loaded_models.popitem(last=False)
        return loaded
