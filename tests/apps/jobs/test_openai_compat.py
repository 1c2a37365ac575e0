"""OpenAI compatibility of the fine-tuning API: the full create-job request (method, "auto", multipliers, seed,
suffix, metadata, integrations), Idempotency-Key, the metadata filter, pause/resume, checkpoints, fine-tuned models
in /v1/models, and the OpenAPI schema with its offline docs page."""

import re

import pytest
from django.test import Client

from apps.core.api.errors import ApiError
from apps.datasets.models import File
from apps.jobs.models import FineTuningJob, JobCheckpoint, JobStatus
from apps.jobs.openai_requests import (
    engine_hyperparameters,
    parse_job_create_request,
    parse_metadata_filter,
    request_fingerprint,
)
from apps.jobs.serialization import fine_tuned_model_name
from workers.ml.config import DEFAULT_LEARNING_RATES

BASE = {"model": "gpt2-tiny", "training_file": "file-x"}


def _error_of(call) -> ApiError:
    with pytest.raises(ApiError) as raised:
        call()
    return raised.value


# --- Request translation (pure: no database) ----------------------------------------------------------------------


def test_method_hyperparameters_merge_with_top_level_ones_and_seed():
    request = parse_job_create_request(
        {
            **BASE,
            "hyperparameters": {"max_steps": 5, "batch_size": 4},
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
            "seed": 7,
            "suffix": "my-model",
            "metadata": {"team": "nlp"},
            "integrations": [],
        }
    )
    assert request.hyperparameters == {"max_steps": 5, "batch_size": 4, "n_epochs": 2, "seed": 7}
    assert request.suffix == "my-model" and request.metadata == {"team": "nlp"} and request.validation_file is None


def test_auto_means_the_engine_default_but_only_for_openai_hyperparameters():
    request = parse_job_create_request(
        {
            **BASE,
            "hyperparameters": {"batch_size": "auto", "n_epochs": "auto", "precision": "auto"},
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": "auto"}}},
        }
    )
    # `precision: "auto"` is an engine value in its own right and stays.
    assert request.hyperparameters == {"precision": "auto"}


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (
            {
                "hyperparameters": {"n_epochs": 3},
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
            },
            "method.supervised.hyperparameters.n_epochs",
            "conflicting_parameters",
        ),
        ({"hyperparameters": {"seed": 1}, "seed": 2}, "seed", "conflicting_parameters"),
        ({"method": {"type": "dpo", "dpo": {}}}, "method.type", "unsupported_method"),
        ({"method": {"type": "reinforcement"}}, "method.type", "unsupported_method"),
        ({"method": {"type": "magic"}}, "method.type", "invalid_request"),
        ({"method": {}}, "method.type", "missing_required_parameter"),
        ({"method": {"type": "supervised", "dpo": {}}}, "method.dpo", "unknown_parameter"),
        ({"method": "supervised"}, "method", "invalid_request"),
        ({"suffix": "x" * 65}, "suffix", "invalid_request"),
        ({"suffix": "a:b"}, "suffix", "invalid_request"),
        ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations", "unsupported_parameter"),
        ({"hyperparameters": {"learning_rate_multiplier": 0}}, "hyperparameters.learning_rate_multiplier", None),
        ({"hyperparameters": {"learning_rate_multiplier": "big"}}, "hyperparameters.learning_rate_multiplier", None),
        ({"hyperparameters": {"n_epochs": "many"}}, "hyperparameters.n_epochs", None),
        ({"hyperparameters": {"batch_size": True}}, "hyperparameters.batch_size", None),
        ({"hyperparameters": [1]}, "hyperparameters", None),
        ({"seed": "7"}, "seed", None),
        ({"training_files": "file-x"}, "training_files", "unknown_parameter"),
    ],
)
def test_bad_requests_name_the_parameter(body, param, code):
    error = _error_of(lambda: parse_job_create_request({**BASE, **body}))
    assert error.status_code == 400 and error.param == param, (body, error.param, error.detail)
    if code:
        assert error.error_code == code
    assert str(error.detail).endswith(".")


def test_missing_model_and_non_object_body():
    assert _error_of(lambda: parse_job_create_request({"training_file": "f"})).param == "model"
    assert _error_of(lambda: parse_job_create_request([BASE])).status_code == 400


def test_suffix_of_64_characters_is_kept_whole():
    assert parse_job_create_request({**BASE, "suffix": "s" * 64}).suffix == "s" * 64


@pytest.mark.parametrize("mode", ["from_scratch", "full", "lora", "qlora"])
def test_learning_rate_multiplier_scales_the_default_rate_of_the_mode(mode):
    request = parse_job_create_request({**BASE, "hyperparameters": {"learning_rate_multiplier": 0.5, "lora_r": 4}})
    hyperparameters = engine_hyperparameters(request, mode=mode)
    assert hyperparameters == {"learning_rate": pytest.approx(0.5 * DEFAULT_LEARNING_RATES[mode]), "lora_r": 4}


def test_learning_rate_and_its_multiplier_together_are_refused():
    request = parse_job_create_request(
        {
            **BASE,
            "hyperparameters": {"learning_rate": 1e-4},
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": 2}}},
        }
    )
    error = _error_of(lambda: engine_hyperparameters(request, mode="full"))
    assert error.param == "method.supervised.hyperparameters.learning_rate_multiplier"
    too_big = parse_job_create_request({**BASE, "hyperparameters": {"learning_rate_multiplier": 1000}})
    assert _error_of(lambda: engine_hyperparameters(too_big, mode="from_scratch")).param == (
        "hyperparameters.learning_rate_multiplier"
    )


def test_fingerprint_ignores_key_order_and_spacing():
    first = request_fingerprint({"model": "m", "hyperparameters": {"a": 1, "b": 2}})
    assert first == request_fingerprint({"hyperparameters": {"b": 2, "a": 1}, "model": "m"})
    assert first != request_fingerprint({"model": "m", "hyperparameters": {"a": 1, "b": 3}})
    assert re.fullmatch(r"[0-9a-f]{64}", first)


def test_metadata_filter_syntax():
    assert parse_metadata_filter({"metadata[team]": "nlp", "metadata[env]": "", "limit": "3"}).pairs == (
        ("team", "nlp"),
        ("env", ""),
    )
    assert parse_metadata_filter({"metadata": "null"}).without_metadata
    assert not parse_metadata_filter({"after": "ftjob-x"})
    for bad in ({"metadata": "team"}, {"metadata[]": "x"}, {"metadata": "null", "metadata[a]": "b"}):
        assert _error_of(lambda bad=bad: parse_metadata_filter(bad)).param == "metadata"


# --- Through the REST API -----------------------------------------------------------------------------------------


@pytest.fixture
def checked_file(tenant_a):
    """A training file already validated as plain text: a job on it is queued at once (no worker needed)."""
    return File.objects.create(
        tenant=tenant_a.tenant,
        filename="corpus.txt",
        bytes=100,
        sha256="c" * 64,
        storage_key=f"tenants/{tenant_a.tenant.pk}/files/corpus",
        status="processed",
        task="causal_lm",
    )


def _create(client, body, **headers):
    return client.post("/v1/fine_tuning/jobs", body, format="json", **headers)


@pytest.mark.django_db
def test_full_openai_request_creates_the_job_it_describes(tenant_a, checked_file):
    response = _create(
        tenant_a.api(),
        {
            "model": "gpt2-tiny",
            "training_file": checked_file.public_id,
            "method": {
                "type": "supervised",
                "supervised": {
                    "hyperparameters": {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5}
                },
            },
            "hyperparameters": {"max_length": 64},
            "seed": 42,
            "suffix": "s" * 64,
            "metadata": {"team": "nlp"},
            "integrations": [],
        },
    )
    assert response.status_code == 200, response.content
    job = response.json()
    assert job["status"] == "queued" and job["seed"] == 42 and job["metadata"] == {"team": "nlp"}
    assert job["user_provided_suffix"] == "s" * 64
    hyperparameters = job["hyperparameters"]
    assert hyperparameters["n_epochs"] == 2 and hyperparameters["max_length"] == 64 and hyperparameters["seed"] == 42
    assert hyperparameters["batch_size"] == 8  # "auto": the engine's default
    assert hyperparameters["learning_rate"] == pytest.approx(0.5 * DEFAULT_LEARNING_RATES["from_scratch"])


@pytest.mark.django_db
def test_refused_requests_answer_in_openai_error_shape(tenant_a, checked_file):
    client = tenant_a.api()
    body = {"model": "gpt2-tiny", "training_file": checked_file.public_id}
    for extra, param in [
        ({"method": {"type": "dpo"}}, "method.type"),
        ({"hyperparameters": {"no_such_knob": 1}}, "hyperparameters.no_such_knob"),
        ({"hyperparameters": {"learning_rate": 1e-3, "learning_rate_multiplier": 2}}, None),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
    ]:
        response = _create(client, {**body, **extra})
        assert response.status_code == 400, (extra, response.content)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        if param:
            assert error["param"] == param, (extra, error)
    assert not FineTuningJob.objects.exists()


@pytest.mark.django_db
def test_idempotency_key_returns_the_same_job_and_refuses_another_body(tenant_a, checked_file):
    client = tenant_a.api()
    body = {"model": "gpt2-tiny", "training_file": checked_file.public_id, "metadata": {"run": "1"}}
    first = _create(client, body, HTTP_IDEMPOTENCY_KEY="create-run-1")
    again = _create(client, dict(reversed(list(body.items()))), HTTP_IDEMPOTENCY_KEY="create-run-1")
    assert first.status_code == again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    assert FineTuningJob.objects.count() == 1
    other = _create(client, {**body, "metadata": {"run": "2"}}, HTTP_IDEMPOTENCY_KEY="create-run-1")
    assert other.status_code == 409
    error = other.json()["error"]
    assert error["code"] == "idempotency_key_reused" and error["type"] == "conflict_error" and error["message"]
    assert FineTuningJob.objects.count() == 1
    # Without a key, the same body is a second job, as with OpenAI.
    assert _create(client, body).json()["id"] != first.json()["id"]


@pytest.mark.django_db
def test_job_list_filters_on_metadata_and_checks_limit(tenant_a, checked_file):
    client = tenant_a.api()
    ids = {}
    jobs = [
        ("nlp-prod", {"team": "nlp", "env": "prod"}),
        ("nlp-dev", {"team": "nlp", "env": "dev"}),
        ("vision", {"team": "vision", "odd__key.x": "1"}),
        ("bare", None),
    ]
    for name, metadata in jobs:
        body = {"model": "gpt2-tiny", "training_file": checked_file.public_id, "metadata": metadata}
        ids[name] = _create(client, body).json()["id"]

    def listed(params):
        response = client.get("/v1/fine_tuning/jobs", params)
        assert response.status_code == 200, response.content
        return [job["id"] for job in response.json()["data"]]

    assert listed({"metadata[team]": "nlp"}) == [ids["nlp-dev"], ids["nlp-prod"]]
    assert listed({"metadata[team]": "nlp", "metadata[env]": "prod"}) == [ids["nlp-prod"]]
    assert listed({"metadata[team]": "nobody"}) == []
    assert listed({"metadata[odd__key.x]": "1"}) == [ids["vision"]]
    assert listed({"metadata": "null"}) == [ids["bare"]]
    page = client.get("/v1/fine_tuning/jobs", {"metadata[team]": "nlp", "limit": 1}).json()
    assert page["has_more"] is True and page["data"][0]["id"] == ids["nlp-dev"]
    rest = listed({"metadata[team]": "nlp", "limit": 1, "after": page["last_id"]})
    assert rest == [ids["nlp-prod"]]
    for limit in ("abc", "0", "101", "-1", "1.5"):
        response = client.get("/v1/fine_tuning/jobs", {"limit": limit})
        assert response.status_code == 400 and response.json()["error"]["param"] == "limit", limit


@pytest.mark.django_db
def test_pause_and_resume(tenant_a, tenant_b, checked_file):
    client = tenant_a.api()
    job_id = _create(client, {"model": "gpt2-tiny", "training_file": checked_file.public_id}).json()["id"]
    for path in ("pause", "resume"):
        assert tenant_b.api().post(f"/v1/fine_tuning/jobs/{job_id}/{path}").status_code == 404
    paused = client.post(f"/v1/fine_tuning/jobs/{job_id}/pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused" and paused.json()["id"] == job_id
    resumed = client.post(f"/v1/fine_tuning/jobs/{job_id}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    again = client.post(f"/v1/fine_tuning/jobs/{job_id}/resume")
    assert again.status_code == 400 and again.json()["error"]["code"] == "invalid_state"
    client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    refused = client.post(f"/v1/fine_tuning/jobs/{job_id}/pause")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_state"


@pytest.mark.django_db
def test_checkpoints_list_pages_from_the_highest_step(tenant_a, tenant_b, checked_file):
    client = tenant_a.api()
    job_id = _create(client, {"model": "gpt2-tiny", "training_file": checked_file.public_id}).json()["id"]
    job = FineTuningJob.objects.get(public_id=job_id)
    path = f"/v1/fine_tuning/jobs/{job_id}/checkpoints"
    empty = client.get(path).json()
    assert empty == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
    for step in (10, 20, 30):
        JobCheckpoint.objects.create(
            tenant=job.tenant, job=job, step_number=step, metrics={"train_loss": 5.0 - step / 10}
        )
    first = client.get(path, {"limit": 2}).json()
    assert [c["step_number"] for c in first["data"]] == [30, 20] and first["has_more"] is True
    checkpoint = first["data"][0]
    assert checkpoint["object"] == "fine_tuning.job.checkpoint" and checkpoint["fine_tuning_job_id"] == job_id
    assert checkpoint["metrics"]["step"] == 30 and checkpoint["metrics"]["train_loss"] == pytest.approx(2.0)
    assert first["first_id"] == checkpoint["id"] and first["last_id"] == first["data"][1]["id"]
    rest = client.get(path, {"limit": 2, "after": first["last_id"]}).json()
    assert [c["step_number"] for c in rest["data"]] == [10] and rest["has_more"] is False
    assert client.get(path, {"after": "ftckpt-gone"}).status_code == 404
    assert client.get(path, {"limit": "many"}).status_code == 400
    assert tenant_b.api().get(path).status_code == 404


def _succeed(job: FineTuningJob) -> str:
    job.status = JobStatus.SUCCEEDED
    job.fine_tuned_model = fine_tuned_model_name(job)
    job.save(update_fields=["status", "fine_tuned_model"])
    return job.fine_tuned_model


@pytest.mark.django_db
def test_models_include_the_tenants_own_fine_tuned_models(tenant_a, tenant_b, checked_file):
    client = tenant_a.api()
    created = _create(client, {"model": "gpt2-tiny", "training_file": checked_file.public_id, "suffix": "poet"})
    model_id = _succeed(FineTuningJob.objects.get(public_id=created.json()["id"]))
    _create(client, {"model": "gpt2-tiny", "training_file": checked_file.public_id, "suffix": "unfinished"})
    assert model_id.startswith("ft:gpt2-tiny:acme:poet:")
    models = {model["id"]: model for model in client.get("/v1/models").json()["data"]}
    assert "gpt2-tiny" in models and models["gpt2-tiny"]["owned_by"] == "tunehouse"
    assert models[model_id]["owned_by"] == "acme" and models[model_id]["object"] == "model"
    assert not any("unfinished" in name for name in models)
    retrieved = client.get(f"/v1/models/{model_id}")
    assert retrieved.status_code == 200 and retrieved.json()["id"] == model_id
    assert retrieved.json()["created"] > 0
    assert model_id not in {model["id"] for model in tenant_b.api().get("/v1/models").json()["data"]}
    missing = tenant_b.api().get(f"/v1/models/{model_id}")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.django_db
def test_openapi_schema_and_offline_docs_page(tenant_a):
    schema = Client().get("/v1/openapi.json")
    assert schema.status_code == 200
    document = schema.json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    for path in (
        "/v1/fine_tuning/jobs",
        "/v1/fine_tuning/jobs/{public_id}/checkpoints",
        "/v1/fine_tuning/jobs/{public_id}/pause",
        "/v1/fine_tuning/jobs/{public_id}/resume",
        "/v1/models/{model_id}",
    ):
        assert path in paths, path
    assert paths["/v1/fine_tuning/jobs"]["post"]["operationId"] == "createFineTuningJob"
    assert document["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["ApiKey"]["description"],
    }
    # A bad key does not hide the docs (they are public), nor does a dashboard session.
    docs = Client(HTTP_AUTHORIZATION="Bearer th-wrong").get("/v1/docs")
    assert docs.status_code == 200
    browser = Client()
    browser.force_login(tenant_a.owner)
    assert browser.get("/v1/docs").status_code == 200
    html = docs.content.decode()
    scripts = re.findall(r"<script[^>]*\bsrc=\"([^\"]+)\"", html)
    links = re.findall(r"<link[^>]*\bhref=\"([^\"]+)\"", html)
    assert scripts and all(src.startswith("/static/drf_spectacular_sidecar/") for src in scripts), scripts
    assert all(not re.match(r"(https?:)?//", url) for url in scripts + links), scripts + links
    assert "/v1/openapi.json" in html
    bundle = Client().get(scripts[0])
    assert bundle.status_code == 200 and b"SwaggerUI" in b"".join(bundle.streaming_content)
