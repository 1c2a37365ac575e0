"""Compare runs (/jobs/compare/?jobs=a,b): the picker, the difference table and the data for the overlaid charts."""

import json
import re

import pytest
from django.test import Client

from apps.datasets.models import File
from apps.jobs.models import FineTuningJob

pytestmark = pytest.mark.django_db


def _job(tenant, file, **fields) -> FineTuningJob:
    return FineTuningJob.objects.create(tenant=tenant, model="gpt2-tiny", training_file=file, **fields)


@pytest.fixture
def training_file(tenant_a):
    return File.objects.create(
        tenant=tenant_a.tenant, filename="train.jsonl", bytes=1, sha256="a" * 64, storage_key="tenants/1/files/t"
    )


@pytest.fixture
def browser(tenant_a):
    client = Client()
    client.force_login(tenant_a.owner)
    return client


@pytest.fixture
def two_runs(tenant_a, training_file):
    first = _job(
        tenant_a.tenant,
        training_file,
        suffix="baseline",
        hyperparameters={"learning_rate": 1e-4, "n_epochs": 3, "lora_r": 8},
        status="succeeded",
        metrics={"valid_loss": 1.5, "train_loss": 1.2},
    )
    second = _job(
        tenant_a.tenant,
        training_file,
        hyperparameters={"learning_rate": 3e-4, "n_epochs": 3},
        status="succeeded",
        metrics={"valid_loss": 1.5, "train_loss": 1.1},
    )
    return first, second


def _rows(html: str) -> dict[str, tuple[bool, list[str]]]:
    """Setting -> (highlighted as differing, the cells), read from the difference table."""
    table = html[html.index('id="compare-table"') : html.index("</table>", html.index('id="compare-table"'))]
    rows = {}
    for classes, label, cells in re.findall(
        r'<tr class="([^"]*)"[^>]*>\s*<th scope="row">([^<]*)(.*?)</tr>', table, flags=re.S
    ):
        rows[label.strip()] = ("differs" in classes.split(), re.findall(r"<td>(.*?)</td>", cells, flags=re.S))
    return rows


def test_differing_hyperparameters_are_highlighted(browser, two_runs):
    first, second = two_runs

    response = browser.get(f"/jobs/compare/?jobs={first.public_id},{second.public_id}")

    assert response.status_code == 200
    rows = _rows(response.content.decode())
    assert rows["learning_rate"] == (True, ["0.0001", "0.0003"])
    assert rows["n_epochs"] == (False, ["3", "3"])
    # A key only one run has is a difference too, shown as a dash for the other.
    assert rows["lora_r"] == (True, ["8", "—"])
    assert rows["model"][0] is False and rows["training file"][0] is False
    assert rows["suffix"] == (True, ["baseline", "—"])
    assert rows["status"][0] is False
    assert rows["valid_loss"][0] is False and rows["train_loss"][0] is True


def test_the_only_differences_toggle_and_the_charts_data_are_there(browser, two_runs):
    first, second = two_runs

    html = browser.get(f"/jobs/compare/?jobs={first.public_id}&jobs={second.public_id}").content.decode()

    assert '<input type="checkbox" id="only-differences">' in html
    assert '<label for="only-differences">Only differences</label>' in html
    for chart in ("compare-chart-train-loss", "compare-chart-validation-loss", "compare-chart-learning-rate"):
        assert f'id="{chart}"' in html
    chart_jobs = json.loads(
        re.search(r'<script id="compare-jobs" type="application/json">(.*?)</script>', html).group(1)
    )
    assert chart_jobs == [
        {"id": first.public_id, "label": f"{first.public_id} (baseline)"},
        {"id": second.public_id, "label": second.public_id},
    ]
    assert "vendor/plotly.min.js" in html and "dashboard/compare.js" in html


def test_the_picker_lists_recent_runs_and_ticks_the_compared_ones(browser, two_runs):
    first, second = two_runs

    html = browser.get(f"/jobs/compare/?jobs={first.public_id}").content.decode()

    assert re.search(
        rf'<input type="checkbox" id="compare-job-{first.public_id}" name="jobs" value="{first.public_id}" checked>',
        html,
    )
    assert re.search(
        rf'<input type="checkbox" id="compare-job-{second.public_id}" name="jobs" value="{second.public_id}" >', html
    )
    assert f'<label for="compare-job-{second.public_id}">' in html
    assert 'method="get"' in html and ">Compare</button>" in html


def test_without_jobs_only_the_picker_is_shown(browser, two_runs):
    html = browser.get("/jobs/compare/").content.decode()

    assert 'id="compare-form"' in html and 'id="compare-table"' not in html and "plotly" not in html


def test_more_runs_than_the_cap_shows_the_first_ones_and_says_so(browser, tenant_a, training_file):
    jobs = [_job(tenant_a.tenant, training_file, seed=index) for index in range(12)]

    response = browser.get("/jobs/compare/?jobs=" + ",".join(job.public_id for job in jobs))

    html = response.content.decode()
    assert response.status_code == 200
    assert 'id="compare-limit"' in html and "up to 10 can be compared" in html
    assert len(_rows(html)["seed"][1]) == 10


@pytest.mark.parametrize("whose", ["another tenant's", "unknown"])
def test_a_job_that_is_not_the_tenants_is_not_found(browser, two_runs, tenant_b, whose):
    first, _ = two_runs
    if whose == "unknown":
        other_id = "ftjob-doesnotexist"
    else:
        other_file = File.objects.create(
            tenant=tenant_b.tenant, filename="b.jsonl", bytes=1, sha256="b" * 64, storage_key="tenants/2/files/b"
        )
        other_id = _job(tenant_b.tenant, other_file, hyperparameters={"learning_rate": 9e-9}).public_id

    response = browser.get(f"/jobs/compare/?jobs={first.public_id},{other_id}")

    assert response.status_code == 404
    assert b"9e-09" not in response.content
