from django.db.models import Q, QuerySet

from apps.datasets.models import File
from apps.tenancy.models import Tenant

from .models import FineTuningJob, JobCheckpoint, JobEvent, ModelEvaluation


def job_list(*, tenant: Tenant) -> QuerySet[FineTuningJob]:
    return FineTuningJob.objects.for_tenant(tenant).select_related("training_file", "validation_file", "tenant")


def job_get(*, tenant: Tenant, public_id: str) -> FineTuningJob | None:
    return job_list(tenant=tenant).filter(public_id=public_id).first()


def _job_events_beyond(job: FineTuningJob, event_id: str | None, *, newer: bool):
    """The job's events newer (or older) than `event_id`; all of them when the id is not one of this job's."""
    events = JobEvent.objects.for_tenant(job.tenant_id).filter(job=job)
    anchor = events.filter(public_id=event_id).values_list("id", flat=True).first() if event_id else None
    if anchor is None:
        return events
    return events.filter(id__gt=anchor) if newer else events.filter(id__lt=anchor)


def job_events_after(*, job: FineTuningJob, after_event_id: str | None = None, limit: int = 1000) -> list[JobEvent]:
    """Events in the order they were written, strictly after `after_event_id` (a reconnecting client's last one)."""
    return list(_job_events_beyond(job, after_event_id, newer=True).order_by("id")[:limit])


def job_events_newest_first(
    *, job: FineTuningJob, after_event_id: str | None = None, limit: int = 20
) -> list[JobEvent]:
    """OpenAI's paging: newest first; `after` is the last id of the previous page (so, older events)."""
    return list(_job_events_beyond(job, after_event_id, newer=False).order_by("-id")[:limit])


def file_is_used_by_jobs(*, tenant: Tenant, file: File) -> bool:
    return FineTuningJob.objects.for_tenant(tenant).filter(Q(training_file=file) | Q(validation_file=file)).exists()


def files_trainable(*, tenant: Tenant) -> QuerySet[File]:
    """Files a job can use: still being checked, or checked and holding examples of a task the engine trains."""
    files = File.objects.for_tenant(tenant)
    return files.filter(status__in=("uploaded", "processed")).exclude(status="processed", task="")


def job_evaluations(*, job: FineTuningJob) -> QuerySet[ModelEvaluation]:
    return ModelEvaluation.objects.filter(tenant_id=job.tenant_id, job=job).select_related("job", "file")


def job_evaluation_get(*, job: FineTuningJob, public_id: str) -> ModelEvaluation | None:
    return job_evaluations(job=job).filter(public_id=public_id).first()


def job_checkpoints(*, job: FineTuningJob) -> QuerySet[JobCheckpoint]:
    """The job's checkpoints, newest step first (OpenAI's order)."""
    return JobCheckpoint.objects.filter(tenant_id=job.tenant_id, job=job).select_related("job", "job__tenant")


def jobs_matching_metadata(
    *, jobs: QuerySet[FineTuningJob], pairs: tuple[tuple[str, str], ...] = (), without_metadata: bool = False
) -> QuerySet[FineTuningJob]:
    """OpenAI's list filter: jobs whose metadata holds every (key, value) pair, or, `without_metadata`, none."""
    # Imported here so that this block stays appended to the module (the top is edited in parallel).
    from django.db.models.fields.json import KeyTransform

    if without_metadata:
        return jobs.filter(metadata={})
    for index, (key, value) in enumerate(pairs):
        # A key transform, not `metadata__<key>`: a key may hold `__` or spell a lookup name.
        alias = f"metadata_value_{index}"
        jobs = jobs.alias(**{alias: KeyTransform(key, "metadata")}).filter(**{alias: value})
    return jobs


def job_checkpoint_get(*, job: FineTuningJob, public_id: str) -> JobCheckpoint | None:
    return job_checkpoints(job=job).filter(public_id=public_id).first()


def job_checkpoints_newest_first(
    *, job: FineTuningJob, after: JobCheckpoint | None = None, limit: int = 10
) -> list[JobCheckpoint]:
    """OpenAI's paging: the highest step first; `after` is the last checkpoint of the previous page."""
    checkpoints = job_checkpoints(job=job).order_by("-step_number", "-id")
    if after is not None:
        checkpoints = checkpoints.filter(step_number__lt=after.step_number)
    return list(checkpoints[:limit])


def fine_tuned_models(*, tenant: Tenant) -> QuerySet[FineTuningJob]:
    """The tenant's succeeded jobs: each one's `fine_tuned_model` is a model of this tenant (GET /v1/models)."""
    from .models import JobStatus

    return (
        job_list(tenant=tenant)
        .filter(status=JobStatus.SUCCEEDED)
        .exclude(fine_tuned_model="")
        .order_by("-finished_at", "-id")
    )


def fine_tuned_model_get(*, tenant: Tenant, model_id: str) -> FineTuningJob | None:
    return fine_tuned_models(tenant=tenant).filter(fine_tuned_model=model_id).first()


def tenant_events_after(*, tenant: Tenant, after_event_id: str | None = None, limit: int = 1000) -> list[JobEvent]:
    """Events of all the tenant's jobs in the order they were written, strictly after `after_event_id` (the last
    one a reconnecting tenant feed saw); from the first when the id is not one of this tenant's events."""
    events = JobEvent.objects.for_tenant(tenant)
    anchor = events.filter(public_id=after_event_id).values_list("id", flat=True).first() if after_event_id else None
    if anchor is not None:
        events = events.filter(id__gt=anchor)
    return list(events.select_related("job").order_by("id")[:limit])


# --- Metrics series, status history and run comparison (the job page and "compare runs") -------------------------
# Kept in one appended block, with its imports inside the functions, because the top of this module is edited in
# parallel.

METRICS_SERIES_DEFAULT_POINTS = 500
METRICS_SERIES_MAX_POINTS = 5000
# At least the first and the last step plus a few in between, or a chart says nothing.
METRICS_SERIES_MIN_POINTS = 10

# Keys a training step logs (engine's _emit_metrics). Every other number in a metrics event is an evaluation's
# (valid_loss, valid_perplexity, accuracy, bleu, validation_*, eval_*...): those points are never dropped.
TRAINING_METRIC_KEYS = frozenset(
    {
        "step",
        "total_steps",
        "train_loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
        "epoch",
        "eta_seconds",
        "memory_mb",
        "attempt",
        "trained_tokens_fraction",
    }
)
# Progress, not a curve: a chart has no use for them and a long series would carry them for nothing.
_SERIES_LEFT_OUT = frozenset({"total_steps", "eta_seconds"})


def _is_number(value) -> bool:
    # `type() in`, not isinstance: bool is an int, and this runs once per key of every event of a long job.
    return type(value) in (int, float)


def is_evaluation_metric(name: str) -> bool:
    return name not in TRAINING_METRIC_KEYS


class MetricsSeries:
    """A job's metrics, one point per step (the latest attempt's), maybe thinned for drawing."""

    def __init__(self, *, points: list[dict], total_points: int, downsampled: bool) -> None:
        self.points = points
        self.total_points = total_points
        self.downsampled = downsampled

    @property
    def evaluation_metrics(self) -> list[str]:
        return sorted({name for point in self.points for name in point if is_evaluation_metric(name)})


def metrics_have_evaluation(data: dict) -> bool:
    # The set test first: it is C-fast and false for the many plain training steps of a long run.
    return not TRAINING_METRIC_KEYS.issuperset(data) and any(
        is_evaluation_metric(name) and _is_number(value) for name, value in data.items()
    )


def _chart_point(data: dict) -> dict:
    point = {name: value for name, value in data.items() if _is_number(value) and name not in _SERIES_LEFT_OUT}
    point["step"] = int(point["step"])
    point["attempt"] = int(point.get("attempt") or 0)
    return point


def _latest_attempt_per_step(events_data) -> list[dict]:
    """One event's data per step, in step order. A resumed job re-logs the steps after its last checkpoint with a
    higher attempt: what an older attempt logged from the step a newer one restarted at was thrown away with that
    run, so it goes, even past the step the newer attempt has reached so far."""
    by_attempt: dict[int, dict[int, dict]] = {}
    for data in events_data:
        # Raw dicts are kept as they are: only the few points that survive thinning are cleaned (_chart_point).
        if type(data) is not dict or not _is_number(step := data.get("step")):
            continue
        # Events come in write order: within one attempt, a later event for the same step is the newer one.
        by_attempt.setdefault(int(data.get("attempt") or 0), {})[int(step)] = data
    kept: dict[int, dict] = {}
    restarted_at = float("inf")
    for attempt in sorted(by_attempt, reverse=True):
        steps = by_attempt[attempt]
        for step, data in steps.items():
            if step < restarted_at:
                kept[step] = data
        restarted_at = min(restarted_at, min(steps))
    return [kept[step] for step in sorted(kept)]


def _largest_triangle_buckets(values: list[tuple[float, float]], buckets: int) -> list[int]:
    """Largest-Triangle-Three-Buckets (Steinarsson, 2013): the indices of `buckets` interior points of `values`
    that keep the curve's visual shape; the first and last points are the anchors, not counted."""
    interior = len(values) - 2
    if buckets <= 0 or interior <= 0:
        return []
    if interior <= buckets:
        return list(range(1, len(values) - 1))
    chosen: list[int] = []
    size = interior / buckets
    previous = 0
    for bucket in range(buckets):
        start = 1 + int(bucket * size)
        end = 1 + int((bucket + 1) * size)
        next_start, next_end = end, min(1 + int((bucket + 2) * size), len(values) - 1)
        if next_start >= next_end:  # the last bucket looks ahead at the final point alone
            next_start, next_end = len(values) - 1, len(values)
        next_points = values[next_start:next_end]
        average_x = sum(x for x, _ in next_points) / len(next_points)
        average_y = sum(y for _, y in next_points) / len(next_points)
        anchor_x, anchor_y = values[previous]
        best, best_area = start, -1.0
        for index in range(start, end):
            x, y = values[index]
            area = abs((anchor_x - average_x) * (y - anchor_y) - (anchor_x - x) * (average_y - anchor_y))
            if area > best_area:
                best, best_area = index, area
        chosen.append(best)
        previous = best
    return chosen


def _evenly_spaced(indices: list[int], count: int) -> list[int]:
    if count >= len(indices):
        return indices
    if count <= 1:
        return indices[-1:]
    return [indices[round(position * (len(indices) - 1) / (count - 1))] for position in range(count)]


def _downsample(points: list[dict], max_points: int) -> list[dict]:
    """At most `max_points` points: the first and the last step and every evaluation always (thinned evenly only
    if they alone exceed the budget), then the training-loss curve by LTTB in the room left."""
    last = len(points) - 1
    evaluations = [i for i, point in enumerate(points) if metrics_have_evaluation(point)]
    kept = {0, last} | set(_evenly_spaced([i for i in evaluations if i not in (0, last)], max_points - 2))
    room = max_points - len(kept)
    curve = [i for i, point in enumerate(points) if _is_number(point.get("train_loss"))]
    if room > 0 and len(curve) > 2:
        values = [(float(points[i]["step"]), float(points[i]["train_loss"])) for i in curve]
        kept |= {curve[position] for position in _largest_triangle_buckets(values, room)}
    return [points[i] for i in sorted(kept)]


def job_metrics_series(*, job: FineTuningJob, max_points: int = METRICS_SERIES_DEFAULT_POINTS) -> MetricsSeries:
    """The job's metrics events as chart points, latest attempt per step, at most `max_points` of them.

    Reads only the `data` column of this job's metrics events, in id order (served by an index on
    (job, type, id)), streamed so that a job with 100k events never holds 100k model instances. A finished job's
    series never changes again, so it is computed once and then served from the cache."""
    if not job.is_finished:
        return _job_metrics_series_uncached(job, max_points)
    from django.core.cache import cache

    # The tenant in the key (convention); the random public id and the finish time: no two jobs ever share it.
    finished_at = job.finished_at.timestamp() if job.finished_at else job.status
    key = f"tenants:{job.tenant_id}:jobs:{job.public_id}:metrics:{max_points}:{finished_at}"
    cached = cache.get(key)
    if cached is None:
        series = _job_metrics_series_uncached(job, max_points)
        cached = {"points": series.points, "total_points": series.total_points, "downsampled": series.downsampled}
        cache.set(key, cached, FINISHED_SERIES_CACHE_SECONDS)
    return MetricsSeries(**cached)


FINISHED_SERIES_CACHE_SECONDS = 24 * 3600


def _job_metrics_series_uncached(job: FineTuningJob, max_points: int) -> MetricsSeries:
    from .models import EventType

    events_data = (
        JobEvent.objects.for_tenant(job.tenant_id)
        .filter(job=job, type=EventType.METRICS)
        .order_by("id")
        .values_list("data", flat=True)
        .iterator(chunk_size=5000)
    )
    events_per_step = _latest_attempt_per_step(events_data)
    downsampled = len(events_per_step) > max_points
    kept = _downsample(events_per_step, max_points) if downsampled else events_per_step
    return MetricsSeries(
        points=[_chart_point(data) for data in kept], total_points=len(events_per_step), downsampled=downsampled
    )


def job_status_history(*, job: FineTuningJob, limit: int = 100):
    """The job's status changes, oldest first (the last `limit` of them: a job moves a handful of times)."""
    from .models import JobStatusChange

    changes = JobStatusChange.objects.filter(job__tenant_id=job.tenant_id, job=job).order_by("-id")[:limit]
    return list(reversed(changes))


def jobs_recent(*, tenant: Tenant, limit: int = 50) -> list[FineTuningJob]:
    return list(job_list(tenant=tenant).order_by("-created_at", "-id")[:limit])


def files_evaluable(*, tenant: Tenant, limit: int = 200) -> list[File]:
    """The tenant's files that passed validation, newest first: what a finished model can be measured on."""
    return list(File.objects.for_tenant(tenant).filter(status="processed").order_by("-created_at", "-id")[:limit])


def job_latest_samples(*, job: FineTuningJob) -> ModelEvaluation | None:
    """The newest succeeded evaluation of the job that holds sample predictions (the page's examples)."""
    return (
        job_evaluations(job=job)
        .filter(status="succeeded")
        .exclude(samples__isnull=True)
        .exclude(samples=[])
        .order_by("-finished_at", "-id")
        .first()
    )


def jobs_comparison_rows(*, jobs: list[FineTuningJob]) -> list[dict]:
    """Rows of a side-by-side table, one value per job: model, files, every hyperparameter any job has, status and
    final metrics; `differs` marks a row whose values are not all the same."""

    def row(label: str, values: list, *, group: str) -> dict:
        shown = ["—" if value is None or value == "" else value for value in values]
        return {"label": label, "group": group, "values": shown, "differs": len({repr(v) for v in shown}) > 1}

    rows = [
        row("model", [job.model for job in jobs], group="job"),
        row("training file", [job.training_file.public_id for job in jobs], group="job"),
        row(
            "validation file",
            [job.validation_file.public_id if job.validation_file_id else None for job in jobs],
            group="job",
        ),
        row("suffix", [job.suffix for job in jobs], group="job"),
        row("seed", [job.seed for job in jobs], group="job"),
    ]
    hyperparameter_names = sorted({name for job in jobs for name in (job.hyperparameters or {})})
    rows += [
        row(name, [(job.hyperparameters or {}).get(name) for job in jobs], group="hyperparameter")
        for name in hyperparameter_names
    ]
    rows += [
        row("status", [job.status for job in jobs], group="outcome"),
        row("steps", [f"{job.steps_completed}/{job.total_steps}" for job in jobs], group="outcome"),
        row("trained tokens", [job.trained_tokens for job in jobs], group="outcome"),
    ]
    metric_names = sorted({name for job in jobs for name in (job.metrics or {})})
    rows += [row(name, [(job.metrics or {}).get(name) for job in jobs], group="metric") for name in metric_names]
    return rows


TRAINING_SAMPLES_CACHE_SECONDS = 24 * 3600


def job_training_samples(*, job: FineTuningJob) -> list[dict]:
    """The sample predictions of the run's final evaluation on its validation split, from the run report stored
    beside the model (`training_report.json`); [] when the run had no validation data or no model yet.

    A succeeded job's report never changes, so it is read from the object store once and then from the cache."""
    if job.status != "succeeded" or not job.model_storage_prefix:
        return []
    import json

    from django.core.cache import cache

    from apps.core.storage import object_store
    from workers.ml.engine import REPORT_FILENAME
    from workers.storage import ObjectNotFound

    key = f"tenants:{job.tenant_id}:jobs:{job.public_id}:training-samples"
    samples = cache.get(key)
    if samples is None:
        try:
            report = json.loads(object_store().get_bytes(f"{job.model_storage_prefix}/{REPORT_FILENAME}"))
        except (ObjectNotFound, ValueError):
            report = {}
        samples = [sample for sample in report.get("sample_predictions") or [] if isinstance(sample, dict)]
        cache.set(key, samples, TRAINING_SAMPLES_CACHE_SECONDS)
    return samples
