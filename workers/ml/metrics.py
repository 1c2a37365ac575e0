"""Evaluation metrics for fine-tuned models: classification, text generation and language-model loss.

Every function returns plain Python numbers (never numpy scalars or tensors) so results go straight into JSON
run reports and the database.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import sacrebleu
import torch
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

# exp(50) ~ 5e21 is already meaningless as a perplexity; capping keeps a diverged run's report finite and
# JSON-serialisable instead of overflowing to inf.
MAX_LOG_PERPLEXITY = 50.0
SAMPLE_INPUT_MAX_CHARS = 500
_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _check_pairs(references: Sequence[str], predictions: Sequence[str]) -> int:
    if len(references) != len(predictions):
        raise ValueError(f"Got {len(references)} references but {len(predictions)} predictions; they must pair up.")
    if not references:
        raise ValueError("Metrics need at least one reference/prediction pair.")
    return len(references)


def classification_metrics(
    references: Sequence[str], predictions: Sequence[str], *, labels: Sequence[str] | None = None
) -> dict[str, Any]:
    """Accuracy, precision/recall/F1 (macro, micro, weighted), a confusion matrix and per-label scores.

    ``labels`` fixes the label set and its order (rows and columns of the confusion matrix); by default it is the
    sorted union of references and predictions. A label that is never predicted gets precision 0 rather than a
    warning (``zero_division=0``), which is the honest score for a model that ignores a class.

    Raises ``ValueError`` for empty input or lists of different lengths.
    """
    examples = _check_pairs(references, predictions)
    y_true = [str(label) for label in references]
    y_pred = [str(label) for label in predictions]
    label_set = [str(label) for label in labels] if labels is not None else sorted(set(y_true) | set(y_pred))
    if not label_set:
        raise ValueError("labels must not be empty.")

    result: dict[str, Any] = {"accuracy": float(accuracy_score(y_true, y_pred))}
    for average in ("macro", "micro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=label_set, average=average, zero_division=0
        )
        result[f"precision_{average}"] = float(precision)
        result[f"recall_{average}"] = float(recall)
        result[f"f1_{average}"] = float(f1)

    matrix = confusion_matrix(y_true, y_pred, labels=label_set)
    result["confusion_matrix"] = {"labels": list(label_set), "matrix": [[int(v) for v in row] for row in matrix]}

    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=label_set, average=None, zero_division=0
    )
    result["per_label"] = {
        label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for label, p, r, f, s in zip(label_set, precision, recall, f1, support, strict=True)
    }
    result["examples"] = examples
    return result


def generation_metrics(references: Sequence[str], predictions: Sequence[str]) -> dict[str, Any]:
    """Corpus BLEU and chrF (sacrebleu) and mean ROUGE-1/2/L F-measure, all on a 0-100 scale.

    Raises ``ValueError`` for empty input or lists of different lengths.
    """
    examples = _check_pairs(references, predictions)
    refs = [str(text) for text in references]
    preds = [str(text) for text in predictions]

    scorer = rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(_ROUGE_TYPES, 0.0)
    for reference, prediction in zip(refs, preds, strict=True):
        # rouge_score takes (target, prediction): the reference comes first.
        scores = scorer.score(reference, prediction)
        for rouge_type in _ROUGE_TYPES:
            totals[rouge_type] += scores[rouge_type].fmeasure

    result: dict[str, Any] = {
        "bleu": float(sacrebleu.corpus_bleu(preds, [refs]).score),
        "chrf": float(sacrebleu.corpus_chrf(preds, [refs]).score),
    }
    for rouge_type in _ROUGE_TYPES:
        result[rouge_type] = 100.0 * totals[rouge_type] / examples
    result["examples"] = examples
    return result


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped at ``exp(50)`` so a diverged loss never overflows; NaN stays NaN."""
    loss = float(loss)
    if math.isnan(loss):
        return math.nan
    return math.exp(min(loss, MAX_LOG_PERPLEXITY))


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> tuple[int, int]:
    """``(correct, counted)`` arg-max predictions over the positions whose label is not ``ignore_index``.

    ``logits`` is ``[batch, seq, vocab]`` and already aligned with ``labels`` ``[batch, seq]``: the logits at
    position ``t`` predict the label at ``t`` (shift before calling for a causal LM). Counts rather than a ratio,
    so a caller can sum them over batches of different sizes.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not line up with labels {tuple(labels.shape)}.")
    counted_mask = labels != ignore_index
    correct = (logits.argmax(dim=-1) == labels) & counted_mask
    return int(correct.sum().item()), int(counted_mask.sum().item())


def sample_predictions_table(
    inputs: Sequence[str], references: Sequence[str], predictions: Sequence[str], *, limit: int = 20
) -> list[dict[str, Any]]:
    """The first ``limit`` rows as ``{"input", "reference", "prediction", "correct"}`` for the run report.

    ``correct`` is an exact match after stripping surrounding whitespace. Inputs are cut to 500 characters so a
    long prompt cannot bloat the report.
    """
    if not len(inputs) == len(references) == len(predictions):
        raise ValueError(
            f"Got {len(inputs)} inputs, {len(references)} references and {len(predictions)} predictions; "
            "they must line up."
        )
    if limit < 0:
        raise ValueError("limit must be zero or more.")
    rows = zip(inputs[:limit], references[:limit], predictions[:limit], strict=True)
    return [
        {
            "input": str(text)[:SAMPLE_INPUT_MAX_CHARS],
            "reference": str(reference),
            "prediction": str(prediction),
            "correct": str(prediction).strip() == str(reference).strip(),
        }
        for text, reference, prediction in rows
    ]
