"""The API keys page (settings): each key's own inference caps are shown and, for owners and admins, edited there;
the settings page shows the team's inference limits."""

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from apps.tenancy.models import ApiKey, Membership, Role

pytestmark = pytest.mark.django_db


def _browser(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_owners_see_and_change_a_keys_limits_on_the_page(tenant_a):
    key = ApiKey.objects.for_tenant(tenant_a.tenant).get()
    key.tokens_per_day = 5000
    key.save()
    browser = _browser(tenant_a.owner)
    page = browser.get("/settings/api-keys/").content.decode()
    assert f'id="tpd-{key.public_id}"' in page and 'value="5000"' in page
    assert 'id="team-inference-limits"' in page and "1,200 requests per minute" in page

    saved = browser.post(
        "/settings/api-keys/",
        {
            "action": "limits",
            "key_id": key.public_id,
            "requests_per_minute": "30",
            "tokens_per_minute": "",
            "tokens_per_day": "",
        },
        follow=True,
    )
    assert "Key limits saved." in saved.content.decode()
    key.refresh_from_db()
    assert (key.requests_per_minute, key.tokens_per_minute, key.tokens_per_day) == (30, None, None)
    assert f'id="rpm-{key.public_id}"' in saved.content.decode() and 'value="30"' in saved.content.decode()

    refused = browser.post(
        "/settings/api-keys/",
        {
            "action": "limits",
            "key_id": key.public_id,
            "requests_per_minute": "0",
            "tokens_per_minute": "",
            "tokens_per_day": "",
        },
        follow=True,
    )
    assert "requests_per_minute must be a positive whole number" in refused.content.decode()
    key.refresh_from_db()
    assert key.requests_per_minute == 30

    created = browser.post("/settings/api-keys/", {"name": "batch", "tokens_per_minute": "900"})
    assert created.context["new_secret"]
    assert ApiKey.objects.for_tenant(tenant_a.tenant).get(name="batch").tokens_per_minute == 900


def test_members_see_the_limits_but_cannot_change_them(tenant_a):
    key = ApiKey.objects.for_tenant(tenant_a.tenant).get()
    key.tokens_per_minute = 777
    key.save()
    member = get_user_model().objects.create_user("member@acme.test", "member@acme.test", "pw")
    Membership.objects.create(tenant=tenant_a.tenant, user=member, role=Role.MEMBER)
    browser = _browser(member)
    page = browser.get("/settings/api-keys/").content.decode()
    assert "777" in page and f'id="rpm-{key.public_id}"' not in page
    response = browser.post(
        "/settings/api-keys/", {"action": "limits", "key_id": key.public_id, "tokens_per_minute": "1"}
    )
    assert response.status_code == 404
    key.refresh_from_db()
    assert key.tokens_per_minute == 777


def test_settings_shows_the_teams_inference_limits(tenant_a):
    tenant_a.tenant.tokens_per_day = 123456
    tenant_a.tenant.save()
    page = _browser(tenant_a.owner).get("/settings/").content.decode()
    assert 'id="limit-tokens-per-day">123,456' in page and "set for this team" in page
    assert 'id="limit-requests-per-minute">1,200' in page
