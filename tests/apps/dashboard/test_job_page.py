"""The job page (/jobs/<id>/): what the server renders; the live parts are fed by the REST API and the websocket."""

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apps.datasets.models import File
from apps.jobs.models import (
    EventType,
    FineTuningJob,
    JobCheckpoint,
    JobEvent,
    JobStatusChange,
    ModelEvaluation,
)

pytestmark = pytest.mark.django_db


def _file(tenant, name: str, *, status: str = "processed") -> File:
    return File.objects.create(
        tenant=tenant,
        filename=name,
        bytes=1,
        sha256="a" * 64,
        storage_key=f"tenants/{tenant.pk}/files/{name}",
        status=status,
    )


def _job(tenant, *, status: str, phase: str = "training") -> FineTuningJob:
    return FineTuningJob.objects.create(
        tenant=tenant,
        model="gpt2-tiny",
        training_file=_file(tenant, "train.jsonl"),
        hyperparameters={"learning_rate": 3e-4, "max_steps": 40},
        status=status,
        phase=phase,
        steps_completed=20,
        total_steps=40,
        latest_train_loss=1.25,
    )


@pytest.fixture
def browser(tenant_a):
    client = Client()
    client.force_login(tenant_a.owner)
    return client


@pytest.fixture
def finished_job(tenant_a):
    job = _job(tenant_a.tenant, status="succeeded", phase="done")
    for previous, status in (
        ("", "validating_files"),
        ("validating_files", "queued"),
        ("queued", "running"),
        ("running", "succeeded"),
    ):
        JobStatusChange.objects.create(job=job, from_status=previous, to_status=status, actor="system")
    JobEvent.objects.create(tenant=job.tenant, job=job, message="a message only the events API returns")
    JobEvent.objects.create(
        tenant=job.tenant, job=job, type=EventType.METRICS, message="Step 20", data={"step": 20, "train_loss": 1.25}
    )
    JobCheckpoint.objects.create(
        tenant=job.tenant, job=job, step_number=20, metrics={"train_loss": 1.25, "valid_loss": 1.5}
    )
    evaluation_file = _file(tenant_a.tenant, "held-out.jsonl")
    ModelEvaluation.objects.create(
        tenant=job.tenant,
        job=job,
        file=evaluation_file,
        status="succeeded",
        metrics={"valid_loss": 1.4},
        samples=[{"input": "2+2=", "reference": "4", "prediction": "5", "correct": False}],
        finished_at=timezone.now(),
    )
    return job


def test_the_page_has_the_live_parts_and_renders_no_event(browser, finished_job):
    response = browser.get(f"/jobs/{finished_job.public_id}/")

    assert response.status_code == 200
    html = response.content.decode()
    for element_id in (
        'id="job-status"',
        'id="job-phase"',
        'id="job-progress"',
        'id="job-step"',
        'id="job-total-steps"',
        'id="job-loss"',
        'id="job-eta"',
        'id="job-throughput"',
        'id="connection"',
        'id="job-error"',
        'id="cancel-job"',
        'id="pause-job"',
        'id="resume-job"',
        'id="status-timeline"',
        'id="chart-loss"',
        'id="chart-learning-rate"',
        'id="chart-grad-norm"',
        'id="chart-evaluation"',
        'id="checkpoints"',
        'id="events"',
        'id="load-older-events"',
        'id="generate-card"',
        'id="generate-form"',
        'id="generate-output"',
        'id="evaluate-form"',
        'id="samples"',
    ):
        assert element_id in html, element_id
    assert "vendor/plotly.min.js" in html and "dashboard/charts.js" in html and "dashboard/job.js" in html
    # The log grows with the run: the page's script reads it from the events API, the server renders none of it.
    assert "a message only the events API returns" not in html
    assert '<progress id="job-progress" max="40" value="20">' in html


def test_the_status_timeline_lists_every_change_in_order(browser, finished_job):
    html = browser.get(f"/jobs/{finished_job.public_id}/").content.decode()

    timeline = html[html.index('id="status-timeline"') : html.index("</ol>", html.index('id="status-timeline"'))]
    positions = [
        timeline.index(f'data-status="{status}"') for status in ("validating_files", "queued", "running", "succeeded")
    ]
    assert positions == sorted(positions)
    assert "<time datetime=" in timeline


def test_checkpoints_samples_and_the_evaluation_form_are_shown(browser, finished_job):
    html = browser.get(f"/jobs/{finished_job.public_id}/").content.decode()

    checkpoint = finished_job.checkpoints.get()
    assert f'data-checkpoint-id="{checkpoint.public_id}"' in html
    assert "valid_loss" in html and "1.5" in html
    assert "2+2=" in html and "sample-wrong" in html
    assert 'id="samples-card"' in html and 'id="samples-card" aria-labelledby="samples-heading" hidden' not in html
    # The evaluation form offers the tenant's processed files, by label.
    assert '<label for="evaluate-file">Dataset</label>' in html and "held-out.jsonl" in html
    assert 'id="evaluate-card" aria-labelledby="evaluate-heading" hidden' not in html
    # A finished job has nothing to pause, resume or cancel.
    assert '<button id="pause-job" type="button" disabled>' in html
    assert '<button id="resume-job" type="button" disabled>' in html
    assert '<button id="cancel-job" type="button" class="danger" hidden>' in html


@pytest.mark.parametrize(
    ("status", "pause_enabled", "resume_enabled"),
    [("running", True, False), ("queued", True, False), ("paused", False, True), ("validating_files", False, False)],
)
def test_pause_and_resume_follow_the_status(browser, tenant_a, status, pause_enabled, resume_enabled):
    job = _job(tenant_a.tenant, status=status)

    html = browser.get(f"/jobs/{job.public_id}/").content.decode()

    assert ('<button id="pause-job" type="button" >' in html) is pause_enabled
    assert ('<button id="resume-job" type="button" >' in html) is resume_enabled
    assert '<button id="cancel-job" type="button" class="danger" >' in html
    # Nothing to try or evaluate before the model exists.
    assert 'id="generate-card" aria-labelledby="generate-heading" hidden' in html
    assert 'id="evaluate-card" aria-labelledby="evaluate-heading" hidden' in html


def test_the_page_costs_the_same_queries_with_many_events(browser, tenant_a):
    job = _job(tenant_a.tenant, status="running")

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert browser.get(f"/jobs/{job.public_id}/").status_code == 200
        return len(captured)

    before = queries()
    JobEvent.objects.bulk_create(
        JobEvent(tenant=job.tenant, job=job, type=EventType.METRICS, message=f"Step {step}", data={"step": step})
        for step in range(1, 2001)
    )

    assert queries() == before


def test_another_tenants_job_page_is_not_found(tenant_b, finished_job):
    client = Client()
    client.force_login(tenant_b.owner)

    assert client.get(f"/jobs/{finished_job.public_id}/").status_code == 404


def test_without_an_evaluation_the_page_shows_the_runs_own_sample_predictions(browser, tenant_a):
    import json

    from apps.core.storage import object_store, tenant_key

    job = _job(tenant_a.tenant, status="succeeded", phase="done")
    job.model_storage_prefix = tenant_key(tenant_a.tenant.pk, "models", job.public_id)
    job.save(update_fields=["model_storage_prefix"])
    report = {
        "sample_predictions": [
            {"input": "the film was <b>great</b>", "reference": "positive", "prediction": "positive", "correct": True},
            {"input": "dull", "reference": "negative", "prediction": "positive", "correct": False},
        ]
    }
    object_store().put_bytes(f"{job.model_storage_prefix}/training_report.json", json.dumps(report).encode())

    page = browser.get(f"/jobs/{job.public_id}/").content.decode()

    assert 'id="samples-card" aria-labelledby="samples-heading" hidden' not in page
    assert "From the run's final evaluation on its validation split." in page
    assert "the film was &lt;b&gt;great&lt;/b&gt;" in page  # user text as text, never markup
    assert page.count('class="sample-correct"') == 1 and page.count('class="sample-wrong"') == 1


def test_a_succeeded_job_without_a_stored_report_shows_no_samples(browser, tenant_a):
    job = _job(tenant_a.tenant, status="succeeded", phase="done")
    job.model_storage_prefix = f"tenants/{tenant_a.tenant.pk}/models/{job.public_id}"
    job.save(update_fields=["model_storage_prefix"])

    page = browser.get(f"/jobs/{job.public_id}/").content.decode()

    assert 'id="samples-card" aria-labelledby="samples-heading" hidden' in page
