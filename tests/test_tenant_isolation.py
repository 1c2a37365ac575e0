"""Walks every URL pattern (HTTP and websocket) with two tenants: tenant B must never read or change tenant A's
objects, through any door. A route without a probe here fails the test, so a new endpoint cannot slip past."""

import asyncio

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from apps.core.storage import object_store, tenant_key
from apps.datasets.models import File, Tokenizer
from apps.jobs.models import FineTuningJob, JobCheckpoint, JobStatus, ModelEvaluation
from apps.jobs.serialization import fine_tuned_model_name
from apps.jobs.services import job_create, job_event_record
from apps.tenancy.models import ApiKey
from tunehouse.asgi import application
from tunehouse.routing import websocket_urlpatterns

pytestmark = pytest.mark.django_db(transaction=True)


def _route_names(patterns, namespace: str = "") -> set[str]:
    names = set()
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            inner = f"{namespace}{pattern.namespace}:" if pattern.namespace else namespace
            names |= _route_names(pattern.url_patterns, inner)
        elif isinstance(pattern, URLPattern):
            names.add(f"{namespace}{pattern.name}" if pattern.name else f"{namespace}<unnamed {pattern.pattern}>")
    return names


@pytest.fixture
def world(tenant_a, tenant_b):
    """Tenant A owns a file, a job with events and a stored object; tenant B is the attacker."""
    file = File.objects.create(
        tenant=tenant_a.tenant,
        filename="secret-corpus.txt",
        bytes=6,
        sha256="a" * 64,
        storage_key=tenant_key(tenant_a.tenant.pk, "files", "secret"),
    )
    object_store().put_bytes(file.storage_key, b"secret")
    job = job_create(tenant=tenant_a.tenant, user=None, training_file=file, model="gpt2-tiny")
    job_event_record(job=job, message="tenant A's private progress")
    tokenizer = Tokenizer.objects.create(
        tenant=tenant_a.tenant,
        name="secret-tokenizer",
        algorithm="bpe",
        vocab_size=500,
        training_file=file,
        status="ready",
    )
    browser_b = Client()
    browser_b.force_login(tenant_b.owner)
    return {
        "a": tenant_a,
        "b": tenant_b,
        "file": file,
        "job": job,
        "api_b": Client(HTTP_AUTHORIZATION=f"Bearer {tenant_b.api_key}"),
        "browser_b": browser_b,
        "a_key": ApiKey.objects.for_tenant(tenant_a.tenant).get(),
        "tokenizer": tokenizer,
    }


def _secrets_of_a(w) -> list[bytes]:
    return [
        w["file"].public_id.encode(),
        w["job"].public_id.encode(),
        b"secret-corpus",
        w["a_key"].prefix.encode(),
        w["tokenizer"].public_id.encode(),
        b"secret-tokenizer",
    ]


def _assert_no_leak(response, w):
    for secret in _secrets_of_a(w):
        assert secret not in response.content, f"{secret!r} leaked in {response.request['PATH_INFO']}"


def _assert_not_found(response):
    assert response.status_code == 404, (response.request["PATH_INFO"], response.status_code)


def probe_public_page(path):
    def probe(w):
        for client in (w["browser_b"], Client()):
            response = client.get(path)
            assert response.status_code in (200, 302, 405)
            _assert_no_leak(response, w)

    return probe


def probe_logout(w):
    response = w["browser_b"].post("/logout/")
    assert response.status_code == 302
    _assert_no_leak(response, w)


def probe_healthz(w):
    response = Client().get("/healthz")
    assert response.json()["status"] == "ok"
    _assert_no_leak(response, w)


def probe_admin(w):
    # Django admin is for platform staff only: a tenant owner is sent to the admin login, sees nothing.
    for path in ["/admin/", f"/admin/jobs/finetuningjob/{w['job'].pk}/change/", "/admin/datasets/file/"]:
        response = w["browser_b"].get(path)
        assert response.status_code == 302 and "/admin/login/" in response["Location"]


def probe_file_list(w):
    for client in (w["api_b"], w["browser_b"]):
        response = client.get("/v1/files")
        assert response.status_code == 200
        _assert_no_leak(response, w)


def probe_file_detail(w):
    path = f"/v1/files/{w['file'].public_id}"
    for client in (w["api_b"], w["browser_b"]):
        _assert_not_found(client.get(path))
        _assert_not_found(client.delete(path))
    assert File.objects.filter(pk=w["file"].pk).exists()
    assert object_store().exists(w["file"].storage_key)


def probe_file_content(w):
    _assert_not_found(w["api_b"].get(f"/v1/files/{w['file'].public_id}/content"))


def probe_file_validate(w):
    path = f"/v1/files/{w['file'].public_id}/validate"
    _assert_not_found(w["api_b"].post(path, {}, content_type="application/json"))
    # Nor can B point its own validation at A's tokenizer or A's file.
    own = File.objects.create(
        tenant=w["b"].tenant, filename="b.txt", bytes=1, sha256="b" * 64, storage_key=f"tenants/{w['b'].tenant.pk}/x"
    )
    for borrowed in ({"tokenizer": w["tokenizer"].public_id}, {"validation_file": w["file"].public_id}):
        response = w["api_b"].post(f"/v1/files/{own.public_id}/validate", borrowed, content_type="application/json")
        _assert_not_found(response)


def probe_file_preview(w):
    _assert_not_found(w["api_b"].get(f"/v1/files/{w['file'].public_id}/preview", {"tokenizer": "tok-x"}))


def probe_tokenizer_list(w):
    response = w["api_b"].get("/v1/tokenizers")
    assert response.status_code == 200
    _assert_no_leak(response, w)
    # B cannot train a tokenizer on A's file.
    response = w["api_b"].post(
        "/v1/tokenizers", {"training_file": w["file"].public_id}, content_type="application/json"
    )
    _assert_not_found(response)


def probe_tokenizer_detail(w):
    path = f"/v1/tokenizers/{w['tokenizer'].public_id}"
    _assert_not_found(w["api_b"].get(path))
    _assert_not_found(w["api_b"].delete(path))
    assert Tokenizer.objects.filter(pk=w["tokenizer"].pk).exists()


def probe_dashboard_file(w):
    _assert_not_found(w["browser_b"].get(f"/files/{w['file'].public_id}/"))


def probe_dashboard_file_errors(w):
    _assert_not_found(w["browser_b"].get(f"/files/{w['file'].public_id}/errors.csv"))


def probe_dashboard_tokenizers(w):
    response = w["browser_b"].get("/tokenizers/")
    assert response.status_code == 200
    _assert_no_leak(response, w)


def probe_dashboard_tokenizer(w):
    _assert_not_found(w["browser_b"].get(f"/tokenizers/{w['tokenizer'].public_id}/"))


def probe_job_list(w):
    response = w["api_b"].get("/v1/fine_tuning/jobs")
    assert response.status_code == 200
    _assert_no_leak(response, w)
    # B cannot train on A's file by naming its id.
    response = w["api_b"].post(
        "/v1/fine_tuning/jobs",
        {"model": "gpt2-tiny", "training_file": w["file"].public_id},
        content_type="application/json",
    )
    _assert_not_found(response)
    # Nor use A's file as its validation file.
    own = File.objects.create(
        tenant=w["b"].tenant, filename="b.txt", bytes=1, sha256="b" * 64, storage_key=f"tenants/{w['b'].tenant.pk}/y"
    )
    response = w["api_b"].post(
        "/v1/fine_tuning/jobs",
        {"model": "gpt2-tiny", "training_file": own.public_id, "validation_file": w["file"].public_id},
        content_type="application/json",
    )
    _assert_not_found(response)
    assert FineTuningJob.objects.count() == 1


def probe_job_estimate(w):
    # Naming A's file as the training or the validation file is "not found", in the OpenAI error shape.
    own = File.objects.create(
        tenant=w["b"].tenant, filename="b.txt", bytes=1, sha256="b" * 64, storage_key=f"tenants/{w['b'].tenant.pk}/e"
    )
    for body in (
        {"model": "gpt2-tiny", "training_file": w["file"].public_id},
        {"model": "gpt2-tiny", "training_file": own.public_id, "validation_file": w["file"].public_id},
    ):
        for client in (w["api_b"], w["browser_b"]):
            response = client.post("/v1/fine_tuning/jobs/estimate", body, content_type="application/json")
            _assert_not_found(response)
            error = response.json()["error"]
            assert error["code"] == "not_found" and error["param"] in ("training_file", "validation_file")
            # Only B's own input is echoed: nothing A named or measured.
            assert b"secret-corpus" not in response.content


def probe_job_detail(w):
    _assert_not_found(w["api_b"].get(f"/v1/fine_tuning/jobs/{w['job'].public_id}"))


def probe_job_events(w):
    _assert_not_found(w["api_b"].get(f"/v1/fine_tuning/jobs/{w['job'].public_id}/events"))


def probe_job_cancel(w):
    _assert_not_found(w["api_b"].post(f"/v1/fine_tuning/jobs/{w['job'].public_id}/cancel"))
    w["job"].refresh_from_db()
    assert w["job"].status != JobStatus.CANCELLED and not w["job"].cancel_requested


def probe_job_generate(w):
    response = w["api_b"].post(
        f"/v1/fine_tuning/jobs/{w['job'].public_id}/generate", {"prompt": "x"}, content_type="application/json"
    )
    _assert_not_found(response)


def probe_job_checkpoints(w):
    JobCheckpoint.objects.create(tenant=w["a"].tenant, job=w["job"], step_number=5, metrics={"train_loss": 1.0})
    path = f"/v1/fine_tuning/jobs/{w['job'].public_id}/checkpoints"
    for client in (w["api_b"], w["browser_b"]):
        _assert_not_found(client.get(path))


def probe_job_metrics(w):
    job_event_record(job=w["job"], message="step 1", event_type="metrics", data={"step": 1, "train_loss": 2.5})
    path = f"/v1/fine_tuning/jobs/{w['job'].public_id}/metrics"
    for client in (w["api_b"], w["browser_b"]):
        response = client.get(path)
        _assert_not_found(response)
        assert response.json()["error"]["code"] == "not_found"
        _assert_no_leak(response, w)


def probe_job_pause(w):
    FineTuningJob.objects.filter(pk=w["job"].pk).update(status=JobStatus.QUEUED)
    _assert_not_found(w["api_b"].post(f"/v1/fine_tuning/jobs/{w['job'].public_id}/pause"))
    w["job"].refresh_from_db()
    assert w["job"].status == JobStatus.QUEUED and not w["job"].pause_requested


def probe_job_resume(w):
    FineTuningJob.objects.filter(pk=w["job"].pk).update(status=JobStatus.PAUSED)
    _assert_not_found(w["api_b"].post(f"/v1/fine_tuning/jobs/{w['job'].public_id}/resume"))
    w["job"].refresh_from_db()
    assert w["job"].status == JobStatus.PAUSED


def probe_dashboard_home(w):
    response = w["browser_b"].get("/")
    assert response.status_code == 200
    _assert_no_leak(response, w)


def probe_dashboard_job(w):
    _assert_not_found(w["browser_b"].get(f"/jobs/{w['job'].public_id}/"))


def probe_dashboard_page(path: str):
    """A tenant-wide dashboard page: B sees its own (empty) workspace, none of A's ids or names."""

    def probe(w):
        response = w["browser_b"].get(path)
        assert response.status_code == 200
        _assert_no_leak(response, w)

    return probe


def probe_dashboard_settings(w):
    """B's settings show B's team only; changing or removing A's memberships by id is "not found", changes nothing."""
    from apps.tenancy.models import Membership

    probe_dashboard_page("/settings/")(w)
    assert w["a"].owner.username.encode() not in w["browser_b"].get("/settings/").content
    a_owner = Membership.objects.get(tenant=w["a"].tenant, user=w["a"].owner)
    for change in (
        {"action": "change_role", "membership_id": a_owner.pk, "role": "viewer"},
        {"action": "remove", "membership_id": a_owner.pk},
    ):
        _assert_not_found(w["browser_b"].post("/settings/", change))
    assert Membership.objects.filter(pk=a_owner.pk, role="owner").exists()
    # The htmx parts of B's workspace pages hold nothing of A's either.
    for path, target in (("/", "running-work"), ("/datasets/", "file-list"), ("/jobs/", "job-list")):
        _assert_no_leak(w["browser_b"].get(path, HTTP_HX_REQUEST="true", HTTP_HX_TARGET=target), w)


def probe_dashboard_compare(w):
    # Naming A's job among the runs to compare is "not found", not a page with A's hyperparameters.
    _assert_not_found(w["browser_b"].get(f"/jobs/compare/?jobs={w['job'].public_id}"))


def _endpoint_of_a(w):
    """Tenant A's endpoint, serving A's job: its id and name must never show on B's endpoint pages."""
    from apps.endpoints.models import Endpoint

    endpoint, _ = Endpoint.objects.get_or_create(
        tenant=w["a"].tenant, name="secret-endpoint", defaults={"job": w["job"], "task": "causal_lm"}
    )
    return endpoint


def _assert_no_endpoint_leak(response, w, endpoint):
    _assert_no_leak(response, w)
    for secret in (endpoint.public_id.encode(), endpoint.name.encode()):
        assert secret not in response.content, f"{secret!r} leaked in {response.request['PATH_INFO']}"


def probe_dashboard_endpoints(w):
    endpoint = _endpoint_of_a(w)
    response = w["browser_b"].get("/endpoints/")
    assert response.status_code == 200
    _assert_no_endpoint_leak(response, w, endpoint)


def probe_dashboard_endpoint(w):
    _assert_not_found(w["browser_b"].get(f"/endpoints/{_endpoint_of_a(w).public_id}/"))


def probe_dashboard_endpoint_compare(w):
    endpoint = _endpoint_of_a(w)
    # A's endpoint named on either side is "not found"; the bare picker lists only B's (none).
    for query in (
        f"?a={endpoint.public_id}",
        f"?b={endpoint.public_id}",
        f"?a={endpoint.public_id}&b={endpoint.public_id}",
    ):
        _assert_not_found(w["browser_b"].get(f"/endpoints/compare/{query}"))
    response = w["browser_b"].get("/endpoints/compare/")
    assert response.status_code == 200
    _assert_no_endpoint_leak(response, w, endpoint)


def _ready_endpoint_of_a(w):
    """A's endpoint, ready, serving A's succeeded job (so a 404 to B cannot come from a status check)."""
    from apps.endpoints.models import Endpoint

    model_id = _fine_tuned_model_of_a(w)
    endpoint = _endpoint_of_a(w)
    Endpoint.objects.filter(pk=endpoint.pk).update(status="ready")
    FineTuningJob.objects.filter(pk=w["job"].pk).update(model_storage_prefix=f"tenants/{w['a'].tenant.pk}/models/x")
    return endpoint, model_id


def probe_endpoint_list(w):
    endpoint, model_id = _ready_endpoint_of_a(w)
    for client in (w["api_b"], w["browser_b"]):
        response = client.get("/v1/endpoints")
        assert response.status_code == 200 and response.json()["data"] == []
        _assert_no_endpoint_leak(response, w, endpoint)
    # B cannot deploy A's model, by job id or by fine-tuned model name.
    for model in (w["job"].public_id, model_id):
        response = w["api_b"].post("/v1/endpoints", {"name": "stolen", "model": model}, content_type="application/json")
        _assert_not_found(response)
    assert not type(endpoint).objects.for_tenant(w["b"].tenant).exists()


def probe_endpoint_detail(w):
    endpoint, _ = _ready_endpoint_of_a(w)
    path = f"/v1/endpoints/{endpoint.public_id}"
    for client in (w["api_b"], w["browser_b"]):
        _assert_not_found(client.get(path))
        _assert_not_found(client.post(path, {"state": "stopped"}, content_type="application/json"))
        _assert_not_found(client.delete(path))
    endpoint.refresh_from_db()
    assert endpoint.status == "ready"


def probe_endpoint_predict(w):
    endpoint, _ = _ready_endpoint_of_a(w)
    response = w["api_b"].post(
        f"/v1/endpoints/{endpoint.public_id}/predict", {"input": "x"}, content_type="application/json"
    )
    _assert_not_found(response)


def probe_endpoint_usage(w):
    endpoint, _ = _ready_endpoint_of_a(w)
    for client in (w["api_b"], w["browser_b"]):
        _assert_not_found(client.get(f"/v1/endpoints/{endpoint.public_id}/usage"))


def probe_inference(path: str, body: dict):
    """A's endpoint named as `model` (its name, its id, its fine-tuned model) reads as a model that does not exist."""

    def probe(w):
        endpoint, model_id = _ready_endpoint_of_a(w)
        for model in (endpoint.name, endpoint.public_id, model_id):
            for client in (w["api_b"], w["browser_b"]):
                response = client.post(path, {"model": model, **body}, content_type="application/json")
                _assert_not_found(response)
                assert response.json()["error"]["code"] == "model_not_found"
                assert endpoint.public_id.encode() not in response.content or model == endpoint.public_id

    return probe


def _study_of_a(w):
    """Tenant A's study, trial 0 on A's job, complete and its job succeeded (so a 404 to B cannot come from a state
    check); the rows are written directly, nothing trains. Its id and name must never show on B's pages."""
    from apps.tuning.models import Study, Trial

    study = Study.objects.filter(tenant=w["a"].tenant).first()
    if study is None:
        study = Study.objects.create(
            tenant=w["a"].tenant,
            name="secret-study",
            model="gpt2-tiny",
            training_file=w["file"],
            search_space={"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
            objective_metric="valid_loss",
            direction="minimize",
            sampler="tpe",
            pruner="none",
            n_trials=4,
            optuna_study_name="tunehouse-secret-study",
        )
        FineTuningJob.objects.filter(pk=w["job"].pk).update(status=JobStatus.SUCCEEDED)
        Trial.objects.create(
            tenant=w["a"].tenant,
            study=study,
            number=0,
            optuna_trial_id=1,
            job=w["job"],
            params={"learning_rate": 1e-3},
            state="complete",
            value=1.0,
        )
    return study


def _assert_no_study_leak(response, w, study):
    _assert_no_leak(response, w)
    for secret in (study.public_id.encode(), study.name.encode()):
        assert secret not in response.content, f"{secret!r} leaked in {response.request['PATH_INFO']}"


def probe_dashboard_studies(w):
    study = _study_of_a(w)
    response = w["browser_b"].get("/studies/")
    assert response.status_code == 200
    _assert_no_study_leak(response, w, study)


def probe_dashboard_study_new(w):
    from apps.tuning.models import Study

    study = _study_of_a(w)
    # The form lists B's files only, even when the address names A's file to prefill.
    response = w["browser_b"].get(f"/studies/new/?training_file={w['file'].public_id}")
    assert response.status_code == 200
    _assert_no_study_leak(response, w, study)
    # Naming A's file as the training or the validation file is "not found", and starts nothing.
    own = File.objects.create(
        tenant=w["b"].tenant, filename="b.txt", bytes=1, sha256="b" * 64, storage_key=f"tenants/{w['b'].tenant.pk}/s"
    )
    space = {"space-0-name": "learning_rate", "space-0-type": "float", "space-0-low": "0.0001", "space-0-high": "0.01"}
    for files in (
        {"training_file": w["file"].public_id},
        {"training_file": own.public_id, "validation_file": w["file"].public_id},
    ):
        response = w["browser_b"].post("/studies/new/", {"model": "gpt2-tiny", **files, **space})
        _assert_not_found(response)
        _assert_no_study_leak(response, w, study)
    assert not Study.objects.for_tenant(w["b"].tenant).exists()


def probe_dashboard_study(w):
    _assert_not_found(w["browser_b"].get(f"/studies/{_study_of_a(w).public_id}/"))


def probe_dashboard_study_trials(w):
    response = w["browser_b"].get(f"/studies/{_study_of_a(w).public_id}/trials/", HTTP_HX_REQUEST="true")
    _assert_not_found(response)


def probe_dashboard_study_cancel(w):
    study = _study_of_a(w)
    _assert_not_found(w["browser_b"].post(f"/studies/{study.public_id}/cancel/"))
    study.refresh_from_db()
    assert study.status == "running" and not study.cancel_requested


def probe_dashboard_study_trial_promote(w):
    study = _study_of_a(w)
    _assert_not_found(w["browser_b"].post(f"/studies/{study.public_id}/trials/0/promote/"))
    trial = study.trials.get(number=0)
    assert trial.promoted_at is None
    assert not FineTuningJob.objects.get(pk=w["job"].pk).fine_tuned_model


def probe_metrics(w):
    from django.test import override_settings

    # Operator-only: a tenant's API key is not the metrics token, and without a token only loopback may scrape.
    with override_settings(METRICS_TOKEN="operator-secret"):
        assert w["api_b"].get("/metrics").status_code == 403
        assert Client(HTTP_AUTHORIZATION="Bearer operator-secret").get("/metrics").status_code == 200
    with override_settings(METRICS_TOKEN=""):
        assert w["api_b"].get("/metrics", REMOTE_ADDR="203.0.113.7").status_code == 403


def probe_switch_tenant(w):
    _assert_not_found(w["browser_b"].post("/tenants/switch/", {"tenant_id": w["a"].tenant.pk}))


def probe_api_keys(w):
    response = w["browser_b"].get("/settings/api-keys/")
    assert response.status_code == 200
    _assert_no_leak(response, w)
    revoke = w["browser_b"].post("/settings/api-keys/", {"action": "revoke", "key_id": w["a_key"].public_id})
    _assert_not_found(revoke)
    w["a_key"].refresh_from_db()
    assert w["a_key"].revoked_at is None


def probe_api_key_list(w):
    for client in (w["api_b"], w["browser_b"]):
        response = client.get("/v1/api_keys")
        assert response.status_code == 200 and response.json()["data"]
        assert all(key["id"] != w["a_key"].public_id for key in response.json()["data"])
        _assert_no_leak(response, w)
    created = w["browser_b"].post("/v1/api_keys", {"name": "b's key"}, content_type="application/json")
    assert created.status_code == 201
    assert ApiKey.objects.for_tenant(w["b"].tenant).filter(public_id=created.json()["id"]).exists()


def probe_api_key_detail(w):
    path = f"/v1/api_keys/{w['a_key'].public_id}"
    for client in (w["api_b"], w["browser_b"]):
        _assert_not_found(client.get(path))
        _assert_not_found(client.post(path, {"tokens_per_day": 1}, content_type="application/json"))
        _assert_not_found(client.delete(path))
    w["a_key"].refresh_from_db()
    assert w["a_key"].revoked_at is None and w["a_key"].tokens_per_day is None


def probe_organization_limits(w):
    # Staff only: to a tenant's members (and their keys), its own organization included, the route does not exist
    # (the 404 echoes the path asked for, so A's slug, and nothing else of A's).
    for slug in (w["a"].tenant.slug, w["b"].tenant.slug):
        for client in (w["api_b"], w["browser_b"], Client()):
            path = f"/v1/organizations/{slug}/limits"
            for response in (
                client.get(path),
                client.post(path, {"tokens_per_day": 1}, content_type="application/json"),
            ):
                _assert_not_found(response)
                assert response.json()["error"]["code"] == "unknown_url"
                _assert_no_leak(response, w)
    w["a"].tenant.refresh_from_db()
    assert w["a"].tenant.tokens_per_day is None


async def _ws_output(path: str, api_key: str):
    communicator = WebsocketCommunicator(
        application,
        path,
        headers=[
            (b"origin", b"http://127.0.0.1"),
            (b"host", b"127.0.0.1"),
            (b"authorization", f"Bearer {api_key}".encode()),
        ],
    )
    await communicator.connect(timeout=10)
    return communicator


def probe_ws_job_events(w):
    async def run():
        communicator = await _ws_output(f"/ws/fine_tuning/jobs/{w['job'].public_id}/", w["b"].api_key)
        assert await communicator.receive_output(timeout=10) == {"type": "websocket.close", "code": 4404}

    async_to_sync(run)()


def probe_ws_tenant_events(w):
    async def run():
        communicator = await _ws_output("/ws/events/", w["b"].api_key)
        await asyncio.sleep(0.1)
        from channels.db import database_sync_to_async

        await database_sync_to_async(job_event_record)(job=w["job"], message="tenant A's private progress 2")
        assert await communicator.receive_nothing(timeout=0.5)
        await communicator.disconnect()

    async_to_sync(run)()


def _fine_tuned_model_of_a(w) -> str:
    """A's job, finished: its model is A's, listed and retrievable by A only."""
    job = w["job"]
    FineTuningJob.objects.filter(pk=job.pk).update(
        status=JobStatus.SUCCEEDED, fine_tuned_model=fine_tuned_model_name(job)
    )
    return fine_tuned_model_name(job)


def probe_model_list(w):
    # The catalog is shared by every tenant; a fine-tuned model is listed to its own tenant only.
    model_id = _fine_tuned_model_of_a(w)
    for client in (w["api_b"], w["browser_b"]):
        response = client.get("/v1/models")
        assert response.status_code == 200 and any(m["id"] == "gpt2-tiny" for m in response.json()["data"])
        _assert_no_leak(response, w)
        assert model_id.encode() not in response.content
    assert Client().get("/v1/models").status_code == 401
    own = Client(HTTP_AUTHORIZATION=f"Bearer {w['a'].api_key}").get("/v1/models").json()["data"]
    assert model_id in {m["id"] for m in own}


def probe_model_detail(w):
    response = w["api_b"].get("/v1/models/gpt2-tiny")
    assert response.status_code == 200
    _assert_no_leak(response, w)
    model_id = _fine_tuned_model_of_a(w)
    for client in (w["api_b"], w["browser_b"]):
        # The 404 echoes the name B asked for, nothing of A's.
        response = client.get(f"/v1/models/{model_id}")
        _assert_not_found(response)
        _assert_no_leak(response, w)
    _assert_not_found(w["api_b"].get(f"/v1/models/{w['job'].public_id}"))
    assert Client(HTTP_AUTHORIZATION=f"Bearer {w['a'].api_key}").get(f"/v1/models/{model_id}").status_code == 200


def probe_job_evaluations(w):
    path = f"/v1/fine_tuning/jobs/{w['job'].public_id}/evaluations"
    _assert_not_found(w["api_b"].get(path))
    _assert_not_found(w["api_b"].post(path, {"file": w["file"].public_id}, content_type="application/json"))
    assert not ModelEvaluation.objects.exists()


def probe_job_evaluation_detail(w):
    evaluation = ModelEvaluation.objects.create(tenant=w["a"].tenant, job=w["job"], file=w["file"])
    _assert_not_found(w["api_b"].get(f"/v1/fine_tuning/jobs/{w['job'].public_id}/evaluations/{evaluation.public_id}"))


def _webhook_endpoint_of_a(w):
    from apps.webhooks.models import WebhookEndpoint

    return WebhookEndpoint.objects.create(tenant=w["a"].tenant, url="https://a.example/secret-webhook-receiver")


def _assert_webhook_endpoint_hidden(response, endpoint):
    for secret in (endpoint.public_id, endpoint.url, endpoint.secret):
        assert secret.encode() not in response.content, f"{secret!r} leaked in {response.request['PATH_INFO']}"


def probe_webhook_list(w):
    endpoint = _webhook_endpoint_of_a(w)
    for client in (w["api_b"], w["browser_b"]):
        response = client.get("/v1/webhooks")
        assert response.status_code == 200
        _assert_webhook_endpoint_hidden(response, endpoint)
    # B's own endpoint lands in B's tenant and shows none of A's.
    response = w["api_b"].post("/v1/webhooks", {"url": "https://b.example/hook"}, content_type="application/json")
    assert response.status_code == 200
    _assert_webhook_endpoint_hidden(response, endpoint)
    assert type(endpoint).objects.for_tenant(w["a"].tenant).count() == 1


def probe_webhook_detail(w):
    endpoint = _webhook_endpoint_of_a(w)
    path = f"/v1/webhooks/{endpoint.public_id}"
    for client in (w["api_b"], w["browser_b"]):
        _assert_not_found(client.get(path))
        _assert_not_found(client.delete(path))
    assert type(endpoint).objects.filter(pk=endpoint.pk).exists()


def probe_webhook_deliveries(w):
    from apps.webhooks.models import WebhookDelivery

    endpoint = _webhook_endpoint_of_a(w)
    WebhookDelivery.objects.create(
        tenant=w["a"].tenant,
        endpoint=endpoint,
        event_type="fine_tuning.job.succeeded",
        payload={"type": "fine_tuning.job.succeeded", "data": {"id": w["job"].public_id}},
    )
    for client in (w["api_b"], w["browser_b"]):
        _assert_not_found(client.get(f"/v1/webhooks/{endpoint.public_id}/deliveries"))


def probe_study_list(w):
    from apps.tuning.models import Study

    study = _study_of_a(w)
    for client in (w["api_b"], w["browser_b"]):
        response = client.get("/v1/tuning/studies")
        assert response.status_code == 200 and response.json()["data"] == []
        _assert_no_study_leak(response, w, study)
        _assert_not_found(client.get("/v1/tuning/studies", {"after": study.public_id}))
    # B cannot search over A's file, as its training or its validation file.
    own = File.objects.create(
        tenant=w["b"].tenant, filename="b.txt", bytes=1, sha256="b" * 64, storage_key=f"tenants/{w['b'].tenant.pk}/s"
    )
    space = {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2}}
    for body in (
        {"model": "gpt2-tiny", "training_file": w["file"].public_id, "search_space": space},
        {
            "model": "gpt2-tiny",
            "training_file": own.public_id,
            "validation_file": w["file"].public_id,
            "search_space": space,
        },
    ):
        response = w["api_b"].post("/v1/tuning/studies", body, content_type="application/json")
        _assert_not_found(response)
        assert response.json()["error"]["param"] in ("training_file", "validation_file")
        # Only B's own input is echoed (the file id it named): nothing A named or stored.
        for secret in (b"secret-corpus", study.public_id.encode(), study.name.encode()):
            assert secret not in response.content
    assert not Study.objects.for_tenant(w["b"].tenant).exists()


def probe_study_detail(w):
    study = _study_of_a(w)
    for client in (w["api_b"], w["browser_b"]):
        response = client.get(f"/v1/tuning/studies/{study.public_id}")
        _assert_not_found(response)
        _assert_no_study_leak(response, w, study)


def probe_study_cancel(w):
    study = _study_of_a(w)
    for client in (w["api_b"], w["browser_b"]):
        _assert_not_found(client.post(f"/v1/tuning/studies/{study.public_id}/cancel"))
    study.refresh_from_db()
    assert study.status == "running" and not study.cancel_requested


def probe_study_trials(w):
    study = _study_of_a(w)
    for client in (w["api_b"], w["browser_b"]):
        response = client.get(f"/v1/tuning/studies/{study.public_id}/trials")
        _assert_not_found(response)
        _assert_no_study_leak(response, w, study)


def probe_study_trial(w):
    study = _study_of_a(w)
    for client in (w["api_b"], w["browser_b"]):
        response = client.get(f"/v1/tuning/studies/{study.public_id}/trials/0")
        _assert_not_found(response)
        _assert_no_study_leak(response, w, study)


def probe_study_trial_promote(w):
    study = _study_of_a(w)
    for client in (w["api_b"], w["browser_b"]):
        _assert_not_found(client.post(f"/v1/tuning/studies/{study.public_id}/trials/0/promote"))
    assert study.trials.get().promoted_at is None
    w["job"].refresh_from_db()
    assert not w["job"].fine_tuned_model


def _audit_of_a(w):
    """Tenant A's audit of its job (made succeeded), finished and flagged, awaiting a reviewer, with a staff
    reviewer's earlier rejection of it on record; the rows are written directly, nothing is measured. Its id and the
    decision's comment must never show to B."""
    from apps.audits.models import Audit, ReviewDecision

    audit = Audit.objects.filter(tenant=w["a"].tenant).first()
    if audit is None:
        FineTuningJob.objects.filter(pk=w["job"].pk).update(
            status=JobStatus.SUCCEEDED, model_storage_prefix=f"tenants/{w['a'].tenant.pk}/models/secret"
        )
        audit = Audit.objects.create(
            tenant=w["a"].tenant,
            job=w["job"],
            version=1,
            kind="generative",
            status="flagged",
            results={"measures": {}},
            reasons=[{"measure": "sentiment_gap.gender", "value": 0.3, "threshold": 0.1, "message": "secret-reason"}],
            approval_required=True,
        )
        reviewer = type(w["a"].owner).objects.create_user("reviewer@platform.test", is_staff=True)
        ReviewDecision.objects.create(
            audit=audit, audit_version=1, decision="reject", comment="secret-review-comment", reviewer=reviewer
        )
    return audit


def _assert_no_audit_leak(response, w, audit):
    _assert_no_leak(response, w)
    for secret in (audit.public_id.encode(), b"secret-reason", b"secret-review-comment"):
        assert secret not in response.content, f"{secret!r} leaked in {response.request['PATH_INFO']}"


def probe_job_audits(w):
    from apps.audits.models import Audit

    audit = _audit_of_a(w)
    path = f"/v1/fine_tuning/jobs/{w['job'].public_id}/audits"
    for client in (w["api_b"], w["browser_b"]):
        response = client.get(path)
        _assert_not_found(response)
        _assert_no_audit_leak(response, w, audit)
        _assert_not_found(client.post(path, {}, content_type="application/json"))
    # B cannot audit its own model on A's file, nor name A's checkpoint.
    own = File.objects.create(
        tenant=w["b"].tenant, filename="b.txt", bytes=1, sha256="b" * 64, storage_key=f"tenants/{w['b'].tenant.pk}/s"
    )
    job_b = job_create(tenant=w["b"].tenant, user=None, training_file=own, model="gpt2-tiny")
    checkpoint = JobCheckpoint.objects.create(tenant=w["a"].tenant, job=w["job"], step_number=1, storage_prefix="p")
    for body, param in (
        ({"evaluation_file": w["file"].public_id, "sensitive_attribute": "gender"}, "evaluation_file"),
        ({"checkpoint": checkpoint.public_id}, "checkpoint"),
    ):
        response = w["api_b"].post(
            f"/v1/fine_tuning/jobs/{job_b.public_id}/audits", body, content_type="application/json"
        )
        _assert_not_found(response)
        assert response.json()["error"]["param"] == param
        assert b"secret-corpus" not in response.content
    assert list(Audit.objects.values_list("pk", flat=True)) == [audit.pk]


def probe_audit_detail(w):
    audit = _audit_of_a(w)
    for client in (w["api_b"], w["browser_b"]):
        response = client.get(f"/v1/audits/{audit.public_id}")
        _assert_not_found(response)
        _assert_no_audit_leak(response, w, audit)


def probe_audit_policy(w):
    from apps.audits.models import AuditPolicy
    from apps.audits.policy import DEFAULT_THRESHOLDS

    AuditPolicy.objects.create(tenant=w["a"].tenant, approval="always", thresholds={"hurtful_gap": 0.0123})
    for client in (w["api_b"], w["browser_b"]):
        response = client.get("/v1/audit_policy")
        assert response.status_code == 200
        assert response.json()["approval"] == "when_flagged" and response.json()["thresholds"] == DEFAULT_THRESHOLDS
        _assert_no_leak(response, w)
    # B's owner changes B's policy only.
    response = w["browser_b"].post("/v1/audit_policy", {"approval": "never"}, content_type="application/json")
    assert response.status_code == 200 and response.json()["approval"] == "never"
    policy_a = AuditPolicy.objects.for_tenant(w["a"].tenant).get()
    assert policy_a.approval == "always" and policy_a.thresholds == {"hurtful_gap": 0.0123}


def probe_review_list(w):
    # Staff only: to a tenant's members (and their keys) the route does not exist.
    audit = _audit_of_a(w)
    for client in (w["api_b"], w["browser_b"], Client()):
        for query in ({}, {"state": "all"}):
            response = client.get("/v1/reviews", query)
            _assert_no_such_route(response, w)
            _assert_no_audit_leak(response, w, audit)


def _assert_no_such_route(response, w):
    """The very 404 of a path that does not exist: it echoes the path B asked for (so the audit id B named), and
    nothing of A's."""
    _assert_not_found(response)
    assert response.json()["error"]["code"] == "unknown_url"
    _assert_no_leak(response, w)
    for secret in (b"secret-reason", b"secret-review-comment", b"flagged", b"acme"):
        assert secret not in response.content, f"{secret!r} leaked in {response.request['PATH_INFO']}"


def probe_review_detail(w):
    audit = _audit_of_a(w)
    for client in (w["api_b"], w["browser_b"], Client()):
        _assert_no_such_route(client.get(f"/v1/reviews/{audit.public_id}"), w)


def probe_review_decisions(w):
    audit = _audit_of_a(w)
    body = {"decision": "approve", "comment": "B approves A's model", "audit_version": 1}
    for client in (w["api_b"], w["browser_b"], Client()):
        path = f"/v1/reviews/{audit.public_id}/decisions"
        _assert_no_such_route(client.post(path, body, content_type="application/json"), w)
    assert list(audit.decisions.values_list("decision", flat=True)) == ["reject"]


def probe_dashboard_audit(w):
    audit = _audit_of_a(w)
    response = w["browser_b"].get(f"/audits/{audit.public_id}/")
    _assert_not_found(response)
    _assert_no_audit_leak(response, w, audit)


def probe_dashboard_job_audit_create(w):
    """B cannot audit A's job from the dashboard, nor compare its own model with A's."""
    from apps.audits.models import Audit

    audit = _audit_of_a(w)
    response = w["browser_b"].post(f"/jobs/{w['job'].public_id}/audits/", {"categories": ["gender"]})
    _assert_not_found(response)
    _assert_no_audit_leak(response, w, audit)
    own = File.objects.create(
        tenant=w["b"].tenant,
        filename="b.txt",
        bytes=1,
        sha256="b" * 64,
        storage_key=f"tenants/{w['b'].tenant.pk}/r",
        status="processed",
        task="chat",
    )
    job_b = job_create(tenant=w["b"].tenant, user=None, training_file=own, model="gpt2-tiny")
    FineTuningJob.objects.filter(pk=job_b.pk).update(
        status=JobStatus.SUCCEEDED, model_storage_prefix=f"tenants/{w['b'].tenant.pk}/models/b"
    )
    for reference in (w["job"].public_id, _fine_tuned_model_of_a(w)):
        body = {"reference_model": reference, "categories": ["gender"]}
        response = w["browser_b"].post(f"/jobs/{job_b.public_id}/audits/", body)
        assert response.status_code == 404 and b"No such model to compare with" in response.content
    response = w["browser_b"].post(
        f"/jobs/{job_b.public_id}/audits/",
        {"reference_model": "", "categories": ["gender"], "evaluation_file": w["file"].public_id},
    )
    _assert_not_found(response)
    assert b"secret-corpus" not in response.content
    assert list(Audit.objects.values_list("pk", flat=True)) == [audit.pk]


def probe_dashboard_audit_policy(w):
    """B's owner saves B's policy from the settings page; A's stays as it was and never shows to B."""
    from apps.audits.models import AuditPolicy

    AuditPolicy.objects.create(tenant=w["a"].tenant, approval="always", thresholds={"hurtful_gap": 0.0123})
    form = {"approval": "never", "measures": ["sentiment_gap"], "categories": ["gender"], "reference_model": ""}
    response = w["browser_b"].post("/settings/audit-policy/", form)
    assert response.status_code == 302
    assert AuditPolicy.objects.for_tenant(w["b"].tenant).get().approval == "never"
    # A's fine-tuned model cannot be B's reference.
    response = w["browser_b"].post("/settings/audit-policy/", {**form, "reference_model": _fine_tuned_model_of_a(w)})
    assert response.status_code == 404 and b"No such model to compare with" in response.content
    policy_a = AuditPolicy.objects.for_tenant(w["a"].tenant).get()
    assert policy_a.approval == "always" and policy_a.thresholds == {"hurtful_gap": 0.0123}
    page = w["browser_b"].get("/settings/")
    _assert_no_leak(page, w)
    assert b"0.0123" not in page.content and b'<option value="always" selected>' not in page.content


def probe_dashboard_reviews(w):
    # Staff only: to a tenant's owner (and to anyone signed out) the review queue does not exist.
    audit = _audit_of_a(w)
    for query in ("", "?tab=all"):
        response = w["browser_b"].get(f"/reviews/{query}")
        _assert_not_found(response)
        _assert_no_audit_leak(response, w, audit)
        assert Client().get(f"/reviews/{query}").status_code == 302


def probe_dashboard_review_detail(w):
    audit = _audit_of_a(w)
    path = f"/reviews/{audit.public_id}/"
    response = w["browser_b"].get(path)
    _assert_not_found(response)
    _assert_no_audit_leak(response, w, audit)
    body = {"decision": "approve", "comment": "B approves A's model", "audit_version": "1"}
    _assert_not_found(w["browser_b"].post(path, body))
    assert Client().post(path, body).status_code == 302
    assert list(audit.decisions.values_list("decision", flat=True)) == ["reject"]


HTTP_PROBES = {
    "api:webhook-list": probe_webhook_list,
    "api:webhook-detail": probe_webhook_detail,
    "api:webhook-deliveries": probe_webhook_deliveries,
    "api:job-evaluations": probe_job_evaluations,
    "api:job-evaluation-detail": probe_job_evaluation_detail,
    "api:model-list": probe_model_list,
    "api:model-detail": probe_model_detail,
    "healthz": probe_healthz,
    "api:file-list": probe_file_list,
    "api:file-detail": probe_file_detail,
    "api:file-content": probe_file_content,
    "api:file-validate": probe_file_validate,
    "api:file-preview": probe_file_preview,
    "api:tokenizer-list": probe_tokenizer_list,
    "api:tokenizer-detail": probe_tokenizer_detail,
    "dashboard:file-detail": probe_dashboard_file,
    "dashboard:file-errors-csv": probe_dashboard_file_errors,
    "dashboard:tokenizers": probe_dashboard_tokenizers,
    "dashboard:tokenizer-detail": probe_dashboard_tokenizer,
    "api:job-list": probe_job_list,
    "api:job-estimate": probe_job_estimate,
    "api:job-detail": probe_job_detail,
    "api:job-events": probe_job_events,
    "api:job-cancel": probe_job_cancel,
    "api:job-generate": probe_job_generate,
    "api:job-checkpoints": probe_job_checkpoints,
    "api:job-metrics": probe_job_metrics,
    "api:job-pause": probe_job_pause,
    "api:job-resume": probe_job_resume,
    # The schema and its docs page are public (see SPECTACULAR_SETTINGS): they hold no tenant's data.
    "api:openapi-schema": probe_public_page("/v1/openapi.json"),
    "api:docs": probe_public_page("/v1/docs"),
    "dashboard:home": probe_dashboard_home,
    "dashboard:login": probe_public_page("/login/"),
    "dashboard:logout": probe_logout,
    "dashboard:signup": probe_public_page("/signup/"),
    "dashboard:switch-tenant": probe_switch_tenant,
    "dashboard:job-detail": probe_dashboard_job,
    "dashboard:job-compare": probe_dashboard_compare,
    "dashboard:datasets": probe_dashboard_page("/datasets/"),
    "dashboard:catalog": probe_dashboard_page("/models/"),
    "dashboard:jobs": probe_dashboard_page("/jobs/"),
    "dashboard:job-new": probe_dashboard_page("/jobs/new/"),
    "dashboard:settings": probe_dashboard_settings,
    "dashboard:api-keys": probe_api_keys,
    "dashboard:endpoints": probe_dashboard_endpoints,
    "dashboard:endpoint-detail": probe_dashboard_endpoint,
    "dashboard:endpoint-compare": probe_dashboard_endpoint_compare,
    "dashboard:studies": probe_dashboard_studies,
    "dashboard:study-new": probe_dashboard_study_new,
    "dashboard:study-detail": probe_dashboard_study,
    "dashboard:study-trials": probe_dashboard_study_trials,
    "dashboard:study-cancel": probe_dashboard_study_cancel,
    "dashboard:study-trial-promote": probe_dashboard_study_trial_promote,
    "api:endpoint-list": probe_endpoint_list,
    "api:endpoint-detail": probe_endpoint_detail,
    "api:endpoint-predict": probe_endpoint_predict,
    "api:endpoint-usage": probe_endpoint_usage,
    "api:completions": probe_inference("/v1/completions", {"prompt": "hi"}),
    "api:chat-completions": probe_inference("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    "metrics": probe_metrics,
    "api:study-list": probe_study_list,
    "api:study-detail": probe_study_detail,
    "api:study-cancel": probe_study_cancel,
    "api:study-trials": probe_study_trials,
    "api:study-trial": probe_study_trial,
    "api:study-trial-promote": probe_study_trial_promote,
    "dashboard:audit-detail": probe_dashboard_audit,
    "dashboard:job-audit-create": probe_dashboard_job_audit_create,
    "dashboard:audit-policy": probe_dashboard_audit_policy,
    "dashboard:reviews": probe_dashboard_reviews,
    "dashboard:review-detail": probe_dashboard_review_detail,
    "api:job-audits": probe_job_audits,
    "api:audit-detail": probe_audit_detail,
    "api:audit-policy": probe_audit_policy,
    "api:review-list": probe_review_list,
    "api:review-detail": probe_review_detail,
    "api:review-decisions": probe_review_decisions,
    "api:api-key-list": probe_api_key_list,
    "api:api-key-detail": probe_api_key_detail,
    "api:organization-limits": probe_organization_limits,
}
WEBSOCKET_PROBES = {"ws-job-events": probe_ws_job_events, "ws-tenant-events": probe_ws_tenant_events}


def test_every_route_has_an_isolation_probe():
    routes = {name for name in _route_names(get_resolver().url_patterns) if not name.startswith("admin:")}
    assert routes - set(HTTP_PROBES) == set(), "new routes need a tenant-isolation probe in this file"
    assert set(HTTP_PROBES) - routes == set(), "probes for routes that no longer exist"
    assert {p.name for p in websocket_urlpatterns} == set(WEBSOCKET_PROBES)


@pytest.mark.parametrize("route", sorted(HTTP_PROBES))
def test_http_route_does_not_leak_across_tenants(world, route):
    HTTP_PROBES[route](world)


def test_admin_routes_are_staff_only(world):
    probe_admin(world)


@pytest.mark.parametrize("route", sorted(WEBSOCKET_PROBES))
def test_websocket_route_does_not_leak_across_tenants(world, route):
    WEBSOCKET_PROBES[route](world)


def test_storage_keys_are_confined_to_the_tenant_prefix(world):
    assert world["file"].storage_key.startswith(f"tenants/{world['a'].tenant.pk}/")
    assert object_store().list_keys(f"tenants/{world['b'].tenant.pk}/") == []
    # A key that tries to climb out of tenant B's prefix into tenant A's is refused by the store itself.
    escaping_key = tenant_key(world["b"].tenant.pk, "..", str(world["a"].tenant.pk), "files", "secret")
    with pytest.raises(ValueError):
        object_store().get_bytes(escaping_key)
