"""Studies run for real: every trial a fine-tuning job on the real `cpu` and `gpu` workers, Optuna's storage on the
test database (SQLite or PostgreSQL), the pruner deciding while a trial trains.

Tiny runs (gpt2-tiny from scratch, a few steps on 2 CPU cores): what is checked is the study's bookkeeping, that a
grid runs exactly its combinations, that a clearly bad trial is pruned, that a killed worker's trial still ends.
"""

import io
import json
import os
import signal
from datetime import timedelta

import pytest
from django.utils import timezone

from apps.jobs.models import FineTuningJob, JobCheckpoint, JobEvent, JobStatus, JobStatusChange
from apps.tuning.models import Study, Trial, TrialState
from apps.tuning.services import PRUNED_ACTOR, study_advance
from tests.apps.jobs.test_job_faults import _replace_gpu_worker
from tests.corpus import english_corpus
from tests.polling import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

FINISHED = {"succeeded", "failed", "cancelled", "budget_exhausted"}
TINY_RUN = {"max_steps": 6, "batch_size": 8, "max_length": 48, "log_every_steps": 2}


def _upload(client, content: str, filename: str) -> str:
    stream = io.BytesIO(content.encode())
    stream.name = filename
    response = client.post("/v1/files", {"purpose": "fine-tune", "file": stream}, format="multipart")
    assert response.status_code == 200, response.content
    return response.json()["id"]


def _prompt_completion_jsonl(rows: int = 160) -> str:
    sentences = english_corpus(rows * 2).splitlines()
    return "\n".join(
        json.dumps({"prompt": f"Continue: {sentences[2 * i]}\n", "completion": sentences[2 * i + 1]})
        for i in range(rows)
    )


def _create_study(client, **body) -> dict:
    response = client.post("/v1/tuning/studies", {"model": "gpt2-tiny", **body}, format="json")
    assert response.status_code == 200, response.content
    return response.json()


def _wait_for_study(client, study_id: str, timeout: float = 300) -> dict:
    return wait_for(client, f"/v1/tuning/studies/{study_id}", lambda study: study["status"] in FINISHED, timeout)


def test_a_two_by_two_grid_runs_exactly_its_four_combinations_sharing_the_tokenized_data(celery_workers, tenant_a):
    client = tenant_a.api()
    study = _create_study(
        client,
        training_file=_upload(client, _prompt_completion_jsonl(), "pairs.jsonl"),
        hyperparameters=TINY_RUN,
        search_space={
            "learning_rate": {"type": "categorical", "choices": [0.001, 0.003]},
            "scheduler": {"type": "categorical", "choices": ["linear", "cosine"]},
        },
        sampler="grid",
        max_parallel_trials=2,
    )
    assert study["n_trials"] == 4  # the grid's size when not given

    study = _wait_for_study(client, study["id"])
    assert study["status"] == "succeeded", study["status_reason"]
    trials = study["trials"]
    assert [trial["state"] for trial in trials] == ["complete"] * 4
    combinations = {(trial["params"]["learning_rate"], trial["params"]["scheduler"]) for trial in trials}
    assert combinations == {(0.001, "linear"), (0.001, "cosine"), (0.003, "linear"), (0.003, "cosine")}
    for trial in trials:
        job = FineTuningJob.objects.get(public_id=trial["fine_tuning_job"])
        # Every trial is a normal job with its sampled parameters laid over the base configuration.
        assert job.status == JobStatus.SUCCEEDED
        assert job.hyperparameters["learning_rate"] == trial["params"]["learning_rate"]
        assert job.hyperparameters["scheduler"] == trial["params"]["scheduler"]
        assert job.hyperparameters["max_steps"] == TINY_RUN["max_steps"]
        assert trial["value"] == job.metrics["valid_loss"]
        # Not a named model until promoted.
        assert job.fine_tuned_model == ""
    best = min(trials, key=lambda trial: trial["value"])
    assert study["best_trial"]["number"] == best["number"]
    assert [point["best"] for point in study["optimisation_history"]][-1] == best["value"]
    assert study["param_importances"] is not None and set(study["param_importances"]) == {"learning_rate", "scheduler"}

    # The trials tokenized the same data once: the later ones found it in the shared cache.
    hits = [
        (event.data or {}).get("tokenized_cache_hit")
        for event in JobEvent.objects.filter(job__study_trial__study__public_id=study["id"], data__isnull=False)
        if "tokenized_cache_hit" in (event.data or {})
    ]
    assert len(hits) == 4 and hits.count(True) >= 2, hits

    # Promote the best: it becomes a named model that can be deployed.
    promoted = client.post(f"/v1/tuning/studies/{study['id']}/trials/{best['number']}/promote")
    assert promoted.status_code == 200, promoted.content
    name = promoted.json()["fine_tuned_model"]
    assert name.startswith("ft:gpt2-tiny:acme:trial-")
    assert client.get(f"/v1/fine_tuning/jobs/{best['fine_tuning_job']}").json()["fine_tuned_model"] == name
    other = next(trial for trial in trials if trial["number"] != best["number"])
    refused = client.post("/v1/endpoints", {"name": "not-promoted", "model": other["fine_tuning_job"]}, format="json")
    assert refused.status_code == 400 and "promote" in refused.json()["error"]["message"]


def test_tpe_with_a_median_pruner_prunes_a_clearly_bad_trial(celery_workers, tenant_a):
    client = tenant_a.api()
    study = _create_study(
        client,
        training_file=_upload(client, english_corpus(), "stories.txt"),
        hyperparameters={**TINY_RUN, "max_steps": 16, "eval_every_steps": 4, "warmup_steps": 0},
        search_space={"learning_rate": {"type": "float", "low": 1e-7, "high": 1e-2, "log": True}},
        sampler="tpe",
        pruner={"type": "median", "options": {"n_startup_trials": 2, "n_warmup_steps": 0}},
        n_trials=3,
        # Two good learning rates first, then one so small the model cannot move: the pruner must stop it at its
        # first evaluation, when it is plainly behind the other two at the same step.
        enqueued_trials=[{"learning_rate": 3e-3}, {"learning_rate": 2e-3}, {"learning_rate": 1e-7}],
    )
    study = _wait_for_study(client, study["id"])
    assert study["status"] == "succeeded", study["status_reason"]
    states = {trial["params"]["learning_rate"]: trial for trial in study["trials"]}
    assert states[3e-3]["state"] == "complete" and states[2e-3]["state"] == "complete"
    bad = states[1e-7]
    assert bad["state"] == "pruned", bad
    assert bad["intermediate_values"][0][0] == 4 and bad["progress"]["step"] < 16
    assert bad["value"] == bad["intermediate_values"][-1][1]
    good_at_4 = [dict(states[lr]["intermediate_values"])[4] for lr in (3e-3, 2e-3)]
    assert bad["intermediate_values"][0][1] > max(good_at_4)
    job = FineTuningJob.objects.get(public_id=bad["fine_tuning_job"])
    assert job.status == JobStatus.CANCELLED
    assert JobStatusChange.objects.filter(job=job, to_status="cancelled", actor=PRUNED_ACTOR).exists()
    assert JobEvent.objects.filter(job=job, message__startswith="Trial pruned at step 4").exists()
    assert study["trial_counts"]["pruned"] == 1 and study["trial_counts"]["complete"] == 2


def test_a_trial_whose_worker_is_killed_resumes_and_the_study_still_reaches_its_trials(
    celery_workers, service_env, service_logs, tenant_a
):
    client = tenant_a.api()
    study = _create_study(
        client,
        training_file=_upload(client, english_corpus(), "stories.txt"),
        hyperparameters={"max_steps": 120, "batch_size": 16, "max_length": 64, "checkpoint_every_steps": 10},
        search_space={"weight_decay": {"type": "categorical", "choices": [0.0, 0.1]}},
        sampler="grid",
    )
    first = wait_for(client, f"/v1/tuning/studies/{study['id']}", lambda body: body["trials"], timeout=60)["trials"][0]
    job_id = first["fine_tuning_job"]
    wait_for(
        client,
        f"/v1/fine_tuning/jobs/{job_id}",
        lambda job: JobCheckpoint.objects.filter(job__public_id=job_id, step_number__gte=20).exists(),
        timeout=180,
    )
    os.killpg(celery_workers["gpu"].pid, signal.SIGKILL)  # the worker and its pool process, no goodbye
    celery_workers["gpu"].wait(timeout=10)
    _replace_gpu_worker(celery_workers, service_env, service_logs, "gpu-after-trial-kill")

    study = _wait_for_study(client, study["id"], timeout=400)
    assert study["status"] == "succeeded", study["status_reason"]
    assert [trial["state"] for trial in study["trials"]] == ["complete", "complete"]
    killed = FineTuningJob.objects.get(public_id=job_id)
    assert killed.attempt == 2 and killed.steps_completed == 120
    assert ("queued", "system:lease-expired") in set(
        JobStatusChange.objects.filter(job=killed).values_list("to_status", "actor")
    )


def test_a_trial_failed_by_the_platform_runs_again_with_the_same_parameters(tenant_a):
    """No workers: the study is advanced in this process and its first trial's job is ended as failed on an
    infrastructure error (what a job that used up its attempts ends as), to show the study's reaction."""
    client = tenant_a.api()
    study = _create_study(
        client,
        training_file=_upload(client, english_corpus(), "stories.txt"),
        hyperparameters=TINY_RUN,
        search_space={"learning_rate": {"type": "categorical", "choices": [0.001, 0.003]}},
        sampler="grid",
    )
    row = Study.objects.get(public_id=study["id"])
    study_advance(study_id=row.pk)
    first = Trial.objects.get(study=row)
    FineTuningJob.objects.filter(pk=first.job_id).update(
        status=JobStatus.FAILED,
        error={"code": "infrastructure_error", "message": "Training stopped on an infrastructure failure."},
    )
    study_advance(study_id=row.pk)

    first.refresh_from_db()
    assert first.state == TrialState.FAILED and "Retried with the same parameters" in first.state_reason
    retry = Trial.objects.get(study=row, number=1)
    assert retry.params == first.params and retry.retry_of_id == first.pk
    assert retry.job.hyperparameters["learning_rate"] == first.params["learning_rate"]
    # A retried trial does not count: the grid still has both combinations to finish.
    assert client.get(f"/v1/tuning/studies/{study['id']}").json()["status"] == "running"


def test_cancelling_a_study_cancels_its_running_trial_and_starts_no_other(celery_workers, tenant_a):
    client = tenant_a.api()
    study = _create_study(
        client,
        training_file=_upload(client, english_corpus(), "stories.txt"),
        hyperparameters={"max_steps": 400, "batch_size": 16, "max_length": 64, "log_every_steps": 2},
        search_space={"weight_decay": {"type": "categorical", "choices": [0.0, 0.05, 0.1]}},
        sampler="grid",
    )
    first = wait_for(client, f"/v1/tuning/studies/{study['id']}", lambda body: body["trials"], timeout=60)["trials"][0]
    wait_for(client, f"/v1/fine_tuning/jobs/{first['fine_tuning_job']}", lambda job: job["progress"]["step"] >= 4, 120)

    cancelled = client.post(f"/v1/tuning/studies/{study['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    job = wait_for(
        client, f"/v1/fine_tuning/jobs/{first['fine_tuning_job']}", lambda job: job["status"] in FINISHED, 60
    )
    assert job["status"] == "cancelled" and job["progress"]["step"] < 400
    body = wait_for(
        client,
        f"/v1/tuning/studies/{study['id']}",
        lambda body: body["trials"][0]["state"] != "running",
        timeout=60,
    )
    assert [trial["state"] for trial in body["trials"]] == ["cancelled"] and body["status"] == "cancelled"


def test_a_spent_gpu_time_budget_cancels_the_running_trials_and_ends_the_study(tenant_a, advances):
    """No workers: the study is advanced in this process, and its trial's job is given a start time ten seconds
    ago (as if it had trained that long) against a one-second budget.

    The session's real workers may still be running from earlier tests: a running-job limit of 0 keeps the trial's
    job out of the broker (so no worker trains it to completion first), and `advances` keeps study advances here."""
    tenant_a.tenant.max_running_jobs = 0
    tenant_a.tenant.save(update_fields=["max_running_jobs"])
    client = tenant_a.api()
    study = _create_study(
        client,
        training_file=_upload(client, english_corpus(), "stories.txt"),
        hyperparameters=TINY_RUN,
        search_space={"learning_rate": {"type": "categorical", "choices": [0.001, 0.003]}},
        sampler="grid",
        gpu_time_budget_seconds=1,
    )
    row = Study.objects.get(public_id=study["id"])
    study_advance(study_id=row.pk)
    trial = Trial.objects.get(study=row)
    FineTuningJob.objects.filter(pk=trial.job_id).update(started_at=timezone.now() - timedelta(seconds=10))
    study_advance(study_id=row.pk)  # cancels the trial's job
    study_advance(study_id=row.pk)  # settles it and ends the study
    body = client.get(f"/v1/tuning/studies/{study['id']}").json()
    assert body["status"] == "budget_exhausted" and body["gpu_seconds_used"] >= 10
    assert [trial["state"] for trial in body["trials"]] == ["cancelled"]
    assert FineTuningJob.objects.get(pk=trial.job_id).status == JobStatus.CANCELLED
