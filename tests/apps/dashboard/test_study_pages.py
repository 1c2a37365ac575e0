"""The hyperparameter-study pages (/studies/, /studies/new/, /studies/<id>/ with its live trials part) and their two
actions (cancel, promote): what the server renders and what the forms do through apps.tuning.services.

No trial trains here: creating a study only sends its first advance to a Celery queue nobody consumes. Tests that
need trials on the page create Trial rows next to real jobs (made by the jobs service) and say so."""

import json
import re

import pytest
from django.test import Client
from django.utils import timezone

from apps.datasets.models import File
from apps.jobs.models import FineTuningJob, JobStatus
from apps.jobs.services import job_create
from apps.tuning.models import Study, StudyStatus, Trial, TrialState
from apps.tuning.services import study_create
from tests.tuning_rows import unreachable_job

# Optuna must never run inside a Django transaction (it opens its own connection to the same database).
pytestmark = pytest.mark.django_db(transaction=True)

FORM_CONTROL = re.compile(r"<(input|select|textarea)\b([^>]*)>")


def _training_file(tenant, *, filename: str = "chat.jsonl") -> File:
    return File.objects.create(
        tenant=tenant,
        filename=filename,
        bytes=10,
        sha256="d" * 64,
        storage_key=f"tenants/{tenant.pk}/files/{filename}",
        status="processed",
        task="chat",
    )


@pytest.fixture(autouse=True)
def _advances_recorded(advances) -> list[int]:
    """No study here is advanced by the session's workers: its advance messages are recorded instead."""
    return advances


def _browser(tenant_fixture) -> Client:
    client = Client()
    client.force_login(tenant_fixture.owner)
    return client


def _study(tenant_fixture, file: File, **overrides) -> Study:
    arguments = {
        "tenant": tenant_fixture.tenant,
        "user": tenant_fixture.owner,
        "model": "gpt2-tiny",
        "training_file": file,
        "name": "lr sweep",
        "hyperparameters": {"max_steps": 20, "eval_every_steps": 5},
        "search_space": {
            "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "scheduler": {"type": "categorical", "choices": ["linear", "cosine"]},
        },
        "n_trials": 6,
        "pruner": "median",
    }
    return study_create(**{**arguments, **overrides})


def _trial(study: Study, number: int, *, state: str = TrialState.RUNNING, value=None, steps=None, params=None) -> Trial:
    """A trial row next to a real job from the jobs service (held back from the session's workers); its state and
    values are set by the test, as the advancing worker would record them, to check how the page renders each row."""
    params = params or {"learning_rate": 10 ** -(2 + number / 4), "scheduler": ["linear", "cosine"][number % 2]}
    job = unreachable_job(study, hyperparameters={**study.base_hyperparameters, **params}, suffix=f"trial-{number}")
    return Trial.objects.create(
        tenant=study.tenant,
        study=study,
        number=number,
        optuna_trial_id=1000 + number,
        job=job,
        params=params,
        state=state,
        value=value,
        intermediate_values={str(step): v for step, v in (steps or {}).items()},
        finished_at=None if state == TrialState.RUNNING else timezone.now(),
    )


def _space_row(index: int, name: str, kind: str, **fields) -> dict:
    row = {f"space-{index}-name": name, f"space-{index}-type": kind}
    row.update({f"space-{index}-{key}": value for key, value in fields.items()})
    return row


def _form(file: File, **overrides) -> dict:
    data = {
        "name": "from the form",
        "model": "gpt2-tiny",
        "training_file": file.public_id,
        "validation_file": "",
        "max_steps": "30",
        "batch_size": "4",
        "eval_every_steps": "10",
        "hyperparameters_json": '{"warmup_steps": 2}',
        "objective_metric": "valid_loss",
        "direction": "auto",
        "sampler": "random",
        "pruner": "none",
        "n_trials": "5",
        "max_parallel_trials": "2",
        "gpu_time_budget_minutes": "30",
        "seed": "7",
        **_space_row(0, "learning_rate", "float", low="1e-4", high="1e-2", log="1", step="", choices=""),
        # Row numbers need not be consecutive: rows added and removed in the browser leave gaps.
        **_space_row(3, "scheduler", "categorical", low="", high="", step="", choices="linear, cosine"),
        **_space_row(4, "", "float", low="", high="", step="", choices=""),
    }
    data.update(overrides)
    return data


@pytest.fixture
def browser(tenant_a) -> Client:
    return _browser(tenant_a)


@pytest.fixture
def training_file(tenant_a) -> File:
    return _training_file(tenant_a.tenant)


def _assert_every_control_is_labelled(html: str) -> None:
    controls = 0
    for _, attributes in FORM_CONTROL.findall(html):
        if 'type="hidden"' in attributes:
            continue
        match = re.search(r'\bid="([^"]+)"', attributes)
        assert match, f"a form control without an id: {attributes}"
        assert f'<label for="{match.group(1)}"' in html or f'for="{match.group(1)}"' in html, match.group(1)
        controls += 1
    assert controls


def test_new_study_form_labels_every_control_and_takes_a_prefill(browser, training_file):
    page = browser.get(f"/studies/new/?model=gpt2-mini&training_file={training_file.public_id}").content.decode()

    _assert_every_control_is_labelled(page)
    assert re.search(r'<option value="gpt2-mini"[^>]*selected', page)
    assert re.search(rf'<option value="{training_file.public_id}" selected', page)
    # The editor offers only what a study may search, and every objective the engine measures.
    assert '<option value="learning_rate">learning_rate</option>' in page and 'value="train_file"' not in page
    for name in ("valid_loss", "accuracy", "rougeL", "tpe", "grid", "hyperband", "successive_halving"):
        assert f'value="{name}"' in page
    assert 'id="add-space-row"' in page and "Start study" in page


def test_new_study_form_creates_the_study_and_redirects_to_it(browser, tenant_a, training_file):
    response = browser.post("/studies/new/", _form(training_file))

    study = Study.objects.for_tenant(tenant_a.tenant).get()
    assert response.status_code == 302 and response["Location"] == f"/studies/{study.public_id}/"
    assert study.search_space == {
        "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "scheduler": {"type": "categorical", "choices": ["linear", "cosine"]},
    }
    assert study.name == "from the form" and study.model == "gpt2-tiny" and study.training_file == training_file
    assert {key: study.base_hyperparameters[key] for key in ("max_steps", "batch_size", "eval_every_steps")} == {
        "max_steps": 30,
        "batch_size": 4,
        "eval_every_steps": 10,
    }
    assert study.base_hyperparameters["warmup_steps"] == 2
    assert (study.sampler, study.pruner, study.direction) == ("random", "none", "minimize")
    assert (study.n_trials, study.max_parallel_trials, study.gpu_time_budget_seconds, study.seed) == (5, 2, 1800, 7)
    assert study.created_by == tenant_a.owner

    page = browser.get(response["Location"]).content.decode()
    assert f"Study {study.public_id} started" in page


def test_an_invalid_search_space_is_shown_with_the_users_input_kept(browser, tenant_a, training_file):
    form = _form(training_file, **{"space-0-low": "0.5", "space-0-high": "0.1", "space-0-log": ""})

    response = browser.post("/studies/new/", form)

    assert response.status_code == 400
    page = response.content.decode()
    assert 'id="study-error"' in page and "search_space.learning_rate.low must not exceed" in page
    # Everything typed is still there, and the faulty row is marked.
    assert 'value="0.5"' in page and 'value="0.1"' in page and 'value="linear, cosine"' in page
    assert re.search(r'<option value="learning_rate" selected', page)
    assert re.search(r'<tr data-space-row class="error">\s*<td><label class="visually-hidden" for="space-0-name"', page)
    assert 'value="from the form"' in page and "{&quot;warmup_steps&quot;: 2}" in page
    assert re.search(r'<option value="random" selected', page)
    assert not Study.objects.exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"hyperparameters_json": "{not json"}, "Other hyperparameters: not valid JSON"),
        ({"space-0-name": "", "space-3-name": ""}, "search_space must be an object with at least one hyperparameter"),
        ({"space-3-name": "learning_rate"}, "learning_rate appears in two rows"),
        ({"space-0-name": "train_file"}, "is not a hyperparameter a study can search"),
        ({"n_trials": "many"}, "n_trials must be a whole number"),
        ({"gpu_time_budget_minutes": "soon"}, "GPU-time budget: a number of minutes"),
        ({"training_file": ""}, "Pick a training file"),
        ({"sampler": "grid"}, "A grid search needs a finite set of values"),
    ],
)
def test_form_errors_re_render_the_form_and_never_fail(browser, training_file, override, message):
    response = browser.post("/studies/new/", _form(training_file, **override))

    assert response.status_code == 400, response.content[:500]
    assert message in response.content.decode()
    assert not Study.objects.exists()


def test_another_tenants_file_is_not_found_in_the_form(browser, tenant_b):
    foreign = _training_file(tenant_b.tenant, filename="rival.jsonl")

    response = browser.post("/studies/new/", _form(foreign))

    assert response.status_code == 404 and "No such file." in response.content.decode()
    assert foreign.public_id.encode() not in response.content and b"rival.jsonl" not in response.content
    assert not Study.objects.exists()


def test_the_list_shows_the_tenants_studies_newest_first(browser, tenant_a, tenant_b, training_file):
    older = _study(tenant_a, training_file, name="first sweep")
    newer = _study(tenant_a, training_file, name="second sweep", sampler="random")
    foreign = _study(tenant_b, _training_file(tenant_b.tenant), name="rival sweep")

    page = browser.get("/studies/").content.decode()

    assert page.index(newer.public_id) < page.index(older.public_id)
    assert "second sweep" in page and "first sweep" in page and "gpt2-tiny" in page
    assert "0 / 6" in page and "median" in page and "random" in page and "running" in page
    assert foreign.public_id not in page and "rival sweep" not in page
    assert 'href="/studies/new/"' in page and 'aria-current="page">Studies</a>' in page


def test_the_study_page_renders_its_header_trial_table_and_chart_containers(browser, tenant_a, training_file):
    study = _study(tenant_a, training_file)

    page = browser.get(f"/studies/{study.public_id}/").content.decode()

    assert "lr sweep" in page and study.public_id in page
    assert 'id="study-objective"' in page and "minimize <strong>valid_loss</strong>" in page
    assert "median" in page and "tpe" in page and "0</span> / 6 finished" in page
    assert 'id="study-trials"' in page and "The first trials are being queued" in page
    for chart in ("chart-history", "chart-importances", "chart-parallel", "chart-intermediate"):
        assert f'id="{chart}"' in page
    assert "need at least 2 complete trials" in page and 'id="study-chart-data"' in page
    assert "vendor/plotly.min.js" in page
    # While it runs, the live part refreshes itself, and the study can be cancelled.
    assert f'hx-get="/studies/{study.public_id}/trials/"' in page and 'hx-trigger="every 5s"' in page
    assert 'id="cancel-study"' in page and "window.confirm" in page


def test_trial_rows_best_trial_and_chart_data(browser, tenant_a, training_file):
    """Rendering only: the trial rows are written as the advancing worker would record them (no training runs)."""
    study = _study(tenant_a, training_file)
    best = _trial(study, 0, state=TrialState.COMPLETE, value=1.25, steps={5: 2.0, 10: 1.5, 20: 1.25})
    _trial(study, 1, state=TrialState.PRUNED, value=3.0, steps={5: 3.0})
    _trial(study, 2, state=TrialState.RUNNING, steps={5: 2.5})
    Study.objects.filter(pk=study.pk).update(
        best_trial=best, param_importances={"learning_rate": 0.8, "scheduler": 0.2}
    )

    response = browser.get(f"/studies/{study.public_id}/trials/")

    assert response.status_code == 200
    part = response.content.decode()
    assert '<div id="study-live"' in part and "<html" not in part
    rows = re.findall(r'<tr data-trial-number="(\d+)" data-state="(\w+)"', part)
    assert rows == [("0", "complete"), ("1", "pruned"), ("2", "running")]
    assert re.search(r'data-trial-number="0"[^>]*class="best-trial"', part) and "★" in part
    assert f'href="/jobs/{best.job.public_id}/"' in part and 'id="best-value"' in part
    # The best trial's job has not succeeded (nothing trained), so there is nothing to promote yet.
    assert 'id="promote-best"' not in part
    chart = json.loads(
        re.search(r'<script id="study-chart-data" type="application/json">(.*?)</script>', part, re.S)[1]
    )
    assert chart["history"] == [{"number": 0, "value": 1.25, "best": 1.25}]
    assert chart["importances"] == {"learning_rate": 0.8, "scheduler": 0.2}
    assert [t["intermediate_values"] for t in chart["trials"]] == [
        [[5, 2.0], [10, 1.5], [20, 1.25]],
        [[5, 3.0]],
        [[5, 2.5]],
    ]
    assert set(chart["search_space"]) == {"learning_rate", "scheduler"} and chart["direction"] == "minimize"


def test_promote_from_the_page_names_the_model_and_links_to_deploy(browser, tenant_a, training_file):
    """Rendering and the promote action: the trial's job is marked succeeded by the test, as a finished trial's
    would be (no training runs here)."""
    study = _study(tenant_a, training_file)
    trial = _trial(study, 0, state=TrialState.COMPLETE, value=0.9, steps={5: 1.1, 10: 0.9})
    FineTuningJob.objects.filter(pk=trial.job_id).update(status=JobStatus.SUCCEEDED, finished_at=timezone.now())
    Study.objects.filter(pk=study.pk).update(best_trial=trial)
    assert 'id="promote-best"' in browser.get(f"/studies/{study.public_id}/").content.decode()

    response = browser.post(f"/studies/{study.public_id}/trials/0/promote/")

    assert response.status_code == 302 and response["Location"] == f"/studies/{study.public_id}/"
    trial.refresh_from_db()
    trial.job.refresh_from_db()
    assert trial.promoted_at is not None and trial.job.fine_tuned_model
    page = browser.get(response["Location"]).content.decode()
    assert f"Trial 0 promoted: its model is {trial.job.fine_tuned_model}" in page
    assert 'id="promote-best"' not in page and trial.job.fine_tuned_model in page
    assert f'href="/jobs/{trial.job.public_id}/#deploy-card"' in page


def test_promoting_a_trial_that_is_not_complete_is_a_message_not_an_error(browser, tenant_a, training_file):
    study = _study(tenant_a, training_file)
    _trial(study, 0)

    response = browser.post(f"/studies/{study.public_id}/trials/0/promote/", follow=True)

    assert response.status_code == 200
    assert "Trial 0 is running; only a complete trial has a model to promote." in response.content.decode()
    assert browser.post(f"/studies/{study.public_id}/trials/9/promote/").status_code == 404


def test_cancel_ends_the_study_and_its_running_trials(browser, tenant_a, training_file):
    study = _study(tenant_a, training_file)
    trial = _trial(study, 0)

    response = browser.post(f"/studies/{study.public_id}/cancel/", follow=True)

    assert response.status_code == 200
    study.refresh_from_db()
    assert study.status == StudyStatus.CANCELLED
    trial.job.refresh_from_db()
    assert trial.job.status == JobStatus.CANCELLED or trial.job.cancel_requested
    page = response.content.decode()
    assert f"Study {study.public_id} cancelled" in page and 'class="status-cancelled">cancelled' in page
    # Ended: no more polling, no cancel button; a second cancel says why it cannot.
    assert "hx-trigger" not in page and 'id="cancel-study"' not in page
    again = browser.post(f"/studies/{study.public_id}/cancel/", follow=True)
    assert "has already cancelled; it cannot be cancelled" in again.content.decode()
    assert browser.get(f"/studies/{study.public_id}/cancel/").status_code == 405


def test_a_trial_jobs_page_links_to_its_study(browser, tenant_a, training_file):
    study = _study(tenant_a, training_file)
    trial = _trial(study, 3)
    plain = job_create(tenant=tenant_a.tenant, user=None, training_file=training_file, model="gpt2-tiny")

    page = browser.get(f"/jobs/{trial.job.public_id}/").content.decode()
    assert 'id="job-study-trial"' in page and "Trial 3 of study" in page
    assert f'href="/studies/{study.public_id}/"' in page
    assert 'id="job-study-trial"' not in browser.get(f"/jobs/{plain.public_id}/").content.decode()


def test_another_tenant_gets_not_found_on_every_study_page_and_action(tenant_a, tenant_b, training_file):
    study = _study(tenant_a, training_file)
    _trial(study, 0, state=TrialState.COMPLETE, value=1.0)
    intruder = _browser(tenant_b)

    for path in (f"/studies/{study.public_id}/", f"/studies/{study.public_id}/trials/"):
        response = intruder.get(path)
        assert response.status_code == 404 and study.public_id.encode() not in response.content
    assert intruder.post(f"/studies/{study.public_id}/cancel/").status_code == 404
    assert intruder.post(f"/studies/{study.public_id}/trials/0/promote/").status_code == 404
    study.refresh_from_db()
    assert study.status == StudyStatus.RUNNING
    assert Trial.objects.get(study=study, number=0).promoted_at is None
    assert study.public_id.encode() not in intruder.get("/studies/").content


def test_a_viewer_reads_but_cannot_start_or_cancel(tenant_a, training_file):
    from django.contrib.auth import get_user_model

    from apps.tenancy.models import Membership

    viewer = get_user_model().objects.create_user(username="viewer@acme.test", email="viewer@acme.test")
    Membership.objects.create(tenant=tenant_a.tenant, user=viewer, role="viewer")
    client = Client()
    client.force_login(viewer)
    study = _study(tenant_a, training_file)

    page = client.get(f"/studies/{study.public_id}/").content.decode()
    assert 'id="cancel-study"' not in page
    assert client.post("/studies/new/", _form(training_file)).status_code == 403
    assert Study.objects.count() == 1
    response = client.post(f"/studies/{study.public_id}/cancel/", follow=True)
    assert "can only read" in response.content.decode()
    study.refresh_from_db()
    assert study.status == StudyStatus.RUNNING
