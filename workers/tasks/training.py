"""Queue `gpu`: training runs, evaluations and bias audits, plus the job-recovery loop every worker runs.

The service claims a database lease first, so a redelivered task is harmless. A worker asked to stop (SIGTERM: a
deploy, `docker stop`, a spot instance being reclaimed) lets a running job finish its step, write a checkpoint and go
back to the queue, instead of losing the run or making Celery wait hours for it.
"""

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

from billiard.process import active_children
from celery import shared_task
from celery.signals import worker_process_init, worker_ready, worker_shutting_down

logger = logging.getLogger(__name__)

# Set in a pool process when its worker is shutting down; the running job checks it between steps.
_worker_stopping = threading.Event()


@contextlib.contextmanager
def _sigterm_stops_training() -> Iterator[threading.Event]:
    """While a job runs, SIGTERM in the pool process asks training to checkpoint and stop, instead of billiard's
    default of exiting mid-step."""
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: _worker_stopping.set())
    try:
        yield _worker_stopping
    finally:
        signal.signal(signal.SIGTERM, previous)


@shared_task(name="workers.tasks.training.run_training_job", acks_late=True, reject_on_worker_lost=True)
def run_training_job(job_id: int) -> None:
    from apps.jobs.execution import job_run

    with _sigterm_stops_training() as stopping:
        job_run(job_id=job_id, worker_stopping=stopping)


@shared_task(name="workers.tasks.training.run_model_evaluation", acks_late=True, reject_on_worker_lost=True)
def run_model_evaluation(evaluation_id: int) -> None:
    from apps.jobs.services import evaluation_run

    evaluation_run(evaluation_id=evaluation_id)


@shared_task(name="workers.tasks.training.run_bias_audit", acks_late=True, reject_on_worker_lost=True)
def run_bias_audit(audit_id: int) -> None:
    from apps.audits.services import audit_run

    audit_run(audit_id=audit_id)


@worker_process_init.connect
def _load_the_engine(**_) -> None:
    # Each pool process imports the training engine (torch, transformers, peft: seconds) when it starts, not when
    # its first job arrives: that job would otherwise wait for it (measured: 5 s to a first step instead of 0.2 s).
    import workers.ml.engine  # noqa: F401


@worker_shutting_down.connect
def _forward_shutdown_to_pool(**_) -> None:
    # Only the main process gets the signal when it alone is signalled (`docker stop`, systemd): its pool processes
    # must hear it too, or a training job would run on for hours while the warm shutdown waits for it.
    for child in active_children():
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGTERM)


@worker_ready.connect
def _start_job_recovery(**_) -> None:
    threading.Thread(target=_recover_jobs_forever, name="job-recovery", daemon=True).start()


def _recover_jobs_forever() -> None:
    """Every worker's main process repairs expired leases, dispatches queued jobs, re-sends overdue webhook
    deliveries and advances hyperparameter studies a lost message left waiting, every few seconds: no extra
    scheduler process to run, and several workers doing it at once is harmless (row locks, idempotent steps)."""
    from django.conf import settings
    from django.db import connection

    from apps.audits.services import audits_recover
    from apps.jobs.services import jobs_recover
    from apps.tuning.services import studies_reconcile
    from apps.webhooks.services import webhook_deliveries_redispatch_overdue

    stop = threading.Event()
    while True:
        try:
            result = jobs_recover()
            if result["requeued"]:
                logger.warning("requeued jobs whose worker stopped answering: %s", ", ".join(result["requeued"]))
            webhook_deliveries_redispatch_overdue()
            studies_reconcile()
            audits_recover()
        except Exception:
            logger.exception("job recovery failed; trying again")
        finally:
            # No connection is held across the sleep (nor inherited by a pool process forked meanwhile).
            connection.close()
        stop.wait(settings.JOB_RECOVERY_INTERVAL_SECONDS)
