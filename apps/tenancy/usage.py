"""What a tenant uses and may use: storage, jobs by status, trained tokens, training time and its effective limits.

Read-only aggregates for the dashboard (home and settings), each served by an index of the tenant's rows: jobs by
status from (tenant, status, ...), this month's figures from (tenant, finished_at). Only the all-time token total
reads every job of the tenant, so only the settings page asks for it."""

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Count, DurationField, ExpressionWrapper, F, Q, Sum
from django.utils import timezone

from apps.datasets.models import File, FileStatus
from apps.datasets.services import max_upload_bytes
from apps.jobs.models import FineTuningJob, JobStatus
from apps.tenancy.models import Tenant

# The statuses of work that is not finished, in the order a job passes through them.
ACTIVE_JOB_STATUSES = (JobStatus.RUNNING, JobStatus.PAUSED, JobStatus.QUEUED, JobStatus.VALIDATING_FILES)


@dataclass(frozen=True)
class TenantUsage:
    storage_bytes: int
    file_count: int
    files_processing: int
    jobs_by_status: dict[str, int] = field(default_factory=dict)
    trained_tokens_this_month: int = 0
    trained_tokens_all_time: int | None = None  # None unless asked for (with_all_time)
    training_time_this_month: timedelta = timedelta(0)
    month_start: datetime | None = None

    @property
    def job_count(self) -> int:
        return sum(self.jobs_by_status.values())

    @property
    def training_hours_this_month(self) -> float:
        return self.training_time_this_month.total_seconds() / 3600

    @property
    def is_empty(self) -> bool:
        return self.file_count == 0 and self.job_count == 0


@dataclass(frozen=True)
class TenantLimits:
    max_upload_bytes: int
    max_upload_bytes_is_override: bool
    max_running_jobs: int
    max_running_jobs_is_override: bool


def month_start(now: datetime | None = None) -> datetime:
    """Midnight of the first day of the current month, in the server's time zone (settings.TIME_ZONE)."""
    local = timezone.localtime(now or timezone.now())
    return local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def tenant_usage(*, tenant: Tenant, now: datetime | None = None, with_all_time: bool = False) -> TenantUsage:
    """`with_all_time` adds the all-time token total, which reads every job of the tenant (the settings page)."""
    since = month_start(now)
    files = File.objects.for_tenant(tenant).aggregate(
        storage_bytes=Sum("bytes", default=0),
        file_count=Count("id"),
        files_processing=Count("id", filter=Q(status=FileStatus.UPLOADED)),
    )
    jobs = FineTuningJob.objects.for_tenant(tenant).order_by()
    by_status = {row["status"]: row["count"] for row in jobs.values("status").annotate(count=Count("id"))}
    # Tokens and training time count when a job finishes (finished_at), so a month's figures never change later.
    training_time = ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())
    this_month = jobs.filter(finished_at__gte=since).aggregate(
        tokens=Sum("trained_tokens", default=0),
        training_time=Sum(training_time, filter=Q(started_at__isnull=False)),
    )
    all_time_tokens = jobs.aggregate(tokens=Sum("trained_tokens", default=0))["tokens"] if with_all_time else None
    return TenantUsage(
        storage_bytes=files["storage_bytes"],
        file_count=files["file_count"],
        files_processing=files["files_processing"],
        jobs_by_status={status: by_status[status] for status in JobStatus.values if by_status.get(status)},
        trained_tokens_this_month=this_month["tokens"],
        trained_tokens_all_time=all_time_tokens,
        training_time_this_month=this_month["training_time"] or timedelta(0),
        month_start=since,
    )


def tenant_limits(*, tenant: Tenant) -> TenantLimits:
    """The limits in force: the tenant's own override where an operator set one, else the platform default."""
    return TenantLimits(
        max_upload_bytes=max_upload_bytes(tenant),
        max_upload_bytes_is_override=bool(tenant.max_upload_bytes),
        # The rule jobs dispatch enforces: 0 is a real limit (jobs wait), None means the platform default.
        max_running_jobs=(
            tenant.max_running_jobs if tenant.max_running_jobs is not None else settings.MAX_RUNNING_JOBS_PER_TENANT
        ),
        max_running_jobs_is_override=tenant.max_running_jobs is not None,
    )
