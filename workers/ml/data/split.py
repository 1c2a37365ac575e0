"""Seeded train/validation splits of a dataset's example indices, stratified by label when labels are given."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def _validation_size(count: int, validation_fraction: float) -> int:
    """round(count × fraction), but never all examples and, for a non-zero fraction, at least one when count ≥ 2."""
    if count < 2 or validation_fraction == 0:
        return 0
    return min(count - 1, max(1, round(count * validation_fraction)))


def _stratified_quotas(sizes: list[int], total: int, validation_fraction: float) -> list[int]:
    """Validation examples per label: proportional (largest remainders), summing to ``total`` where possible, and
    never taking a label's last training example (so a label with one example stays in training)."""
    capacity = [size - 1 if size >= 2 else 0 for size in sizes]
    exact = [size * validation_fraction for size in sizes]
    quotas = [min(cap, math.floor(value)) for cap, value in zip(capacity, exact, strict=True)]
    remaining = total - sum(quotas)
    # Largest fractional part first; ties broken by label position so the result is deterministic.
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    while remaining > 0:
        progressed = False
        for index in by_remainder:
            if remaining == 0:
                break
            if quotas[index] < capacity[index]:
                quotas[index] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            break
    return quotas


def split_indices(
    labels_or_count: Sequence[str] | int,
    *,
    validation_fraction: float = 0.1,
    seed: int = 0,
    stratify: bool = True,
) -> tuple[list[int], list[int]]:
    """(train indices, validation indices), each sorted, disjoint and together covering ``range(n)``.

    Give the number of examples, or their labels to stratify: each label then contributes about
    ``validation_fraction`` of its examples to validation, and every label with at least two examples keeps at
    least one in training. The same inputs and ``seed`` always give the same split (``random.Random(seed)``).
    """
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1); got {validation_fraction}.")
    if isinstance(labels_or_count, str):
        raise TypeError("Pass a sequence of labels or a count, not a single string.")
    rng = random.Random(seed)  # noqa: S311 - a reproducible split, not a secret
    if isinstance(labels_or_count, int):
        if labels_or_count < 0:
            raise ValueError(f"The number of examples cannot be negative; got {labels_or_count}.")
        labels: Sequence[str] | None = None
        count = labels_or_count
    else:
        labels = labels_or_count
        count = len(labels)
    total = _validation_size(count, validation_fraction)

    if labels is None or not stratify:
        order = list(range(count))
        rng.shuffle(order)
        validation = sorted(order[:total])
    else:
        groups: dict[str, list[int]] = {}
        for index, label in enumerate(labels):
            groups.setdefault(label, []).append(index)
        # Labels in sorted order: the split must not depend on which label happened to come first in the file.
        ordered_labels = sorted(groups, key=str)
        quotas = _stratified_quotas([len(groups[label]) for label in ordered_labels], total, validation_fraction)
        validation = []
        for label, quota in zip(ordered_labels, quotas, strict=True):
            members = groups[label][:]
            rng.shuffle(members)
            validation.extend(members[:quota])
        validation.sort()
    chosen = set(validation)
    train = [index for index in range(count) if index not in chosen]
    return train, validation
