"""Hyperparameter studies in the dashboard: the list, the new-study form, one study's page with its live trial table
and charts, and the two actions a user takes on a study (cancel it, promote its best trial).

Every write goes through apps.tuning.services, whose ApiError sentences are shown on the page as they are (never a
500). The study page renders from apps.tuning.serialization, the same JSON the REST API returns, so the table, the
charts and SDK users always agree; the live part (`_study_trials.html`) is re-fetched by htmx while the study runs
and carries the charts' data with it, so the charts follow the table without a second poll."""

import json
import math
import re

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from apps.catalog.selectors import catalog_list
from apps.core.api.errors import ApiError
from apps.dashboard.access import require_tenant, tenant_object_or_404
from apps.datasets.selectors import file_get
from apps.jobs.selectors import files_trainable
from apps.tuning.models import Direction, PrunerKind, SamplerKind, StudyStatus
from apps.tuning.search_space import MAX_PARAMETERS, PARAMETER_TYPES, SEARCHABLE_HYPERPARAMETERS
from apps.tuning.selectors import studies_of, study_get, trial_counts, trial_get
from apps.tuning.serialization import study_to_json
from apps.tuning.services import study_cancel, study_create, trial_promote
from workers.ml.config import EARLY_STOPPING_METRICS

STUDIES_PER_PAGE = 25
FILES_OFFERED = 100
# How often the live part of a running study's page refreshes itself (trial jobs report every few steps).
POLL_SECONDS = 5
# The search-space rows a new form starts with; "Add a hyperparameter" adds more (up to MAX_PARAMETERS).
STARTING_ROWS = 2
# The base hyperparameters most studies set; anything else goes in the JSON box.
COMMON_HYPERPARAMETERS = ("max_steps", "batch_size", "eval_every_steps")
_ROW_FIELD = re.compile(r"^space-(\d+)-name$")
_WRITE_REFUSED = "Your role in this team can only read: ask an owner or admin for the member role."


# --- list ----------------------------------------------------------------------------------------------------------


@login_required
def studies(request):
    tenant = require_tenant(request).tenant
    # Page numbers like the jobs list: one COUNT, then one page of rows (and a trial count per row on that page).
    paginator = Paginator(studies_of(tenant=tenant), STUDIES_PER_PAGE)
    page = paginator.get_page(request.GET.get("page"))
    rows = []
    for study in page:
        counts = trial_counts(study=study)
        rows.append(
            {
                "study": study,
                # What counts towards n_trials (the service's own rule): complete and pruned trials.
                "finished": counts["complete"] + counts["pruned"],
                "failed": counts["failed"],
                "running": counts["running"],
                "best_value": study.best_trial.value if study.best_trial_id else None,
            }
        )
    return render(request, "dashboard/studies.html", {"page": page, "rows": rows})


# --- new study -----------------------------------------------------------------------------------------------------


class _FormError(Exception):
    """Input the form itself cannot read (not a number, not JSON); shown like the service's errors."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message, self.param = message, param


def _number_or_text(raw: str, *, whole: bool):
    """A number typed in the form: int or float when it reads as one, else the text itself, so the service's own
    sentence names what is wrong with it (blank becomes None: "must be a number")."""
    text = raw.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    if whole and math.isfinite(value) and value == int(value) and re.fullmatch(r"[+-]?\d+(\.0*)?", text):
        return int(value)
    return value


def _whole_or_text(raw: str):
    text = raw.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        return text


def _choice_value(text: str):
    """One comma-separated categorical choice: numbers, true/false and null as JSON reads them, else the text."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if value is None or isinstance(value, bool | int | float) else text


def _space_rows(post) -> list[dict]:
    """The search-space editor's rows as typed, in the order they were added (row numbers may have gaps)."""
    indices = sorted(int(match.group(1)) for key in post if (match := _ROW_FIELD.match(key)))
    rows = []
    for index in indices:
        prefix = f"space-{index}-"
        rows.append(
            {
                "index": index,
                "name": post.get(prefix + "name", "").strip(),
                "type": post.get(prefix + "type", "float"),
                "low": post.get(prefix + "low", ""),
                "high": post.get(prefix + "high", ""),
                "log": bool(post.get(prefix + "log")),
                "step": post.get(prefix + "step", ""),
                "choices": post.get(prefix + "choices", ""),
            }
        )
    return rows


def _search_space(rows: list[dict]) -> dict:
    """The search space in the API's format, from the rows that name a hyperparameter. Only what the form cannot
    read is refused here; ranges, types and choices are the service's to check (its errors name the field)."""
    space: dict = {}
    for row in rows:
        name = row["name"]
        if not name:
            continue
        if name in space:
            raise _FormError(f"search_space: {name} appears in two rows; keep one.", f"search_space.{name}")
        if row["type"] == "categorical":
            choices = [part.strip() for part in row["choices"].split(",") if part.strip()]
            space[name] = {"type": "categorical", "choices": [_choice_value(choice) for choice in choices]}
            continue
        whole = row["type"] == "int"
        spec = {
            "type": row["type"],
            "low": _number_or_text(row["low"], whole=whole),
            "high": _number_or_text(row["high"], whole=whole),
            "log": row["log"],
        }
        if row["step"].strip():
            spec["step"] = _number_or_text(row["step"], whole=whole)
        space[name] = spec
    return space


def _hyperparameters(post) -> dict:
    """The base job's hyperparameters: the JSON box, with the common fields typed above it laid over it."""
    raw = post.get("hyperparameters_json", "").strip()
    base: dict = {}
    if raw:
        try:
            base = json.loads(raw)
        except ValueError as exc:
            raise _FormError(f"Other hyperparameters: not valid JSON ({exc}).", "hyperparameters") from exc
        if not isinstance(base, dict):
            raise _FormError(
                'Other hyperparameters must be a JSON object, like {"learning_rate": 0.001}.', "hyperparameters"
            )
    for name in COMMON_HYPERPARAMETERS:
        value = _whole_or_text(post.get(name, ""))
        if value is not None:
            base[name] = value
    return base


def _budget_seconds(raw: str) -> int | None:
    text = raw.strip()
    if not text:
        return None
    try:
        minutes = float(text)
    except ValueError:
        raise _FormError(
            "GPU-time budget: a number of minutes, or blank for no limit.", "gpu_time_budget_seconds"
        ) from None
    if not math.isfinite(minutes) or minutes <= 0:
        raise _FormError("GPU-time budget: more than 0 minutes, or blank for no limit.", "gpu_time_budget_seconds")
    return max(1, round(minutes * 60))


def _tenant_file(tenant, public_id: str, param: str, *, required: bool):
    if not public_id:
        if required:
            raise _FormError("Pick a training file (upload one under Datasets first).", param)
        return None
    found = file_get(tenant=tenant, public_id=public_id)
    if found is None:
        raise ApiError("No such file.", code="not_found", param=param, status_code=404)
    return found


def _create_from_post(request, tenant):
    post = request.POST
    direction = post.get("direction", "auto")
    return study_create(
        tenant=tenant,
        user=request.user,
        name=post.get("name", "").strip(),
        model=post.get("model", ""),
        training_file=_tenant_file(tenant, post.get("training_file", ""), "training_file", required=True),
        validation_file=_tenant_file(tenant, post.get("validation_file", ""), "validation_file", required=False),
        hyperparameters=_hyperparameters(post),
        search_space=_search_space(_space_rows(post)),
        objective_metric=post.get("objective_metric") or None,
        direction=None if direction == "auto" else direction,
        sampler=post.get("sampler") or None,
        pruner=post.get("pruner") or None,
        n_trials=_whole_or_text(post.get("n_trials", "")),
        max_parallel_trials=_whole_or_text(post.get("max_parallel_trials", "")),
        gpu_time_budget_seconds=_budget_seconds(post.get("gpu_time_budget_minutes", "")),
        seed=_whole_or_text(post.get("seed", "")),
    )


def _blank_rows() -> list[dict]:
    return [
        {"index": index, "name": "", "type": "float", "low": "", "high": "", "log": False, "step": "", "choices": ""}
        for index in range(STARTING_ROWS)
    ]


def _form_context(request, tenant, *, values: dict, rows: list[dict], error: dict | None) -> dict:
    entries = [entry for entry in catalog_list() if entry.status == "ready"]
    requested_model = values.get("model", "")
    # The smallest general-purpose entry by default, like the new-job page.
    model = requested_model if any(entry.model_id == requested_model for entry in entries) else "gpt2-tiny"
    error_param = (error or {}).get("param") or ""
    for row in rows:
        row["invalid"] = bool(row["name"]) and (
            error_param == f"search_space.{row['name']}" or error_param.startswith(f"search_space.{row['name']}.")
        )
    return {
        "catalog": entries,
        "model": model,
        "files": files_trainable(tenant=tenant).filter(status="processed")[:FILES_OFFERED],
        "values": values,
        "rows": rows,
        "next_row": max((row["index"] for row in rows), default=-1) + 1,
        "error": error,
        "error_field": error_param.split(".", 1)[0].split("[", 1)[0],
        "searchable": SEARCHABLE_HYPERPARAMETERS,
        "parameter_types": PARAMETER_TYPES,
        "max_parameters": MAX_PARAMETERS,
        "metrics": EARLY_STOPPING_METRICS,
        "directions": ("auto", *Direction.values),
        "samplers": SamplerKind.values,
        "pruners": PrunerKind.values,
        "common": [
            {"name": name, "value": values.get(name, ""), "invalid": error_param == f"hyperparameters.{name}"}
            for name in COMMON_HYPERPARAMETERS
        ],
        "can_write": require_tenant(request).can_write,
    }


@login_required
def study_new(request):
    context = require_tenant(request)
    tenant = context.tenant
    if request.method != "POST":
        values = {
            "model": request.GET.get("model", ""),
            "training_file": request.GET.get("training_file", ""),
            "sampler": SamplerKind.TPE,
            "pruner": PrunerKind.NONE,
            "objective_metric": "valid_loss",
            "direction": "auto",
            "max_parallel_trials": "1",
            "seed": "0",
        }
        return render(
            request,
            "dashboard/study_new.html",
            _form_context(request, tenant, values=values, rows=_blank_rows(), error=None),
        )
    rows = _space_rows(request.POST) or _blank_rows()
    if not context.can_write:
        error, status = {"message": _WRITE_REFUSED, "param": None}, 403
    else:
        try:
            study = _create_from_post(request, tenant)
        except _FormError as exc:
            error, status = {"message": exc.message, "param": exc.param}, 400
        except ApiError as exc:
            error, status = {"message": str(exc.detail), "param": exc.param}, exc.status_code
        else:
            messages.success(request, f"Study {study.public_id} started: its first trials are being queued.")
            return redirect("dashboard:study-detail", public_id=study.public_id)
    # The form again, as the user filled it in, with the sentence that says what to change.
    values = {key: request.POST.get(key, "") for key in request.POST if not key.startswith("space-")}
    return render(
        request,
        "dashboard/study_new.html",
        _form_context(request, tenant, values=values, rows=rows, error=error),
        status=status,
    )


# --- one study -----------------------------------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _promotable(trial: dict) -> bool:
    # trial_promote's own condition, so the button shows only where pressing it works.
    return trial["state"] == "complete" and trial["job_status"] == "succeeded" and not trial["promoted"]


def _live_context(request, study) -> dict:
    """What the live part shows (status, progress, best trial, trial table) and the charts' data: one
    study_to_json, the REST API's own object."""
    body = study_to_json(study, with_trials=True)
    counts = body["trial_counts"]
    best_id = body["best_trial"]["id"] if body["best_trial"] else None
    used, budget = body["gpu_seconds_used"], body["gpu_time_budget_seconds"]
    return {
        "study": study,
        "body": body,
        "trials": [
            {
                **trial,
                "is_best": trial["id"] == best_id,
                "steps_reported": len(trial["intermediate_values"]),
                "duration": _duration(trial["duration_seconds"]),
                "promotable": _promotable(trial),
            }
            for trial in body["trials"]
        ],
        "best": body["best_trial"],
        "best_id": best_id,
        "best_promotable": bool(body["best_trial"]) and _promotable(body["best_trial"]),
        "finished": counts["complete"] + counts["pruned"],
        "counts": counts,
        "gpu_minutes_used": used / 60,
        "gpu_minutes_budget": budget / 60 if budget else None,
        "budget_percent": min(100, round(100 * used / budget)) if budget else None,
        "running": study.status == StudyStatus.RUNNING,
        "poll_seconds": POLL_SECONDS,
        "can_write": require_tenant(request).can_write,
        "chart_data": {
            "direction": body["objective"]["direction"],
            "metric": body["objective"]["metric"],
            "search_space": body["search_space"],
            "history": body["optimisation_history"],
            "importances": body["param_importances"],
            "trials": [
                {
                    "number": trial["number"],
                    "state": trial["state"],
                    "params": trial["params"],
                    "value": trial["value"],
                    "intermediate_values": trial["intermediate_values"],
                }
                for trial in body["trials"]
            ],
        },
    }


@login_required
def study_detail(request, public_id: str):
    study = tenant_object_or_404(request, study_get, public_id, "study")
    return render(request, "dashboard/study_detail.html", _live_context(request, study))


@login_required
def study_trials(request, public_id: str):
    """The live part alone: what htmx swaps in every few seconds while the study runs."""
    study = tenant_object_or_404(request, study_get, public_id, "study")
    return render(request, "dashboard/_study_trials.html", _live_context(request, study))


@login_required
@require_POST
def cancel_study(request, public_id: str):
    context = require_tenant(request)
    study = tenant_object_or_404(request, study_get, public_id, "study")
    if not context.can_write:
        messages.error(request, _WRITE_REFUSED)
    else:
        try:
            study_cancel(tenant=context.tenant, study=study, user=request.user)
        except ApiError as exc:
            messages.error(request, str(exc.detail))
        else:
            messages.success(request, f"Study {study.public_id} cancelled; its running trials are stopping.")
    return redirect("dashboard:study-detail", public_id=study.public_id)


@login_required
@require_POST
def promote_trial(request, public_id: str, number: int):
    context = require_tenant(request)
    study = tenant_object_or_404(request, study_get, public_id, "study")
    trial = trial_get(study=study, number=number)
    if trial is None:
        raise Http404("No such trial.")
    if not context.can_write:
        messages.error(request, _WRITE_REFUSED)
    else:
        try:
            job = trial_promote(tenant=context.tenant, trial=trial, user=request.user)
        except ApiError as exc:
            messages.error(request, str(exc.detail))
        else:
            messages.success(request, f"Trial {trial.number} promoted: its model is {job.fine_tuned_model}.")
    return redirect("dashboard:study-detail", public_id=study.public_id)
