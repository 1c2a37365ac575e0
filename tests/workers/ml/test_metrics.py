"""Evaluation metrics against hand-computed values and the libraries they wrap; no Django."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import sacrebleu
import torch
from sklearn.metrics import f1_score, precision_score, recall_score

from workers.ml.metrics import (
    classification_metrics,
    generation_metrics,
    perplexity,
    sample_predictions_table,
    token_accuracy,
)

# "spam" dominates; "eggs" appears once as a reference and is predicted once, wrongly.
REFERENCES = ["spam"] * 6 + ["ham"] * 3 + ["eggs"]
PREDICTIONS = ["spam", "spam", "spam", "spam", "ham", "eggs"] + ["ham", "ham", "spam"] + ["spam"]


def test_classification_metrics_match_hand_counts_and_scikit_learn() -> None:
    result = classification_metrics(REFERENCES, PREDICTIONS)

    assert result["examples"] == 10
    assert result["accuracy"] == pytest.approx(0.6)
    # Rows are references, columns predictions, in sorted label order.
    assert result["confusion_matrix"] == {
        "labels": ["eggs", "ham", "spam"],
        "matrix": [[0, 0, 1], [0, 2, 1], [1, 1, 4]],
    }
    assert result["per_label"]["eggs"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert result["per_label"]["ham"]["precision"] == pytest.approx(2 / 3)
    assert result["per_label"]["spam"]["recall"] == pytest.approx(4 / 6)
    assert result["per_label"]["spam"]["support"] == 6
    assert result["f1_macro"] == pytest.approx(4 / 9)
    for average in ("macro", "micro", "weighted"):
        assert result[f"f1_{average}"] == pytest.approx(f1_score(REFERENCES, PREDICTIONS, average=average))
        assert result[f"precision_{average}"] == pytest.approx(
            precision_score(REFERENCES, PREDICTIONS, average=average, zero_division=0)
        )
        assert result[f"recall_{average}"] == pytest.approx(recall_score(REFERENCES, PREDICTIONS, average=average))
    assert json.loads(json.dumps(result)) == result
    assert all(type(result[key]) is float for key in ("accuracy", "f1_macro", "precision_weighted"))


def test_a_label_never_predicted_scores_zero_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = classification_metrics(["a", "b", "c"], ["a", "a", "c"], labels=["c", "b", "a", "d"])

    assert result["confusion_matrix"]["labels"] == ["c", "b", "a", "d"]
    assert result["confusion_matrix"]["matrix"] == [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert result["per_label"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert result["per_label"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert result["per_label"]["a"]["precision"] == pytest.approx(0.5)
    # Macro averages over all four given labels, the two zero ones included.
    assert result["precision_macro"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)


@pytest.mark.parametrize(("references", "predictions"), [([], []), (["a"], ["a", "b"])])
def test_classification_metrics_reject_empty_or_unpaired_input(references: list[str], predictions: list[str]) -> None:
    with pytest.raises(ValueError):
        classification_metrics(references, predictions)


def test_identical_texts_score_100_everywhere() -> None:
    texts = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog"]
    result = generation_metrics(texts, list(texts))

    for key in ("bleu", "chrf", "rouge1", "rouge2", "rougeL"):
        assert result[key] == pytest.approx(100.0), key
    assert result["examples"] == 2


def test_generation_metrics_match_sacrebleu_and_hand_computed_rouge() -> None:
    references = ["the cat sat on the mat"]
    predictions = ["the cat is on the mat"]
    result = generation_metrics(references, predictions)

    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)
    assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score)
    assert 0 < result["bleu"] < 100
    # 5 of 6 unigrams shared (the x2, cat, on, mat): P = R = F = 5/6.
    assert result["rouge1"] == pytest.approx(100 * 5 / 6)
    # 3 of 5 bigrams shared (the cat, on the, the mat).
    assert result["rouge2"] == pytest.approx(100 * 3 / 5)


def test_rouge_is_the_mean_over_pairs() -> None:
    result = generation_metrics(["hello world", "good morning"], ["hello world", "bad evening"])
    assert result["rouge1"] == pytest.approx(50.0)


@pytest.mark.parametrize(("references", "predictions"), [([], []), (["a b"], ["a b", "c"])])
def test_generation_metrics_reject_empty_or_unpaired_input(references: list[str], predictions: list[str]) -> None:
    with pytest.raises(ValueError):
        generation_metrics(references, predictions)


def test_perplexity_is_exp_of_the_loss_capped_and_nan_preserving() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(1e6) == math.exp(50)
    assert perplexity(math.inf) == math.exp(50)
    assert math.isnan(perplexity(math.nan))


def test_token_accuracy_counts_only_positions_that_are_not_ignored() -> None:
    torch.manual_seed(0)
    vocab = 5
    predicted = torch.tensor([[1, 2, 3, 4], [0, 0, 1, 1]])
    logits = torch.randn(2, 4, vocab) + 10 * torch.nn.functional.one_hot(predicted, vocab)
    labels = torch.tensor([[1, 2, 0, -100], [-100, -100, 1, 3]])

    correct, counted = token_accuracy(logits, labels)

    # Counted: row 0 positions 0-2 (two right), row 1 positions 2-3 (one right).
    assert (correct, counted) == (3, 5)
    assert token_accuracy(logits, torch.full((2, 4), -100)) == (0, 0)
    assert token_accuracy(logits, torch.full((2, 4), 0), ignore_index=0) == (0, 0)
    with pytest.raises(ValueError):
        token_accuracy(logits, labels[:, :3])


def test_sample_predictions_table_limits_rows_and_truncates_inputs() -> None:
    inputs = ["x" * 800, "second", "third"]
    rows = sample_predictions_table(inputs, ["yes", "no", "maybe"], [" yes\n", "yes", "maybe"], limit=2)

    assert len(rows) == 2
    assert rows[0]["input"] == "x" * 500
    assert rows[0] == {"input": "x" * 500, "reference": "yes", "prediction": " yes\n", "correct": True}
    assert rows[1]["correct"] is False
    assert len(sample_predictions_table(inputs, ["a"] * 3, ["a"] * 3)) == 3
    with pytest.raises(ValueError):
        sample_predictions_table(inputs, ["a"], ["a"])
