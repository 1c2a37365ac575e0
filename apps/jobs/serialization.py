"""The JSON objects of the fine-tuning API, in OpenAI's shapes; the websocket sends exactly these."""

from .models import FineTuningJob, JobEvent


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
        "metadata": None,
        # Tunehouse additions: the internal phase and the latest progress.
        "phase": job.phase,
        "progress": {
            "step": job.steps_completed,
            "total_steps": job.total_steps,
            "train_loss": job.latest_train_loss,
        },
    }


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
