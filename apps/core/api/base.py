"""The one API base class: it resolves the caller's tenant and is the only place that builds querysets.

Views declare `model` and `lookup_field`; they never write `get_queryset` or `get_object` themselves (checked at
class creation), so no endpoint can forget the tenant filter.
"""

from django.db.models import Model, QuerySet
from rest_framework import generics
from rest_framework.exceptions import NotAuthenticated

from apps.tenancy.context import TenantContext, context_for_request


class TenantAPIView(generics.GenericAPIView):
    model: type[Model] | None = None
    lookup_field = "public_id"
    lookup_url_kwarg = "public_id"

    _SEALED = ("get_queryset", "get_object", "tenant_context")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in cls._SEALED:
            if name in cls.__dict__:
                raise TypeError(f"{cls.__name__} may not override {name}: tenant scoping lives in TenantAPIView only")

    @property
    def tenant_context(self) -> TenantContext:
        context = context_for_request(self.request)
        if context is None:
            raise NotAuthenticated()
        return context

    @property
    def tenant(self):
        return self.tenant_context.tenant

    def scoped_queryset(self) -> QuerySet:
        """Hook for select_related/ordering on top of the tenant filter; the filter itself cannot be dropped."""
        return self.model.objects.all()

    def get_queryset(self) -> QuerySet:
        return self.scoped_queryset().filter(tenant_id=self.tenant.pk)

    def get_object(self):
        # A public id of another tenant is not in this queryset, so it answers 404, exactly like an unknown id.
        return super().get_object()
