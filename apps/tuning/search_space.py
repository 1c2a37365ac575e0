"""The search space of a study: its JSON form checked field by field (every error names the field), and the same
space as Optuna distributions, or as the finite grid a grid search walks.

    {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": true},
     "lora_r": {"type": "int", "low": 4, "high": 32, "step": 4},
     "scheduler": {"type": "categorical", "choices": ["linear", "cosine"]}}
"""

import itertools
import math
from dataclasses import fields

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from apps.core.api.errors import ApiError
from workers.ml.config import TrainingConfig

PARAMETER_TYPES = ("float", "int", "categorical")
MAX_PARAMETERS = 20
MAX_CHOICES = 100
# A grid larger than this is a mistake (or a job for random or TPE search), not a plan.
MAX_GRID_SIZE = 1_000
# Set by the platform for every trial, or fixing what the study is: never searched.
_NOT_SEARCHABLE = frozenset(
    {
        "train_file",
        "train_filename",
        "output_dir",
        "validation_file",
        "validation_filename",
        "checkpoint_dir",
        "tokenized_cache_dir",
        "prepared_data",
        "device",
        "base_model",
        "architecture",
        "task",
        "column_mapping",
        "early_stopping_metric",
    }
)
SEARCHABLE_HYPERPARAMETERS = tuple(
    sorted(field.name for field in fields(TrainingConfig) if field.name not in _NOT_SEARCHABLE)
)


def _error(message: str, param: str) -> ApiError:
    return ApiError(message, code="invalid_search_space", param=param)


def _number(spec: dict, key: str, param: str, *, whole: bool) -> float | int:
    value = spec.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _error(f"{param}.{key} must be a{' whole' if whole else ''} number.", f"{param}.{key}")
    if whole and value != int(value):
        raise _error(f"{param}.{key} must be a whole number for an int parameter.", f"{param}.{key}")
    return int(value) if whole else float(value)


def _checked_parameter(name: str, spec: object) -> dict:
    param = f"search_space.{name}"
    if name not in SEARCHABLE_HYPERPARAMETERS:
        raise _error(
            f"'{name}' is not a hyperparameter a study can search. "
            f"Searchable: {', '.join(SEARCHABLE_HYPERPARAMETERS)}.",
            param,
        )
    if not isinstance(spec, dict):
        raise _error(f"{param} must be an object with a type.", param)
    kind = spec.get("type")
    if kind not in PARAMETER_TYPES:
        raise _error(f"{param}.type must be one of {', '.join(PARAMETER_TYPES)}.", f"{param}.type")
    unknown = set(spec) - {"type", "low", "high", "log", "step", "choices"}
    if unknown:
        raise _error(f"{param} has unknown keys: {', '.join(sorted(unknown))}.", param)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not 1 <= len(choices) <= MAX_CHOICES:
            raise _error(f"{param}.choices must be a list of 1 to {MAX_CHOICES} values.", f"{param}.choices")
        if not all(choice is None or isinstance(choice, str | int | float | bool) for choice in choices):
            raise _error(f"{param}.choices may hold strings, numbers, booleans or null only.", f"{param}.choices")
        if len({repr(choice) for choice in choices}) != len(choices):
            raise _error(f"{param}.choices has the same value twice.", f"{param}.choices")
        return {"type": kind, "choices": choices}
    whole = kind == "int"
    low, high = _number(spec, "low", param, whole=whole), _number(spec, "high", param, whole=whole)
    if low > high:
        raise _error(f"{param}.low must not exceed {param}.high.", f"{param}.low")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise _error(f"{param}.log must be true or false.", f"{param}.log")
    if log and low <= 0:
        raise _error(f"{param}.low must be above 0 on a log scale.", f"{param}.low")
    checked = {"type": kind, "low": low, "high": high, "log": log}
    if spec.get("step") is not None:
        step = _number(spec, "step", param, whole=whole)
        if step <= 0:
            raise _error(f"{param}.step must be above 0.", f"{param}.step")
        if log:
            raise _error(f"{param} cannot have both a step and a log scale (Optuna's rule).", f"{param}.step")
        checked["step"] = step
    elif whole:
        checked["step"] = 1
    return checked


def search_space_checked(search_space: object) -> dict:
    """The search space with its defaults filled in; ApiError (naming the field) for anything malformed."""
    if not isinstance(search_space, dict) or not search_space:
        raise _error("search_space must be an object with at least one hyperparameter.", "search_space")
    if len(search_space) > MAX_PARAMETERS:
        raise _error(f"search_space takes at most {MAX_PARAMETERS} hyperparameters.", "search_space")
    return {name: _checked_parameter(name, spec) for name, spec in search_space.items()}


def extreme_values(spec: dict) -> list:
    """The values of a parameter that, if the training config accepts them, prove every value in between valid."""
    if spec["type"] == "categorical":
        return list(spec["choices"])
    return [spec["low"], spec["high"]]


def distributions_of(search_space: dict) -> dict[str, BaseDistribution]:
    distributions: dict[str, BaseDistribution] = {}
    for name, spec in search_space.items():
        if spec["type"] == "categorical":
            distributions[name] = CategoricalDistribution(spec["choices"])
        elif spec["type"] == "int":
            distributions[name] = IntDistribution(spec["low"], spec["high"], log=spec["log"], step=spec.get("step", 1))
        else:
            distributions[name] = FloatDistribution(spec["low"], spec["high"], log=spec["log"], step=spec.get("step"))
    return distributions


def grid_values(name: str, spec: dict) -> list:
    """The values a grid search tries for one parameter: the choices, or low..high by step."""
    if spec["type"] == "categorical":
        return list(spec["choices"])
    step = spec.get("step")
    if step is None:
        raise _error(
            f"A grid search needs a finite set of values: give search_space.{name} a step, or make it categorical.",
            f"search_space.{name}.step",
        )
    count = int(math.floor((spec["high"] - spec["low"]) / step + 1e-9)) + 1
    if count > MAX_CHOICES:
        raise _error(f"search_space.{name} has {count} grid values; at most {MAX_CHOICES}.", f"search_space.{name}")
    values = [spec["low"] + index * step for index in range(count)]
    return [int(value) for value in values] if spec["type"] == "int" else [round(value, 12) for value in values]


def grid_of(search_space: dict) -> dict[str, list]:
    grid = {name: grid_values(name, spec) for name, spec in search_space.items()}
    size = math.prod(len(values) for values in grid.values())
    if size > MAX_GRID_SIZE:
        raise _error(f"The grid has {size:,} combinations; at most {MAX_GRID_SIZE:,}.", "search_space")
    return grid


def grid_combinations(grid: dict[str, list]) -> list[dict]:
    names = list(grid)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(grid[name] for name in names))]
