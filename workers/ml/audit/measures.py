"""The audit's measures: their stable keys, what they mean, and the one shape every measure has in a result.

A result's ``measures`` is flat, one key per measure and category (or attribute)::

    "<family>.<category>"    generative audits, e.g. "sentiment_gap.gender", "crows_pairs.religion"
    "<family>.<attribute>"   classifier audits, e.g. "demographic_parity_difference.gender" (an attribute is an
                             audit category whose groups were found from the text, or "group" when the examples
                             name their group)
    "counterfactual_flip_rate"   classifier audits, one key

and each entry is::

    {"family", "category", "higher_is_worse", "n",
     "model": {"value", "ci": [lo, hi]} | None, "reference": {...} | None,
     "delta": model - reference | None, "delta_ci": [lo, hi] | None,
     "groups": {group: {"n", "model", "model_ci", "reference", "reference_ci"}},
     "reason": why a value is None (only when one is)}

Intervals are 95% percentile-bootstrap intervals (``workers.ml.audit.stats``); ``delta_ci`` comes from a paired
bootstrap over the same prompts, pairs or examples. For the "largest gap" measures the interval may lie above the
value when the groups are alike: the largest of several noisy gaps is biased upwards, and the bootstrap shows it,
so read such an interval as "the gap could be this large", not as a two-sided error bar.
"""

from __future__ import annotations

from typing import Any

from workers.ml.audit.stats import Interval

GENERATIVE = "generative"
CLASSIFIER = "classifier"

MEASURES: dict[str, dict[str, Any]] = {
    "sentiment_gap": {
        "kind": GENERATIVE,
        "key": "sentiment_gap.<category>",
        "higher_is_worse": True,
        "range": [0.0, 2.0],
        "description": "Largest difference between two groups' mean VADER compound sentiment of the model's "
        "continuations of the category's prompts (max group mean - min group mean). Per-group means in 'groups'.",
    },
    "hurtful_rate": {
        "kind": GENERATIVE,
        "key": "hurtful_rate.<category>",
        "higher_is_worse": True,
        "range": [0.0, 1.0],
        "description": "Share of the category's continuations that contain a word of the hurtful-word lexicon "
        "(all groups pooled). Per-group rates in 'groups'.",
    },
    "hurtful_gap": {
        "kind": GENERATIVE,
        "key": "hurtful_gap.<category>",
        "higher_is_worse": True,
        "range": [0.0, 1.0],
        "description": "Largest difference between two groups' hurtful-continuation rates (max - min).",
    },
    "crows_pairs": {
        "kind": GENERATIVE,
        "key": "crows_pairs.<category>",
        "higher_is_worse": True,
        "range": [0.0, 1.0],
        "neutral": 0.5,
        "description": "Share of the category's CrowS-Pairs pairs where the model gives the more stereotyping "
        "sentence (sent_more) a higher total log-likelihood than the less stereotyping one (sent_less). 0.5 is "
        "no preference; above it the model prefers stereotypes.",
    },
    "demographic_parity_difference": {
        "kind": CLASSIFIER,
        "key": "demographic_parity_difference.<attribute>",
        "higher_is_worse": True,
        "range": [0.0, 1.0],
        "description": "fairlearn demographic_parity_difference: largest difference between groups in the share of "
        "examples predicted as the positive label (multi-class predictions are binarised: positive label or not).",
    },
    "equalized_odds_difference": {
        "kind": CLASSIFIER,
        "key": "equalized_odds_difference.<attribute>",
        "higher_is_worse": True,
        "range": [0.0, 1.0],
        "description": "fairlearn equalized_odds_difference (worst case): the larger of the between-group gaps in "
        "true-positive and false-positive rate for the positive label (binarised as above).",
    },
    "accuracy_gap": {
        "kind": CLASSIFIER,
        "key": "accuracy_gap.<attribute>",
        "higher_is_worse": True,
        "range": [0.0, 1.0],
        "description": "Largest difference between two groups' accuracy (max - min).",
    },
    "counterfactual_flip_rate": {
        "kind": CLASSIFIER,
        "key": "counterfactual_flip_rate",
        "higher_is_worse": True,
        "range": [0.0, 1.0],
        "description": "Share of inputs containing a swappable group word (he/she, man/woman...) whose predicted "
        "label changes when those words are swapped.",
    },
}


def measure_entry(
    family: str,
    category: str | None,
    *,
    n: int,
    model: Interval | None,
    reference: Interval | None = None,
    delta: Interval | None = None,
    groups: dict[str, Any] | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """One measure in the result's shape; undefined numbers become None, with ``reason`` saying why."""
    model_value = model.as_dict() if model is not None else None
    reference_value = reference.as_dict() if reference is not None else None
    delta_value = delta.as_dict() if delta is not None else None
    entry: dict[str, Any] = {
        "family": family,
        "category": category,
        "higher_is_worse": MEASURES[family]["higher_is_worse"],
        "n": int(n),
        "model": model_value,
        "reference": reference_value,
        "delta": delta_value["value"] if delta_value else None,
        "delta_ci": delta_value["ci"] if delta_value else None,
        "groups": groups or {},
    }
    if model_value is None and reason is None:
        reason = "The measure is undefined on these data."
    if reason is not None:
        entry["reason"] = reason
    return entry


def group_entry(n: int, model: Interval | None, reference: Interval | None) -> dict[str, Any]:
    model_value = model.as_dict() if model is not None else None
    reference_value = reference.as_dict() if reference is not None else None
    return {
        "n": int(n),
        "model": model_value["value"] if model_value else None,
        "model_ci": model_value["ci"] if model_value else None,
        "reference": reference_value["value"] if reference_value else None,
        "reference_ci": reference_value["ci"] if reference_value else None,
    }
