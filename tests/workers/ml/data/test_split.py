"""Seeded train/validation splits: sizes, determinism, stratification, disjointness."""

from __future__ import annotations

from collections import Counter

import pytest

from workers.ml.data.split import split_indices


def _check_partition(train: list[int], validation: list[int], count: int) -> None:
    assert not set(train) & set(validation)
    assert sorted(train + validation) == list(range(count))
    assert train == sorted(train) and validation == sorted(validation)


@pytest.mark.parametrize(
    ("count", "fraction", "expected_validation"),
    [
        (100, 0.1, 10),
        (1000, 0.25, 250),
        (7, 0.1, 1),
        (2, 0.5, 1),
        (1, 0.5, 0),
        (0, 0.1, 0),
        (50, 0.0, 0),
        (10, 0.99, 9),
    ],
)
def test_sizes_from_a_count(count, fraction, expected_validation):
    train, validation = split_indices(count, validation_fraction=fraction, seed=3)
    _check_partition(train, validation, count)
    assert len(validation) == expected_validation


def test_same_seed_same_split_other_seed_other_split():
    assert split_indices(500, seed=7) == split_indices(500, seed=7)
    assert split_indices(500, seed=7) != split_indices(500, seed=8)
    labels = ["a", "b", "c"] * 100
    assert split_indices(labels, seed=1) == split_indices(list(labels), seed=1)
    assert split_indices(labels, seed=1) != split_indices(labels, seed=2)


def test_stratified_keeps_label_proportions():
    labels = ["pos"] * 600 + ["neg"] * 300 + ["neutral"] * 100
    train, validation = split_indices(labels, validation_fraction=0.2, seed=0)
    _check_partition(train, validation, len(labels))
    assert Counter(labels[i] for i in validation) == {"pos": 120, "neg": 60, "neutral": 20}


def test_stratified_rounding_still_hits_the_total_and_keeps_a_training_example_per_label():
    labels = ["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["d"]
    train, validation = split_indices(labels, validation_fraction=0.3, seed=4)
    _check_partition(train, validation, len(labels))
    assert len(validation) == round(len(labels) * 0.3)
    train_labels = Counter(labels[i] for i in train)
    assert all(train_labels[label] >= 1 for label in "abcd")  # d has one example: it trains, never validates
    for label, count in Counter(labels).items():
        if count >= 2:
            assert train_labels[label] >= 1


def test_label_with_two_examples_and_a_large_fraction_keeps_one_for_training():
    labels = ["x", "x", "y", "y"]
    train, validation = split_indices(labels, validation_fraction=0.9, seed=0)
    assert sorted(labels[i] for i in train) == ["x", "y"]
    assert sorted(labels[i] for i in validation) == ["x", "y"]


def test_stratify_false_with_labels_is_a_plain_shuffle():
    labels = ["a"] * 90 + ["b"] * 10
    assert split_indices(labels, stratify=False, seed=5) == split_indices(100, seed=5)


def test_split_does_not_depend_on_label_order_of_appearance():
    labels = ["b", "a"] * 50
    train, validation = split_indices(labels, validation_fraction=0.2, seed=0)
    assert Counter(labels[i] for i in validation) == {"a": 10, "b": 10}


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_bad_fraction_is_refused(fraction):
    with pytest.raises(ValueError):
        split_indices(10, validation_fraction=fraction)


def test_bad_inputs_are_refused():
    with pytest.raises(TypeError):
        split_indices("abc")
    with pytest.raises(ValueError):
        split_indices(-1)
