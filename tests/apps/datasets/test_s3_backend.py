"""With S3_* settings the platform keeps tenant files in S3: the Files API against a real SeaweedFS server."""

import io
import uuid

import pytest
from django.test import override_settings

from apps.core.storage import object_store
from tests.s3server import s3_server  # noqa: F401 - the session fixture
from workers.storage import S3Store

pytestmark = pytest.mark.django_db


@pytest.fixture
def s3_settings(s3_server):  # noqa: F811 - pytest fixture injection
    bucket = s3_server.make_bucket(f"tunehouse-{uuid.uuid4().hex[:8]}")
    overrides = override_settings(
        S3_BUCKET=bucket,
        S3_ENDPOINT_URL=s3_server.endpoint_url,
        S3_ACCESS_KEY_ID=s3_server.access_key_id,
        S3_SECRET_ACCESS_KEY=s3_server.secret_access_key,
        S3_REGION=s3_server.region,
    )
    object_store.cache_clear()
    with overrides:
        yield bucket
    object_store.cache_clear()


def test_uploads_round_trip_through_s3(s3_settings, s3_server, tenant_a):  # noqa: F811
    store = object_store()
    assert isinstance(store, S3Store)
    content = b"stored in a real S3 server\n" * 1000
    upload = io.BytesIO(content)
    upload.name = "s3.txt"
    body = tenant_a.api().post("/v1/files", {"purpose": "fine-tune", "file": upload}, format="multipart").json()
    key = f"tenants/{tenant_a.tenant.pk}/files/{body['id']}"
    listed = s3_server.client().list_objects_v2(Bucket=s3_settings, Prefix=f"tenants/{tenant_a.tenant.pk}/")
    assert [item["Key"] for item in listed["Contents"]] == [key]
    response = tenant_a.api().get(f"/v1/files/{body['id']}/content")
    assert b"".join(response.streaming_content) == content
    assert tenant_a.api().delete(f"/v1/files/{body['id']}").status_code == 200
    assert not store.exists(key)
