"""The endpoint pages (/endpoints/, /endpoints/<id>/, /endpoints/compare/) and the job page's Deploy card: what
the server renders. Status, usage and streamed tokens come from the REST API in the page's scripts."""

import re

import pytest
from django.test import Client

from apps.datasets.models import File
from apps.endpoints.models import Endpoint
from apps.jobs.models import FineTuningJob, JobCheckpoint
from apps.jobs.serialization import fine_tuned_model_name

pytestmark = pytest.mark.django_db

FORM_CONTROL = re.compile(r"<(input|select|textarea)\b([^>]*)>")


def _job(tenant, *, status: str = "succeeded", suffix: str = "support-bot") -> FineTuningJob:
    training_file = File.objects.create(
        tenant=tenant,
        filename="train.jsonl",
        bytes=1,
        sha256="a" * 64,
        storage_key=f"tenants/{tenant.pk}/files/train",
        status="processed",
    )
    job = FineTuningJob.objects.create(
        tenant=tenant, model="gpt2-tiny", training_file=training_file, suffix=suffix, status=status
    )
    if status == "succeeded":
        job.fine_tuned_model = fine_tuned_model_name(job)
        job.save(update_fields=["fine_tuned_model"])
    return job


def _endpoint(job, *, name: str, task: str = "causal_lm", status: str = "ready") -> Endpoint:
    return Endpoint.objects.create(tenant=job.tenant, name=name, job=job, task=task, status=status, revision=3)


def _browser(tenant_fixture) -> Client:
    client = Client()
    client.force_login(tenant_fixture.owner)
    return client


def _assert_every_control_is_labelled(html: str) -> None:
    """Keyboard and screen-reader use: every input, select and textarea has a <label for=its id>."""
    controls = 0
    for _, attributes in FORM_CONTROL.findall(html):
        if 'type="hidden"' in attributes:
            continue
        match = re.search(r'\bid="([^"]+)"', attributes)
        assert match, f"a form control without an id: {attributes}"
        assert f'<label for="{match.group(1)}"' in html, f"no label for #{match.group(1)}"
        controls += 1
    assert controls


@pytest.fixture
def browser(tenant_a):
    return _browser(tenant_a)


@pytest.fixture
def endpoint(tenant_a):
    return _endpoint(_job(tenant_a.tenant), name="support-bot")


def test_the_list_shows_only_the_tenants_endpoints_and_the_deploy_form(browser, endpoint, tenant_b):
    foreign = _endpoint(_job(tenant_b.tenant, suffix="rival"), name="rival-bot")

    response = browser.get("/endpoints/")

    assert response.status_code == 200
    html = response.content.decode()
    assert f'data-endpoint-id="{endpoint.public_id}"' in html and "support-bot" in html
    assert endpoint.job.fine_tuned_model in html and "causal_lm" in html
    assert foreign.public_id not in html and "rival-bot" not in html and "rival" not in html
    for element_id in (
        "endpoint-list",
        "deploy-form",
        "deploy-job",
        "deploy-checkpoint",
        "deploy-submit",
        "deploy-status",
    ):
        assert f'id="{element_id}"' in html, element_id
    assert f'<option value="{endpoint.job.public_id}" data-suffix="support-bot">' in html
    _assert_every_control_is_labelled(html)
    assert "dashboard/endpoints.js" in html
    # The nav leads here and says where the user is.
    assert 'href="/endpoints/" aria-current="page">Endpoints</a>' in html


def test_without_a_succeeded_job_there_is_nothing_to_deploy(browser, tenant_a):
    _job(tenant_a.tenant, status="running")

    html = browser.get("/endpoints/").content.decode()

    assert 'id="deploy-form"' not in html and 'id="deploy-none"' in html
    assert "No endpoint yet" in html


def test_the_endpoint_page_has_every_part_with_labels(browser, endpoint):
    response = browser.get(f"/endpoints/{endpoint.public_id}/")

    assert response.status_code == 200
    html = response.content.decode()
    for element_id in (
        "endpoint-status",
        "endpoint-model",
        "endpoint-checkpoint",
        "endpoint-revision",
        "endpoint-error",
        "undeploy-endpoint",
        "redeploy-form",
        "redeploy-job",
        "redeploy-checkpoint",
        "redeploy-submit",
        "defaults-form",
        "playground-form",
        "playground-mode-chat",
        "playground-mode-completion",
        "playground-message",
        "playground-prompt",
        "playground-max-tokens",
        "playground-temperature",
        "playground-stream",
        "playground-send",
        "playground-stop",
        "playground-output",
        "playground-stats",
        "usage-window",
        "usage-chart-requests",
        "usage-chart-tokens",
        "usage-chart-latency",
        "snippet-curl",
        "snippet-python",
        "copy-curl",
        "copy-python",
        "endpoint-data",
    ):
        assert f'id="{element_id}"' in html, element_id
    _assert_every_control_is_labelled(html)
    assert 'id="playground-card" aria-labelledby="playground-heading" >' in html
    assert 'id="predict-card" aria-labelledby="predict-heading" hidden>' in html
    assert endpoint.job.fine_tuned_model in html and '<dd id="endpoint-revision">3</dd>' in html
    # The redeploy picker starts on the job being served.
    assert f'<option value="{endpoint.job.public_id}" selected>' in html
    for script in ("vendor/plotly.min.js", "dashboard/charts.js", "dashboard/playground.js", "dashboard/endpoints.js"):
        assert script in html


def test_snippets_carry_the_endpoint_name_and_the_real_base_url(browser, endpoint, settings):
    settings.ALLOWED_HOSTS = ["tunehouse.example"]
    html = browser.get(f"/endpoints/{endpoint.public_id}/", HTTP_HOST="tunehouse.example").content.decode()

    base_url = "http://tunehouse.example/v1"
    curl = html[html.index('id="snippet-curl"') : html.index("</code>", html.index('id="snippet-curl"'))]
    python = html[html.index('id="snippet-python"') : html.index("</code>", html.index('id="snippet-python"'))]
    assert f"curl {base_url}/chat/completions" in curl and "support-bot" in curl
    assert f"base_url=&quot;{base_url}&quot;" in python and "model=&quot;support-bot&quot;" in python
    assert "from openai import OpenAI" in python


def test_a_classifier_gets_the_predict_box_instead_of_the_playground(browser, tenant_a):
    classifier = _endpoint(_job(tenant_a.tenant, suffix="sentiment"), name="sentiment", task="classification")

    html = browser.get(f"/endpoints/{classifier.public_id}/").content.decode()

    assert 'id="predict-card" aria-labelledby="predict-heading" >' in html
    assert 'id="playground-card" aria-labelledby="playground-heading" hidden>' in html
    assert '<label for="predict-input">' in html and 'id="predict-results"' in html
    assert f"http://testserver/v1/endpoints/{classifier.public_id}/predict" in html


def test_another_tenants_endpoint_is_not_found_on_every_page(endpoint, tenant_b):
    intruder = _browser(tenant_b)
    own = _endpoint(_job(tenant_b.tenant, suffix="mine"), name="mine")

    assert intruder.get(f"/endpoints/{endpoint.public_id}/").status_code == 404
    assert intruder.get("/endpoints/ep-doesnotexist/").status_code == 404
    for query in (f"a={endpoint.public_id}&b={own.public_id}", f"a={own.public_id}&b={endpoint.public_id}"):
        assert intruder.get(f"/endpoints/compare/?{query}").status_code == 404
    listing = intruder.get("/endpoints/").content.decode()
    assert endpoint.public_id not in listing and "support-bot" not in listing


def test_compare_shows_a_picker_then_two_columns(browser, endpoint, tenant_a):
    other = _endpoint(_job(tenant_a.tenant, suffix="v2"), name="support-bot-v2")

    picker = browser.get("/endpoints/compare/").content.decode()
    assert 'id="endpoint-compare-picker"' in picker and 'id="compare-form"' not in picker
    assert '<label for="compare-a">' in picker and '<label for="compare-b">' in picker
    assert endpoint.public_id in picker and other.public_id in picker

    html = browser.get(f"/endpoints/compare/?a={endpoint.public_id}&b={other.public_id}").content.decode()
    for element_id in (
        "compare-form",
        "compare-prompt",
        "compare-send",
        "compare-stop",
        "compare-output-a",
        "compare-output-b",
    ):
        assert f'id="{element_id}"' in html, element_id
    assert 'data-endpoint-name="support-bot"' in html and 'data-endpoint-name="support-bot-v2"' in html
    _assert_every_control_is_labelled(html)
    assert "dashboard/playground.js" in html


def test_the_job_page_offers_deploy_only_for_a_succeeded_job(browser, tenant_a):
    succeeded = _job(tenant_a.tenant, suffix="Support Bot")
    checkpoint = JobCheckpoint.objects.create(tenant=tenant_a.tenant, job=succeeded, step_number=20, metrics={})
    running = _job(tenant_a.tenant, status="running")

    html = browser.get(f"/jobs/{succeeded.public_id}/").content.decode()
    assert 'id="deploy-card" aria-labelledby="deploy-heading" >' in html
    assert 'id="deploy-job-name" name="name"' in html and 'value="support-bot"' in html
    assert f'<option value="{checkpoint.public_id}">step 20' in html
    assert '<label for="deploy-job-name">' in html and '<label for="deploy-job-checkpoint">' in html
    assert 'id="deploy-job-submit" type="submit">Deploy</button>' in html

    html = browser.get(f"/jobs/{running.public_id}/").content.decode()
    assert 'id="deploy-card" aria-labelledby="deploy-heading" hidden>' in html
