"""Which tenant a request acts for, resolved in one place for the dashboard, the REST API and websockets."""

from dataclasses import dataclass

from django.contrib.auth.models import AbstractBaseUser

from .models import ROLES_THAT_CAN_MANAGE, ROLES_THAT_CAN_WRITE, ApiKey, KeyPermissions, Role, Tenant
from .selectors import default_membership, membership_get

SESSION_TENANT_KEY = "tunehouse_tenant_id"


@dataclass(frozen=True)
class TenantContext:
    tenant: Tenant
    role: str
    user: AbstractBaseUser | None  # None when an API key created from the command line acts
    api_key: ApiKey | None = None

    @property
    def can_write(self) -> bool:
        return self.role in ROLES_THAT_CAN_WRITE

    @property
    def can_manage(self) -> bool:
        return self.role in ROLES_THAT_CAN_MANAGE

    @property
    def inference_only(self) -> bool:
        """An inference-only key: inference routes and the model list, nothing else (not even reads)."""
        return self.api_key is not None and self.api_key.permissions == KeyPermissions.INFERENCE

    @property
    def can_run_inference(self) -> bool:
        return self.api_key is None or self.api_key.permissions != KeyPermissions.READ_ONLY


def context_for_api_key(api_key: ApiKey) -> TenantContext:
    # A key acts with member rights in its tenant: it can create jobs but not manage members or other keys. A
    # read-only key acts as a viewer, so every check that guards a write refuses it too.
    user = api_key.created_by if api_key.created_by_id else None
    role = Role.VIEWER if api_key.permissions == KeyPermissions.READ_ONLY else Role.MEMBER
    return TenantContext(tenant=api_key.tenant, role=role, user=user, api_key=api_key)


def context_for_session(user: AbstractBaseUser, session) -> TenantContext | None:
    """The tenant chosen in this session (tenant switcher), else the user's first one; None if they have none."""
    if not user.is_authenticated:
        return None
    membership = None
    chosen_tenant_id = session.get(SESSION_TENANT_KEY)
    if chosen_tenant_id is not None:
        membership = membership_get(user=user, tenant_id=chosen_tenant_id)
    if membership is None:
        membership = default_membership(user=user)
    if membership is None:
        return None
    return TenantContext(tenant=membership.tenant, role=membership.role, user=user)


def context_for_request(request) -> TenantContext | None:
    auth = getattr(request, "auth", None)
    if isinstance(auth, ApiKey):
        return context_for_api_key(auth)
    return getattr(request, "tenant_context", None)
