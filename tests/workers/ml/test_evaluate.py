"""Evaluating a saved model on any dataset of its task, as a function and from the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from workers.ml.config import TrainingConfig
from workers.ml.data.samples import write_sample_datasets
from workers.ml.engine import evaluate_saved_model, run_training
from workers.ml.errors import TrainingDataError

REPOSITORY_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict[str, str]:
    return write_sample_datasets(str(tmp_path_factory.mktemp("samples")))


@pytest.fixture(scope="module")
def classifier(samples, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("classifier") / "model"
    config = TrainingConfig(
        train_file=samples["sentiment.csv"],
        output_dir=str(output),
        task="classification",
        architecture="bert",
        max_steps=15,
        learning_rate=3e-3,
        device="cpu",
    )
    run_training(config)
    return output


def test_classifier_metrics_agree_with_scikit_learn_on_the_models_own_predictions(classifier, samples):
    result = evaluate_saved_model(str(classifier), samples["sentiment.csv"], max_examples=40, device="cpu")
    assert result["task"] == "classification" and result["examples"] == 40

    # Predict independently with plain transformers and score with scikit-learn.
    import csv

    with open(samples["sentiment.csv"], newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))[:40]
    tokenizer = AutoTokenizer.from_pretrained(classifier, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(classifier, local_files_only=True).eval()
    with torch.no_grad():
        encoded = tokenizer(
            [row["text"] for row in rows], padding=True, truncation=True, max_length=128, return_tensors="pt"
        )
        predicted = [model.config.id2label[int(index)] for index in model(**encoded).logits.argmax(-1)]
    references = [row["label"] for row in rows]
    metrics = result["metrics"]
    assert metrics["accuracy"] == pytest.approx(accuracy_score(references, predicted))
    assert metrics["f1_macro"] == pytest.approx(f1_score(references, predicted, average="macro", zero_division=0))
    assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == 40
    assert len(result["samples"]) == 10 and {"input", "reference", "prediction", "correct"} <= set(result["samples"][0])


def test_a_dataset_of_another_task_or_with_unknown_labels_is_refused(classifier, samples, tmp_path):
    with pytest.raises(TrainingDataError) as wrong_task:
        evaluate_saved_model(str(classifier), samples["translation.tsv"], device="cpu")
    assert wrong_task.value.code == "training_file_task_mismatch"
    other_labels = tmp_path / "other.csv"
    other_labels.write_text("text,label\n" + "".join(f"row {index},sarcastic\n" for index in range(12)))
    with pytest.raises(TrainingDataError) as unknown:
        evaluate_saved_model(str(classifier), str(other_labels), device="cpu")
    assert unknown.value.code == "unknown_labels"


def test_cli_prints_one_json_object(classifier, samples):
    completed = subprocess.run(
        [sys.executable, "-m", "workers.ml.evaluate", str(classifier), samples["sentiment.csv"], "--max-examples", "8"],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    (line,) = completed.stdout.splitlines()
    body = json.loads(line)
    assert body["type"] == "evaluation" and body["examples"] == 8 and 0 <= body["metrics"]["accuracy"] <= 1
