"""Bias audits of fine-tuned models and their data (Django-free).

``run_audit(AuditSpec(...))`` is the entry point (``workers.ml.audit.audit``); the measures it reports, with their
stable keys, are in ``MEASURES`` (``workers.ml.audit.measures``). The third-party benchmarks it reads are extracted
at install time by ``python -m workers.ml.audit.benchmark_data``.

The names below are imported on first use, so that ``python -m workers.ml.audit.benchmark_data`` (run by
``make install``) does not load torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AuditSpec": "workers.ml.audit.audit",
    "run_audit": "workers.ml.audit.audit",
    "MEASURES": "workers.ml.audit.measures",
    "CATEGORIES": "workers.ml.audit.prompts",
    "prompt_sets": "workers.ml.audit.prompts",
    "generative_audit": "workers.ml.audit.generative",
    "classifier_audit": "workers.ml.audit.classifier",
    "data_audit": "workers.ml.audit.corpus",
    "bootstrap_ci": "workers.ml.audit.stats",
    "paired_bootstrap_ci": "workers.ml.audit.stats",
    "hurtful_rate": "workers.ml.audit.scoring",
    "sentiment": "workers.ml.audit.scoring",
    "swap_group_words": "workers.ml.audit.counterfactual",
    "BenchmarkDataMissing": "workers.ml.audit.benchmark_data",
    "default_data_dir": "workers.ml.audit.benchmark_data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
