"""GET /v1/fine_tuning/jobs/{id}/metrics: the chart series of a job, one point per step, thinned server-side."""

import pytest
from django.test import Client

from apps.datasets.models import File
from apps.jobs.models import EventType, FineTuningJob, JobEvent

pytestmark = pytest.mark.django_db


@pytest.fixture
def job(tenant_a):
    file = File.objects.create(
        tenant=tenant_a.tenant, filename="corpus.txt", bytes=1, sha256="a" * 64, storage_key="tenants/x/files/1"
    )
    return FineTuningJob.objects.create(tenant=tenant_a.tenant, model="gpt2-tiny", training_file=file)


def _log_metrics(job, *points: dict) -> None:
    JobEvent.objects.bulk_create(
        JobEvent(tenant=job.tenant, job=job, type=EventType.METRICS, message=f"Step {data['step']}", data=data)
        for data in points
    )


def _metrics(tenant, job, **params):
    return tenant.api().get(f"/v1/fine_tuning/jobs/{job.public_id}/metrics", params)


def test_series_has_one_point_per_step_in_step_order_with_the_numbers_only(tenant_a, job):
    _log_metrics(
        job,
        {"step": 2, "total_steps": 4, "train_loss": 2.0, "learning_rate": 1e-4, "grad_norm": 1.5, "eta_seconds": 3.0},
        {"step": 1, "total_steps": 4, "train_loss": 3.0, "learning_rate": 5e-5, "note": "text is not a curve"},
    )
    JobEvent.objects.create(tenant=job.tenant, job=job, message="Job started", data={"step": 99})

    response = _metrics(tenant_a, job)

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list" and body["downsampled"] is False and body["total_points"] == 2
    assert body["data"] == [
        {"step": 1, "train_loss": 3.0, "learning_rate": 5e-5, "attempt": 0},
        {"step": 2, "train_loss": 2.0, "learning_rate": 1e-4, "grad_norm": 1.5, "attempt": 0},
    ]
    assert body["evaluation_metrics"] == []


def test_a_resumed_attempt_replaces_the_steps_logged_after_its_checkpoint(tenant_a, job):
    # Attempt 1 reached step 10; attempt 2 restarted from the checkpoint of step 5 and has reached step 7 so far.
    _log_metrics(job, *({"step": step, "train_loss": 10.0 - step, "attempt": 1} for step in range(1, 11)))
    _log_metrics(job, *({"step": step, "train_loss": 100.0 + step, "attempt": 2} for step in range(6, 8)))

    points = _metrics(tenant_a, job).json()["data"]

    assert [(p["step"], p["attempt"]) for p in points] == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 2), (7, 2)]
    assert points[-1]["train_loss"] == 107.0


def test_within_one_attempt_the_later_event_for_a_step_wins(tenant_a, job):
    _log_metrics(job, {"step": 3, "train_loss": 1.0, "attempt": 1}, {"step": 3, "train_loss": 0.5, "attempt": 1})

    assert _metrics(tenant_a, job).json()["data"] == [{"step": 3, "train_loss": 0.5, "attempt": 1}]


def test_a_long_series_is_thinned_but_keeps_every_evaluation_and_the_first_and_last_step(tenant_a, job):
    evaluation_steps = set(range(250, 3001, 250))
    _log_metrics(
        job,
        *(
            {"step": step, "train_loss": 5.0 / step + (step % 7) * 0.01, "learning_rate": 1e-4, "attempt": 0}
            | ({"valid_loss": 4.0 / step, "accuracy": 0.5} if step in evaluation_steps else {})
            for step in range(1, 3001)
        ),
    )

    body = _metrics(tenant_a, job, max_points=100).json()

    steps = [point["step"] for point in body["data"]]
    assert body["downsampled"] is True and body["total_points"] == 3000
    assert len(steps) <= 100 and len(steps) > 50
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert steps[0] == 1 and steps[-1] == 3000
    assert evaluation_steps <= set(steps)
    assert all("valid_loss" in point for point in body["data"] if point["step"] in evaluation_steps)
    assert body["evaluation_metrics"] == ["accuracy", "valid_loss"]


def test_thinning_keeps_the_peaks_of_the_loss_curve(tenant_a, job):
    # A flat curve with one spike: a shape-preserving method keeps the spike, plain striding would miss it.
    _log_metrics(job, *({"step": step, "train_loss": 9.0 if step == 1237 else 1.0} for step in range(1, 2001)))

    steps = [point["step"] for point in _metrics(tenant_a, job, max_points=50).json()["data"]]

    assert 1237 in steps


def test_evaluations_beyond_the_budget_are_thinned_too_so_the_bound_holds(tenant_a, job):
    _log_metrics(job, *({"step": step, "train_loss": 1.0, "eval_loss": 1.0} for step in range(1, 201)))

    body = _metrics(tenant_a, job, max_points=20).json()

    steps = [point["step"] for point in body["data"]]
    assert len(steps) <= 20 and steps[0] == 1 and steps[-1] == 200


def test_default_budget_is_500_points(tenant_a, job):
    _log_metrics(job, *({"step": step, "train_loss": 1.0 / step} for step in range(1, 1201)))

    body = _metrics(tenant_a, job).json()

    assert body["downsampled"] is True and len(body["data"]) == 500 and body["total_points"] == 1200


def test_a_job_without_metrics_has_an_empty_series(tenant_a, job):
    assert _metrics(tenant_a, job).json() == {
        "object": "list",
        "data": [],
        "downsampled": False,
        "total_points": 0,
        "evaluation_metrics": [],
    }


@pytest.mark.parametrize("max_points", ["many", "9", "5001", "-1", "1.5"])
def test_a_bad_max_points_is_a_400_naming_the_parameter(tenant_a, job, max_points):
    response = _metrics(tenant_a, job, max_points=max_points)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "max_points" and error["type"] == "invalid_request_error"
    assert "between 10 and 5000" in error["message"]


def test_another_tenants_job_is_not_found(tenant_a, tenant_b, job):
    _log_metrics(job, {"step": 1, "train_loss": 1.0})

    response = _metrics(tenant_b, job)

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert b"train_loss" not in response.content


def test_the_dashboard_reads_it_with_its_session(tenant_a, job):
    _log_metrics(job, {"step": 1, "train_loss": 1.0})
    browser = Client()
    browser.force_login(tenant_a.owner)

    response = browser.get(f"/v1/fine_tuning/jobs/{job.public_id}/metrics")

    assert response.status_code == 200 and response.json()["data"][0]["train_loss"] == 1.0


def test_the_series_costs_the_same_queries_however_long_the_job(tenant_a, job, django_assert_max_num_queries):
    # One query reads the events' data column; the rest is authentication and the job lookup.
    _log_metrics(job, *({"step": step, "train_loss": 1.0} for step in range(1, 3001)))
    client = tenant_a.api()

    with django_assert_max_num_queries(8):
        response = client.get(f"/v1/fine_tuning/jobs/{job.public_id}/metrics")

    assert response.json()["total_points"] == 3000


def test_a_finished_jobs_series_is_served_again_without_reading_its_events(tenant_a, job):
    from django.utils import timezone

    FineTuningJob.objects.filter(pk=job.pk).update(status="succeeded", finished_at=timezone.now())
    _log_metrics(job, *({"step": step, "train_loss": 1.0} for step in range(1, 101)))
    client = tenant_a.api()
    first = client.get(f"/v1/fine_tuning/jobs/{job.public_id}/metrics").json()
    JobEvent.objects.filter(job=job).delete()  # gone from the table: the answer below can only be the cached one

    second = client.get(f"/v1/fine_tuning/jobs/{job.public_id}/metrics").json()

    assert second == first and second["total_points"] == 100
