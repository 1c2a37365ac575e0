"""The tenant's workspace pages: home, datasets, the job list and team settings."""

from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from apps.dashboard.access import require_tenant
from apps.datasets.selectors import file_list
from apps.jobs.selectors import job_list


@login_required
def home(request):
    context = require_tenant(request)
    return render(
        request,
        "dashboard/home.html",
        {"files": file_list(tenant=context.tenant)[:50], "jobs": job_list(tenant=context.tenant)[:50]},
    )


@login_required
def datasets(request):
    context = require_tenant(request)
    return render(request, "dashboard/home.html", {"files": file_list(tenant=context.tenant)[:50], "jobs": []})


@login_required
def jobs(request):
    context = require_tenant(request)
    return render(request, "dashboard/home.html", {"files": [], "jobs": job_list(tenant=context.tenant)[:50]})


@login_required
def settings_page(request):
    require_tenant(request)
    return render(request, "dashboard/home.html", {"files": [], "jobs": []})
