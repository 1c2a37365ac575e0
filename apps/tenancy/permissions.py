from rest_framework import permissions

from .context import context_for_request


class IsTenantMember(permissions.BasePermission):
    """The caller acts for a tenant (API key or signed-in member); viewers may only read."""

    message = "This action needs a role that can write in this tenant."

    def has_permission(self, request, view) -> bool:
        context = context_for_request(request)
        if context is None:
            return False
        if request.method in permissions.SAFE_METHODS:
            return True
        return context.can_write
