"""The JSON objects of the fine-tuning API, in OpenAI's shapes; the websocket sends exactly these."""

from .models import FineTuningJob, JobCheckpoint, JobEvent, JobStatus


def _unix(value) -> int | None:
    return int(value.timestamp()) if value else None


def event_to_json(event: JobEvent, *, job_public_id: str) -> dict:
    return {
        "object": "fine_tuning.job.event",
        "id": event.public_id,
        "created_at": _unix(event.created_at),
        "level": event.level,
        "message": event.message,
        "type": event.type,
        "data": event.data,
        "job_id": job_public_id,
    }


def job_to_json(job: FineTuningJob) -> dict:
    return {
        "object": "fine_tuning.job",
        "id": job.public_id,
        "created_at": _unix(job.created_at),
        "finished_at": _unix(job.finished_at),
        "model": job.model,
        "fine_tuned_model": job.fine_tuned_model or None,
        "organization_id": job.tenant.slug,
        "result_files": [],
        "status": job.status,
        "validation_file": job.validation_file.public_id if job.validation_file_id else None,
        "training_file": job.training_file.public_id,
        "hyperparameters": job.hyperparameters,
        "trained_tokens": job.trained_tokens,
        "metrics": job.metrics,
        "error": job.error,
        "seed": job.seed,
        "estimated_finish": None,
        "integrations": [],
        "user_provided_suffix": job.suffix or None,
        "metadata": job.metadata or None,
        # Tunehouse additions: the internal phase and the latest progress.
        "phase": job.phase,
        "progress": {
            "step": job.steps_completed,
            "total_steps": job.total_steps,
            "train_loss": job.latest_train_loss,
        },
        # Its latest bias audit {id, version, status, approval (of the audit gating deploys), gating_audit}, or null.
        "audit": job_audit_summary(job),
    }


def job_audit_summary(job: FineTuningJob) -> dict | None:
    # Only a succeeded job's model is ever audited: any other job (most rows of a list, every transition before
    # success) costs no query.
    if job.status != JobStatus.SUCCEEDED:
        return None
    from apps.audits.selectors import gating_audit, latest_audit
    from apps.audits.serialization import audit_summary

    return audit_summary(latest_audit(job=job), gate=gating_audit(job=job))


def evaluation_to_json(evaluation) -> dict:
    return {
        "object": "fine_tuning.job.evaluation",
        "id": evaluation.public_id,
        "job_id": evaluation.job.public_id,
        "file": evaluation.file.public_id,
        "status": evaluation.status,
        "created_at": _unix(evaluation.created_at),
        "finished_at": _unix(evaluation.finished_at),
        "max_examples": evaluation.max_examples,
        "examples": evaluation.examples,
        "metrics": evaluation.metrics,
        "samples": evaluation.samples,
        "error": evaluation.error,
    }


def checkpoint_to_json(checkpoint: JobCheckpoint) -> dict:
    """OpenAI's `fine_tuning.job.checkpoint`; `metrics` carries OpenAI's names (step, train_loss, valid_loss...)
    next to every scalar the evaluation measured."""
    job = checkpoint.job
    metrics = {"step": checkpoint.step_number, **(checkpoint.metrics or {})}
    if "validation_loss" in metrics and "valid_loss" not in metrics:
        metrics["valid_loss"] = metrics["validation_loss"]
    return {
        "object": "fine_tuning.job.checkpoint",
        "id": checkpoint.public_id,
        "created_at": _unix(checkpoint.created_at),
        "fine_tuned_model_checkpoint": checkpoint_model_name(checkpoint),
        "fine_tuning_job_id": job.public_id,
        "metrics": metrics,
        "step_number": checkpoint.step_number,
    }


def fine_tuned_model_name(job: FineTuningJob) -> str:
    """`ft:<base>:<tenant>:<suffix>:<id>`, OpenAI's scheme with the tenant in the organisation's place."""
    return f"ft:{job.model}:{job.tenant.slug}:{job.suffix or 'model'}:{job.public_id.split('-', 1)[1][:8]}"


def checkpoint_model_name(checkpoint: JobCheckpoint) -> str:
    return f"{fine_tuned_model_name(checkpoint.job)}:ckpt-step-{checkpoint.step_number}"
