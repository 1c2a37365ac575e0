"""Starting work: the model catalog and the new-job form."""

from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from apps.catalog.selectors import catalog_list
from apps.dashboard.access import require_tenant
from apps.jobs.selectors import files_trainable
from workers.ml.config import TrainingConfig


def _hyperparameter_fields() -> list[dict]:
    """The tunable fields of the training config with their defaults, for the new-job form."""
    defaults = TrainingConfig(train_file="-", output_dir="-")
    # learning_rate is left blank: its default depends on the mode (from scratch, full or LoRA).
    shown = ["n_epochs", "max_steps", "batch_size", "learning_rate", "max_length", "vocab_size", "seed"]
    return [{"name": name, "default": "" if name == "learning_rate" else getattr(defaults, name)} for name in shown]


@login_required
def catalog(request):
    require_tenant(request)
    return render(request, "dashboard/catalog.html", {"catalog": catalog_list()})


@login_required
def new_job(request):
    context = require_tenant(request)
    return render(
        request,
        "dashboard/job_new.html",
        {
            "trainable_files": files_trainable(tenant=context.tenant)[:50],
            "catalog": [entry for entry in catalog_list() if entry.status == "ready"],
            "hyperparameters": _hyperparameter_fields(),
            # The smallest general-purpose entry: trains on any text, chat or prompt/completion file in seconds.
            "default_model": "gpt2-tiny",
        },
    )
