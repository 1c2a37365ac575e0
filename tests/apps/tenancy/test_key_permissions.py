"""API key permissions: an inference-only key runs the endpoints and lists models but reads and changes nothing else;
a read-only key reads everything but changes nothing and runs no inference. Refusals are 403s in OpenAI's shape
(`insufficient_permissions`) that leave every stored row as it was."""

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from apps.datasets.models import File
from apps.endpoints.models import EndpointRequest
from apps.tenancy.models import ApiKey, KeyPermissions
from apps.tenancy.services import api_key_create
from tests.apps.endpoints import test_limits
from tests.apps.endpoints.test_limits import (  # noqa: F401 - the autouse fixture gives these tests their Redis db
    _key_client,
    _registry_no_serving_process_watches,
    _signed_in,
)

bot = test_limits.bot  # a deployed endpoint named "bot" (no serving process: admitted requests answer 503)

pytestmark = pytest.mark.django_db(transaction=True)


def _key(tenant_fixture, permissions: str, *, user=None) -> str:
    user = user or tenant_fixture.owner
    return api_key_create(tenant=tenant_fixture.tenant, user=user, name=permissions, permissions=permissions).secret


def _refused(response) -> bool:
    error = response.json()["error"]
    return (
        response.status_code == 403
        and error["code"] == "insufficient_permissions"
        and error["type"] == "permission_error"
    )


def _a_file(tenant) -> File:
    return File.objects.create(tenant=tenant, filename="t.txt", bytes=1, sha256="a" * 64, storage_key="k")


def test_an_inference_only_key_runs_inference_and_lists_models_and_nothing_else(tenant_a, bot):
    app = _key_client(_key(tenant_a, KeyPermissions.INFERENCE))
    file = _a_file(tenant_a.tenant)

    models = app.get("/v1/models")
    assert models.status_code == 200 and "bot" in [model["id"] for model in models.json()["data"]]
    assert app.get("/v1/models/gpt2-tiny").status_code == 200
    # Admitted, metered and sent on (no serving process runs here, so the answer is 503), not refused.
    completion = app.post("/v1/completions", {"model": "bot", "prompt": "x", "max_tokens": 4}, format="json")
    chat = app.post(
        "/v1/chat/completions",
        {"model": "bot", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        format="json",
    )
    assert (completion.status_code, chat.status_code) == (503, 503)
    assert EndpointRequest.objects.filter(endpoint_public_id=bot["id"]).count() == 2
    predict = app.post(f"/v1/endpoints/{bot['id']}/predict", {"input": "x"}, format="json")
    assert not _refused(predict) and predict.status_code != 403

    for response in (
        app.get("/v1/files"),
        app.get(f"/v1/files/{file.public_id}"),
        app.delete(f"/v1/files/{file.public_id}"),
        app.get("/v1/fine_tuning/jobs"),
        app.post("/v1/fine_tuning/jobs", {"model": "gpt2-tiny", "training_file": file.public_id}, format="json"),
        app.get("/v1/endpoints"),
        app.delete(f"/v1/endpoints/{bot['id']}"),
        app.get("/v1/api_keys"),
    ):
        assert _refused(response), response.content
    assert File.objects.filter(pk=file.pk).exists()
    assert tenant_a.api().get(f"/v1/endpoints/{bot['id']}").json()["status"] != "stopped"


def test_a_read_only_key_reads_everything_changes_nothing_and_runs_no_inference(tenant_a, bot):
    monitor = _key_client(_key(tenant_a, KeyPermissions.READ_ONLY))
    file = _a_file(tenant_a.tenant)

    for path in ("/v1/files", f"/v1/files/{file.public_id}", "/v1/fine_tuning/jobs", "/v1/endpoints", "/v1/models"):
        assert monitor.get(path).status_code == 200, path
    assert monitor.get(f"/v1/endpoints/{bot['id']}/usage").status_code == 200

    for response in (
        monitor.delete(f"/v1/files/{file.public_id}"),
        monitor.post("/v1/fine_tuning/jobs", {"model": "gpt2-tiny", "training_file": file.public_id}, format="json"),
        monitor.post(f"/v1/endpoints/{bot['id']}", {"name": "renamed"}, format="json"),
        monitor.post("/v1/completions", {"model": "bot", "prompt": "x", "max_tokens": 4}, format="json"),
        monitor.post(
            "/v1/chat/completions",
            {"model": "bot", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            format="json",
        ),
        monitor.post(f"/v1/endpoints/{bot['id']}/predict", {"input": "x"}, format="json"),
    ):
        assert _refused(response), response.content
    assert File.objects.filter(pk=file.pk).exists()
    assert tenant_a.api().get(f"/v1/endpoints/{bot['id']}").json()["name"] == "bot"
    assert not EndpointRequest.objects.filter(endpoint_public_id=bot["id"]).exists()  # refused before metering


def test_owners_set_and_change_permissions_through_the_api_and_a_key_cannot_raise_its_own(tenant_a):
    owner = _signed_in(tenant_a.owner)
    created = owner.post("/v1/api_keys", {"name": "app", "permissions": "inference"}, format="json")
    assert created.status_code == 201 and created.json()["permissions"] == "inference"
    key_id, secret = created.json()["id"], created.json()["key"]
    assert owner.post("/v1/api_keys", {"name": "plain"}, format="json").json()["permissions"] == "all"
    listed = {key["id"]: key["permissions"] for key in owner.get("/v1/api_keys").json()["data"]}
    assert listed[key_id] == "inference"

    app = _key_client(secret)
    assert _refused(app.get("/v1/files"))
    raised = app.post(f"/v1/api_keys/{key_id}", {"permissions": "all"}, format="json")
    assert _refused(raised)
    assert ApiKey.objects.get(public_id=key_id).permissions == KeyPermissions.INFERENCE

    # The owner widens it: it takes effect on the key's next request.
    assert owner.post(f"/v1/api_keys/{key_id}", {"permissions": "all"}, format="json").json()["permissions"] == "all"
    assert app.get("/v1/files").status_code == 200


@pytest.mark.parametrize("value", ["admin", "", 3, ["all"]])
def test_an_unknown_permission_answers_400_naming_it_and_stores_nothing(tenant_a, value):
    owner = _signed_in(tenant_a.owner)
    before = ApiKey.objects.count()
    response = owner.post("/v1/api_keys", {"name": "bad", "permissions": value}, format="json")
    assert response.status_code == 400 and response.json()["error"]["param"] == "permissions"
    assert "all" in response.json()["error"]["message"]
    assert ApiKey.objects.count() == before
    key_id = ApiKey.objects.for_tenant(tenant_a.tenant).get().public_id
    changed = owner.post(f"/v1/api_keys/{key_id}", {"permissions": value}, format="json")
    assert changed.status_code == 400 and ApiKey.objects.get(public_id=key_id).permissions == KeyPermissions.ALL


def test_a_staff_members_read_only_key_reads_the_limits_but_cannot_set_them(tenant_a):
    staff = get_user_model().objects.create_user("staff@tunehouse.test", "staff@tunehouse.test", "pw", is_staff=True)
    path = f"/v1/organizations/{tenant_a.tenant.slug}/limits"
    read_only = _key_client(_key(tenant_a, KeyPermissions.READ_ONLY, user=staff))
    assert read_only.get(path).status_code == 200
    assert _refused(read_only.post(path, {"tokens_per_day": 5}, format="json"))
    inference = _key_client(_key(tenant_a, KeyPermissions.INFERENCE, user=staff))
    assert _refused(inference.get(path))
    tenant_a.tenant.refresh_from_db()
    assert tenant_a.tenant.tokens_per_day is None


def test_the_dashboard_creates_keys_with_permissions_and_shows_them(tenant_a):
    browser = Client()
    browser.force_login(tenant_a.owner)
    page = browser.post("/settings/api-keys/", {"name": "prod-app", "permissions": "inference"})
    assert page.context["new_secret"]
    assert ApiKey.objects.get(name="prod-app").permissions == KeyPermissions.INFERENCE
    listing = browser.get("/settings/api-keys/").content.decode()
    assert 'name="permissions"' in listing and "Inference only" in listing
    refused = browser.post("/settings/api-keys/", {"name": "odd", "permissions": "root"}, follow=True)
    assert not ApiKey.objects.filter(name="odd").exists()
    assert "permissions must be one of" in refused.content.decode()
