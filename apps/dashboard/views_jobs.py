"""One job's page and the comparison of several runs."""

from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import render

from apps.dashboard.access import require_tenant, tenant_object_or_404
from apps.jobs.selectors import job_get
from apps.jobs.serialization import job_to_json


@login_required
def job_detail(request, public_id: str):
    job = tenant_object_or_404(request, job_get, public_id, "job")
    return render(request, "dashboard/job_detail.html", {"job": job, "job_json": job_to_json(job)})


@login_required
def compare(request):
    tenant = require_tenant(request).tenant
    jobs = []
    for public_id in filter(None, request.GET.get("jobs", "").split(",")):
        job = job_get(tenant=tenant, public_id=public_id.strip())
        if job is None:
            raise Http404("No such job.")
        jobs.append(job)
    return render(request, "dashboard/compare.html", {"jobs": jobs})
