"""Bias audit of a causal language model: what it writes after prompts about different groups, and which of two
sentences about two groups it finds more likely.

For each category the model (and, when given, a reference such as its base model) continues the same prompts
(``prompts.prompt_sets``); each continuation gets a VADER sentiment score and a hurtful-word flag. CrowS-Pairs
pairs are scored by total log-likelihood. See ``measures.MEASURES`` for what is reported.

Generation is greedy by default (``temperature`` 0); with a temperature it samples, seeded per batch, so the same
inputs and seed give the same text. Prompts are batched with left padding, longest first.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import GenerationConfig

from workers.ml.audit import prompts as prompt_data
from workers.ml.audit import scoring
from workers.ml.audit.benchmark_data import read_sources
from workers.ml.audit.loading import LoadedModel, load_causal_lm, resolve_device
from workers.ml.audit.measures import group_entry, measure_entry
from workers.ml.audit.stats import (
    DEFAULT_SAMPLES,
    Interval,
    Statistic,
    bootstrap_ci,
    derived_seed,
    largest_gap,
    mean_of,
    paired_bootstrap_ci,
    pooled_mean,
)

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: called as work advances (e.g. ``("generating: model", 64, 264)``)."""

MAX_NEW_TOKENS_LIMIT = 256
WORST_EXAMPLES_PER_CATEGORY = 10
DEFAULT_BATCH_SIZE = 32
_PAIRS_PER_PROMPT = 5  # CrowS-Pairs pairs per category, by default, for each prompt per group


@dataclass(frozen=True)
class _Continuation:
    category: str
    group: str
    prompt: str


@dataclass
class _ModelOutputs:
    texts: list[str]
    sentiments: list[float]
    hurtful: list[bool]
    prefers_stereotype: dict[str, list[float]]
    """Per category, 1.0 where sent_more got the higher log-likelihood, else 0.0 (pair order)."""


def _report(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def _context_length(loaded: LoadedModel) -> int:
    length = getattr(loaded.model.config, "max_position_embeddings", None)
    if not length:
        length = getattr(loaded.tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel; the audit's texts are short anyway.
    return int(min(length or 2048, 1_000_000))


def _start_token(tokenizer: Any) -> int | None:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """HF sampling draws from torch's global generator: seed it for one batch, then restore it."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _batches(order: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield list(order[start : start + size])


def generate_continuations(
    loaded: LoadedModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
    stage: str = "generating",
) -> list[str]:
    """The text ``loaded`` writes after each prompt (without the prompt and the end-of-text token)."""
    tokenizer = loaded.tokenizer
    context = _context_length(loaded)
    if context <= max_new_tokens:
        raise ValueError(f"The model's context of {context} tokens leaves no room for {max_new_tokens} new tokens.")
    end_of_text = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_text
    fallback_start = _start_token(tokenizer)
    token_ids: list[list[int]] = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
        # A prompt too long for the context keeps its end, which is what the continuation follows on from.
        ids = ids[-(context - max_new_tokens) :]
        token_ids.append(ids or ([fallback_start] if fallback_start is not None else [pad]))
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=None,
        top_k=None,
        eos_token_id=end_of_text,
        pad_token_id=pad,
        bos_token_id=tokenizer.bos_token_id,
    )
    order = sorted(range(len(prompts)), key=lambda index: (-len(token_ids[index]), index))
    texts: list[str] = [""] * len(prompts)
    done = 0
    for batch_number, batch in enumerate(_batches(order, batch_size)):
        width = max(len(token_ids[index]) for index in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            ids = token_ids[index]
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        sampling = _seeded(derived_seed(seed, "generate", batch_number), loaded.device) if temperature > 0 else None
        with torch.inference_mode(), sampling or contextlib.nullcontext():
            output = loaded.model.generate(
                input_ids=input_ids.to(loaded.device),
                attention_mask=attention_mask.to(loaded.device),
                generation_config=generation_config,
            )
        for row, index in enumerate(batch):
            new_ids = output[row, width:].tolist()
            if end_of_text is not None and end_of_text in new_ids:
                new_ids = new_ids[: new_ids.index(end_of_text)]
            texts[index] = tokenizer.decode(new_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        done += len(batch)
        _report(progress, stage, done, len(prompts))
    return texts


def sequence_log_likelihoods(
    loaded: LoadedModel,
    texts: Sequence[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
    stage: str = "scoring sentences",
) -> list[float]:
    """The total log-likelihood of each text under ``loaded``: the sum over its tokens of log p(token | before).

    Texts start from the tokenizer's beginning-of-text token (else its end-of-text token), so every token of the
    text is scored; without either the first token is not.
    """
    tokenizer = loaded.tokenizer
    context = _context_length(loaded)
    start = _start_token(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    token_ids = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        token_ids.append(([start] if start is not None else []) + ids)
        token_ids[-1] = token_ids[-1][:context]
    order = sorted(range(len(texts)), key=lambda index: (-len(token_ids[index]), index))
    totals = [0.0] * len(texts)
    done = 0
    for batch in _batches(order, batch_size):
        width = max(len(token_ids[index]) for index in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            ids = token_ids[index]
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        input_ids = input_ids.to(loaded.device)
        attention_mask = attention_mask.to(loaded.device)
        with torch.inference_mode():
            logits = loaded.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
            targets = input_ids[:, 1:]
            token_log_probs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            sums = (token_log_probs * attention_mask[:, 1:]).double().sum(dim=1).tolist()
        for row, index in enumerate(batch):
            totals[index] = float(sums[row])
        done += len(batch)
        _report(progress, stage, done, len(texts))
    return totals


def _run_model(
    model_dir: str | Path,
    role: str,
    items: list[_Continuation],
    pairs: dict[str, list[prompt_data.SentencePair]],
    *,
    device: torch.device,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int,
    progress: Progress | None,
) -> _ModelOutputs:
    loaded = load_causal_lm(model_dir, device)
    try:
        with loaded.cpu_threads():
            texts = generate_continuations(
                loaded,
                [item.prompt for item in items],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=seed,
                batch_size=batch_size,
                progress=progress,
                stage=f"generating: {role}",
            )
            sentences = [
                sentence
                for category in pairs
                for pair in pairs[category]
                for sentence in (pair.more_stereotyping, pair.less_stereotyping)
            ]
            log_likelihoods = sequence_log_likelihoods(
                loaded, sentences, batch_size=batch_size, progress=progress, stage=f"scoring CrowS-Pairs: {role}"
            )
    finally:
        loaded.release()
    prefers: dict[str, list[float]] = {}
    position = 0
    for category, category_pairs in pairs.items():
        prefers[category] = []
        for _ in category_pairs:
            more, less = log_likelihoods[position], log_likelihoods[position + 1]
            prefers[category].append(1.0 if more > less else 0.0)
            position += 2
    _report(progress, f"scoring continuations: {role}", 0, len(texts))
    outputs = _ModelOutputs(
        texts=texts,
        sentiments=scoring.sentiments(texts),
        hurtful=[scoring.is_hurtful(text) for text in texts],
        prefers_stereotype=prefers,
    )
    _report(progress, f"scoring continuations: {role}", len(texts), len(texts))
    return outputs


def _by_group(items: list[_Continuation], category: str, values: Sequence[float]) -> dict[str, np.ndarray]:
    grouped: dict[str, list[float]] = {}
    for item, value in zip(items, values, strict=True):
        if item.category == category:
            grouped.setdefault(item.group, []).append(float(value))
    return {group: np.asarray(grouped[group]) for group in sorted(grouped)}


def _estimates(
    model: dict[str, np.ndarray],
    reference: dict[str, np.ndarray] | None,
    statistic: Statistic,
    *,
    samples: int,
    seed: int,
) -> tuple[Interval, Interval | None, Interval | None]:
    model_interval = bootstrap_ci(model, statistic, samples=samples, seed=seed)
    if reference is None:
        return model_interval, None, None
    reference_interval = bootstrap_ci(reference, statistic, samples=samples, seed=seed)
    delta = paired_bootstrap_ci(model, reference, statistic, samples=samples, seed=seed)
    return model_interval, reference_interval, delta


def _group_measure(
    family: str,
    category: str,
    model: dict[str, np.ndarray],
    reference: dict[str, np.ndarray] | None,
    statistic: Statistic,
    *,
    samples: int,
    seed: int,
    needs_two_groups: bool,
) -> dict[str, Any]:
    key = f"{family}.{category}"
    groups = {}
    for group in model:
        model_mean, reference_mean, _ = _estimates(
            {group: model[group]},
            {group: reference[group]} if reference is not None else None,
            mean_of(group),
            samples=samples,
            seed=derived_seed(seed, key, group),
        )
        groups[group] = group_entry(len(model[group]), model_mean, reference_mean)
    n = sum(len(values) for values in model.values())
    if not model or (needs_two_groups and len(model) < 2):
        return measure_entry(
            family, category, n=n, model=None, groups=groups, reason="Fewer than two groups have prompts."
        )
    estimate, reference_estimate, delta = _estimates(
        model, reference, statistic, samples=samples, seed=derived_seed(seed, key)
    )
    return measure_entry(
        family, category, n=n, model=estimate, reference=reference_estimate, delta=delta, groups=groups
    )


def _worst_examples(items: list[_Continuation], outputs: _ModelOutputs, category: str) -> list[dict[str, Any]]:
    candidates = [
        index
        for index, item in enumerate(items)
        if item.category == category and (outputs.hurtful[index] or outputs.sentiments[index] < 0)
    ]
    # Hurtful ones first, then the most negative; ties in a fixed order so the list is reproducible.
    candidates.sort(
        key=lambda index: (not outputs.hurtful[index], outputs.sentiments[index], items[index].group, index)
    )
    return [
        {
            "category": category,
            "group": items[index].group,
            "prompt": items[index].prompt,
            "continuation": outputs.texts[index],
            "sentiment": outputs.sentiments[index],
            "hurtful_words": scoring.hurtful_words_in(outputs.texts[index]),
        }
        for index in candidates[:WORST_EXAMPLES_PER_CATEGORY]
    ]


def generative_audit(
    model_dir: str | Path,
    reference_dir: str | Path | None,
    categories: Sequence[str] = prompt_data.CATEGORIES,
    *,
    max_prompts_per_group: int = 20,
    max_pairs_per_category: int | None = None,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int = 0,
    bootstrap_samples: int = DEFAULT_SAMPLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    data_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Audit the causal LM in ``model_dir`` (against ``reference_dir`` when given) on ``categories``.

    ``max_pairs_per_category`` CrowS-Pairs pairs per category (default: 5 per prompt per group). Returns the
    result dict described in ``workers.ml.audit.audit`` (``kind`` "generative"), with ``data`` None.
    """
    chosen = prompt_data.check_categories(categories)
    if type(max_new_tokens) is not int or not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise ValueError(f"max_new_tokens must be an integer from 1 to {MAX_NEW_TOKENS_LIMIT}; got {max_new_tokens!r}.")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be 0 or more; got {temperature!r}.")
    pairs_per_category = max_pairs_per_category or _PAIRS_PER_PROMPT * max_prompts_per_group
    resolved_device = resolve_device(device)
    sources = read_sources(data_dir)  # fails early, naming `make install`, when the benchmarks are missing

    prompt_sets = prompt_data.prompt_sets(chosen, max_prompts_per_group, seed, data_dir)
    pairs = prompt_data.crows_pairs(chosen, pairs_per_category, seed, data_dir)
    items = [
        _Continuation(category, group, prompt)
        for category in chosen
        for group, group_prompts in prompt_sets[category].items()
        for prompt in group_prompts
    ]
    run = {
        "device": resolved_device,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
        "batch_size": batch_size,
        "progress": progress,
    }
    model_outputs = _run_model(model_dir, "model", items, pairs, **run)
    reference_outputs = _run_model(reference_dir, "reference", items, pairs, **run) if reference_dir else None

    measures: dict[str, Any] = {}
    worst: list[dict[str, Any]] = []
    samples = bootstrap_samples
    for category in chosen:
        for family, values_of, statistic, needs_two in (
            ("sentiment_gap", lambda outputs: outputs.sentiments, largest_gap, True),
            ("hurtful_rate", lambda outputs: [float(flag) for flag in outputs.hurtful], pooled_mean, False),
            ("hurtful_gap", lambda outputs: [float(flag) for flag in outputs.hurtful], largest_gap, True),
        ):
            model_values = _by_group(items, category, values_of(model_outputs))
            reference_values = _by_group(items, category, values_of(reference_outputs)) if reference_outputs else None
            measures[f"{family}.{category}"] = _group_measure(
                family,
                category,
                model_values,
                reference_values,
                statistic,
                samples=samples,
                seed=seed,
                needs_two_groups=needs_two,
            )
        key = f"crows_pairs.{category}"
        model_prefers = model_outputs.prefers_stereotype[category]
        if model_prefers:
            estimate, reference_estimate, delta = _estimates(
                {"pairs": np.asarray(model_prefers)},
                {"pairs": np.asarray(reference_outputs.prefers_stereotype[category])} if reference_outputs else None,
                mean_of("pairs"),
                samples=samples,
                seed=derived_seed(seed, key),
            )
            measures[key] = measure_entry(
                "crows_pairs", category, n=len(model_prefers), model=estimate, reference=reference_estimate, delta=delta
            )
        else:
            measures[key] = measure_entry(
                "crows_pairs", category, n=0, model=None, reason="CrowS-Pairs has no pairs for this category."
            )
        worst.extend(_worst_examples(items, model_outputs, category))

    return {
        "kind": "generative",
        "version": 1,
        "reference": reference_outputs is not None,
        "measures": measures,
        "tables": {},
        "worst_examples": worst,
        "data": None,
        "sources": {
            **{key: sources[key] for key in ("bold", "honest", "crows_pairs")},
            **scoring.scorer_sources(),
            "templates": prompt_data.project_sources()["templates"],
        },
        "settings": {
            "kind": "generative",
            "model_dir": str(model_dir),
            "reference_dir": str(reference_dir) if reference_dir is not None else None,
            "categories": list(chosen),
            "max_prompts_per_group": max_prompts_per_group,
            "max_pairs_per_category": pairs_per_category,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "decoding": "sampling" if temperature > 0 else "greedy",
            "seed": seed,
            "bootstrap_samples": bootstrap_samples,
            "confidence": 0.95,
            "device": resolved_device.type,
            "prompts": len(items),
        },
    }
