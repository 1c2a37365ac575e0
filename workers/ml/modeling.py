"""Building, loading, adapting and exporting the models the platform trains.

Three tasks, each with one Hugging Face head:

- ``"causal_lm"``: next-token prediction (GPT-2 from scratch, or a pretrained decoder such as SmolLM2/Llama);
- ``"classification"``: one label per text (BERT or GPT-2 from scratch, or any pretrained model with a
  sequence-classification head — the head is always new);
- ``"seq2seq"``: text to text (T5 from scratch, or a pretrained encoder-decoder).

Models are loaded from local safetensors folders only: no hub, no pickles, no remote code.

Packed training rows: a row holding several documents end to end, with ``position_ids`` restarting at 0 at each
document and ``attention_mask=None``, is attended block-diagonally by transformers 5 (``masking_utils`` finds the
document boundaries from the position ids) — but only when no key/value cache is in play. So the models this module
hands out for training have ``config.use_cache = False``; their ``generation_config.use_cache`` stays ``True`` so that
``generate`` still caches, and exported folders are written with ``use_cache = True`` again.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)
from transformers.pytorch_utils import Conv1D

from workers.ml.config import INVALID_HYPERPARAMETER, MAX_CONTEXT_LENGTH
from workers.ml.errors import TrainingDataError

CAUSAL_LM = "causal_lm"
CLASSIFICATION = "classification"
SEQ2SEQ = "seq2seq"
TASKS = (CAUSAL_LM, CLASSIFICATION, SEQ2SEQ)

ARCHITECTURE_TASKS: dict[str, tuple[str, ...]] = {
    "gpt2": (CAUSAL_LM, CLASSIFICATION),
    "bert": (CLASSIFICATION,),
    "t5": (SEQ2SEQ,),
}
SIZES = ("tiny", "mini", "small", "base")
INIT_SCHEMES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "normal")
LORA_EXPORTS = ("merged", "adapter")
MAX_LORA_RANK = 1024
MAX_VOCAB_SIZE = 1_000_000
QLORA_UNAVAILABLE = "qlora_unavailable"
ADAPTER_MARKER = "tunehouse_adapter.json"

# Config keyword arguments of each named size. Parameter counts (``count_parameters``, tied embeddings once) at the
# reference vocabularies — gpt2 50,257 with 1,024 positions, bert 30,522 with 512 positions and a 2-label head,
# t5 32,128 (relative positions, so no position table) — computed by building each model:
#
#   size   gpt2 causal_lm                 bert classification                  t5 seq2seq
#   tiny     3,382,080  2L  64w  2h      2,090,690  2L  64w  2h ff 256      2,286,464  2+2L  64w  2h ff 256
#   mini    16,287,488  4L 256w  4h     11,171,074  4L 256w  4h ff 1024    15,570,688  4+4L 256w  4h ff 1024
#   small   45,171,200  6L 512w  8h     35,069,442  6L 512w  8h ff 2048    60,506,624  6+6L 512w  8h ff 2048
#   base   124,439,808 12L 768w 12h    109,483,778 12L 768w 12h ff 3072   123,790,080  6+6L 768w 12h ff 3072
#
# Almost all of tiny's parameters are the embedding table: with a platform-trained 512-token vocabulary tiny gpt2 has
# 136,960. gpt2 base is GPT-2 small (124M) and bert base is BERT-base; t5 base keeps T5-base's width but
# t5-small's depth, to stay near 125M (T5-base itself is 223M).
_SIZE_CONFIGS: dict[str, dict[str, dict[str, int]]] = {
    "gpt2": {
        "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2},
        "mini": {"n_layer": 4, "n_embd": 256, "n_head": 4},
        "small": {"n_layer": 6, "n_embd": 512, "n_head": 8},
        "base": {"n_layer": 12, "n_embd": 768, "n_head": 12},
    },
    "bert": {
        "tiny": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 256},
        "mini": {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024},
        "small": {"num_hidden_layers": 6, "hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 2048},
        "base": {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072},
    },
    "t5": {
        "tiny": {"num_layers": 2, "num_decoder_layers": 2, "d_model": 64, "d_kv": 32, "d_ff": 256, "num_heads": 2},
        "mini": {"num_layers": 4, "num_decoder_layers": 4, "d_model": 256, "d_kv": 64, "d_ff": 1024, "num_heads": 4},
        "small": {"num_layers": 6, "num_decoder_layers": 6, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_heads": 8},
        "base": {"num_layers": 6, "num_decoder_layers": 6, "d_model": 768, "d_kv": 64, "d_ff": 3072, "num_heads": 12},
    },
}

# LoRA targets by ``config.model_type``: the attention projections, as the LoRA paper and peft do.
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    # GPT-2's projections are Conv1D layers (weight stored transposed): apply_lora sets fan_in_fan_out for them.
    # "c_proj" matches both the attention output and the MLP output projection.
    "gpt2": ["c_attn", "c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "bert": ["query", "key", "value"],
    "t5": ["q", "v"],
}
# Classification heads by the attribute name the transformers models give them; peft's SEQ_CLS task trains a full
# copy of the head (modules_to_save) next to the adapters, since a new head starts from random weights.
_CLASSIFIER_HEAD_NAMES = ("classifier", "score", "classification_head")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_PUBLISHED_FILE_MODE = 0o644
_LOCAL_ONLY: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}


def _invalid(param: str, message: str) -> TrainingDataError:
    return TrainingDataError(INVALID_HYPERPARAMETER, message, param)


def _check_choice(value: object, choices: tuple[str, ...] | list[str], param: str, what: str) -> None:
    if not isinstance(value, str) or value not in choices:
        raise _invalid(param, f"Unknown {what} {value!r}; choose one of: {', '.join(choices)}.")


def _check_int(value: object, param: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _invalid(param, f"{param} must be a whole number from {low} to {high}, got {value!r}.")


# ---------------------------------------------------------------------------------------------------------------
# Weight initialisation


def _is_norm(module: nn.Module) -> bool:
    # T5LayerNorm and the RMSNorm classes of decoder models are their own classes, not nn.LayerNorm subclasses.
    return isinstance(module, nn.LayerNorm | nn.RMSNorm | nn.GroupNorm) or type(module).__name__.endswith(
        ("LayerNorm", "RMSNorm")
    )


def _init_matrix(weight: torch.Tensor, scheme: str, std: float) -> None:
    """Initialises a 2-D weight laid out as torch's Linear is, ``(out_features, in_features)``: fan_in is dim 1."""
    if scheme == "xavier_uniform":
        nn.init.xavier_uniform_(weight)
    elif scheme == "xavier_normal":
        nn.init.xavier_normal_(weight)
    elif scheme == "kaiming_uniform":
        # He et al. for (leaky-)ReLU-like activations (GELU and SiLU are close): std = sqrt(2 / fan_in).
        nn.init.kaiming_uniform_(weight, a=0.0, mode="fan_in", nonlinearity="relu")
    elif scheme == "kaiming_normal":
        nn.init.kaiming_normal_(weight, a=0.0, mode="fan_in", nonlinearity="relu")
    else:
        nn.init.normal_(weight, mean=0.0, std=std)


def initialise_weights(model: nn.Module, scheme: str, *, std: float = 0.02) -> None:
    """Re-initialises every weight of ``model`` in place with ``scheme``.

    Linear, GPT-2 Conv1D and Embedding weights get the scheme (``"normal"`` is N(0, ``std``)); their biases are zero;
    LayerNorm / T5LayerNorm / RMSNorm weights are one and their biases zero. Conv1D stores its weight as
    ``(in_features, out_features)``, the transpose of Linear, so the scheme is applied to the transposed view and the
    fans are the layer's true ones. An Embedding ``(num_embeddings, dim)`` follows torch's convention for its matrix
    (fan_in = dim), which is also right for the output projection a tied embedding doubles as; its padding row is
    zeroed, as transformers does. Each parameter is initialised once, input embeddings first, so tied weights (an
    LM head sharing the token embedding) stay one tensor.
    """
    _check_choice(scheme, INIT_SCHEMES, "init", "weight initialisation")
    if isinstance(std, bool) or not isinstance(std, int | float) or not (math.isfinite(std) and std > 0):
        raise _invalid("init", f"The standard deviation of the normal initialisation must be positive, got {std!r}.")
    modules: list[nn.Module] = []
    get_input_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_input_embeddings):
        with contextlib.suppress(NotImplementedError, AttributeError):
            embeddings = get_input_embeddings()
            if isinstance(embeddings, nn.Module):
                modules.append(embeddings)
    modules.extend(model.modules())
    done: set[int] = set()

    def first_time(parameter: torch.Tensor | None) -> bool:
        if parameter is None or id(parameter) in done:
            return False
        done.add(id(parameter))
        return True

    with torch.no_grad():
        for module in modules:
            if isinstance(module, Conv1D | nn.Linear):
                if first_time(module.weight):
                    _init_matrix(module.weight.T if isinstance(module, Conv1D) else module.weight, scheme, std)
                if first_time(module.bias):
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                if first_time(module.weight):
                    _init_matrix(module.weight, scheme, std)
                    if module.padding_idx is not None:
                        module.weight[module.padding_idx].zero_()
            elif _is_norm(module):
                weight = getattr(module, "weight", None)
                bias = getattr(module, "bias", None)
                if isinstance(weight, torch.Tensor) and first_time(weight):
                    weight.fill_(1.0)
                if isinstance(bias, torch.Tensor) and first_time(bias):
                    bias.zero_()


# ---------------------------------------------------------------------------------------------------------------
# Building from scratch and loading


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside ``model``'s wrappers: ``torch.compile``'s, then peft's (whose adapters are
    injected into it in place, so they take part in whatever runs through it)."""
    model = getattr(model, "_orig_mod", model)
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _attention_implementation(model_class: type[PreTrainedModel]) -> str:
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def _prepare_for_training(model: PreTrainedModel) -> PreTrainedModel:
    # See the module docstring: a key/value cache in the forward pass turns off packed-sequence masking.
    model.config.use_cache = False
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True
    return model


def _labels(num_labels: int | None, id2label: dict[int, str] | None) -> tuple[int, dict[int, str]]:
    if id2label is not None:
        if not isinstance(id2label, dict) or not id2label:
            raise _invalid("id2label", "id2label must map each class index to its label.")
        if num_labels is None:
            num_labels = len(id2label)
        if sorted(int(index) for index in id2label) != list(range(num_labels)):
            raise _invalid("id2label", f"id2label must name each of the {num_labels} classes 0..{num_labels - 1}.")
    if num_labels is None:
        raise _invalid("num_labels", "A classification model needs num_labels (or id2label).")
    _check_int(num_labels, "num_labels", 2, 100_000)
    labels = {int(k): str(v) for k, v in id2label.items()} if id2label else {i: f"LABEL_{i}" for i in range(num_labels)}
    return num_labels, labels


_DROPOUT_FIELDS = {
    "gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout"),
    "bert": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
    "t5": ("dropout_rate",),
}


def build_from_scratch(
    *,
    architecture: str,
    size: str,
    task: str,
    vocab_size: int,
    max_length: int,
    init: str,
    num_labels: int | None = None,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    decoder_start_token_id: int | None = None,
    id2label: dict[int, str] | None = None,
    dropout: float | None = None,
) -> PreTrainedModel:
    """A randomly initialised model of a named size (see ``_SIZE_CONFIGS``) for ``task``.

    ``dropout`` sets every dropout rate of the architecture (embeddings, attention, residual / hidden); None keeps
    the architecture's usual 0.1.

    GPT-2 and BERT get ``max_length`` learned positions; T5 uses relative positions, so it has no length limit of
    its own. GPT-2 classification pools the last token that is not padding, so it needs ``pad_token_id`` (``eos``
    is used when it is not given). T5 defaults to its usual ids (pad 0, eos 1, decoder start = pad) when not given.
    """
    _check_choice(architecture, tuple(ARCHITECTURE_TASKS), "architecture", "architecture")
    _check_choice(task, TASKS, "task", "task")
    if task not in ARCHITECTURE_TASKS[architecture]:
        raise _invalid(
            "architecture",
            f"A {architecture} model cannot be trained for {task}; it supports: "
            f"{', '.join(ARCHITECTURE_TASKS[architecture])}. For {task} use: "
            f"{', '.join(a for a, tasks in ARCHITECTURE_TASKS.items() if task in tasks)}.",
        )
    _check_choice(size, SIZES, "model_size", "model size")
    _check_choice(init, INIT_SCHEMES, "init", "weight initialisation")
    _check_int(vocab_size, "vocab_size", 2, MAX_VOCAB_SIZE)
    _check_int(max_length, "max_length", 1, MAX_CONTEXT_LENGTH)
    for name, token_id in (
        ("pad_token_id", pad_token_id),
        ("bos_token_id", bos_token_id),
        ("eos_token_id", eos_token_id),
        ("decoder_start_token_id", decoder_start_token_id),
    ):
        if token_id is not None:
            _check_int(token_id, name, 0, vocab_size - 1)
    dims = _SIZE_CONFIGS[architecture][size]
    label_kwargs: dict[str, Any] = {}
    if task == CLASSIFICATION:
        count, labels = _labels(num_labels, id2label)
        label_kwargs = {"num_labels": count, "id2label": labels, "label2id": {v: k for k, v in labels.items()}}

    model: PreTrainedModel
    if architecture == "gpt2":
        model_class = GPT2LMHeadModel if task == CAUSAL_LM else GPT2ForSequenceClassification
        if task == CLASSIFICATION and pad_token_id is None:
            pad_token_id = eos_token_id
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_length,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            # GPT-2's tanh-approximated GELU, as torch's one fused kernel instead of "gelu_new"'s five elementwise
            # passes (a quarter of a CPU training step): the same function (equal to float rounding), any HF loader.
            activation_function="gelu_pytorch_tanh",
            **dims,
            **label_kwargs,
        )
    elif architecture == "bert":
        model_class = BertForSequenceClassification
        config = BertConfig(
            vocab_size=vocab_size,
            max_position_embeddings=max_length,
            pad_token_id=pad_token_id if pad_token_id is not None else 0,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **dims,
            **label_kwargs,
        )
    else:
        model_class = T5ForConditionalGeneration
        pad = pad_token_id if pad_token_id is not None else 0
        config = T5Config(
            vocab_size=vocab_size,
            pad_token_id=pad,
            eos_token_id=eos_token_id if eos_token_id is not None else min(1, vocab_size - 1),
            decoder_start_token_id=decoder_start_token_id if decoder_start_token_id is not None else pad,
            **dims,
        )
        if bos_token_id is not None:
            config.bos_token_id = bos_token_id
    if dropout is not None:
        if not 0 <= dropout < 1:
            raise _invalid("dropout", f"dropout must be at least 0 and below 1, got {dropout!r}.")
        for name in _DROPOUT_FIELDS[architecture]:
            setattr(config, name, float(dropout))
    config._attn_implementation = _attention_implementation(model_class)
    model = model_class(config)
    initialise_weights(model, init)
    return _prepare_for_training(model)


def _task_mapping(task: str) -> dict[str, str]:
    if task == CAUSAL_LM:
        return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if task == CLASSIFICATION:
        return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    return MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES


def _supports_task(config: Any, task: str) -> bool:
    model_type = getattr(config, "model_type", None)
    if model_type not in _task_mapping(task):
        return False
    if task == CAUSAL_LM:
        # Encoder models (BERT, RoBERTa...) and encoder-decoders (BART...) have a ForCausalLM class only as a decoder
        # half; a causal language model here is a decoder-only model.
        return not getattr(config, "is_encoder_decoder", False) and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return True


def supported_tasks(config: Any) -> list[str]:
    """The tasks a model of this config can be trained for (causal_lm, classification, seq2seq)."""
    return [task for task in TASKS if _supports_task(config, task)]


def load_pretrained(
    path: str | Path,
    *,
    task: str,
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    torch_dtype: torch.dtype | str | None = None,
) -> PreTrainedModel:
    """Loads a local safetensors model folder with the head for ``task``.

    Classification gets a head of ``num_labels`` classes: a new, randomly initialised one for a base model (an
    existing head of another size is replaced). ``torch_dtype`` ``None`` loads float32, the precision training on
    CPU needs.
    """
    _check_choice(task, TASKS, "task", "task")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise TrainingDataError(INVALID_HYPERPARAMETER, f"No model folder (config.json) at {str(folder)!r}.", "model")
    try:
        config = AutoConfig.from_pretrained(folder, **_LOCAL_ONLY)
    except (ValueError, KeyError, OSError) as error:
        raise TrainingDataError(
            INVALID_HYPERPARAMETER,
            f"The model at {str(folder)!r} has a config transformers cannot read: {error}",
            "model",
        ) from error
    if not _supports_task(config, task):
        can = supported_tasks(config)
        raise TrainingDataError(
            INVALID_HYPERPARAMETER,
            f"The model {config.model_type!r} at {str(folder)!r} cannot be trained for {task}"
            + (f"; it supports: {', '.join(can)}." if can else "."),
            "model",
        )
    kwargs: dict[str, Any] = {**_LOCAL_ONLY, "use_safetensors": True, "dtype": torch_dtype or torch.float32}
    model: PreTrainedModel
    if task == CAUSAL_LM:
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, **kwargs)
    elif task == SEQ2SEQ:
        model = AutoModelForSeq2SeqLM.from_pretrained(folder, config=config, **kwargs)
    else:
        count, labels = _labels(num_labels, id2label)
        config.num_labels = count
        config.id2label = labels
        config.label2id = {v: k for k, v in labels.items()}
        if config.pad_token_id is None:
            # Decoder classifiers (GPT-2, Llama) pool the last token that is not padding, so they need the pad id.
            config.pad_token_id = load_tokenizer(folder).pad_token_id
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, config=config, ignore_mismatched_sizes=True, **kwargs
        )
    return _prepare_for_training(model)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer of a local model folder, with a pad token."""
    tokenizer = AutoTokenizer.from_pretrained(Path(path), **_LOCAL_ONLY)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TrainingDataError(
            INVALID_HYPERPARAMETER, f"The model at {str(path)!r} has no fast (tokenizer.json) tokenizer.", "model"
        )
    if tokenizer.pad_token is None:
        # Batches are padded to one length. Padded positions are hidden by the attention mask and left out of the
        # loss, so which id fills them does not matter: reusing eos (else unk) keeps the vocabulary, and the
        # embedding matrix, unchanged, where adding a [PAD] token would need a new untrained embedding row. Since
        # pad may then equal eos, labels must be masked by attention_mask, never by comparing ids with pad.
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise TrainingDataError(
                INVALID_HYPERPARAMETER,
                f"The tokenizer at {str(path)!r} has no pad, end-of-sequence or unknown token to pad batches with.",
                "model",
            )
        tokenizer.pad_token = fallback
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# LoRA


def default_lora_targets(model: nn.Module) -> list[str] | str:
    """The LoRA target modules for ``model``: ours by model type, else peft's own defaults, else all linear layers."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in DEFAULT_LORA_TARGETS:
        return list(DEFAULT_LORA_TARGETS[model_type])
    try:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults
    except ImportError:  # pragma: no cover - the constant exists in every peft we pin
        peft_defaults = {}
    if model_type in peft_defaults:
        return list(peft_defaults[model_type])
    return "all-linear"


def _adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear | Conv1D)}


def _matches(name: str, target: str) -> bool:
    # peft's rule for a list of target names: the full module name, or its last dotted components.
    return name == target or name.endswith("." + target)


def apply_lora(
    model: PreTrainedModel,
    *,
    task: str,
    r: int,
    alpha: int | float,
    dropout: float,
    target_modules: list[str] | None,
) -> Any:
    """Wraps ``model`` in a peft ``PeftModel`` whose LoRA adapters (and, for classification, head) train alone."""
    from peft import LoraConfig, TaskType, get_peft_model

    _check_choice(task, TASKS, "task", "task")
    _check_int(r, "lora_r", 1, MAX_LORA_RANK)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not (math.isfinite(alpha) and alpha > 0):
        raise _invalid("lora_alpha", f"lora_alpha must be a positive number, got {alpha!r}.")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise _invalid("lora_dropout", f"lora_dropout must be at least 0 and below 1, got {dropout!r}.")

    candidates = _adaptable_modules(model)
    head_names = [name for name in _CLASSIFIER_HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]
    if task == CLASSIFICATION:
        # The new head is trained in full; adapting it as well would be redundant.
        candidates = {
            name: module
            for name, module in candidates.items()
            if not any(name == head or name.startswith(head + ".") for head in head_names)
        }
    available = sorted({name.rsplit(".", 1)[-1] for name in candidates})
    targets: list[str] | str = default_lora_targets(model) if target_modules is None else target_modules
    matched: list[nn.Module]
    if targets == "all-linear":
        matched = list(candidates.values())
    else:
        if (
            isinstance(targets, str)
            or not targets
            or not all(isinstance(target, str) and target.strip() for target in targets)
        ):
            raise _invalid("lora_target_modules", "lora_target_modules must be a non-empty list of module names.")
        matched = []
        for target in targets:
            hits = [module for name, module in candidates.items() if _matches(name, target)]
            if not hits:
                raise _invalid(
                    "lora_target_modules",
                    f"No linear layer of this model is named {target!r}. Linear layers LoRA can adapt: "
                    f"{', '.join(available)}.",
                )
            matched.extend(hits)
        targets = list(dict.fromkeys(targets))
    if not matched:
        raise _invalid("lora_target_modules", "This model has no linear layer LoRA can adapt.")

    task_type = {CAUSAL_LM: TaskType.CAUSAL_LM, CLASSIFICATION: TaskType.SEQ_CLS, SEQ2SEQ: TaskType.SEQ_2_SEQ_LM}[task]
    lora_config = LoraConfig(
        task_type=task_type,
        r=r,
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        target_modules=targets,
        bias="none",
        # Conv1D (GPT-2) stores its weight as (in, out): peft must transpose the LoRA product for it.
        fan_in_fan_out=any(isinstance(module, Conv1D) for module in matched),
        modules_to_save=head_names if task == CLASSIFICATION else None,
    )
    return get_peft_model(model, lora_config)


# ---------------------------------------------------------------------------------------------------------------
# Export


@contextlib.contextmanager
def writing_folder_atomically(target: str | Path) -> Iterator[Path]:
    """Yields an empty sibling folder of ``target`` to write into; on success it replaces ``target`` in one rename.

    A reader sees the old folder or the complete new one, never a half-written one. On error the partial folder is
    removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    temporary.mkdir()
    try:
        yield temporary
        for path in temporary.rglob("*"):
            # safetensors writes its files 0600; the folder is read by other processes (serving, other workers).
            if path.is_file() and not path.is_symlink():
                path.chmod(_PUBLISHED_FILE_MODE)
        old: Path | None = None
        if target.exists() or target.is_symlink():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
            os.replace(target, old)
        try:
            os.replace(temporary, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


def _is_peft_model(model: object) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


@contextlib.contextmanager
def _inference_cache_setting(model: Any) -> Iterator[None]:
    # Exported folders are for inference: write use_cache=True however training ran.
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "use_cache"):
        yield
        return
    before = config.use_cache
    config.use_cache = True
    try:
        yield
    finally:
        config.use_cache = before


def export_model(
    model: nn.Module,
    tokenizer: Any,
    output_dir: str | Path,
    *,
    lora_export: str = "merged",
) -> Path:
    """Writes ``model`` and ``tokenizer`` to ``output_dir`` as a Hugging Face folder of safetensors, atomically.

    A plain model is saved as is. For a PeftModel, ``"merged"`` folds the adapters into a copy of the base weights
    (the model passed in keeps its adapters) and writes a plain model folder any transformers can load;
    ``"adapter"`` writes only the adapter (``adapter_model.safetensors``, ``adapter_config.json``, with the trained
    classification head if any), the tokenizer and ``tunehouse_adapter.json`` naming the base model folder.
    """
    _check_choice(lora_export, LORA_EXPORTS, "lora_export", "LoRA export")
    with writing_folder_atomically(output_dir) as folder:
        if _is_peft_model(model):
            if lora_export == "merged":
                merged = copy.deepcopy(model).merge_and_unload()
                with _inference_cache_setting(merged):
                    merged.save_pretrained(folder)
                del merged
            else:
                base = model.get_base_model()
                peft_config = model.peft_config[model.active_adapter]
                base_path = peft_config.base_model_name_or_path or getattr(base, "name_or_path", "") or ""
                if not base_path:
                    raise _invalid(
                        "lora_export",
                        "An adapter export needs a base model loaded from a folder; this model was built in memory, "
                        "so export it merged.",
                    )
                model.save_pretrained(folder, safe_serialization=True)
                marker = {
                    "base_model": str(base_path),
                    "base_model_type": getattr(base.config, "model_type", None),
                    "task_type": str(getattr(peft_config.task_type, "value", peft_config.task_type)),
                    "adapter_format": "peft-lora",
                }
                (folder / ADAPTER_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        else:
            with _inference_cache_setting(model):
                model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        pickles = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.lower().endswith(_PICKLE_SUFFIXES)]
        if pickles:  # pragma: no cover - transformers 5 and peft write safetensors only
            raise RuntimeError(f"Export wrote pickle files, refusing to publish them: {pickles}")
    return Path(output_dir)


# ---------------------------------------------------------------------------------------------------------------
# Accounting and capabilities


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """The number of parameters of ``model``, each tied (shared) tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def require_qlora_support(device: str | torch.device) -> None:
    """Raises unless 4-bit QLoRA can run here: it needs bitsandbytes and a CUDA device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    has_bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
    if has_bitsandbytes and device_type == "cuda" and torch.cuda.is_available():
        return
    missing = []
    if not has_bitsandbytes:
        missing.append("the bitsandbytes package is not installed on this worker")
    if device_type != "cuda" or not torch.cuda.is_available():
        missing.append(f"the training device is {device_type!s}, not a CUDA GPU")
    raise TrainingDataError(
        QLORA_UNAVAILABLE,
        "QLoRA (4-bit quantized base weights) needs an NVIDIA GPU with bitsandbytes, but "
        + " and ".join(missing)
        + ". Use mode 'lora' or 'full' instead.",
        "mode",
    )
