"""The object store every Django-side service writes through (a local folder, or S3 when S3_BUCKET is set)."""

from functools import cache

from django.conf import settings

from workers.storage import LocalFolderStore, ObjectStore, S3Store


@cache
def object_store() -> ObjectStore:
    if settings.S3_BUCKET:
        return S3Store(
            bucket=settings.S3_BUCKET,
            endpoint_url=settings.S3_ENDPOINT_URL or None,
            access_key_id=settings.S3_ACCESS_KEY_ID or None,
            secret_access_key=settings.S3_SECRET_ACCESS_KEY or None,
            region=settings.S3_REGION,
        )
    return LocalFolderStore(settings.STORAGE_DIR)


def tenant_key(tenant_id: int, *parts: str) -> str:
    """Every stored object lives under its tenant's prefix, so a key can never address another tenant's data."""
    return "/".join(["tenants", str(tenant_id), *parts])
