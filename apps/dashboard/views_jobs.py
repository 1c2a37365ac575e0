"""One job's page and the comparison of several runs.

Both pages render only what is small and bounded (the job row, its status changes, its checkpoints); the event log
and the metric curves, which grow with the run, are fetched by the page's script from the same REST API the SDK
uses, so a job with 100k events opens as fast as a new one."""

from django.contrib.auth.decorators import login_required
from django.core.exceptions import ObjectDoesNotExist
from django.http import Http404
from django.shortcuts import render

from apps.dashboard.access import require_tenant, tenant_object_or_404
from apps.dashboard.views_audits import job_audit_card
from apps.jobs.selectors import (
    files_evaluable,
    job_checkpoints_newest_first,
    job_get,
    job_latest_samples,
    job_status_history,
    job_training_samples,
    jobs_comparison_rows,
    jobs_recent,
)
from apps.jobs.serialization import checkpoint_to_json, job_to_json

# Enough to compare a sweep's interesting runs; beyond it the table and the overlaid charts stop being readable.
MAX_COMPARED_JOBS = 10
CHECKPOINTS_SHOWN = 20
PICKER_JOBS = 50


@login_required
def job_detail(request, public_id: str):
    job = tenant_object_or_404(request, job_get, public_id, "job")
    return job_page(request, job)


def job_page(request, job, *, audit_form: dict | None = None, status: int = 200):
    """The job's page; the audit card's form (views_audits) renders it again with a refused run's input and error."""
    checkpoints = [
        {**checkpoint_to_json(checkpoint), "saved_at": checkpoint.created_at}
        for checkpoint in job_checkpoints_newest_first(job=job, limit=CHECKPOINTS_SHOWN)
    ]
    context = {
        "job": job,
        "job_json": job_to_json(job),
        "status_history": job_status_history(job=job),
        "checkpoints": checkpoints,
        **_samples(job),
        # Listed even before the job succeeds: the form appears live, without a reload, when it does.
        "evaluation_files": files_evaluable(tenant=job.tenant),
        "study_trial": _study_trial(job),
        **job_audit_card(request, job, form=audit_form),
    }
    return render(request, "dashboard/job_detail.html", context, status=status)


def _study_trial(job):
    """The hyperparameter-study trial this job ran for, or None for a job started on its own."""
    try:
        return job.study_trial
    except ObjectDoesNotExist:
        return None


def _samples(job) -> dict:
    """The page's sample predictions: the newest evaluation's, else the training run's own final ones."""
    evaluation = job_latest_samples(job=job)
    if evaluation is not None:
        return {"samples": evaluation.samples, "samples_evaluation": evaluation}
    return {"samples": job_training_samples(job=job), "samples_evaluation": None}


def _requested_job_ids(raw: str) -> list[str]:
    """`?jobs=a,b` or `?jobs=a&jobs=b` (the picker's checkboxes), in order, each once."""
    ids: list[str] = []
    for part in raw:
        for public_id in part.split(","):
            if (public_id := public_id.strip()) and public_id not in ids:
                ids.append(public_id)
    return ids


@login_required
def compare(request):
    tenant = require_tenant(request).tenant
    requested = _requested_job_ids(request.GET.getlist("jobs"))
    too_many = len(requested) > MAX_COMPARED_JOBS
    jobs = []
    for public_id in requested[:MAX_COMPARED_JOBS]:
        job = job_get(tenant=tenant, public_id=public_id)
        if job is None:
            raise Http404("No such job.")
        jobs.append(job)
    context = {
        "jobs": jobs,
        "rows": jobs_comparison_rows(jobs=jobs) if jobs else [],
        # The runs being compared stay ticked in the picker even when they are older than the 50 listed.
        "picker_jobs": jobs + [job for job in jobs_recent(tenant=tenant, limit=PICKER_JOBS) if job not in jobs],
        "selected_ids": [job.public_id for job in jobs],
        "too_many": too_many,
        "requested_count": len(requested),
        "max_compared": MAX_COMPARED_JOBS,
        "chart_jobs": [{"id": job.public_id, "label": _trace_label(job)} for job in jobs],
    }
    return render(request, "dashboard/compare.html", context)


def _trace_label(job) -> str:
    return f"{job.public_id} ({job.suffix})" if job.suffix else job.public_id
