from django.db.models import QuerySet

from apps.tenancy.models import Tenant

from .models import File, Tokenizer


def file_list(*, tenant: Tenant, purpose: str | None = None) -> QuerySet[File]:
    files = File.objects.for_tenant(tenant)
    if purpose:
        files = files.filter(purpose=purpose)
    return files


def file_get(*, tenant: Tenant, public_id: str) -> File | None:
    return File.objects.for_tenant(tenant).filter(public_id=public_id).first()


def tokenizer_list(*, tenant: Tenant) -> QuerySet[Tokenizer]:
    return Tokenizer.objects.for_tenant(tenant).select_related("training_file")


def tokenizer_get(*, tenant: Tenant, public_id: str) -> Tokenizer | None:
    return tokenizer_list(tenant=tenant).filter(public_id=public_id).first()
