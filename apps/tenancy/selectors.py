"""Reads for tenancy: which tenants a user may act in, and in which role."""

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Case, QuerySet, Value, When

from .models import ApiKey, Membership, Role, Tenant


def memberships_for_user(*, user: AbstractBaseUser) -> QuerySet[Membership]:
    return Membership.objects.filter(user=user).select_related("tenant").order_by("tenant__name")


def membership_get(*, user: AbstractBaseUser, tenant_id: int) -> Membership | None:
    if not user.is_authenticated:
        return None
    return Membership.objects.select_related("tenant").filter(user=user, tenant_id=tenant_id).first()


def default_membership(*, user: AbstractBaseUser) -> Membership | None:
    return memberships_for_user(user=user).order_by("created_at").first()


def api_keys_for_tenant(*, tenant: Tenant) -> QuerySet[ApiKey]:
    return ApiKey.objects.for_tenant(tenant).select_related("created_by")


def active_api_keys_for_tenant(*, tenant: Tenant) -> QuerySet[ApiKey]:
    """The tenant's keys that still authenticate (not revoked)."""
    return api_keys_for_tenant(tenant=tenant).filter(revoked_at=None)


def memberships_for_tenant(*, tenant: Tenant) -> QuerySet[Membership]:
    """The team's members, owners first, for the settings page."""
    ordering = Case(*(When(role=role, then=Value(rank)) for rank, role in enumerate(Role.values)), default=Value(99))
    return Membership.objects.filter(tenant=tenant).select_related("user").order_by(ordering, "user__username")
