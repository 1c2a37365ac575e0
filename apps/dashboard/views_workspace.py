"""The tenant's workspace pages: home, datasets, the job list and team settings.

Parts of these pages refresh themselves with htmx: a request from htmx that targets one of those parts gets only
that part's partial template back (the same view, the same selectors), any other request gets the whole page."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.db.models import Q, QuerySet
from django.db.models.fields.json import KeyTransform
from django.http import Http404
from django.shortcuts import redirect, render
from django.utils.cache import patch_vary_headers

from apps.dashboard.access import require_tenant
from apps.dashboard.views_audits import audit_policy_card
from apps.datasets.models import FileStatus
from apps.datasets.selectors import file_list
from apps.endpoints.limits import tenant_inference_limits
from apps.jobs.models import FineTuningJob, JobStatus
from apps.jobs.selectors import job_list
from apps.tenancy.models import Membership, Role
from apps.tenancy.selectors import memberships_for_tenant
from apps.tenancy.services import membership_add_by_email, membership_change_role, membership_remove
from apps.tenancy.usage import ACTIVE_JOB_STATUSES, tenant_limits, tenant_usage

RECENT_JOBS_ON_HOME = 10
# Running work beyond this is one click away on the jobs page (filtered by status).
ACTIVE_JOBS_ON_HOME = 20
FILES_SHOWN = 100
JOBS_PER_PAGE = 25
SEARCH_MAX_CHARS = 100
# What a row of a job table shows; the job's files, hyperparameters and metrics stay in the database.
JOB_ROW_FIELDS = (
    "public_id",
    "model",
    "suffix",
    "status",
    "phase",
    "steps_completed",
    "total_steps",
    "created_at",
    "started_at",
    "finished_at",
)


def _job_rows(jobs: QuerySet[FineTuningJob]) -> QuerySet[FineTuningJob]:
    return jobs.select_related(None).only(*JOB_ROW_FIELDS)


def _wants_part(request, part_id: str) -> bool:
    """True for an htmx request aimed at the element `part_id`; a history restore (back button without a cached
    snapshot) asks for the whole page even though it comes from htmx."""
    htmx = request.htmx
    return bool(htmx) and not htmx.history_restore_request and htmx.target == part_id


def _render_page_or_part(request, *, page: str, part: str, part_id: str, context: dict):
    response = render(request, part if _wants_part(request, part_id) else page, context)
    # The same URL answers a page or a part: caches must keep them apart.
    patch_vary_headers(response, ("HX-Request", "HX-Target"))
    return response


@login_required
def home(request):
    tenant = require_tenant(request).tenant
    active_jobs = _job_rows(job_list(tenant=tenant).filter(status__in=ACTIVE_JOB_STATUSES))
    context = {"active_jobs": list(active_jobs[:ACTIVE_JOBS_ON_HOME])}
    if not _wants_part(request, "running-work"):
        context.update(
            recent_jobs=_job_rows(job_list(tenant=tenant))[:RECENT_JOBS_ON_HOME],
            usage=tenant_usage(tenant=tenant),
        )
    return _render_page_or_part(
        request,
        page="dashboard/home.html",
        part="dashboard/_running_work.html",
        part_id="running-work",
        context=context,
    )


@login_required
def datasets(request):
    tenant = require_tenant(request).tenant
    files = file_list(tenant=tenant)
    # The report can hold thousands of per-line errors; the list needs only its example count.
    rows = files.defer("validation_report").annotate(examples=KeyTransform("rows", "validation_report"))
    shown = list(rows[:FILES_SHOWN])
    context = {
        "files": shown,
        "file_count": files.count() if len(shown) == FILES_SHOWN else len(shown),
        "any_processing": any(file.status == FileStatus.UPLOADED for file in shown),
        "limits": tenant_limits(tenant=tenant),
    }
    return _render_page_or_part(
        request, page="dashboard/datasets.html", part="dashboard/_file_rows.html", part_id="file-list", context=context
    )


@login_required
def jobs(request):
    tenant = require_tenant(request).tenant
    status = request.GET.get("status", "")
    if status not in JobStatus.values:
        status = ""
    search = request.GET.get("q", "").strip()[:SEARCH_MAX_CHARS]
    rows = _job_rows(job_list(tenant=tenant))
    if status:
        rows = rows.filter(status=status)
    if search:
        rows = rows.filter(Q(public_id__icontains=search) | Q(model__icontains=search) | Q(suffix__icontains=search))
    # Page numbers: one COUNT over an indexed filter, then one page of rows; never the whole list.
    paginator = Paginator(rows, JOBS_PER_PAGE)
    page_number = request.GET.get("page")
    page = paginator.get_page(paginator.num_pages if page_number == "last" else page_number)
    context = {
        "page": page,
        "status": status,
        "search": search,
        "statuses": JobStatus.values,
        "filtered": bool(status or search),
    }
    return _render_page_or_part(
        request, page="dashboard/jobs.html", part="dashboard/_job_rows.html", part_id="job-list", context=context
    )


def _membership_id(request) -> int:
    try:
        return int(request.POST.get("membership_id", ""))
    except ValueError:
        raise Http404("No such member.") from None


def _change_members(request, context) -> None:
    """One membership change from the settings page; its outcome is told through messages."""
    action = request.POST.get("action")
    tenant, actor = context.tenant, request.user
    if action == "add":
        added = membership_add_by_email(
            tenant=tenant, actor=actor, email=request.POST.get("email", ""), role=request.POST.get("role", "")
        )
        messages.success(request, f"{added.user.username} joined the team as {added.role}.")
    elif action == "change_role":
        changed = membership_change_role(
            tenant=tenant, actor=actor, membership_id=_membership_id(request), role=request.POST.get("role", "")
        )
        messages.success(request, f"{changed.user.username} is now {changed.role}.")
    elif action == "remove":
        membership_remove(tenant=tenant, actor=actor, membership_id=_membership_id(request))
        messages.success(request, "Member removed.")
    else:
        raise Http404("Unknown action.")


@login_required
def settings_page(request):
    context = require_tenant(request)
    if request.method == "POST":
        # Like every write of another tenant's objects: not found, whatever the role.
        if not context.can_manage:
            raise Http404("Only owners and admins manage members.")
        try:
            _change_members(request, context)
        except Membership.DoesNotExist:
            raise Http404("No such member.") from None
        except ValidationError as exc:
            messages.error(request, " ".join(exc.messages))
        except PermissionDenied as exc:
            messages.error(request, str(exc))
        return redirect("dashboard:settings")
    return settings_render(request, context)


def settings_render(request, context, *, audit_policy_form: dict | None = None, status: int = 200):
    """The settings page; the audit-policy card's form (views_audits) renders it again with refused input."""
    return render(
        request,
        "dashboard/settings.html",
        {
            "members": memberships_for_tenant(tenant=context.tenant),
            "roles": Role.choices,
            "can_manage": context.can_manage,
            "is_owner": context.role == Role.OWNER,
            "limits": tenant_limits(tenant=context.tenant),
            "inference_limits": tenant_inference_limits(context.tenant),
            "usage": tenant_usage(tenant=context.tenant, with_all_time=True),
            **audit_policy_card(context, form=audit_policy_form),
        },
        status=status,
    )
