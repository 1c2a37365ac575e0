"""Team members and roles: who may add, re-role and remove whom, and a team never loses its last owner."""

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied, ValidationError
from django.test import Client

from apps.tenancy.models import Membership, Role
from apps.tenancy.services import (
    membership_add,
    membership_add_by_email,
    membership_change_role,
    membership_remove,
)

pytestmark = pytest.mark.django_db


def _user(email: str):
    return get_user_model().objects.create_user(username=email, email=email, password="correct-horse-battery")


def _owner_membership(fixture) -> Membership:
    return Membership.objects.get(tenant=fixture.tenant, user=fixture.owner)


def _roles(tenant) -> dict[str, str]:
    return dict(Membership.objects.filter(tenant=tenant).values_list("user__username", "role"))


def test_an_owner_adds_an_existing_account_by_email_with_a_role(tenant_a):
    _user("ada@example.test")
    added = membership_add_by_email(
        tenant=tenant_a.tenant, actor=tenant_a.owner, email=" Ada@Example.test ", role="admin"
    )
    assert (added.user.username, added.role) == ("ada@example.test", Role.ADMIN)
    assert _roles(tenant_a.tenant)["ada@example.test"] == "admin"


@pytest.mark.parametrize(
    ("email", "role", "message"),
    [
        ("nobody@example.test", "member", "No account uses nobody@example.test"),
        ("owner@acme.test", "member", "already a member"),
        ("ada@example.test", "superuser", "Choose one of the roles"),
        ("", "member", "Enter the email"),
    ],
)
def test_adding_a_member_explains_what_is_wrong(tenant_a, email, role, message):
    _user("ada@example.test")
    with pytest.raises(ValidationError, match=message):
        membership_add_by_email(tenant=tenant_a.tenant, actor=tenant_a.owner, email=email, role=role)
    assert set(_roles(tenant_a.tenant)) == {"owner@acme.test"}


def test_an_owner_changes_a_role_and_removes_a_member(tenant_a):
    member = membership_add(tenant=tenant_a.tenant, user=_user("bob@example.test"), role=Role.MEMBER)
    membership_change_role(tenant=tenant_a.tenant, actor=tenant_a.owner, membership_id=member.pk, role="viewer")
    assert _roles(tenant_a.tenant)["bob@example.test"] == "viewer"
    membership_remove(tenant=tenant_a.tenant, actor=tenant_a.owner, membership_id=member.pk)
    assert "bob@example.test" not in _roles(tenant_a.tenant)


def test_the_last_owner_can_be_neither_demoted_nor_removed(tenant_a):
    own = _owner_membership(tenant_a)
    with pytest.raises(ValidationError, match="at least one owner"):
        membership_change_role(tenant=tenant_a.tenant, actor=tenant_a.owner, membership_id=own.pk, role="admin")
    with pytest.raises(ValidationError, match="at least one owner"):
        membership_remove(tenant=tenant_a.tenant, actor=tenant_a.owner, membership_id=own.pk)
    assert _roles(tenant_a.tenant) == {"owner@acme.test": "owner"}


def test_with_a_second_owner_the_first_may_step_down(tenant_a):
    second = membership_add(tenant=tenant_a.tenant, user=_user("carol@example.test"), role=Role.MEMBER)
    membership_change_role(tenant=tenant_a.tenant, actor=tenant_a.owner, membership_id=second.pk, role="owner")
    own = _owner_membership(tenant_a)
    membership_change_role(tenant=tenant_a.tenant, actor=tenant_a.owner, membership_id=own.pk, role="admin")
    assert _roles(tenant_a.tenant) == {"owner@acme.test": "admin", "carol@example.test": "owner"}


def test_an_admin_manages_members_but_not_owners(tenant_a):
    admin = _user("dana@example.test")
    membership_add(tenant=tenant_a.tenant, user=admin, role=Role.ADMIN)
    member = membership_add(tenant=tenant_a.tenant, user=_user("eve@example.test"), role=Role.MEMBER)
    membership_change_role(tenant=tenant_a.tenant, actor=admin, membership_id=member.pk, role="viewer")
    own = _owner_membership(tenant_a)
    with pytest.raises(PermissionDenied):
        membership_change_role(tenant=tenant_a.tenant, actor=admin, membership_id=member.pk, role="owner")
    with pytest.raises(PermissionDenied):
        membership_remove(tenant=tenant_a.tenant, actor=admin, membership_id=own.pk)
    with pytest.raises(PermissionDenied):
        membership_add_by_email(tenant=tenant_a.tenant, actor=admin, email="frank@example.test", role="owner")
    assert _roles(tenant_a.tenant) == {
        "owner@acme.test": "owner",
        "dana@example.test": "admin",
        "eve@example.test": "viewer",
    }


@pytest.mark.parametrize("role", [Role.MEMBER, Role.VIEWER])
def test_members_and_viewers_cannot_change_the_team(tenant_a, role):
    actor = _user("grace@example.test")
    membership_add(tenant=tenant_a.tenant, user=actor, role=role)
    other = membership_add(tenant=tenant_a.tenant, user=_user("heidi@example.test"), role=Role.VIEWER)
    _user("ivan@example.test")
    before = _roles(tenant_a.tenant)
    with pytest.raises(PermissionDenied):
        membership_add_by_email(tenant=tenant_a.tenant, actor=actor, email="ivan@example.test", role="member")
    with pytest.raises(PermissionDenied):
        membership_change_role(tenant=tenant_a.tenant, actor=actor, membership_id=other.pk, role="admin")
    with pytest.raises(PermissionDenied):
        membership_remove(tenant=tenant_a.tenant, actor=actor, membership_id=other.pk)
    assert _roles(tenant_a.tenant) == before


def test_another_tenants_membership_is_not_found(tenant_a, tenant_b):
    theirs = _owner_membership(tenant_b)
    with pytest.raises(Membership.DoesNotExist):
        membership_change_role(tenant=tenant_a.tenant, actor=tenant_a.owner, membership_id=theirs.pk, role="viewer")
    with pytest.raises(Membership.DoesNotExist):
        membership_remove(tenant=tenant_a.tenant, actor=tenant_a.owner, membership_id=theirs.pk)
    assert _owner_membership(tenant_b).role == Role.OWNER


def test_someone_elses_owner_is_no_manager_here(tenant_a, tenant_b):
    """Being an owner of tenant B gives no rights in tenant A."""
    member = membership_add(tenant=tenant_a.tenant, user=_user("judy@example.test"), role=Role.MEMBER)
    with pytest.raises(PermissionDenied):
        membership_remove(tenant=tenant_a.tenant, actor=tenant_b.owner, membership_id=member.pk)


# -- the settings page is a thin door onto the same services --------------------------------------------------------
def _browser(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_settings_page_adds_changes_and_removes_members(tenant_a):
    _user("kim@example.test")
    browser = _browser(tenant_a.owner)
    response = browser.post("/settings/", {"action": "add", "email": "kim@example.test", "role": "viewer"})
    assert response.status_code == 302
    kim = Membership.objects.get(tenant=tenant_a.tenant, user__username="kim@example.test")
    assert kim.role == "viewer"
    browser.post("/settings/", {"action": "change_role", "membership_id": kim.pk, "role": "admin"})
    assert Membership.objects.get(pk=kim.pk).role == "admin"
    page = browser.get("/settings/")
    assert b"kim@example.test is now admin." in page.content
    browser.post("/settings/", {"action": "remove", "membership_id": kim.pk})
    assert not Membership.objects.filter(pk=kim.pk).exists()


def test_settings_page_shows_why_the_last_owner_stays(tenant_a):
    own = _owner_membership(tenant_a)
    browser = _browser(tenant_a.owner)
    response = browser.post("/settings/", {"action": "remove", "membership_id": own.pk}, follow=True)
    assert b"A team needs at least one owner" in response.content
    assert Membership.objects.filter(pk=own.pk, role="owner").exists()


def test_a_viewer_sees_members_read_only_and_cannot_post(tenant_a):
    viewer = _user("liam@example.test")
    membership_add(tenant=tenant_a.tenant, user=viewer, role=Role.VIEWER)
    browser = _browser(viewer)
    page = browser.get("/settings/")
    assert page.status_code == 200
    assert b"owner@acme.test" in page.content and b"liam@example.test" in page.content
    assert b'id="members-read-only"' in page.content
    assert b'id="add-member"' not in page.content and b"Change role" not in page.content
    own = _owner_membership(tenant_a)
    assert browser.post("/settings/", {"action": "remove", "membership_id": own.pk}).status_code == 404
    assert (
        browser.post("/settings/", {"action": "add", "email": "liam@example.test", "role": "owner"}).status_code == 404
    )
    assert _roles(tenant_a.tenant) == {"owner@acme.test": "owner", "liam@example.test": "viewer"}


def test_settings_page_answers_404_for_a_bad_or_foreign_membership_id(tenant_a, tenant_b):
    browser = _browser(tenant_a.owner)
    foreign = _owner_membership(tenant_b)
    assert browser.post("/settings/", {"action": "remove", "membership_id": foreign.pk}).status_code == 404
    assert browser.post("/settings/", {"action": "remove", "membership_id": "x"}).status_code == 404
    assert browser.post("/settings/", {"action": "explode"}).status_code == 404
    assert Membership.objects.filter(pk=foreign.pk).exists()
