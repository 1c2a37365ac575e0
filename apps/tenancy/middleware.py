from .context import context_for_session


class ActiveTenantMiddleware:
    """Attaches `request.tenant_context` (or None) for browser sessions: the tenant picked in the tenant switcher."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request.tenant_context = context_for_session(request.user, request.session)
        return self.get_response(request)
