from .selectors import memberships_for_user


def active_tenant(request) -> dict:
    context = getattr(request, "tenant_context", None)
    if context is None:
        return {"tenant_context": None, "memberships": []}
    return {"tenant_context": context, "memberships": list(memberships_for_user(user=request.user))}
