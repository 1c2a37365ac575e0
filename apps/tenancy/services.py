"""Writes for tenants, members and API keys. Views, commands and admin call these; none writes rows itself."""

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.utils import timezone
from django.utils.text import slugify

from .models import (
    INFERENCE_LIMIT_FIELDS,
    INFERENCE_LIMIT_MAX,
    ROLES_THAT_CAN_MANAGE,
    ApiKey,
    KeyPermissions,
    Membership,
    Role,
    Tenant,
)

API_KEY_PREFIX = "th-"
# Writing last_used_at on every request would turn each API call into a write; once a minute is enough to see it.
LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True)
class CreatedApiKey:
    api_key: ApiKey
    secret: str  # the full key: returned once, never stored


def hash_api_key(secret: str) -> str:
    # Keys are 240 random bits, so a fast hash is safe here (no dictionary to attack), unlike passwords.
    return hashlib.sha256(secret.encode()).hexdigest()


def tenant_create(*, slug: str, name: str = "", owner: AbstractBaseUser) -> Tenant:
    slug = slugify(slug)
    if not slug:
        raise ValidationError({"slug": "A tenant needs a slug made of letters, digits or hyphens."})
    if Tenant.objects.filter(slug=slug).exists():
        raise ValidationError({"slug": f"The tenant slug '{slug}' is taken."})
    with transaction.atomic():
        tenant = Tenant.objects.create(slug=slug, name=name or slug)
        Membership.objects.create(user=owner, tenant=tenant, role=Role.OWNER)
    return tenant


def user_sign_up(*, email: str, password: str, tenant_name: str) -> tuple[AbstractBaseUser, Tenant]:
    """A new user and the tenant they own; the user's email is their login name."""
    user_model = get_user_model()
    email = user_model.objects.normalize_email(email).lower()
    if user_model.objects.filter(username=email).exists():
        raise ValidationError({"email": "An account with this email exists; sign in instead."})
    base_slug = slugify(tenant_name) or slugify(email.split("@")[0]) or "team"
    slug = base_slug
    while Tenant.objects.filter(slug=slug).exists():
        slug = f"{base_slug}-{secrets.token_hex(2)}"
    with transaction.atomic():
        user = user_model.objects.create_user(username=email, email=email, password=password)
        tenant = tenant_create(slug=slug, name=tenant_name or slug, owner=user)
    return user, tenant


def membership_add(*, tenant: Tenant, user: AbstractBaseUser, role: str = Role.MEMBER) -> Membership:
    membership, _ = Membership.objects.update_or_create(tenant=tenant, user=user, defaults={"role": role})
    return membership


def _role_or_error(role: str) -> Role:
    if role not in Role.values:
        raise ValidationError({"role": f"Choose one of the roles: {', '.join(Role.values)}."})
    return Role(role)


def _locked_manager_role(*, tenant: Tenant, actor: AbstractBaseUser) -> Role:
    """The actor's role, read after locking the tenant row: membership changes of one tenant run one at a time, so
    two owners demoting each other at once cannot leave the team without an owner."""
    Tenant.objects.select_for_update().filter(pk=tenant.pk).first()
    role = Membership.objects.filter(tenant=tenant, user_id=actor.pk).values_list("role", flat=True).first()
    if role not in ROLES_THAT_CAN_MANAGE:
        raise PermissionDenied("Only the team's owners and admins can manage its members.")
    return Role(role)


def _check_may_touch(*, actor_role: Role, current_role: str, new_role: str | None) -> None:
    # Admins run the team day to day; ownership (who can remove whom) stays with the owners.
    if actor_role != Role.OWNER and Role.OWNER in (current_role, new_role):
        raise PermissionDenied("Only an owner can grant, change or remove the owner role.")


def _check_keeps_an_owner(*, membership: Membership) -> None:
    if membership.role != Role.OWNER:
        return
    owners = Membership.objects.filter(tenant_id=membership.tenant_id, role=Role.OWNER).count()
    if owners <= 1:
        raise ValidationError("A team needs at least one owner: make someone else owner first.")


def membership_add_by_email(*, tenant: Tenant, actor: AbstractBaseUser, email: str, role: str) -> Membership:
    """Adds an existing account to the team; people without an account sign up first (no invitations by mail)."""
    role = _role_or_error(role)
    email = email.strip().lower()
    if not email:
        raise ValidationError({"email": "Enter the email address the person signs in with."})
    user = get_user_model().objects.filter(username__iexact=email).first()
    if user is None:
        user = get_user_model().objects.filter(email__iexact=email).order_by("pk").first()
    with transaction.atomic():
        actor_role = _locked_manager_role(tenant=tenant, actor=actor)
        _check_may_touch(actor_role=actor_role, current_role="", new_role=role)
        if user is None:
            raise ValidationError({"email": f"No account uses {email}; ask them to sign up first, then add them."})
        if Membership.objects.filter(tenant=tenant, user=user).exists():
            raise ValidationError({"email": f"{email} is already a member of this team."})
        return Membership.objects.create(tenant=tenant, user=user, role=role)


def membership_change_role(*, tenant: Tenant, actor: AbstractBaseUser, membership_id: int, role: str) -> Membership:
    """Raises Membership.DoesNotExist for another tenant's membership id (404 for the caller)."""
    role = _role_or_error(role)
    with transaction.atomic():
        actor_role = _locked_manager_role(tenant=tenant, actor=actor)
        membership = Membership.objects.select_related("user").get(tenant=tenant, pk=membership_id)
        if membership.role == role:
            return membership
        _check_may_touch(actor_role=actor_role, current_role=membership.role, new_role=role)
        _check_keeps_an_owner(membership=membership)
        membership.role = role
        membership.save(update_fields=["role"])
    return membership


def membership_remove(*, tenant: Tenant, actor: AbstractBaseUser, membership_id: int) -> None:
    """Raises Membership.DoesNotExist for another tenant's membership id (404 for the caller)."""
    with transaction.atomic():
        actor_role = _locked_manager_role(tenant=tenant, actor=actor)
        membership = Membership.objects.get(tenant=tenant, pk=membership_id)
        _check_may_touch(actor_role=actor_role, current_role=membership.role, new_role=None)
        _check_keeps_an_owner(membership=membership)
        membership.delete()


def inference_limits_clean(limits: dict) -> dict[str, int | None]:
    """The inference limits among `limits` (requests_per_minute, tokens_per_minute, tokens_per_day), each a positive
    whole number or None (the default); a ValidationError names the first field that is neither. Digit strings are
    taken too, and "" means None, since HTML forms send nothing else."""
    cleaned: dict[str, int | None] = {}
    for name in INFERENCE_LIMIT_FIELDS:
        if name not in limits:
            continue
        value = limits[name]
        if isinstance(value, str):
            value = value.strip()
            if value == "":
                value = None
            elif value.isdigit():
                value = int(value)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValidationError({name: f"{name} must be a positive whole number, or null for the default."})
        if value is not None and value > INFERENCE_LIMIT_MAX:
            raise ValidationError({name: f"{name} may be at most {INFERENCE_LIMIT_MAX}."})
        cleaned[name] = value
    return cleaned


def api_key_permissions_clean(permissions: object) -> str:
    """One of KeyPermissions' values ("all", "inference", "read_only"), else a ValidationError naming them."""
    if permissions not in KeyPermissions.values:
        choices = ", ".join(f"'{value}'" for value in KeyPermissions.values)
        raise ValidationError({"permissions": f"permissions must be one of {choices}, not {permissions!r}."})
    return str(permissions)


def api_key_create(
    *,
    tenant: Tenant,
    user: AbstractBaseUser | None,
    name: str,
    limits: dict | None = None,
    permissions: str = KeyPermissions.ALL,
) -> CreatedApiKey:
    """`limits`: the key's own caps (inference_limits_clean); `permissions`: what the key may do (KeyPermissions).
    Both are checked before anything is stored."""
    name = name.strip()
    if not name:
        raise ValidationError({"name": "Give the key a name so you can recognise it later."})
    caps = inference_limits_clean(limits or {})
    permissions = api_key_permissions_clean(permissions)
    secret = API_KEY_PREFIX + secrets.token_urlsafe(30)
    api_key = ApiKey.objects.create(
        tenant=tenant,
        name=name[:100],
        prefix=secret[:10],
        key_hash=hash_api_key(secret),
        created_by=user,
        permissions=permissions,
        **caps,
    )
    return CreatedApiKey(api_key=api_key, secret=secret)


def api_key_update(
    *,
    tenant: Tenant,
    public_id: str,
    name: str | None = None,
    limits: dict | None = None,
    permissions: str | None = None,
) -> ApiKey:
    """Renames the key, changes the caps present in `limits` (None removes a cap) and/or its permissions; the others
    stay. Raises ApiKey.DoesNotExist for another tenant's key id (404 for the caller). Takes effect on the key's next
    request."""
    caps = inference_limits_clean(limits or {})
    if permissions is not None:
        permissions = api_key_permissions_clean(permissions)
    api_key = ApiKey.objects.for_tenant(tenant).get(public_id=public_id)
    if name is not None:
        if not isinstance(name, str) or not name.strip():
            raise ValidationError({"name": "Give the key a name so you can recognise it later."})
        api_key.name = name.strip()[:100]
    for field, value in caps.items():
        setattr(api_key, field, value)
    if permissions is not None:
        api_key.permissions = permissions
    api_key.save(update_fields=["name", "permissions", *caps])
    return api_key


def tenant_inference_limits_update(*, tenant: Tenant, limits: dict) -> Tenant:
    """Platform staff set a team's inference limits (None: back to the platform default); read per request, so they
    take effect on the next one without a restart."""
    caps = inference_limits_clean(limits)
    for field, value in caps.items():
        setattr(tenant, field, value)
    tenant.save(update_fields=list(caps))
    return tenant


def api_key_revoke(*, tenant: Tenant, public_id: str) -> ApiKey:
    api_key = ApiKey.objects.for_tenant(tenant).get(public_id=public_id)
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
    return api_key


def api_key_authenticate(*, secret: str) -> ApiKey | None:
    """The active key matching `secret`, with its last-used time refreshed; None for unknown or revoked keys."""
    if not secret.startswith(API_KEY_PREFIX):
        return None
    api_key = ApiKey.objects.select_related("tenant").filter(key_hash=hash_api_key(secret), revoked_at=None).first()
    if api_key is None:
        return None
    now = timezone.now()
    if api_key.last_used_at is None or now - api_key.last_used_at > LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
        api_key.last_used_at = now
    return api_key
