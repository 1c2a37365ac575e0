"""`/v1/files` with the real `openai` SDK's shapes: upload, list, retrieve, content, delete, errors."""

import hashlib
import io

import pytest
from django.test import override_settings

from apps.core.storage import object_store
from apps.datasets.models import File
from apps.jobs.services import job_create

pytestmark = pytest.mark.django_db


def named(content: bytes, name: str) -> io.BytesIO:
    stream = io.BytesIO(content)
    stream.name = name
    return stream


def upload(client, content: bytes, name: str = "data.txt", purpose: str = "fine-tune"):
    return client.post("/v1/files", {"purpose": purpose, "file": named(content, name)}, format="multipart")


def test_upload_stores_bytes_under_the_tenant_prefix_with_sha256(tenant_a):
    content = b"hello world\n" * 100
    response = upload(tenant_a.api(), content)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "file" and body["id"].startswith("file-") and body["bytes"] == len(content)
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    file = File.objects.for_tenant(tenant_a.tenant).get(public_id=body["id"])
    assert file.storage_key == f"tenants/{tenant_a.tenant.pk}/files/{body['id']}"
    assert object_store().get_bytes(file.storage_key) == content
    # The staging object is gone: only the final key remains under uploads/.
    assert object_store().list_keys(f"tenants/{tenant_a.tenant.pk}/uploads/") == []


def test_identical_reupload_is_recognised(tenant_a):
    first = upload(tenant_a.api(), b"same text\n").json()
    second = upload(tenant_a.api(), b"same text\n", name="again.txt").json()
    assert first["id"] == second["id"]
    assert File.objects.for_tenant(tenant_a.tenant).count() == 1


def test_list_retrieve_content_and_delete(tenant_a):
    client = tenant_a.api()
    ids = [upload(client, f"text {n}\n".encode()).json()["id"] for n in range(3)]
    page = client.get("/v1/files", {"limit": 2}).json()
    assert [item["id"] for item in page["data"]] == ids[::-1][:2] and page["has_more"] is True
    rest = client.get("/v1/files", {"limit": 2, "after": page["last_id"]}).json()
    assert [item["id"] for item in rest["data"]] == [ids[0]] and rest["has_more"] is False
    assert client.get(f"/v1/files/{ids[1]}").json()["id"] == ids[1]
    content = client.get(f"/v1/files/{ids[1]}/content")
    assert b"".join(content.streaming_content) == b"text 1\n"
    deleted = client.delete(f"/v1/files/{ids[1]}").json()
    assert deleted == {"object": "file", "id": ids[1], "deleted": True}
    assert client.get(f"/v1/files/{ids[1]}").status_code == 404


@pytest.mark.parametrize(
    ("name", "purpose", "status", "code", "param"),
    [
        ("data.docx", "fine-tune", 400, "unsupported_file_type", "file"),
        ("data.txt", "batch", 400, "invalid_request", "purpose"),
    ],
)
def test_bad_uploads_get_clear_openai_errors(tenant_a, name, purpose, status, code, param):
    response = upload(tenant_a.api(), b"x\n", name=name, purpose=purpose)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["param"] == param and error["message"]
    assert File.objects.count() == 0


def test_missing_file_field(tenant_a):
    response = tenant_a.api().post("/v1/files", {"purpose": "fine-tune"}, format="multipart")
    assert response.status_code == 400 and response.json()["error"]["param"] == "file"


@override_settings(MAX_UPLOAD_BYTES=1000)
def test_too_large_upload_is_refused_and_leaves_nothing_behind(tenant_a):
    small = upload(tenant_a.api(), b"kept\n").json()
    response = upload(tenant_a.api(), b"y" * 5000)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "file_too_large"
    assert [f.public_id for f in File.objects.all()] == [small["id"]]
    assert object_store().list_keys(f"tenants/{tenant_a.tenant.pk}/uploads/") == []


@override_settings(MAX_UPLOAD_BYTES=1000)
def test_too_large_body_is_refused_before_it_is_read(tenant_a):
    response = tenant_a.api().generic(
        "POST", "/v1/files", b"z" * 10, content_type="multipart/form-data; boundary=x", CONTENT_LENGTH="99999999"
    )
    assert response.status_code == 413


def test_deleting_a_file_used_by_a_job_is_refused(tenant_a):
    body = upload(tenant_a.api(), b"some training text\n" * 10).json()
    file = File.objects.get(public_id=body["id"])
    job_create(tenant=tenant_a.tenant, user=None, training_file=file, model="gpt2-tiny")
    response = tenant_a.api().delete(f"/v1/files/{body['id']}")
    assert response.status_code == 409 and response.json()["error"]["code"] == "file_in_use"
    assert object_store().exists(file.storage_key)


def test_bad_list_parameters(tenant_a):
    client = tenant_a.api()
    assert client.get("/v1/files", {"limit": "abc"}).json()["error"]["param"] == "limit"
    assert client.get("/v1/files", {"limit": 0}).status_code == 400
    assert client.get("/v1/files", {"order": "sideways"}).json()["error"]["param"] == "order"
    assert client.get("/v1/files", {"after": "file-nope"}).status_code == 404


def test_unknown_api_path_answers_in_openai_shape(tenant_a):
    response = tenant_a.api().get("/v1/no-such-thing")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_url"
