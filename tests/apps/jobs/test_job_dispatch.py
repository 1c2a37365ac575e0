"""Dispatch and recovery decisions: per-tenant limits, a fair pick between tenants, expired leases, fencing.

The broker is out of the picture here on purpose: `jobs_dispatch(send=...)` hands the chosen job ids to a list
instead of Celery, so the test sees exactly which jobs were chosen (the fault tests run the same code with real
workers)."""

from datetime import timedelta
from pathlib import Path
from threading import Event

import pytest
import redis.exceptions
import torch
from django.db import OperationalError
from django.utils import timezone

from apps.core.storage import local_copy_of_prefix
from apps.datasets.models import File
from apps.jobs.execution import _JobProgress, _record_crash, failure_of
from apps.jobs.models import FineTuningJob, JobCheckpoint, JobEvent, JobPhase, JobStatus, JobStatusChange
from apps.jobs.services import job_create, job_pause, job_resume, jobs_dispatch, jobs_recover
from workers.ml.callbacks import TrainingEvent
from workers.ml.checkpoint import write_checkpoint

pytestmark = pytest.mark.django_db


def _checked_file(tenant) -> File:
    return File.objects.create(
        tenant=tenant, filename="t.txt", bytes=1, sha256="0" * 64, storage_key="k", status="processed", task="causal_lm"
    )


def _queued_jobs(tenant, count: int) -> list[FineTuningJob]:
    file = _checked_file(tenant)
    jobs = [job_create(tenant=tenant, user=None, training_file=file, model="gpt2-tiny") for _ in range(count)]
    assert all(job.status == JobStatus.QUEUED for job in jobs)
    return jobs


def _dispatch() -> list[str]:
    sent: list[int] = []
    chosen = jobs_dispatch(send=sent.append)
    assert len(sent) == len(chosen)
    return chosen


def test_a_tenant_runs_at_most_its_limit_and_the_rest_wait_queued(tenant_a, settings):
    settings.MAX_RUNNING_JOBS_PER_TENANT = 2
    jobs = _queued_jobs(tenant_a.tenant, 5)

    assert _dispatch() == [jobs[0].public_id, jobs[1].public_id]  # oldest first
    assert _dispatch() == []  # both slots taken, whether the jobs run yet or still wait in the broker
    waiting = FineTuningJob.objects.get(pk=jobs[2].pk)
    assert waiting.phase == JobPhase.WAITING_FOR_SLOT and waiting.dispatched_at is None

    FineTuningJob.objects.filter(pk=jobs[0].pk).update(status=JobStatus.SUCCEEDED)
    assert _dispatch() == [jobs[2].public_id]


def test_a_tenant_with_a_hundred_queued_jobs_does_not_starve_another_tenants_first_job(tenant_a, tenant_b):
    tenant_a.tenant.max_running_jobs = 2
    tenant_a.tenant.save()
    flood = _queued_jobs(tenant_a.tenant, 100)
    assert len(_dispatch()) == 2

    (first_of_b,) = _queued_jobs(tenant_b.tenant, 1)
    # B's job goes to the broker at once, behind A's two: A's 98 others wait for A's own slots.
    assert _dispatch() == [first_of_b.public_id]
    sent_before_b = FineTuningJob.objects.filter(tenant=tenant_a.tenant, dispatched_at__isnull=False).count()
    assert sent_before_b == 2
    assert FineTuningJob.objects.filter(pk__in=[job.pk for job in flood], dispatched_at__isnull=True).count() == 98


def test_a_job_whose_lease_expired_is_queued_again_and_its_old_executor_is_fenced(tenant_a, settings):
    settings.JOB_LEASE_SECONDS = 5
    (job,) = _queued_jobs(tenant_a.tenant, 1)
    FineTuningJob.objects.filter(pk=job.pk).update(
        status=JobStatus.RUNNING, attempt=1, lease_heartbeat_at=timezone.now() - timedelta(seconds=6)
    )
    old_executor = _JobProgress(job, 1, checkpoint_dir=Path("/nonexistent"), worker_stopping=Event())

    result = jobs_recover(send=lambda job_id: None)

    assert result["requeued"] == [job.public_id] and result["dispatched"] == [job.public_id]
    job.refresh_from_db()
    assert job.status == JobStatus.QUEUED
    assert JobStatusChange.objects.filter(job=job, to_status="queued", actor="system:lease-expired").exists()
    # The next claim takes attempt 2; the old executor, if it still runs, stops and may write nothing.
    FineTuningJob.objects.filter(pk=job.pk).update(status=JobStatus.RUNNING, attempt=2)
    assert old_executor.may_write() is False
    assert old_executor.should_stop() is True


def test_a_checkpoint_written_but_not_recorded_by_a_killed_worker_is_recorded_when_the_next_attempt_resumes_from_it(
    tenant_a, tmp_path
):
    # A SIGKILL between the engine's write and the row leaves step 40 complete on disk with 30 the newest recorded
    # (seen in CI); the next attempt on this machine resumes from 40.
    (job,) = _queued_jobs(tenant_a.tenant, 1)
    FineTuningJob.objects.filter(pk=job.pk).update(status=JobStatus.RUNNING, attempt=2)
    job.refresh_from_db()
    weights = b"the weights of step 40"
    write_checkpoint(
        tmp_path,
        step=40,
        write_files=lambda folder: (folder / "model.safetensors").write_bytes(weights),
        metrics={"train_loss": 2.5},
    )
    progress = _JobProgress(job, 2, checkpoint_dir=tmp_path, worker_stopping=Event())
    resumed = TrainingEvent(
        level="info",
        message="Resumed from the checkpoint of step 40; continuing to step 240.",
        data={"resumed_from_step": 40},
    )

    progress.on_event(resumed)
    progress.on_event(resumed)  # said twice, recorded once

    listed = tenant_a.api().get(f"/v1/fine_tuning/jobs/{job.public_id}/checkpoints").json()["data"]
    assert [(item["step_number"], item["metrics"]) for item in listed] == [(40, {"step": 40, "train_loss": 2.5})]
    checkpoint = JobCheckpoint.objects.get(job=job)
    assert checkpoint.attempt == 2
    # Its files are in the object store: an attempt on another machine (or a deployment) finds them there.
    copy = local_copy_of_prefix(checkpoint.storage_prefix, tmp_path / "copy")
    assert (copy / "model.safetensors").read_bytes() == weights
    assert JobEvent.objects.filter(job=job, message__startswith="Resumed from the checkpoint of step 40").count() == 2


def test_a_fresh_lease_is_left_alone(tenant_a, settings):
    settings.JOB_LEASE_SECONDS = 5
    (job,) = _queued_jobs(tenant_a.tenant, 1)
    FineTuningJob.objects.filter(pk=job.pk).update(
        status=JobStatus.RUNNING, attempt=1, lease_heartbeat_at=timezone.now() - timedelta(seconds=2)
    )
    assert jobs_recover(send=lambda job_id: None)["requeued"] == []
    assert FineTuningJob.objects.get(pk=job.pk).status == JobStatus.RUNNING


@pytest.mark.parametrize(
    ("requested", "ends"), [({"cancel_requested": True}, "cancelled"), ({"pause_requested": True}, "paused")]
)
def test_a_lost_job_that_was_being_cancelled_or_paused_ends_so(tenant_a, settings, requested, ends):
    settings.JOB_LEASE_SECONDS = 5
    (job,) = _queued_jobs(tenant_a.tenant, 1)
    FineTuningJob.objects.filter(pk=job.pk).update(
        status=JobStatus.RUNNING, attempt=1, lease_heartbeat_at=timezone.now() - timedelta(minutes=1), **requested
    )
    jobs_recover(send=lambda job_id: None)
    assert FineTuningJob.objects.get(pk=job.pk).status == ends


def test_a_queued_job_pauses_at_once_and_resumes_into_the_queue(tenant_a):
    (job,) = _queued_jobs(tenant_a.tenant, 1)
    job_pause(tenant=tenant_a.tenant, job=job, user=tenant_a.owner)
    job.refresh_from_db()
    assert job.status == JobStatus.PAUSED
    assert _dispatch() == []  # a paused job holds no slot and is not sent

    job_resume(tenant=tenant_a.tenant, job=job, user=tenant_a.owner)
    assert _dispatch() == [job.public_id]
    actors = list(JobStatusChange.objects.filter(job=job).values_list("to_status", "actor"))
    assert ("paused", f"user:{tenant_a.owner.get_username()}") in actors


def test_a_message_lost_in_the_broker_is_sent_again(tenant_a, settings):
    settings.JOB_REDISPATCH_SECONDS = 60
    (job,) = _queued_jobs(tenant_a.tenant, 1)
    assert _dispatch() == [job.public_id]
    assert jobs_recover(send=lambda job_id: None)["dispatched"] == []  # recently sent: still on its way

    FineTuningJob.objects.filter(pk=job.pk).update(dispatched_at=timezone.now() - timedelta(seconds=61))
    assert jobs_recover(send=lambda job_id: None)["dispatched"] == [job.public_id]


@pytest.mark.parametrize(
    ("exc", "retried", "code", "param"),
    [
        (torch.OutOfMemoryError("CUDA out of memory"), False, "out_of_memory", "batch_size"),
        (MemoryError(), False, "out_of_memory", "batch_size"),
        (OperationalError("server closed the connection unexpectedly"), True, "infrastructure_error", None),
        (redis.exceptions.ConnectionError("Connection refused"), True, "infrastructure_error", None),
        (ValueError("a bug"), False, "internal_error", None),
    ],
)
def test_only_infrastructure_failures_are_retried(exc, retried, code, param):
    retry, error = failure_of(exc)
    assert (retry, error["code"], error["param"]) == (retried, code, param)
    assert error["message"]


def test_a_job_retried_after_an_infrastructure_failure_fails_once_its_attempts_are_spent(tenant_a, settings):
    settings.JOB_MAX_ATTEMPTS = 2
    (job,) = _queued_jobs(tenant_a.tenant, 1)
    crash = OperationalError("the database went away")
    for attempt, ends in ((1, JobStatus.QUEUED), (2, JobStatus.FAILED)):
        FineTuningJob.objects.filter(pk=job.pk).update(status=JobStatus.RUNNING, attempt=attempt)
        _record_crash(job, attempt, crash)
        assert FineTuningJob.objects.get(pk=job.pk).status == ends
    assert FineTuningJob.objects.get(pk=job.pk).error["code"] == "infrastructure_error"


def test_a_job_the_broker_could_not_take_gives_its_slot_back_for_the_next_try(tenant_a):
    (job,) = _queued_jobs(tenant_a.tenant, 1)

    def broker_down(job_id: int) -> None:
        raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    assert jobs_dispatch(send=broker_down) == []
    assert FineTuningJob.objects.get(pk=job.pk).dispatched_at is None
    assert _dispatch() == [job.public_id]  # the next recovery tick, with the broker back


def test_a_data_preparation_whose_worker_died_is_sent_again(tenant_a, settings):
    settings.JOB_LEASE_SECONDS = 5
    settings.JOB_REDISPATCH_SECONDS = 900
    waiting, started, stalled = _queued_jobs(tenant_a.tenant, 3)
    settings.MAX_RUNNING_JOBS_PER_TENANT = 3
    assert set(_dispatch()) == {waiting.public_id, started.public_id, stalled.public_id}  # all three to `cpu`
    now = timezone.now()
    sent = now - timedelta(seconds=30)
    FineTuningJob.objects.filter(pk__in=[waiting.pk, started.pk, stalled.pk]).update(dispatched_at=sent)
    # `waiting` is still in the cpu queue (no heartbeat yet), `started` beats, `stalled` stopped beating 10 s ago.
    FineTuningJob.objects.filter(pk=started.pk).update(lease_heartbeat_at=now - timedelta(seconds=1))
    FineTuningJob.objects.filter(pk=stalled.pk).update(lease_heartbeat_at=now - timedelta(seconds=10))

    assert jobs_recover(send=lambda job_id: None)["dispatched"] == [stalled.public_id]
    assert FineTuningJob.objects.get(pk=stalled.pk).phase == JobPhase.TOKENIZING
