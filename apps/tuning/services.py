"""Writes for hyperparameter studies: creation (every field checked, errors naming it), advancing a study (settle the
trials whose job ended, start new ones up to the parallel limit, stop on the trial count or the GPU-time budget),
the pruner's verdict while a trial trains, cancel and promote.

A study advances on a `cpu` worker (`workers.tasks.tuning.advance_study`), sent when one of its trial jobs ends and
repeated by every worker's recovery loop (`studies_reconcile`), under a Redis lock per study so two workers never
ask Optuna for the same slot twice. Optuna is only ever called outside Django transactions (see optuna_store).
"""

import logging
import math
from contextlib import contextmanager
from datetime import timedelta

import optuna
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from apps.core.api.errors import ApiError
from apps.datasets.models import File
from apps.jobs.models import FINISHED_STATUSES, EventLevel, FineTuningJob, JobStatus
from apps.jobs.serialization import fine_tuned_model_name
from apps.jobs.services import (
    file_engine_task,
    files_verdict,
    job_cancel,
    job_create,
    job_event_record,
    resolve_hyperparameters,
    validate_base_model,
    validate_metadata,
)
from apps.tenancy.models import Tenant
from workers.ml.config import EARLY_STOPPING_METRICS

from .models import (
    Direction,
    PrunerKind,
    SamplerKind,
    Study,
    StudyStatus,
    Trial,
    TrialState,
)
from .search_space import distributions_of, extreme_values, grid_combinations, grid_of, search_space_checked

logger = logging.getLogger(__name__)

MAX_TRIALS = 1_000
MAX_PARALLEL_TRIALS = 32
DEFAULT_TRIALS = 20
# Without validation data there is nothing to optimise: a study holds this share of the training data back.
DEFAULT_VALIDATION_FRACTION = 0.1
# Losses and perplexity go down; accuracy, F1, BLEU, chrF and ROUGE go up.
_MINIMISED_OBJECTIVES = ("valid_loss", "valid_perplexity")
# A trial whose job failed on the platform's side (not on its own parameters) runs again this many times.
MAX_TRIAL_RETRIES = 2
# Failures (refused parameters, crashes) in one study before it stops instead of burning its budget on them.
_FAILURES_BEFORE_GIVING_UP = 3
_LOCK_SECONDS = 120
# How old a running study must be before the recovery loop advances it without a trial having ended.
RECONCILE_AFTER_SECONDS = 60
_PRUNED_BY = "study:pruner"


# --- creation --------------------------------------------------------------------------------------------------


def _tenant_file(tenant: Tenant, file: File | None, param: str) -> File | None:
    if file is not None and file.tenant_id != tenant.pk:
        raise ApiError("No such file.", code="not_found", param=param, status_code=404)
    return file


def _whole_number(value, param: str, *, low: int, high: int, default: int | None) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(f"{param} must be a whole number from {low:,} to {high:,}.", param=param)
    return value


def _choice(value, param: str, choices: type, default: str) -> str:
    if value is None:
        return default
    if value not in choices.values:
        raise ApiError(f"{param} must be one of {', '.join(choices.values)}.", param=param)
    return value


def _objective(objective_metric, direction) -> tuple[str, str]:
    metric = objective_metric or "valid_loss"
    if metric not in EARLY_STOPPING_METRICS:
        raise ApiError(
            f"objective_metric must be an evaluation metric: {', '.join(EARLY_STOPPING_METRICS)}.",
            param="objective_metric",
        )
    default_direction = Direction.MINIMIZE if metric in _MINIMISED_OBJECTIVES else Direction.MAXIMIZE
    return metric, _choice(direction, "direction", Direction, default_direction)


def _resolve_or_explain(base: dict, *, entry, task: str | None, param: str, value_note: str = "") -> dict:
    try:
        return resolve_hyperparameters(base, entry=entry, task=task)
    except ApiError as exc:
        if not value_note:
            raise
        raise ApiError(f"{value_note} {exc.detail}", code=exc.error_code, param=param) from exc


def _checked_pruner_options(pruner: str, options, *, defaults: dict) -> dict:
    from .optuna_store import PRUNER_OPTION_NAMES, pruner_for

    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ApiError("pruner_options must be an object.", param="pruner_options")
    allowed = PRUNER_OPTION_NAMES[pruner]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ApiError(
            f"pruner_options for {pruner} takes {', '.join(allowed) or 'nothing'}; unknown: {', '.join(unknown)}.",
            param=f"pruner_options.{unknown[0]}",
        )
    for name, value in options.items():
        if not (value == "auto" and name == "max_resource") and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise ApiError(
                f"pruner_options.{name} must be a whole number of 0 or more.", param=f"pruner_options.{name}"
            )
    merged = {**defaults, **options}
    try:
        pruner_for(Study(pruner=pruner, pruner_options=merged))
    except ValueError as exc:
        raise ApiError(f"pruner_options: {exc}", param="pruner_options") from exc
    return merged


def _checked_enqueued(enqueued, space: dict, n_trials: int, sampler: str) -> list[dict]:
    enqueued = [] if enqueued is None else enqueued
    if enqueued and sampler == SamplerKind.GRID:
        raise ApiError(
            "A grid search runs every combination of its grid; enqueued_trials are for random and TPE searches.",
            param="enqueued_trials",
        )
    if not isinstance(enqueued, list) or len(enqueued) > n_trials:
        raise ApiError(
            f"enqueued_trials must be a list of at most n_trials ({n_trials}) objects.", param="enqueued_trials"
        )
    distributions = distributions_of(space)
    for index, params in enumerate(enqueued):
        param = f"enqueued_trials[{index}]"
        if not isinstance(params, dict) or not params:
            raise ApiError(f"{param} must be an object of search-space values.", param=param)
        for name, value in params.items():
            if name not in distributions:
                raise ApiError(f"{param}.{name} is not in the search space.", param=f"{param}.{name}")
            try:
                inside = distributions[name]._contains(distributions[name].to_internal_repr(value))
            except (ValueError, TypeError):
                inside = False
            if not inside:
                raise ApiError(f"{param}.{name}: {value!r} is outside its search space.", param=f"{param}.{name}")
    return enqueued


def study_create(
    *,
    tenant: Tenant,
    user: AbstractBaseUser | None,
    model: str,
    training_file: File,
    search_space: object,
    validation_file: File | None = None,
    hyperparameters: dict | None = None,
    objective_metric: str | None = None,
    direction: str | None = None,
    sampler: str | None = None,
    pruner: str | None = None,
    pruner_options: dict | None = None,
    n_trials: int | None = None,
    max_parallel_trials: int | None = None,
    gpu_time_budget_seconds: int | None = None,
    seed: int | None = None,
    enqueued_trials: list | None = None,
    name: str = "",
    metadata: dict | None = None,
) -> Study:
    """Checks everything a trial would be refused for before any trial runs, then creates the study; its first
    trials start on a `cpu` worker right after."""
    training_file = _tenant_file(tenant, training_file, "training_file")
    validation_file = _tenant_file(tenant, validation_file, "validation_file")
    if validation_file is not None and validation_file.pk == training_file.pk:
        # job_create refuses it, so every trial would fail on it.
        raise ApiError("The validation file must differ from the training file.", param="validation_file")
    metadata = validate_metadata(metadata)
    if hyperparameters is not None and not isinstance(hyperparameters, dict):
        raise ApiError("hyperparameters must be an object.", param="hyperparameters")
    base = dict(hyperparameters or {})
    space = search_space_checked(search_space)
    sampler = _choice(sampler, "sampler", SamplerKind, SamplerKind.TPE)
    pruner = _choice(pruner, "pruner", PrunerKind, PrunerKind.NONE)
    metric, direction = _objective(objective_metric, direction)
    entry = validate_base_model(model)
    # The files as a job would judge them: one that failed its checks (or that this model cannot learn) is refused
    # now, not after every trial has failed on it. Files still being checked are fine: the trials wait for them.
    study_files = [(training_file, "training_file")] + (
        [(validation_file, "validation_file")] if validation_file else []
    )
    verdict, error = files_verdict(study_files, entry, base)
    if verdict == "failed":
        raise ApiError(error["message"], code=error["code"], param=error["param"])
    if validation_file is None and not base.get("validation_fraction"):
        base["validation_fraction"] = DEFAULT_VALIDATION_FRACTION
    task = file_engine_task(training_file)
    resolved = _resolve_or_explain(base, entry=entry, task=task, param="hyperparameters")
    if pruner != PrunerKind.NONE and not resolved.get("eval_every_steps") and "eval_every_steps" not in space:
        if not resolved.get("max_steps"):
            raise ApiError(
                "A pruner compares trials at their evaluations: set hyperparameters.eval_every_steps (or max_steps, "
                "and a tenth of it is used).",
                param="hyperparameters.eval_every_steps",
            )
        base["eval_every_steps"] = max(1, resolved["max_steps"] // 10)
    for parameter, spec in space.items():
        for value in extreme_values(spec):
            _resolve_or_explain(
                {**base, parameter: value},
                entry=entry,
                task=task,
                param=f"search_space.{parameter}",
                value_note=f"search_space.{parameter}: the value {value!r} would be refused:",
            )
    if sampler == SamplerKind.GRID:
        grid_size = len(grid_combinations(grid_of(space)))
        n_trials = _whole_number(n_trials, "n_trials", low=1, high=grid_size, default=grid_size)
    else:
        n_trials = _whole_number(n_trials, "n_trials", low=1, high=MAX_TRIALS, default=DEFAULT_TRIALS)
    max_parallel = _whole_number(max_parallel_trials, "max_parallel_trials", low=1, high=MAX_PARALLEL_TRIALS, default=1)
    budget = _whole_number(gpu_time_budget_seconds, "gpu_time_budget_seconds", low=1, high=10**9, default=None)
    seed = _whole_number(seed, "seed", low=0, high=2**31 - 1, default=0)
    from .optuna_store import pruner_defaults

    options = _checked_pruner_options(
        pruner,
        pruner_options,
        defaults=pruner_defaults(
            pruner,
            n_trials=n_trials,
            eval_every_steps=base.get("eval_every_steps") or resolved.get("eval_every_steps") or 0,
            max_steps=resolved.get("max_steps") or 0,
        ),
    )
    enqueued = _checked_enqueued(enqueued_trials, space, n_trials, sampler)
    with transaction.atomic():
        study = Study(
            tenant=tenant,
            name=(name or "")[:200],
            model=model,
            training_file=training_file,
            validation_file=validation_file,
            base_hyperparameters=base,
            search_space=space,
            objective_metric=metric,
            direction=direction,
            sampler=sampler,
            pruner=pruner,
            pruner_options=options,
            enqueued_trials=enqueued,
            n_trials=n_trials,
            max_parallel_trials=max_parallel,
            gpu_time_budget_seconds=budget,
            seed=seed,
            metadata=metadata,
            created_by=user,
        )
        study.optuna_study_name = f"tunehouse-{study.public_id}"
        study.save()
        _advance_after_commit(study)
    return study


def _advance_after_commit(study: Study) -> None:
    def send() -> None:
        from workers.tasks.tuning import advance_study

        try:
            advance_study.delay(study.pk)
        except Exception:
            # The broker is down: the recovery loop (studies_reconcile) advances the study when it is back.
            logger.warning("study %s: could not send advance_study; the recovery loop will", study.public_id)

    transaction.on_commit(send)


# --- advancing --------------------------------------------------------------------------------------------------


@contextmanager
def _study_lock(study_pk: int, *, wait_seconds: float):
    """One advancer per study at a time, whichever worker and database: a Redis lock that expires on its own if
    its holder dies."""
    from apps.endpoints.registry import redis_client

    lock = redis_client().lock(f"tuning:study:{study_pk}:advance", timeout=_LOCK_SECONDS, blocking_timeout=wait_seconds)
    if not lock.acquire():
        yield False
        return
    try:
        yield True
    finally:
        try:
            lock.release()
        except Exception:  # expired meanwhile: the next advance starts from the rows, nothing is lost
            logger.warning("study %s: advance lock had expired", study_pk)


def gpu_seconds_used(study: Study) -> float:
    """Wall-clock seconds the study's trial jobs have spent since they first started (running, or ended)."""
    now = timezone.now()
    used = 0.0
    for started, finished in FineTuningJob.objects.filter(
        study_trial__study=study, started_at__isnull=False
    ).values_list("started_at", "finished_at"):
        used += ((finished or now) - started).total_seconds()
    return used


def study_advance(*, study_id: int, wait_seconds: float = 60) -> None:
    """Settles the trials whose job ended, then starts trials up to the parallel limit, or ends the study. Safe to
    call any time and from any worker: a caller waits up to ``wait_seconds`` for one already advancing, then gives
    up (the recovery loop comes back)."""
    with _study_lock(study_id, wait_seconds=wait_seconds) as held:
        if held:
            _advance_locked(study_id)


def _advance_locked(study_id: int) -> None:
    study = Study.objects.filter(pk=study_id).select_related("tenant", "training_file", "created_by").first()
    if study is None:
        return
    trials = list(study.trials.select_related("job"))
    ostudy = _optuna_study(study, len(trials))
    results = optuna_study_for_results(study)
    _fail_orphaned_optuna_trials(results, trials)
    settled = [trial for trial in trials if trial.state == TrialState.RUNNING and _settle(study, results, trial)]
    if settled:
        _record_best_and_importances(study, results)
    if study.is_finished:
        return
    running = [trial for trial in trials if trial.state == TrialState.RUNNING]
    finished = sum(1 for trial in trials if trial.state in (TrialState.COMPLETE, TrialState.PRUNED))
    failures = sum(1 for trial in trials if trial.state == TrialState.FAILED and not trial.retries.exists())
    if study.gpu_time_budget_seconds is not None and gpu_seconds_used(study) >= study.gpu_time_budget_seconds:
        _stop_running(study, running, "The study's GPU-time budget is spent.")
        if not running:
            _end(study, StudyStatus.BUDGET_EXHAUSTED, f"GPU-time budget spent after {finished} trials.")
        return
    if failures >= max(_FAILURES_BEFORE_GIVING_UP, math.ceil(study.n_trials / 2)) and not running:
        _end(study, StudyStatus.FAILED, f"{failures} trials failed; see their jobs for why.")
        return
    if finished >= study.n_trials:
        if not running:
            _end(study, StudyStatus.SUCCEEDED, f"{finished} trials finished.")
        return
    room = min(study.max_parallel_trials - len(running), study.n_trials - finished - len(running))
    for _ in range(max(0, room)):
        _start_trial(study, ostudy)


def _optuna_study(study: Study, trials_so_far: int) -> optuna.Study:
    from .optuna_store import optuna_study

    return optuna_study(study, trials_so_far=trials_so_far)


def optuna_study_for_results(study: Study) -> optuna.Study:
    from .optuna_store import optuna_study_for_results

    return optuna_study_for_results(study)


def _fail_orphaned_optuna_trials(ostudy: optuna.Study, trials: list[Trial]) -> None:
    """An Optuna trial asked for by an advancer that died before recording it is failed, so a grid search does not
    wait for it and it is not counted."""
    known = {trial.number for trial in trials}
    for orphan in ostudy.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if orphan.number not in known:
            ostudy.tell(orphan.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


def _start_trial(study: Study, ostudy: optuna.Study) -> Trial:
    otrial = ostudy.ask(distributions_of(study.search_space))
    params = dict(otrial.params)
    retry_of = None
    if (retried := otrial.user_attrs.get("retry_of")) is not None:
        retry_of = Trial.objects.filter(study=study, number=retried).first()
    hyperparameters = {**study.base_hyperparameters, **params}
    trial = Trial(
        tenant=study.tenant, study=study, number=otrial.number, optuna_trial_id=otrial._trial_id, params=params
    )
    trial.retry_of = retry_of
    try:
        job = job_create(
            tenant=study.tenant,
            user=study.created_by,
            training_file=study.training_file,
            validation_file=study.validation_file,
            model=study.model,
            hyperparameters=hyperparameters,
            suffix=f"trial-{otrial.number}",
            metadata={"study": study.public_id, "trial": str(otrial.number)},
        )
    except ApiError as exc:
        # Parameters the platform refuses together (each alone was checked at creation): a failed trial, and the
        # sampler learns to avoid the region.
        optuna_study_for_results(study).tell(otrial.number, state=optuna.trial.TrialState.FAIL)
        trial.state, trial.state_reason, trial.finished_at = TrialState.FAILED, str(exc.detail), timezone.now()
        trial.save()
        return trial
    trial.job = job
    trial.save()
    job_event_record(
        job=job,
        message=f"Trial {otrial.number} of study {study.public_id}: "
        + ", ".join(f"{name}={value!r}" for name, value in params.items()),
        data={"study": study.public_id, "trial": otrial.number, "params": params},
    )
    return trial


def _settle(study: Study, ostudy: optuna.Study, trial: Trial) -> bool:
    """Tells Optuna how the trial's job ended and records it; False while the job still runs."""
    job = trial.job
    if job is None or job.status not in FINISHED_STATUSES:
        return False
    reason = ""
    if job.status == JobStatus.SUCCEEDED:
        value = (job.metrics or {}).get(study.objective_metric)
        if isinstance(value, int | float) and math.isfinite(value):
            ostudy.tell(trial.number, float(value), skip_if_finished=True)
            state, trial.value = TrialState.COMPLETE, float(value)
        else:
            ostudy.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            state, reason = TrialState.FAILED, f"The job measured no {study.objective_metric}."
    elif job.status == JobStatus.CANCELLED and trial.state_reason.startswith("Pruned"):
        ostudy.tell(trial.number, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True)
        state = TrialState.PRUNED
        trial.value = _last_intermediate(trial)
    elif job.status == JobStatus.CANCELLED:
        ostudy.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        state, reason = TrialState.CANCELLED, "Its job was cancelled."
    else:
        ostudy.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        error = job.error or {}
        state, reason = TrialState.FAILED, error.get("message") or "Its job failed."
        if error.get("code") == "infrastructure_error" and _retries_of(trial) < MAX_TRIAL_RETRIES:
            # Not the parameters' fault: the same parameters again, as the next trial.
            ostudy.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            reason += " Retried with the same parameters."
    trial.state, trial.finished_at = state, job.finished_at or timezone.now()
    if reason:
        trial.state_reason = reason
    trial.save(update_fields=["state", "value", "state_reason", "finished_at"])
    return True


def _retries_of(trial: Trial) -> int:
    retries, current = 0, trial
    while current.retry_of_id is not None:
        retries += 1
        current = current.retry_of
    return retries


def _last_intermediate(trial: Trial) -> float | None:
    values = trial.intermediate_values or {}
    return values[max(values, key=int)] if values else None


def _record_best_and_importances(study: Study, ostudy: optuna.Study) -> None:
    complete = study.trials.filter(state=TrialState.COMPLETE, value__isnull=False)
    order = "value" if study.direction == Direction.MINIMIZE else "-value"
    best = complete.order_by(order, "number").first()
    importances = study.param_importances
    if complete.count() >= 2 and len(study.search_space) >= 1:
        try:
            importances = {
                name: float(share) for name, share in optuna.importance.get_param_importances(ostudy).items()
            }
        except Exception:
            # Importances are a reading aid: too few distinct results (or a degenerate space) must never stop the
            # study from advancing. The chart waits for more trials.
            logger.info("study %s: no parameter importances yet", study.public_id, exc_info=True)
            importances = None
    Study.objects.filter(pk=study.pk).update(best_trial=best, param_importances=importances)
    study.best_trial, study.param_importances = best, importances


def _stop_running(study: Study, running: list[Trial], why: str) -> None:
    for trial in running:
        if trial.job is not None and not trial.job.is_finished:
            try:
                job_cancel(tenant=study.tenant, job=trial.job, user=None)
            except ApiError:
                continue  # ended meanwhile
            job_event_record(job=trial.job, level=EventLevel.WARN, message=why)


def _end(study: Study, status: str, reason: str) -> None:
    Study.objects.filter(pk=study.pk, status=StudyStatus.RUNNING).update(
        status=status, status_reason=reason, finished_at=timezone.now()
    )
    study.refresh_from_db()


# --- while a trial trains ------------------------------------------------------------------------------------------


class TrialReporter:
    """What a trial's running job tells the pruner: each evaluation of the objective is reported; True from
    `report` means the trial is pruned and training should stop."""

    def __init__(self, trial: Trial):
        self.trial = trial
        self.study = trial.study
        self._otrial = None

    def report(self, *, step: int, metrics: dict) -> bool:
        value = metrics.get(self.study.objective_metric)
        total_steps = metrics.get("total_steps") or 0
        if not isinstance(value, int | float) or not math.isfinite(value):
            return False
        Trial.objects.filter(pk=self.trial.pk).update(
            intermediate_values={**self._stored_values(), str(step): float(value)}
        )
        if self.study.pruner == PrunerKind.NONE:
            return False
        otrial = self._optuna_trial()
        otrial.report(float(value), step)
        # The final evaluation: the run is over, there is nothing left to save by stopping it.
        if (total_steps and step >= total_steps) or not otrial.should_prune():
            return False
        Trial.objects.filter(pk=self.trial.pk).update(
            state_reason=f"Pruned at step {step:,}: {self.study.objective_metric} {value:.4g} was among the worse "
            f"of the trials at that point ({self.study.pruner} pruner)."
        )
        return True

    def _stored_values(self) -> dict:
        return Trial.objects.filter(pk=self.trial.pk).values_list("intermediate_values", flat=True).first() or {}

    def _optuna_trial(self) -> optuna.trial.Trial:
        if self._otrial is None:
            from .optuna_store import optuna_study

            self._otrial = optuna.trial.Trial(optuna_study(self.study), self.trial.optuna_trial_id)
        return self._otrial


def trial_reporter_for_job(job: FineTuningJob) -> TrialReporter | None:
    trial = Trial.objects.filter(job=job).select_related("study").first()
    return None if trial is None else TrialReporter(trial)


PRUNED_ACTOR = _PRUNED_BY


def studies_after_job_finished(job: FineTuningJob) -> None:
    """In the transaction that ends a job: if it was a trial, its study advances once that commits."""
    trial = Trial.objects.filter(job=job).select_related("study").first()
    if trial is not None:
        _advance_after_commit(trial.study)


def studies_reconcile() -> list[str]:
    """The recovery loop's share: advances every running study (a trial whose job ended while its message was lost,
    room left by an advance that crashed, a budget spent while trials train), and settles the trials of studies
    cancelled since. A study being advanced elsewhere is skipped. Returns the ids advanced."""
    advanced = []
    # A new study's first advance is the message sent when it was created: the loop steps in only once that had
    # time to arrive (a lost message), so it never races the first advance for trial 0.
    settled_in = timezone.now() - timedelta(seconds=RECONCILE_AFTER_SECONDS)
    waiting = Study.objects.filter(
        Q(status=StudyStatus.RUNNING, created_at__lt=settled_in)
        | Q(trials__state=TrialState.RUNNING, trials__job__status__in=FINISHED_STATUSES)
    ).distinct()
    for study in waiting:
        study_advance(study_id=study.pk, wait_seconds=0)
        advanced.append(study.public_id)
    return advanced


# --- user actions ----------------------------------------------------------------------------------------------


def study_cancel(*, tenant: Tenant, study: Study, user: AbstractBaseUser | None) -> Study:
    """Ends the study now and cancels its running trials (their jobs stop between steps)."""
    if study.tenant_id != tenant.pk:
        raise ApiError("No such study.", code="not_found", status_code=404)
    if study.is_finished:
        raise ApiError(
            f"Study {study.public_id} has already {study.status}; it cannot be cancelled.", code="study_finished"
        )
    Study.objects.filter(pk=study.pk, status=StudyStatus.RUNNING).update(
        status=StudyStatus.CANCELLED,
        cancel_requested=True,
        status_reason="Cancelled by " + (getattr(user, "email", "") or "the API"),
        finished_at=timezone.now(),
    )
    for trial in study.trials.select_related("job").filter(state=TrialState.RUNNING, job__isnull=False):
        if not trial.job.is_finished:
            try:
                job_cancel(tenant=tenant, job=trial.job, user=user)
            except ApiError:
                continue  # it ended meanwhile
    study.refresh_from_db()
    _advance_after_commit(study)
    return study


@transaction.atomic
def trial_promote(*, tenant: Tenant, trial: Trial, user: AbstractBaseUser | None) -> FineTuningJob:
    """Makes a completed trial's model a named fine-tuned model (listed, deployable, evaluable like any other)."""
    if trial.tenant_id != tenant.pk:
        raise ApiError("No such trial.", code="not_found", status_code=404)
    job = FineTuningJob.objects.select_for_update().select_related("tenant").filter(pk=trial.job_id).first()
    if trial.state != TrialState.COMPLETE or job is None or job.status != JobStatus.SUCCEEDED:
        raise ApiError(
            f"Trial {trial.number} is {trial.state}; only a complete trial has a model to promote.",
            code="trial_not_complete",
        )
    if not job.fine_tuned_model:
        job.fine_tuned_model = fine_tuned_model_name(job)
        job.save(update_fields=["fine_tuned_model"])
        job_event_record(
            job=job,
            message=f"Promoted from study {trial.study.public_id} (trial {trial.number}): "
            f"new fine-tuned model {job.fine_tuned_model}",
        )
    if trial.promoted_at is None:
        trial.promoted_at = timezone.now()
        trial.save(update_fields=["promoted_at"])
    return job


def job_is_unpromoted_trial(job: FineTuningJob) -> bool:
    return Trial.objects.filter(job=job, promoted_at__isnull=True).exists()
