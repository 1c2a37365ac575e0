"""One entry point for a bias audit: ``run_audit(AuditSpec(...))`` -> a JSON-able result dict.

The result::

    {"kind": "generative" | "classifier", "version": 1, "reference": bool,
     "measures": {key: measure},       # flat; keys and meanings in MEASURES (workers.ml.audit.measures)
     "tables": {attribute: {"model": {...}, "reference": {...} | None}},   # classifier per-group MetricFrame rows
     "worst_examples": [...],          # generative: hurtful / most negative continuations (<= 10 per category);
                                       # classifier: inputs whose prediction flipped when group words were swapped
     "data": data_audit(...) | None,   # when the spec has training_texts
     "sources": {...},                 # the data sets and word lists used, with their licences
     "settings": {...}}                # the values the audit ran with

Every number is a finite float or None (with a ``reason``); the same spec gives the same dict, byte for byte, on
the same machine (timings are not in it: a caller's ``progress`` callback sees the work as it goes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.ml.audit.classifier import classifier_audit
from workers.ml.audit.corpus import data_audit
from workers.ml.audit.generative import Progress, generative_audit
from workers.ml.audit.measures import CLASSIFIER, GENERATIVE, MEASURES
from workers.ml.audit.prompts import CATEGORIES, check_categories, project_sources
from workers.ml.audit.stats import DEFAULT_SAMPLES

RESULT_VERSION = 1
KINDS = (GENERATIVE, CLASSIFIER)


@dataclass(frozen=True)
class AuditSpec:
    """What to audit and how."""

    kind: str
    """``"generative"`` (a causal LM: continuations and CrowS-Pairs) or ``"classifier"`` (a sequence classifier)."""
    model_dir: str | Path
    """The model folder to audit (safetensors; a plain folder or a LoRA adapter folder the trainer exported)."""
    reference_dir: str | Path | None = None
    """A model to compare with, typically the base model; deltas are model - reference. None: absolute values only."""
    categories: Sequence[str] = CATEGORIES
    """Audit categories: gender, race_ethnicity, religion, nationality, age, disability, sexual_orientation."""
    max_prompts_per_group: int = 20
    """Generative: prompts sampled per group (CrowS-Pairs pairs per category: 5 times this)."""
    max_new_tokens: int = 20
    """Generative: tokens generated per continuation."""
    seed: int = 0
    """Seeds prompt sampling, sampling decoding (if any) and the bootstrap."""
    bootstrap_samples: int = DEFAULT_SAMPLES
    """Bootstrap replicates for every confidence interval (95%)."""
    examples: Sequence[dict[str, Any]] | None = None
    """Classifier: labelled examples ``{"text", "label", "group"?}`` to predict (see ``classifier``)."""
    training_texts: Sequence[str] | None = None
    """Texts of the training data, for the data audit (group mentions); None skips it."""
    training_labels: Sequence[Any] | None = None
    """Labels of ``training_texts`` (same order), for label distributions per group."""
    data_dir: str | Path | None = None
    """Where the extracted benchmarks are (default: ``benchmark_data.default_data_dir()``, filled by make install)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}.")
        check_categories(self.categories)
        if self.kind == CLASSIFIER and not self.examples:
            raise ValueError("A classifier audit needs examples ({'text', 'label', 'group'?}).")
        if self.training_labels is not None and (
            self.training_texts is None or len(self.training_labels) != len(self.training_texts)
        ):
            raise ValueError("training_labels must pair up with training_texts.")


def run_audit(spec: AuditSpec, *, progress: Progress | None = None, device: str = "auto") -> dict[str, Any]:
    """Run the audit ``spec`` describes and return its JSON-able result (see the module docstring)."""
    categories = tuple(check_categories(spec.categories))
    if spec.kind == GENERATIVE:
        result = generative_audit(
            spec.model_dir,
            spec.reference_dir,
            categories,
            max_prompts_per_group=spec.max_prompts_per_group,
            max_new_tokens=spec.max_new_tokens,
            seed=spec.seed,
            bootstrap_samples=spec.bootstrap_samples,
            data_dir=spec.data_dir,
            device=device,
            progress=progress,
        )
    else:
        result = classifier_audit(
            spec.model_dir,
            spec.reference_dir,
            list(spec.examples or []),
            categories=categories,
            seed=spec.seed,
            bootstrap_samples=spec.bootstrap_samples,
            device=device,
            progress=progress,
        )
    if spec.training_texts is not None:
        result["data"] = data_audit(
            spec.training_texts,
            spec.training_labels,
            categories,
            positive_label=result["settings"].get("positive_label"),
        )
        result["sources"].setdefault("group_terms", project_sources()["group_terms"])
    result["version"] = RESULT_VERSION
    result["settings"]["spec"] = _spec_settings(spec)
    return result


def _spec_settings(spec: AuditSpec) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for field in dataclasses.fields(spec):
        value = getattr(spec, field.name)
        if field.name in {"examples", "training_texts", "training_labels"}:
            settings[field.name] = len(value) if value is not None else None
        elif isinstance(value, Path):
            settings[field.name] = str(value)
        elif isinstance(value, tuple | list):
            settings[field.name] = list(value)
        else:
            settings[field.name] = value
    return settings


__all__ = ["MEASURES", "AuditSpec", "run_audit"]
