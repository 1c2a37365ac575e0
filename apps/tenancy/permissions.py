from rest_framework import permissions

from .context import context_for_request
from .models import KeyPermissions


def _api_error(message: str, *, code: str, status_code: int):
    # Imported here: this module is loaded by DRF's settings, which apps.core.api.errors imports (a cycle).
    from apps.core.api.errors import ApiError

    return ApiError(message, code=code, status_code=status_code)


def check_api_key_permissions(request, view) -> None:
    """403 where the request's API key was made for less than this route: an inference-only key anywhere but the
    inference routes (views marked ``inference_route``), a read-only key on anything but a read. Sessions and keys
    with all permissions pass; what the caller's role allows is checked apart."""
    context = context_for_request(request)
    if context is None or context.api_key is None:
        return
    if context.inference_only and not getattr(view, "inference_route", False):
        raise _api_error(
            f"This API key is for inference only (completions, chat completions, predictions and the model list); "
            f"{request.method} {request.path} needs a key with all permissions.",
            code="insufficient_permissions",
            status_code=403,
        )
    if context.api_key.permissions == KeyPermissions.READ_ONLY and request.method not in permissions.SAFE_METHODS:
        raise _api_error(
            f"This API key is read-only: it cannot create, change or delete anything, nor run inference "
            f"({request.method} {request.path}).",
            code="insufficient_permissions",
            status_code=403,
        )


class IsTenantMember(permissions.BasePermission):
    """The caller acts for a tenant (API key or signed-in member); viewers may only read, and a key only does what it
    was made for."""

    message = "This action needs a role that can write in this tenant."

    def has_permission(self, request, view) -> bool:
        context = context_for_request(request)
        if context is None:
            return False
        check_api_key_permissions(request, view)
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
            raise _api_error(
                f"Unknown request URL: {request.method} {request.path}.", code="unknown_url", status_code=404
            )
        check_api_key_permissions(request, view)
        return True
