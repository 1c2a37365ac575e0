"""The JSON of studies and trials (REST API and dashboard)."""

from django.utils import timezone

from .models import Study, Trial
from .selectors import optimisation_history, trial_counts, trials_of


def _unix(value) -> int | None:
    return int(value.timestamp()) if value else None


def trial_to_json(trial: Trial) -> dict:
    job = trial.job
    started = job.started_at if job is not None else None
    ended = trial.finished_at or (job.finished_at if job is not None else None)
    return {
        "object": "tuning.trial",
        "id": trial.public_id,
        "study_id": trial.study.public_id,
        "number": trial.number,
        "state": trial.state,
        "state_reason": trial.state_reason,
        "params": trial.params,
        "value": trial.value,
        # [[step, value], ...] in step order: what the pruner saw.
        "intermediate_values": sorted(
            ([int(step), value] for step, value in (trial.intermediate_values or {}).items())
        ),
        "fine_tuning_job": job.public_id if job is not None else None,
        "job_status": job.status if job is not None else None,
        "progress": {"step": job.steps_completed, "total_steps": job.total_steps} if job is not None else None,
        "fine_tuned_model": (job.fine_tuned_model or None) if job is not None else None,
        "retry_of": trial.retry_of.number if trial.retry_of_id else None,
        "promoted": trial.promoted_at is not None,
        "created_at": _unix(trial.created_at),
        "finished_at": _unix(trial.finished_at),
        "duration_seconds": round(((ended or timezone.now()) - started).total_seconds(), 1) if started else None,
    }


def study_to_json(study: Study, *, with_trials: bool = False) -> dict:
    from .services import gpu_seconds_used

    body = {
        "object": "tuning.study",
        "id": study.public_id,
        "name": study.name,
        "model": study.model,
        "training_file": study.training_file.public_id,
        "validation_file": study.validation_file.public_id if study.validation_file_id else None,
        "hyperparameters": study.base_hyperparameters,
        "search_space": study.search_space,
        "objective": {"metric": study.objective_metric, "direction": study.direction},
        "sampler": study.sampler,
        "pruner": {"type": study.pruner, "options": study.pruner_options},
        "enqueued_trials": study.enqueued_trials,
        "n_trials": study.n_trials,
        "max_parallel_trials": study.max_parallel_trials,
        "gpu_time_budget_seconds": study.gpu_time_budget_seconds,
        "gpu_seconds_used": round(gpu_seconds_used(study), 1),
        "seed": study.seed,
        "status": study.status,
        "status_reason": study.status_reason,
        "trial_counts": trial_counts(study=study),
        "best_trial": trial_to_json(study.best_trial) if study.best_trial_id else None,
        "param_importances": study.param_importances,
        "metadata": study.metadata,
        "created_at": _unix(study.created_at),
        "finished_at": _unix(study.finished_at),
    }
    if with_trials:
        trials = list(trials_of(study=study))
        body["trials"] = [trial_to_json(trial) for trial in trials]
        body["optimisation_history"] = optimisation_history(study=study, trials=trials)
    return body
