"""Writes for tenants, members and API keys. Views, commands and admin call these; none writes rows itself."""

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone
from django.utils.text import slugify

from .models import ApiKey, Membership, Role, Tenant

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


def api_key_create(*, tenant: Tenant, user: AbstractBaseUser | None, name: str) -> CreatedApiKey:
    name = name.strip()
    if not name:
        raise ValidationError({"name": "Give the key a name so you can recognise it later."})
    secret = API_KEY_PREFIX + secrets.token_urlsafe(30)
    api_key = ApiKey.objects.create(
        tenant=tenant, name=name[:100], prefix=secret[:10], key_hash=hash_api_key(secret), created_by=user
    )
    return CreatedApiKey(api_key=api_key, secret=secret)


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
