"""The model catalog page and the new-job page: every entry with its facts and a start link, and a form whose every
input has a label (the browser tests find them by label), preselected from ?model=."""

import re

import pytest
from django.test import Client

from apps.catalog.models import CatalogModel
from apps.datasets.models import File
from workers.ml.config import TrainingConfig


@pytest.fixture
def browser(tenant_a) -> Client:
    client = Client()
    client.force_login(tenant_a.owner)
    return client


@pytest.mark.django_db
def test_catalog_page_lists_every_entry_with_a_start_link(browser):
    page = browser.get("/models/").content.decode()
    for entry in CatalogModel.objects.all():
        assert f'id="model-{entry.model_id}"' in page
        if entry.status == "ready":
            assert f'href="/jobs/new/?model={entry.model_id}"' in page
    assert "architecture, trained from scratch" in page and "Start a job with this model" in page
    assert "Apache-2.0" in page


@pytest.mark.django_db
def test_new_job_form_labels_every_input_and_preselects_the_model(browser, tenant_a):
    File.objects.create(
        tenant=tenant_a.tenant,
        filename="chat.jsonl",
        bytes=10,
        sha256="d" * 64,
        storage_key="k",
        status="processed",
        task="chat",
    )
    page = browser.get("/jobs/new/?model=gpt2-mini").content.decode()
    labels = set(re.findall(r'<label for="([^"]+)">', page))
    inputs = set(re.findall(r'<(?:input|select)\s[^>]*id="([^"]+)"', page))
    assert inputs and inputs <= labels, inputs - labels
    assert '<label for="job-file">Training file</label>' in page and '<label for="job-model">Model</label>' in page
    assert (
        '<label for="hp-max_steps">max_steps</label>' in page
        and '<label for="hp-max_length">max_length</label>' in page
    )
    assert re.search(r'<option value="gpt2-mini"[^>]*selected', page)
    assert 'data-task="chat"' in page and 'id="preflight"' in page and "Start training" in page
    assert 'id="job-status"' in page
    # One-line explanations from the engine's own docstrings, and its defaults.
    assert "Optimizer steps to run" in page and 'name="warmup_steps" type="number" step="any" value="0"' in page
    for name in ("scheduler", "optimizer", "init", "lora_r", "checkpoints_kept", "precision", "packing"):
        assert f'id="hp-{name}"' in page and name in {
            field.name for field in TrainingConfig.__dataclass_fields__.values()
        }


@pytest.mark.django_db
def test_unknown_model_in_the_query_falls_back_to_the_default(browser):
    page = browser.get("/jobs/new/?model=<script>").content.decode()
    assert re.search(r'<option value="gpt2-tiny"[^>]*selected', page) and '<script>"' not in page
