"""Starting work: the model catalog and the new-job form with its pre-flight estimate."""

import ast
import dataclasses
import functools
import inspect
import re

from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from apps.catalog.models import EntryKind
from apps.catalog.selectors import catalog_list
from apps.dashboard.access import require_tenant
from apps.jobs.preflight import TARGET_DEVICES
from apps.jobs.selectors import files_trainable
from workers.ml import config as training_config
from workers.ml.config import TrainingConfig

# The form's sections: (title, open by default, fields). Every name is a TrainingConfig field, so the form posts the
# engine's own hyperparameters and the estimate's fixes name the inputs they change.
FORM_SECTIONS = (
    ("Basics", True, ("n_epochs", "max_steps", "batch_size", "auto_batch_size", "learning_rate", "max_length", "seed")),
    (
        "Schedule",
        False,
        ("scheduler", "warmup_steps", "weight_decay", "max_grad_norm", "optimizer", "gradient_accumulation_steps"),
    ),
    ("From scratch", False, ("init", "vocab_size")),
    ("LoRA", False, ("mode", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_export")),
    (
        "Evaluation & early stopping",
        False,
        ("validation_fraction", "eval_every_steps", "early_stopping_metric", "early_stopping_patience"),
    ),
    ("Checkpoints", False, ("checkpoint_every_steps", "checkpoints_kept")),
    ("Precision", False, ("precision",)),
    ("Packing", False, ("packing",)),
)
_CHOICES = {
    "scheduler": training_config.SCHEDULERS,
    "optimizer": training_config.OPTIMIZERS,
    "init": training_config.INIT_SCHEMES,
    "mode": training_config.MODES,
    "lora_export": training_config.LORA_EXPORTS,
    "early_stopping_metric": training_config.EARLY_STOPPING_METRICS,
    "precision": training_config.PRECISIONS,
}
# Left blank in the form: their default depends on the mode (learning rate) or on the model (LoRA targets, mode).
_BLANK_BY_DEFAULT = {"learning_rate", "lora_target_modules", "mode", "early_stopping_metric"}
_BLANK_MEANS = {
    "learning_rate": "blank: the mode's default (3e-3 from scratch, 5e-5 full, 2e-4 LoRA)",
    "lora_target_modules": "blank: the model family's attention projections",
    "mode": "blank: the model's default (from scratch for architectures)",
    "early_stopping_metric": "blank: no early stopping",
}
# Hints stay one line on a wide screen; the full docstrings are in workers/ml/config.py and the API docs.
_HINT_CHARS = 160


@functools.cache
def _field_docs() -> dict[str, str]:
    """The first sentence of each TrainingConfig field's docstring, without reST markup: one line per input."""
    tree = ast.parse(inspect.getsource(TrainingConfig))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            text = " ".join(str(following.value.value).split()).replace("``", "")
            sentence = re.split(r"(?<=\.)\s+(?=[A-Z])", text, maxsplit=1)[0]
            docs[node.target.id] = sentence if len(sentence) <= _HINT_CHARS else _shortened(sentence)
    return docs


def _shortened(sentence: str) -> str:
    return sentence[:_HINT_CHARS].rsplit(" ", 1)[0].rstrip(",;:") + "…"


def _input_kind(name: str, default: object) -> str:
    if name in _CHOICES:
        return "choice"
    if name == "lora_target_modules":
        return "list"
    if isinstance(default, bool):
        return "bool"
    return "int" if isinstance(default, int) else "float"


def _form_sections() -> list[dict]:
    defaults = TrainingConfig(train_file="-", output_dir="-")
    docs = _field_docs()
    fields_by_name = {field.name: field for field in dataclasses.fields(TrainingConfig)}
    sections = []
    for title, open_by_default, names in FORM_SECTIONS:
        fields = []
        for name in names:
            default = fields_by_name[name].default
            default = None if name in _BLANK_BY_DEFAULT else getattr(defaults, name, default)
            fields.append(
                {
                    "name": name,
                    "kind": _input_kind(name, default),
                    "default": "" if default is None else default,
                    "choices": _CHOICES.get(name, ()),
                    "help": docs.get(name, ""),
                    "blank_means": _BLANK_MEANS.get(name, ""),
                }
            )
        sections.append({"title": title, "open": open_by_default, "fields": fields})
    return sections


@login_required
def catalog(request):
    require_tenant(request)
    return render(
        request,
        "dashboard/catalog.html",
        {"catalog": catalog_list(), "pretrained": EntryKind.PRETRAINED},
    )


@login_required
def new_job(request):
    context = require_tenant(request)
    entries = [entry for entry in catalog_list() if entry.status == "ready"]
    requested = request.GET.get("model", "")
    # The smallest general-purpose entry: trains on any text, chat or prompt/completion file in seconds.
    default_model = requested if any(entry.model_id == requested for entry in entries) else "gpt2-tiny"
    return render(
        request,
        "dashboard/job_new.html",
        {
            "trainable_files": files_trainable(tenant=context.tenant)[:50],
            "catalog": entries,
            "sections": _form_sections(),
            "default_model": default_model,
            "target_devices": TARGET_DEVICES,
        },
    )
