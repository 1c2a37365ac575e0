"""Websocket authentication: the browser's session cookie, or `Authorization: Bearer <key>` for API clients."""

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async

from .context import context_for_api_key, context_for_session
from .services import api_key_authenticate


@database_sync_to_async
def _resolve_tenant_context(scope):
    headers = dict(scope.get("headers") or [])
    authorization = headers.get(b"authorization", b"").decode("latin-1")
    if authorization:
        scheme, _, secret = authorization.partition(" ")
        api_key = api_key_authenticate(secret=secret.strip()) if scheme.lower() == "bearer" else None
        return context_for_api_key(api_key) if api_key else None
    user = scope.get("user")
    session = scope.get("session")
    if user is None or session is None:
        return None
    return context_for_session(user, session)


class _TenantContextMiddleware:
    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        scope = dict(scope)
        scope["tenant_context"] = await _resolve_tenant_context(scope)
        return await self.inner(scope, receive, send)


def TenantWebsocketAuthMiddleware(inner):  # noqa: N802 - reads like the middleware classes it wraps
    return AuthMiddlewareStack(_TenantContextMiddleware(inner))
