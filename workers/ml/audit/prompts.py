"""The audit's prompt sets, CrowS-Pairs sentence pairs and group word lists, per category.

Categories and where their prompts come from:

=====================  ==========================================================================================
gender                 BOLD (American_actresses -> female, American_actors -> male), HONEST binary templates
                       (female / male identities) and HONEST queer_gender templates (gender_diverse)
race_ethnicity         BOLD race prompts: asian_american, african_american, european_american,
                       hispanic_latino_american
religion               BOLD religious_ideology prompts: judaism, christianity, islam, hinduism, buddhism,
                       sikhism, atheism
sexual_orientation     HONEST queer_nonqueer templates: queer (queer_orientation, queer) and non_queer
                       (nonqueer_orientation, nonqueer)
nationality, age,      project templates (``data/templates.json``) filled with each group's words
disability
=====================  ==========================================================================================

HONEST templates end in a ``[M]`` mask; the text before it is the prompt ("The woman worked as a"). HONEST identities
listed under both binary categories (the English rendering of gender-neutral words such as "the child") are left out.
"""

from __future__ import annotations

import csv
import functools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workers.ml.audit.benchmark_data import benchmark_file
from workers.ml.audit.stats import derived_seed

CATEGORIES = (
    "gender",
    "race_ethnicity",
    "religion",
    "nationality",
    "age",
    "disability",
    "sexual_orientation",
)
DATA_DIR = Path(__file__).resolve().parent / "data"
TEMPLATES_FILE = DATA_DIR / "templates.json"
GROUP_TERMS_FILE = DATA_DIR / "group_terms.json"
COUNTERFACTUAL_PAIRS_FILE = DATA_DIR / "counterfactual_pairs.json"
TEMPLATE_CATEGORIES = ("nationality", "age", "disability")

_BOLD_FILES = {
    "gender": "data/prompts/gender_prompt.json",
    "race_ethnicity": "data/prompts/race_prompt.json",
    "religion": "data/prompts/religious_ideology_prompt.json",
}
_BOLD_GROUPS = {
    "gender": {"American_actresses": "female", "American_actors": "male"},
    "race_ethnicity": {
        "Asian_Americans": "asian_american",
        "African_Americans": "african_american",
        "European_Americans": "european_american",
        "Hispanic_and_Latino_Americans": "hispanic_latino_american",
    },
    # BOLD's religion keys are already lowercase group names.
    "religion": {
        name: name for name in ("judaism", "christianity", "islam", "hinduism", "buddhism", "sikhism", "atheism")
    },
}
_HONEST_FILES = {"binary": "data/binary/en_template.tsv", "queer_nonqueer": "data/queer_nonqueer/en_template.tsv"}
# HONEST category -> (audit category, group). Pronoun templates ("They has earned...") are ungrammatical in English
# and cisgender-only templates have no counterpart group, so both are left out.
_HONEST_GROUPS = {
    "binary": {"female": ("gender", "female"), "male": ("gender", "male")},
    "queer_nonqueer": {
        "queer_gender": ("gender", "gender_diverse"),
        "queer_gender_xenogender": ("gender", "gender_diverse"),
        "queer_orientation": ("sexual_orientation", "queer"),
        "queer": ("sexual_orientation", "queer"),
        "nonqueer_orientation": ("sexual_orientation", "non_queer"),
        "nonqueer": ("sexual_orientation", "non_queer"),
    },
}
_CROWS_BIAS_TYPES = {
    "gender": "gender",
    "race-color": "race_ethnicity",
    "religion": "religion",
    "nationality": "nationality",
    "age": "age",
    "disability": "disability",
    "sexual-orientation": "sexual_orientation",
}


@dataclass(frozen=True)
class SentencePair:
    """One CrowS-Pairs pair: the same sentence about two groups."""

    more_stereotyping: str
    """``sent_more``: the sentence that is more stereotyping (of a disadvantaged group, or in the stereotype's
    direction)."""
    less_stereotyping: str
    """``sent_less``: the minimally edited sentence about the contrasting group."""
    direction: str
    """``"stereo"`` or ``"antistereo"``, as annotated."""
    bias_type: str
    """CrowS-Pairs' own bias type (``race-color``, ``gender``...)."""


def check_categories(categories: Iterable[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(categories))
    unknown = [category for category in chosen if category not in CATEGORIES]
    if unknown or not chosen:
        raise ValueError(f"Unknown or no audit categories {unknown}; choose from: {', '.join(CATEGORIES)}.")
    return chosen


@functools.cache
def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _add(prompts: dict[str, dict[str, list[str]]], category: str, group: str, prompt: str) -> None:
    prompt = " ".join(prompt.split())
    if prompt:
        prompts.setdefault(category, {}).setdefault(group, []).append(prompt)


def _bold_prompts(data_dir: Path | None, category: str, into: dict[str, dict[str, list[str]]]) -> None:
    prompts_by_key = json.loads(benchmark_file(data_dir, "bold", _BOLD_FILES[category]).read_text(encoding="utf-8"))
    for key, group in _BOLD_GROUPS[category].items():
        for person_prompts in prompts_by_key.get(key, {}).values():
            for prompt in person_prompts:
                _add(into, category, group, prompt)


def _honest_prompts(data_dir: Path | None, wanted: Sequence[str], into: dict[str, dict[str, list[str]]]) -> None:
    for subset, groups in _HONEST_GROUPS.items():
        if not any(category in wanted for category, _ in groups.values()):
            continue
        with benchmark_file(data_dir, "honest", _HONEST_FILES[subset]).open(encoding="utf-8", newline="") as file:
            rows = list(csv.DictReader(file, delimiter="\t"))
        categories_of_identity: dict[str, set[str]] = {}
        for row in rows:
            categories_of_identity.setdefault(row["identity"], set()).add(row["category"])
        for row in rows:
            target = groups.get(row["category"])
            if target is None or target[0] not in wanted or len(categories_of_identity[row["identity"]]) > 1:
                continue
            before_mask = row["template_masked"].split("[M]", 1)[0].strip()
            _add(into, target[0], target[1], before_mask[:1].upper() + before_mask[1:])


def _template_prompts(category: str, into: dict[str, dict[str, list[str]]]) -> None:
    spec = _read_json(TEMPLATES_FILE)
    for group, words in spec["categories"][category].items():
        for template in spec["templates"]:
            for word in words:
                _add(into, category, group, template.format(group=word))


def all_prompts(
    categories: Iterable[str] = CATEGORIES, data_dir: Path | str | None = None
) -> dict[str, dict[str, list[str]]]:
    """Every prompt of each category, by group, in file order (duplicates removed)."""
    wanted = check_categories(categories)
    folder = Path(data_dir) if data_dir is not None else None
    prompts: dict[str, dict[str, list[str]]] = {}
    for category in wanted:
        if category in _BOLD_FILES:
            _bold_prompts(folder, category, prompts)
        if category in TEMPLATE_CATEGORIES:
            _template_prompts(category, prompts)
    if {"gender", "sexual_orientation"} & set(wanted):
        _honest_prompts(folder, wanted, prompts)
    return {
        category: {group: list(dict.fromkeys(prompts[category][group])) for group in sorted(prompts.get(category, {}))}
        for category in wanted
    }


def _sample(population: int, size: int, seed: int, *names: str) -> list[int]:
    """``size`` of ``range(population)``, chosen by a seed derived from ``names``, in increasing order."""
    generator = np.random.default_rng(derived_seed(seed, *names))
    return sorted(int(index) for index in generator.permutation(population)[:size])


def prompt_sets(
    categories: Iterable[str] = CATEGORIES,
    max_per_group: int = 20,
    seed: int = 0,
    data_dir: Path | str | None = None,
) -> dict[str, dict[str, list[str]]]:
    """A deterministic sample of at most ``max_per_group`` prompts per group: ``{category: {group: [prompt]}}``.

    The sample of a group depends only on the seed, the category and the group (not on which other categories
    are asked for); prompts keep their file order.
    """
    if type(max_per_group) is not int or max_per_group < 1:
        raise ValueError(f"max_per_group must be a positive integer; got {max_per_group!r}.")
    sets: dict[str, dict[str, list[str]]] = {}
    for category, groups in all_prompts(categories, data_dir).items():
        sets[category] = {}
        for group, prompts in groups.items():
            if len(prompts) > max_per_group:
                prompts = [prompts[index] for index in _sample(len(prompts), max_per_group, seed, category, group)]
            sets[category][group] = prompts
    return sets


def crows_pairs(
    categories: Iterable[str] = CATEGORIES,
    max_per_category: int = 100,
    seed: int = 0,
    data_dir: Path | str | None = None,
) -> dict[str, list[SentencePair]]:
    """A deterministic sample of at most ``max_per_category`` CrowS-Pairs pairs per audit category."""
    wanted = check_categories(categories)
    if type(max_per_category) is not int or max_per_category < 1:
        raise ValueError(f"max_per_category must be a positive integer; got {max_per_category!r}.")
    path = benchmark_file(
        Path(data_dir) if data_dir is not None else None, "crows_pairs", "data/crows_pairs_anonymized.csv"
    )
    by_category: dict[str, list[SentencePair]] = {category: [] for category in wanted}
    with path.open(encoding="utf-8", newline="") as file:
        for row in csv.DictReader(file):
            category = _CROWS_BIAS_TYPES.get(row["bias_type"])
            if category in by_category:
                by_category[category].append(
                    SentencePair(
                        row["sent_more"].strip(), row["sent_less"].strip(), row["stereo_antistereo"], row["bias_type"]
                    )
                )
    for category, pairs in by_category.items():
        if len(pairs) > max_per_category:
            chosen = _sample(len(pairs), max_per_category, seed, "crows", category)
            by_category[category] = [pairs[index] for index in chosen]
    return by_category


def group_terms(categories: Iterable[str] = CATEGORIES) -> dict[str, dict[str, list[str]]]:
    """The words that mark a text as mentioning each group (``data/group_terms.json``), per category."""
    terms = _read_json(GROUP_TERMS_FILE)["categories"]
    return {
        category: {group: list(words) for group, words in terms[category].items()}
        for category in check_categories(categories)
    }


@functools.cache
def _term_matcher(category: str) -> tuple[re.Pattern[str], dict[str, frozenset[str]]]:
    """One pattern for all of a category's terms (longest first) and, per normalised term, its groups."""
    groups_of: dict[str, set[str]] = {}
    for group, terms in group_terms([category])[category].items():
        for term in terms:
            groups_of.setdefault(" ".join(term.lower().split()), set()).add(group)
    alternatives = sorted(groups_of, key=lambda term: (-len(term), term))
    body = "|".join(re.escape(term).replace(r"\ ", r"\s+") for term in alternatives)
    pattern = re.compile(rf"(?<![\w-])(?:{body})(?![\w-])", re.IGNORECASE)
    return pattern, {term: frozenset(groups) for term, groups in groups_of.items()}


def groups_mentioned(texts: Sequence[str], categories: Iterable[str] = CATEGORIES) -> dict[str, list[list[str]]]:
    """For each category, the groups each text mentions (by ``data/group_terms.json``), sorted, per text."""
    mentioned: dict[str, list[list[str]]] = {}
    for category in check_categories(categories):
        pattern, groups_of = _term_matcher(category)
        per_text = []
        for text in texts:
            found: set[str] = set()
            for match in pattern.finditer(text):
                found |= groups_of[" ".join(match.group(0).lower().split())]
            per_text.append(sorted(found))
        mentioned[category] = per_text
    return mentioned


def counterfactual_pairs() -> list[tuple[str, str]]:
    """The gendered word pairs swapped for counterfactual classifier inputs (``data/counterfactual_pairs.json``)."""
    return [(first, second) for first, second in _read_json(COUNTERFACTUAL_PAIRS_FILE)["pairs"]]


def project_sources() -> dict[str, Any]:
    """The project-written data files, for the audit's ``sources``."""
    licence = "Project-authored (Tunehouse), under the project's own licence"
    return {
        "templates": {
            "name": "Tunehouse prompt templates",
            "files": ["workers/ml/audit/data/templates.json"],
            "licence": licence,
        },
        "group_terms": {
            "name": "Tunehouse group term lists",
            "files": ["workers/ml/audit/data/group_terms.json"],
            "licence": licence,
        },
        "counterfactual_pairs": {
            "name": "Tunehouse gendered word pairs",
            "files": ["workers/ml/audit/data/counterfactual_pairs.json"],
            "licence": licence,
        },
    }
