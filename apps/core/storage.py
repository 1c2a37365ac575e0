"""The object store every Django-side service writes through (a local folder, or S3 when S3_BUCKET is set)."""

import os
import shutil
import tempfile
from functools import cache
from pathlib import Path

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


def local_copy_of_object(key: str, target: Path) -> Path:
    """A stored object on this machine's disk, downloaded once: objects are immutable, so a copy never goes stale.
    The download goes to a temp name first, so a crash never leaves a half file under the real name."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=target.parent, prefix=".download-")
    os.close(handle)
    try:
        object_store().download_file(key, staging)
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return target


def local_copy_of_prefix(prefix: str, target: Path) -> Path:
    """Every object under `prefix` (a model, a tokenizer) unpacked into `target` once, atomically."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
    try:
        object_store().download_dir(prefix, staging)
        os.replace(staging, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
