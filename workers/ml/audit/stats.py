"""Percentile-bootstrap confidence intervals for group statistics: group means, the largest gap between groups, and
paired differences between a model and a reference scored on the same items.

Values come per group as arrays of shape ``(n,)`` (one number per item) or ``(n, k)`` (k numbers per item, e.g.
``(y_true, y_pred)``). Resampling draws items with replacement *within each group*, so every replicate keeps the
group sizes. A statistic is vectorised over replicates: it receives ``{group: array of shape (replicates, n[, k])}``
and returns one number per replicate.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Statistic = Callable[[Mapping[str, np.ndarray]], np.ndarray]
"""``{group: (replicates, n[, k]) array}`` -> ``(replicates,)`` array; NaN marks a replicate where it is undefined."""

DEFAULT_SAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile-bootstrap confidence interval."""

    value: float
    """The statistic on the data as observed."""
    low: float
    """Lower bound of the interval (the ``(1 - confidence) / 2`` percentile of the replicates)."""
    high: float
    """Upper bound of the interval."""

    @property
    def is_finite(self) -> bool:
        return all(math.isfinite(number) for number in (self.value, self.low, self.high))

    def as_dict(self) -> dict[str, Any] | None:
        """``{"value", "ci": [low, high]}``, or None when any number is undefined (never NaN in results)."""
        if not self.is_finite:
            return None
        return {"value": float(self.value), "ci": [float(self.low), float(self.high)]}


def derived_seed(seed: int, *names: object) -> int:
    """A seed for one named measure, stable across runs and independent of which other measures are computed."""
    digest = hashlib.sha256(":".join(str(part) for part in (seed, *names)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _as_arrays(values_by_group: Mapping[str, Sequence[float] | np.ndarray]) -> dict[str, np.ndarray]:
    arrays = {group: np.asarray(values, dtype=float) for group, values in values_by_group.items()}
    arrays = {group: array for group, array in arrays.items() if array.shape[0] > 0}
    if not arrays:
        raise ValueError("A bootstrap needs at least one group with at least one value.")
    return arrays


def _percentiles(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


def _check(samples: int, confidence: float) -> None:
    if type(samples) is not int or samples < 1:
        raise ValueError(f"samples must be a positive integer; got {samples!r}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1; got {confidence!r}.")


def _resample_indices(
    rng: np.random.Generator, arrays: Mapping[str, np.ndarray], samples: int
) -> dict[str, np.ndarray]:
    # Groups in sorted order so that the draws do not depend on the mapping's insertion order.
    return {
        group: rng.integers(0, arrays[group].shape[0], size=(samples, arrays[group].shape[0]))
        for group in sorted(arrays)
    }


def _observed(statistic: Statistic, arrays: Mapping[str, np.ndarray]) -> float:
    return float(np.asarray(statistic({group: array[np.newaxis] for group, array in arrays.items()}))[0])


def bootstrap_ci(
    values_by_group: Mapping[str, Sequence[float] | np.ndarray],
    statistic: Statistic,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Interval:
    """``statistic`` on the data and its percentile-bootstrap interval (resampling within each group).

    Groups without values are left out. For ``largest_gap`` the interval can sit above the estimate when the
    groups are alike: the largest of several noisy gaps is biased upwards, and the bootstrap shows it.
    """
    _check(samples, confidence)
    arrays = _as_arrays(values_by_group)
    rng = np.random.default_rng(seed)
    indices = _resample_indices(rng, arrays, samples)
    replicates = np.asarray(statistic({group: arrays[group][indices[group]] for group in arrays}), dtype=float)
    low, high = _percentiles(replicates, confidence)
    return Interval(_observed(statistic, arrays), low, high)


def paired_bootstrap_ci(
    model_by_group: Mapping[str, Sequence[float] | np.ndarray],
    reference_by_group: Mapping[str, Sequence[float] | np.ndarray],
    statistic: Statistic,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Interval:
    """``statistic(model) - statistic(reference)`` with a paired percentile-bootstrap interval.

    Item ``i`` of a group must be the same prompt (pair, example) for both; each replicate draws the same items for
    both, so what the two share (the prompts' own difficulty) cancels out of the interval.
    """
    _check(samples, confidence)
    model = _as_arrays(model_by_group)
    reference = _as_arrays(reference_by_group)
    if set(model) != set(reference) or any(model[g].shape[0] != reference[g].shape[0] for g in model):
        raise ValueError("A paired bootstrap needs the same groups with the same number of items on both sides.")
    rng = np.random.default_rng(seed)
    indices = _resample_indices(rng, model, samples)
    replicates = np.asarray(statistic({g: model[g][indices[g]] for g in model}), dtype=float) - np.asarray(
        statistic({g: reference[g][indices[g]] for g in reference}), dtype=float
    )
    low, high = _percentiles(replicates, confidence)
    return Interval(_observed(statistic, model) - _observed(statistic, reference), low, high)


# ---------------------------------------------------------------------------------------------------------------
# Statistics (vectorised over replicates)


def mean_of(group: str) -> Statistic:
    """The mean of one group's values."""

    def statistic(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        return arrays[group].mean(axis=1)

    return statistic


def largest_gap(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The largest difference between two groups' means: max group mean - min group mean (0 for one group)."""
    means = np.stack([arrays[group].mean(axis=1) for group in sorted(arrays)], axis=0)
    return means.max(axis=0) - means.min(axis=0)


def pooled_mean(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The mean over all items of all groups (groups weighted by their size)."""
    totals = sum(arrays[group].sum(axis=1) for group in sorted(arrays))
    count = sum(arrays[group].shape[1] for group in arrays)
    return np.asarray(totals, dtype=float) / count


def equalized_odds_gap(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """fairlearn's equalized odds difference on ``(y_true, y_pred)`` 0/1 columns: the larger of the between-group
    gaps in true-positive rate and in false-positive rate. As in fairlearn (sklearn's normalised confusion matrix),
    a rate a group cannot have (no positives, or no negatives) counts as 0."""
    true_positive_rates = []
    false_positive_rates = []
    for group in sorted(arrays):
        y_true = arrays[group][..., 0]
        y_pred = arrays[group][..., 1]
        positives = y_true.sum(axis=1)
        negatives = y_true.shape[1] - positives
        true_positive_rates.append((y_true * y_pred).sum(axis=1) / np.maximum(positives, 1))
        false_positive_rates.append(((1 - y_true) * y_pred).sum(axis=1) / np.maximum(negatives, 1))
    gaps = [np.ptp(np.stack(rates), axis=0) for rates in (true_positive_rates, false_positive_rates)]
    return np.maximum(gaps[0], gaps[1])
