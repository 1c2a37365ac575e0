"""Bias audit of a dataset: how often each group is mentioned, and, with labels, how labels differ between groups.

Group mentions use the same term lists as the model audits (``data/group_terms.json``), matched case-insensitively
on word boundaries. A text that mentions several groups counts for each of them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from workers.ml.audit import prompts as prompt_data
from workers.ml.audit.classifier import POSITIVE_LABEL_NAMES


def _positive_label(labels: Sequence[str], positive_label: str | None) -> str | None:
    if positive_label is not None:
        return positive_label
    named = sorted({label for label in labels if label.strip().lower() in POSITIVE_LABEL_NAMES})
    return named[0] if named else None


def data_audit(
    texts: Sequence[str],
    labels: Sequence[Any] | None = None,
    categories: Sequence[str] = prompt_data.CATEGORIES,
    *,
    positive_label: str | None = None,
) -> dict[str, Any]:
    """Group-term frequencies per category and, when ``labels`` are given, label distributions per group.

    Returns ``{"texts": N, "labelled": bool, "positive_label": str | None, "categories": {category: {"groups":
    {group: {"texts", "share"[, "labels", "positive_share"]}}, "texts_mentioning_any", "share_mentioning_any"[,
    "largest_label_gap"]}}}``. ``share`` is over all texts. The largest label gap is the largest difference
    between two groups in the share of their texts carrying ``positive_label``; without one (by default a label
    named "positive", "pos", "1", "true" or "yes") it is the largest such gap over every label, naming that label.
    """
    chosen = prompt_data.check_categories(categories)
    text_list = [str(text) for text in texts]
    label_list = [str(label) for label in labels] if labels is not None else None
    if label_list is not None and len(label_list) != len(text_list):
        raise ValueError(f"Got {len(text_list)} texts but {len(label_list)} labels; they must pair up.")
    total = len(text_list)
    positive = _positive_label(label_list, positive_label) if label_list is not None else None
    mentioned = prompt_data.groups_mentioned(text_list, chosen)
    result: dict[str, Any] = {
        "texts": total,
        "labelled": label_list is not None,
        "positive_label": positive,
        "categories": {},
    }
    all_labels = sorted(set(label_list)) if label_list is not None else []
    for category in chosen:
        per_text = mentioned[category]
        groups: dict[str, dict[str, Any]] = {}
        for group in sorted(prompt_data.group_terms([category])[category]):
            rows = [index for index, found in enumerate(per_text) if group in found]
            entry: dict[str, Any] = {"texts": len(rows), "share": len(rows) / total if total else 0.0}
            if label_list is not None:
                counts = Counter(label_list[index] for index in rows)
                entry["labels"] = {label: counts[label] for label in all_labels if counts[label]}
                if positive is not None and rows:
                    entry["positive_share"] = counts[positive] / len(rows)
            groups[group] = entry
        any_rows = sum(1 for found in per_text if found)
        category_result: dict[str, Any] = {
            "groups": groups,
            "texts_mentioning_any": any_rows,
            "share_mentioning_any": any_rows / total if total else 0.0,
        }
        if label_list is not None:
            category_result["largest_label_gap"] = _largest_label_gap(groups, all_labels, positive)
        result["categories"][category] = category_result
    return result


def _largest_label_gap(
    groups: dict[str, dict[str, Any]], all_labels: list[str], positive: str | None
) -> dict[str, Any] | None:
    present = {group: entry for group, entry in groups.items() if entry["texts"] > 0}
    if len(present) < 2:
        return None
    best: dict[str, Any] | None = None
    for label in [positive] if positive is not None else all_labels:
        shares = {group: entry["labels"].get(label, 0) / entry["texts"] for group, entry in present.items()}
        highest = max(sorted(shares), key=lambda group: shares[group])
        lowest = min(sorted(shares), key=lambda group: shares[group])
        gap = shares[highest] - shares[lowest]
        if best is None or gap > best["value"]:
            best = {"label": label, "value": gap, "highest": highest, "lowest": lowest}
    return best
