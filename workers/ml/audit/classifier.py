"""Bias audit of a text classifier: how its predictions and errors differ between groups, and whether swapping
gendered words in an input changes its prediction.

The **positive label** is the one whose share of predictions is the selection rate, and against which multi-class
predictions are binarised for fairlearn's demographic parity and equalized odds (positive label or not). By default
it is the first of the model's labels (in ``id2label`` order) named "positive", "pos", "1", "true" or "yes", else
the model's first label (index 0); pass ``positive_label`` to choose.

Groups: an example's ``"group"`` may be a string (one attribute, named ``"group"``) or a mapping
``{attribute: group}``. Examples without one get, for each audit category, the group whose words
(``data/group_terms.json``) they mention, when they mention exactly one group of that category; the attribute is
then the category's name ("gender", "religion"...).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
    selection_rate,
)
from sklearn.metrics import accuracy_score, f1_score

from workers.ml.audit import prompts as prompt_data
from workers.ml.audit.counterfactual import WordSwapper, swapper_for
from workers.ml.audit.loading import LoadedModel, load_classifier, resolve_device
from workers.ml.audit.measures import group_entry, measure_entry
from workers.ml.audit.stats import (
    DEFAULT_SAMPLES,
    Interval,
    Statistic,
    bootstrap_ci,
    derived_seed,
    equalized_odds_gap,
    largest_gap,
    mean_of,
    paired_bootstrap_ci,
)

Progress = Callable[[str, int, int], None]

POSITIVE_LABEL_NAMES = ("positive", "pos", "1", "true", "yes")
EXPLICIT_ATTRIBUTE = "group"
MAX_FLIP_EXAMPLES = 10
DEFAULT_BATCH_SIZE = 32
_MAX_INPUT_TOKENS = 512


def default_positive_label(labels: Sequence[str]) -> str:
    """The first label named like a positive class, else the first label (see the module docstring)."""
    for label in labels:
        if str(label).strip().lower() in POSITIVE_LABEL_NAMES:
            return str(label)
    if not labels:
        raise ValueError("A classifier audit needs at least one label.")
    return str(labels[0])


def group_fairness(
    y_true: Sequence[str], y_pred: Sequence[str], groups: Sequence[str], *, positive_label: str
) -> dict[str, Any]:
    """fairlearn figures for one sensitive attribute.

    Returns ``{"by_group": {group: {"n", "accuracy", "f1_macro", "selection_rate"}}, "overall": {...},
    "demographic_parity_difference", "equalized_odds_difference", "accuracy_gap"}``. Selection rate is the share
    predicted as ``positive_label``; demographic parity and equalized odds use predictions and truths binarised
    against it.
    """
    y_true_array = np.asarray([str(label) for label in y_true], dtype=object)
    y_pred_array = np.asarray([str(label) for label in y_pred], dtype=object)
    group_array = np.asarray([str(group) for group in groups], dtype=object)
    true_binary = (y_true_array == positive_label).astype(int)
    pred_binary = (y_pred_array == positive_label).astype(int)
    frame = MetricFrame(
        metrics={
            "accuracy": accuracy_score,
            "f1_macro": functools.partial(f1_score, average="macro", zero_division=0),
            "selection_rate": functools.partial(selection_rate, pos_label=positive_label),
        },
        y_true=y_true_array,
        y_pred=y_pred_array,
        sensitive_features=group_array,
    )
    by_group: dict[str, dict[str, Any]] = {}
    for group in sorted(set(group_array.tolist())):
        row = frame.by_group.loc[group]
        by_group[group] = {
            "n": int((group_array == group).sum()),
            **{metric: float(row[metric]) for metric in ("accuracy", "f1_macro", "selection_rate")},
        }
    accuracies = [row["accuracy"] for row in by_group.values()]
    return {
        "by_group": by_group,
        "overall": {"n": len(y_true_array), **{metric: float(value) for metric, value in frame.overall.items()}},
        "demographic_parity_difference": float(
            demographic_parity_difference(true_binary, pred_binary, sensitive_features=group_array)
        ),
        "equalized_odds_difference": float(
            equalized_odds_difference(true_binary, pred_binary, sensitive_features=group_array)
        ),
        "accuracy_gap": float(max(accuracies) - min(accuracies)),
    }


def predict(
    loaded: LoadedModel,
    texts: Sequence[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
    stage: str = "predicting",
) -> list[str]:
    """The predicted label name of each text (batched, longest first)."""
    assert loaded.labels is not None
    limit = min(
        _MAX_INPUT_TOKENS,
        getattr(loaded.model.config, "max_position_embeddings", None) or _MAX_INPUT_TOKENS,
    )
    order = sorted(range(len(texts)), key=lambda index: (-len(texts[index]), index))
    predictions: list[str] = [""] * len(texts)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        encoded = loaded.tokenizer(
            [texts[index] for index in batch], padding=True, truncation=True, max_length=limit, return_tensors="pt"
        )
        encoded = {key: value.to(loaded.device) for key, value in encoded.items() if key != "token_type_ids"}
        with torch.inference_mode():
            label_ids = loaded.model(**encoded).logits.argmax(dim=-1).tolist()
        for index, label_id in zip(batch, label_ids, strict=True):
            predictions[index] = loaded.labels[label_id]
        if progress is not None:
            progress(stage, min(start + batch_size, len(order)), len(order))
    return predictions


def _attributes(examples: Sequence[Mapping[str, Any]], categories: Sequence[str]) -> dict[str, list[str | None]]:
    """attribute -> the group of each example (None where it has none)."""
    explicit: dict[str, list[str | None]] = {}
    for position, example in enumerate(examples):
        group = example.get("group")
        values = group if isinstance(group, Mapping) else ({EXPLICIT_ATTRIBUTE: group} if group is not None else {})
        for attribute, value in values.items():
            explicit.setdefault(str(attribute), [None] * len(examples))[position] = (
                str(value) if value is not None and str(value) != "" else None
            )
    if explicit:
        return explicit
    mentioned = prompt_data.groups_mentioned([str(example["text"]) for example in examples], categories)
    return {
        category: [found[0] if len(found) == 1 else None for found in per_text]
        for category, per_text in mentioned.items()
    }


def _interval_or_none(
    model: dict[str, np.ndarray],
    reference: dict[str, np.ndarray] | None,
    statistic: Statistic,
    *,
    samples: int,
    seed: int,
) -> tuple[Interval, Interval | None, Interval | None]:
    estimate = bootstrap_ci(model, statistic, samples=samples, seed=seed)
    if reference is None:
        return estimate, None, None
    return (
        estimate,
        bootstrap_ci(reference, statistic, samples=samples, seed=seed),
        paired_bootstrap_ci(model, reference, statistic, samples=samples, seed=seed),
    )


def _with_value(interval: Interval, value: float) -> Interval:
    """fairlearn's figure as the point estimate, with the bootstrap's interval (they agree on the data)."""
    return Interval(value, interval.low, interval.high)


def _attribute_measures(
    attribute: str,
    assigned: list[str | None],
    y_true: list[str],
    model_pred: list[str],
    reference_pred: list[str] | None,
    *,
    positive_label: str,
    samples: int,
    seed: int,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    rows = [index for index, group in enumerate(assigned) if group is not None]
    groups = sorted({assigned[index] for index in rows if assigned[index] is not None})
    keys = tuple(
        f"{family}.{attribute}"
        for family in ("demographic_parity_difference", "equalized_odds_difference", "accuracy_gap")
    )
    if len(groups) < 2:
        reason = f"Fewer than two groups of {attribute} among the examples."
        measures = {
            key: measure_entry(key.split(".")[0], attribute, n=len(rows), model=None, reason=reason) for key in keys
        }
        return measures, None

    group_of = [str(assigned[index]) for index in rows]
    truth = [y_true[index] for index in rows]
    fairness_model = group_fairness(
        truth, [model_pred[index] for index in rows], group_of, positive_label=positive_label
    )
    fairness_reference = (
        group_fairness(truth, [reference_pred[index] for index in rows], group_of, positive_label=positive_label)
        if reference_pred is not None
        else None
    )

    def columns(predictions: list[str], kind: str) -> dict[str, np.ndarray]:
        by_group: dict[str, list[Any]] = {}
        for index in rows:
            true_positive = float(y_true[index] == positive_label)
            predicted_positive = float(predictions[index] == positive_label)
            value: Any = {
                "selected": predicted_positive,
                "correct": float(predictions[index] == y_true[index]),
                "odds": [true_positive, predicted_positive],
            }[kind]
            by_group.setdefault(str(assigned[index]), []).append(value)
        return {group: np.asarray(values, dtype=float) for group, values in sorted(by_group.items())}

    measures: dict[str, Any] = {}
    for family, kind, statistic, group_metric in (
        ("demographic_parity_difference", "selected", largest_gap, "selection_rate"),
        ("equalized_odds_difference", "odds", equalized_odds_gap, None),
        ("accuracy_gap", "correct", largest_gap, "accuracy"),
    ):
        key = f"{family}.{attribute}"
        model_columns = columns(model_pred, kind)
        reference_columns = columns(reference_pred, kind) if reference_pred is not None else None
        estimate, reference_estimate, delta = _interval_or_none(
            model_columns, reference_columns, statistic, samples=samples, seed=derived_seed(seed, key)
        )
        estimate = _with_value(estimate, fairness_model[family])
        if reference_estimate is not None and fairness_reference is not None:
            reference_estimate = _with_value(reference_estimate, fairness_reference[family])
            delta = _with_value(delta, fairness_model[family] - fairness_reference[family]) if delta else None
        group_entries = {}
        if group_metric is not None:
            for group in groups:
                model_group, reference_group, _ = _interval_or_none(
                    {group: model_columns[group]},
                    {group: reference_columns[group]} if reference_columns is not None else None,
                    mean_of(group),
                    samples=samples,
                    seed=derived_seed(seed, key, group),
                )
                group_entries[group] = group_entry(len(model_columns[group]), model_group, reference_group)
        else:
            group_entries = {group: {"n": int(len(model_columns[group]))} for group in groups}
        measures[key] = measure_entry(
            family,
            attribute,
            n=len(rows),
            model=estimate,
            reference=reference_estimate,
            delta=delta,
            groups=group_entries,
        )
    table = {"model": fairness_model, "reference": fairness_reference}
    return measures, table


def _flip_measure(
    swapper: WordSwapper,
    texts: list[str],
    model_pred: list[str],
    model_swapped: dict[int, str],
    reference_pred: list[str] | None,
    reference_swapped: dict[int, str] | None,
    *,
    category: str,
    samples: int,
    seed: int,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    swappable = sorted(model_swapped)
    if not swappable:
        entry = measure_entry(
            "counterfactual_flip_rate",
            category,
            n=0,
            model=None,
            reason="No example contains a swappable group word.",
        )
        return entry, []
    model_flips = np.asarray([float(model_swapped[i] != model_pred[i]) for i in swappable])
    reference_flips = (
        np.asarray([float(reference_swapped[i] != reference_pred[i]) for i in swappable])
        if reference_pred is not None and reference_swapped is not None
        else None
    )
    estimate, reference_estimate, delta = _interval_or_none(
        {"swappable": model_flips},
        {"swappable": reference_flips} if reference_flips is not None else None,
        mean_of("swappable"),
        samples=samples,
        seed=derived_seed(seed, "counterfactual_flip_rate"),
    )
    entry = measure_entry(
        "counterfactual_flip_rate",
        category,
        n=len(swappable),
        model=estimate,
        reference=reference_estimate,
        delta=delta,
    )
    examples = [
        {
            "kind": "counterfactual_flip",
            "text": texts[index],
            "swapped_text": swapper.swap(texts[index]),
            "prediction": model_pred[index],
            "swapped_prediction": model_swapped[index],
        }
        for index in swappable
        if model_swapped[index] != model_pred[index]
    ][:MAX_FLIP_EXAMPLES]
    return entry, examples


def classifier_audit(
    model_dir: str | Path,
    reference_dir: str | Path | None,
    examples: Sequence[Mapping[str, Any]],
    *,
    group_words: Sequence[tuple[str, str]] | None = None,
    categories: Sequence[str] = prompt_data.CATEGORIES,
    positive_label: str | None = None,
    seed: int = 0,
    bootstrap_samples: int = DEFAULT_SAMPLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Audit the classifier in ``model_dir`` (against ``reference_dir`` when given) on labelled ``examples``
    (``{"text", "label", "group"?}``). ``group_words`` are the word pairs swapped for the counterfactual flip rate
    (default: the project's gendered pairs). Returns the result dict described in ``workers.ml.audit.audit``."""
    if not examples:
        raise ValueError("A classifier audit needs at least one example.")
    chosen = prompt_data.check_categories(categories)
    texts = [str(example["text"]) for example in examples]
    y_true = [str(example["label"]) for example in examples]
    swapper = swapper_for(group_words)
    swappable = [index for index, text in enumerate(texts) if swapper.has_swappable_word(text)]
    swapped_texts = [swapper.swap(texts[index]) for index in swappable]
    resolved_device = resolve_device(device)

    def run(folder: str | Path, role: str) -> tuple[list[str], list[str], dict[int, str]]:
        loaded = load_classifier(folder, resolved_device)
        try:
            with loaded.cpu_threads():
                predictions = predict(
                    loaded, texts, batch_size=batch_size, progress=progress, stage=f"predicting: {role}"
                )
                swapped = predict(
                    loaded, swapped_texts, batch_size=batch_size, progress=progress, stage=f"counterfactuals: {role}"
                )
            assert loaded.labels is not None
            return loaded.labels, predictions, dict(zip(swappable, swapped, strict=True))
        finally:
            loaded.release()

    labels, model_pred, model_swapped = run(model_dir, "model")
    unknown = sorted(set(y_true) - set(labels))
    if unknown:
        raise ValueError(
            f"The examples have labels the model does not know: {', '.join(unknown[:5])}; its labels are: "
            f"{', '.join(labels)}."
        )
    positive = positive_label if positive_label is not None else default_positive_label(labels)
    if positive not in labels:
        raise ValueError(f"positive_label {positive!r} is not one of the model's labels: {', '.join(labels)}.")
    reference_pred: list[str] | None = None
    reference_swapped: dict[int, str] | None = None
    if reference_dir:
        reference_labels, reference_pred, reference_swapped = run(reference_dir, "reference")
        if positive not in reference_labels:
            raise ValueError(
                f"The reference model has no label {positive!r}; its labels: {', '.join(reference_labels)}."
            )

    measures: dict[str, Any] = {}
    tables: dict[str, Any] = {}
    for attribute, assigned in _attributes(examples, chosen).items():
        attribute_measures, table = _attribute_measures(
            attribute,
            assigned,
            y_true,
            model_pred,
            reference_pred,
            positive_label=positive,
            samples=bootstrap_samples,
            seed=seed,
        )
        measures.update(attribute_measures)
        if table is not None:
            tables[attribute] = table
    flip_category = "gender" if group_words is None else "custom"
    measures["counterfactual_flip_rate"], flips = _flip_measure(
        swapper,
        texts,
        model_pred,
        model_swapped,
        reference_pred,
        reference_swapped,
        category=flip_category,
        samples=bootstrap_samples,
        seed=seed,
    )
    return {
        "kind": "classifier",
        "version": 1,
        "reference": reference_pred is not None,
        "measures": measures,
        "tables": tables,
        "worst_examples": flips,
        "data": None,
        "sources": {
            key: value
            for key, value in prompt_data.project_sources().items()
            if key in {"group_terms", "counterfactual_pairs"}
        },
        "settings": {
            "kind": "classifier",
            "model_dir": str(model_dir),
            "reference_dir": str(reference_dir) if reference_dir else None,
            "categories": list(chosen),
            "examples": len(examples),
            "labels": list(labels),
            "positive_label": positive,
            "group_words": "default" if group_words is None else [list(pair) for pair in group_words],
            "seed": seed,
            "bootstrap_samples": bootstrap_samples,
            "confidence": 0.95,
            "device": resolved_device.type,
        },
    }
