"""Tenants, memberships, sign-up, API keys: the behaviour users and scripts rely on."""

import json
import subprocess
import sys
from io import StringIO

import pytest
from django.core.management import call_command
from django.test import Client

from apps.tenancy.models import ApiKey, Membership, Role, Tenant
from apps.tenancy.services import api_key_revoke, membership_add
from tunehouse.localrun import REPO_ROOT

pytestmark = pytest.mark.django_db


def test_create_tenant_command_prints_json_with_a_working_key(tenant_a):
    response = tenant_a.api().get("/v1/files")
    assert response.status_code == 200
    assert response.json() == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}


@pytest.mark.django_db(transaction=True)
def test_create_tenant_command_output_is_one_json_object_in_a_real_process(service_env):
    result = subprocess.run(
        [sys.executable, "manage.py", "create_tenant", "initech", "--owner-email", "boss@initech.test"],
        cwd=REPO_ROOT,
        env=service_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert created["tenant"] == "initech" and created["api_key"].startswith("th-")


def test_create_tenant_refuses_a_taken_slug(tenant_a):
    with pytest.raises(Exception, match="taken"):
        call_command("create_tenant", "acme", "--owner-email", "other@acme.test", stdout=StringIO())


def test_api_keys_are_stored_hashed_and_shown_once(tenant_a):
    key = ApiKey.objects.for_tenant(tenant_a.tenant).get()
    assert tenant_a.api_key not in {key.key_hash, key.prefix, key.name}
    assert tenant_a.api_key.startswith(key.prefix)
    assert len(key.key_hash) == 64


def test_last_used_time_is_recorded(tenant_a):
    assert ApiKey.objects.for_tenant(tenant_a.tenant).get().last_used_at is None
    tenant_a.api().get("/v1/files")
    assert ApiKey.objects.for_tenant(tenant_a.tenant).get().last_used_at is not None


def test_revoked_key_is_refused_with_an_openai_error(tenant_a):
    key = ApiKey.objects.for_tenant(tenant_a.tenant).get()
    api_key_revoke(tenant=tenant_a.tenant, public_id=key.public_id)
    response = tenant_a.api().get("/v1/files")
    assert response.status_code == 401
    error = response.json()["error"]
    assert set(error) == {"code", "message", "param", "type"}
    assert error["type"] == "authentication_error"


def test_missing_and_malformed_keys_answer_401(db):
    client = Client()
    assert client.get("/v1/files").status_code == 401
    assert client.get("/v1/files", HTTP_AUTHORIZATION="Bearer th-not-a-real-key").status_code == 401
    assert client.get("/v1/files", HTTP_AUTHORIZATION="Basic abc").status_code == 401


def test_sign_up_creates_a_team_owned_by_the_new_user(client):
    response = client.post(
        "/signup/", {"email": "Ada@Example.test", "password": "a-long-passphrase-9", "team_name": "Analytical Engines"}
    )
    assert response.status_code == 302
    membership = Membership.objects.get(user__username="ada@example.test")
    assert membership.role == Role.OWNER and membership.tenant.name == "Analytical Engines"
    home = client.get("/")
    assert home.status_code == 200 and b"Analytical Engines" in home.content


def test_sign_up_rejects_weak_password_and_duplicate_email(client, tenant_a):
    weak = client.post("/signup/", {"email": "x@y.test", "password": "12345678", "team_name": "T"})
    assert weak.status_code == 200 and b"too common" in weak.content
    duplicate = client.post(
        "/signup/", {"email": tenant_a.owner.username, "password": "a-long-passphrase-9", "team_name": "T"}
    )
    assert duplicate.status_code == 200 and b"exists" in duplicate.content
    assert Tenant.objects.count() == 1


def test_sign_in_and_sign_out(client, tenant_a):
    assert client.get("/").status_code == 302
    response = client.post("/login/", {"username": tenant_a.owner.username, "password": tenant_a.password})
    assert response.status_code == 302
    assert client.get("/").status_code == 200
    client.post("/logout/")
    assert client.get("/").status_code == 302


def test_a_user_in_two_tenants_switches_between_them(client, tenant_a, tenant_b):
    membership_add(tenant=tenant_b.tenant, user=tenant_a.owner, role=Role.VIEWER)
    client.force_login(tenant_a.owner)
    assert b"acme" in client.get("/settings/api-keys/").content.lower()
    client.post("/tenants/switch/", {"tenant_id": tenant_b.tenant.pk})
    page = client.get("/")
    assert page.context["tenant_context"].tenant == tenant_b.tenant
    assert page.context["tenant_context"].role == Role.VIEWER


def test_switching_to_a_tenant_you_are_not_in_is_not_found(client, tenant_a, tenant_b):
    client.force_login(tenant_a.owner)
    assert client.post("/tenants/switch/", {"tenant_id": tenant_b.tenant.pk}).status_code == 404
    assert client.get("/").context["tenant_context"].tenant == tenant_a.tenant


def test_viewer_can_read_but_not_write_through_the_api(client, tenant_a, tenant_b):
    membership_add(tenant=tenant_a.tenant, user=tenant_b.owner, role=Role.VIEWER)
    client.force_login(tenant_b.owner)
    client.post("/tenants/switch/", {"tenant_id": tenant_a.tenant.pk})
    assert client.get("/v1/files").status_code == 200
    response = client.post("/v1/fine_tuning/jobs", {"model": "gpt2-tiny", "training_file": "file-x"})
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"


def test_dashboard_creates_shows_once_and_revokes_keys(client, tenant_a):
    client.force_login(tenant_a.owner)
    page = client.post("/settings/api-keys/", {"name": "ci"})
    secret = page.context["new_secret"]
    assert secret.startswith("th-") and secret.encode() in page.content
    assert secret.encode() not in client.get("/settings/api-keys/").content
    api = Client(HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert api.get("/v1/files").status_code == 200
    key = ApiKey.objects.for_tenant(tenant_a.tenant).get(name="ci")
    client.post("/settings/api-keys/", {"action": "revoke", "key_id": key.public_id})
    assert api.get("/v1/files").status_code == 401


def test_a_member_cannot_create_keys(client, tenant_a, tenant_b):
    membership_add(tenant=tenant_a.tenant, user=tenant_b.owner, role=Role.MEMBER)
    client.force_login(tenant_b.owner)
    client.post("/tenants/switch/", {"tenant_id": tenant_a.tenant.pk})
    assert client.post("/settings/api-keys/", {"name": "sneaky"}).status_code == 404
    assert not ApiKey.objects.for_tenant(tenant_a.tenant).filter(name="sneaky").exists()


def test_admin_is_for_platform_staff_only(client, tenant_a, django_user_model):
    client.force_login(tenant_a.owner)
    assert client.get("/admin/").status_code == 302
    staff = django_user_model.objects.create_user(
        "staff@tunehouse.test", password="x", is_staff=True, is_superuser=True
    )
    client.force_login(staff)
    assert client.get("/admin/jobs/finetuningjob/").status_code == 200
    assert client.get("/admin/tenancy/apikey/").status_code == 200


@pytest.mark.django_db(transaction=True)
def test_seed_demo_creates_the_login_and_validated_samples_once(celery_workers, client):
    import time

    from apps.datasets.models import File

    call_command("seed_demo", stdout=StringIO())
    call_command("seed_demo", stdout=StringIO())
    tenant = Tenant.objects.get(slug="demo")
    files = File.objects.for_tenant(tenant)
    assert files.count() == 5
    deadline = time.monotonic() + 60
    while files.filter(status="uploaded").exists() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert sorted(files.values_list("task", flat=True)) == [
        "causal_lm",
        "chat",
        "classification",
        "prompt_completion",
        "seq2seq",
    ]
    assert set(files.values_list("status", flat=True)) == {"processed"}
    assert client.post("/login/", {"username": "demo@tunehouse.local", "password": "tunehouse-demo"}).status_code == 302
