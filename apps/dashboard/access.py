"""How every dashboard page finds the active tenant and its objects: another tenant's id is simply not found (404)."""

from django.http import Http404

from apps.tenancy.context import TenantContext


def require_tenant(request) -> TenantContext:
    context = request.tenant_context
    if context is None:
        raise Http404("You are not a member of any team.")
    return context


def tenant_object_or_404(request, selector, public_id: str, what: str):
    """One of the active tenant's objects by public id, read through its selector."""
    found = selector(tenant=require_tenant(request).tenant, public_id=public_id)
    if found is None:
        raise Http404(f"No such {what}.")
    return found
