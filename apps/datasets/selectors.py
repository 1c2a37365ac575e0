from django.db.models import QuerySet

from apps.tenancy.models import Tenant

from .models import File


def file_list(*, tenant: Tenant, purpose: str | None = None) -> QuerySet[File]:
    files = File.objects.for_tenant(tenant)
    if purpose:
        files = files.filter(purpose=purpose)
    return files


def file_get(*, tenant: Tenant, public_id: str) -> File | None:
    return File.objects.for_tenant(tenant).filter(public_id=public_id).first()
