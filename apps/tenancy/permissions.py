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


class IsPlatformStaff(permissions.BasePermission):
    """Platform staff only (signed in, or through a key they created). Anyone else gets the very 404 of an unknown
    path, as for /v1/reviews: these routes do not exist for them."""

    def has_permission(self, request, view) -> bool:
        context = context_for_request(request)
        user = context.user if context is not None and context.api_key is not None else request.user
        if not (user is not None and user.is_authenticated and user.is_staff and user.is_active):
            # Imported here: this module is loaded by DRF's settings, which apps.core.api.errors imports (a cycle).
            from apps.core.api.errors import ApiError

            raise ApiError(
                f"Unknown request URL: {request.method} {request.path}.", code="unknown_url", status_code=404
            )
        return True
