"""Writes for files: streamed upload into the object store, validation on the `cpu` queue, guarded deletion."""

import codecs
import hashlib
import logging
import uuid
from collections.abc import Iterable, Iterator

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from apps.core.api.errors import ApiError
from apps.core.storage import object_store, tenant_key
from apps.tenancy.models import Tenant

from .models import File, FilePurpose, FileStatus

logger = logging.getLogger(__name__)

ALLOWED_EXTENSIONS = (".txt",)
READ_CHUNK_BYTES = 1024 * 1024


def max_upload_bytes(tenant: Tenant) -> int:
    return tenant.max_upload_bytes or settings.MAX_UPLOAD_BYTES


def _hashing(chunks: Iterable[bytes], digest, limit: int, counter: list[int]) -> Iterator[bytes]:
    """Passes chunks through while hashing and counting, and stops the upload as soon as it passes `limit`."""
    for chunk in chunks:
        counter[0] += len(chunk)
        if counter[0] > limit:
            raise ApiError(
                f"The file is larger than this tenant's limit of {limit} bytes.",
                code="file_too_large",
                param="file",
                status_code=413,
            )
        digest.update(chunk)
        yield chunk


def file_upload(
    *, tenant: Tenant, user: AbstractBaseUser | None, filename: str, chunks: Iterable[bytes], purpose: str
) -> File:
    """Streams the upload into the store (never whole in memory) and queues its validation.

    An identical re-upload (same sha256 in the same tenant) returns the file already stored instead of a copy.
    """
    if purpose not in FilePurpose.values:
        raise ApiError(
            f"'{purpose}' is not a supported purpose; use one of: {', '.join(FilePurpose.values)}.", param="purpose"
        )
    filename = (filename or "").rsplit("/", 1)[-1].strip()[:255]
    if not filename.lower().endswith(ALLOWED_EXTENSIONS):
        raise ApiError(
            f"Unsupported file type for '{filename}': upload a plain text file ending in .txt.",
            code="unsupported_file_type",
            param="file",
        )
    limit = max_upload_bytes(tenant)
    store = object_store()
    staging_key = tenant_key(tenant.pk, "uploads", uuid.uuid4().hex)
    digest = hashlib.sha256()
    size = [0]
    try:
        store.put_stream(staging_key, _hashing(chunks, digest, limit, size))
    except BaseException:
        store.delete(staging_key)
        raise
    sha256 = digest.hexdigest()

    existing = File.objects.for_tenant(tenant).filter(sha256=sha256, purpose=purpose).first()
    if existing is not None:
        store.delete(staging_key)
        return existing

    file = File(tenant=tenant, filename=filename, purpose=purpose, bytes=size[0], sha256=sha256, created_by=user)
    file.storage_key = tenant_key(tenant.pk, "files", file.public_id)
    _move(store, staging_key, file.storage_key)
    file.save()

    from workers.tasks.datasets import validate_file

    transaction.on_commit(lambda: validate_file.delay(file.pk))
    return file


def _move(store, source_key: str, target_key: str) -> None:
    with store.open(source_key) as stream:
        store.put_stream(target_key, iter(lambda: stream.read(READ_CHUNK_BYTES), b""))
    store.delete(source_key)


def file_validate(*, file_id: int) -> File:
    """Checks a stored text file (valid UTF-8, not empty) by streaming it, and records a small report."""
    file = File.objects.get(pk=file_id)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    newline_count = 0
    character_count = 0
    has_text = False
    ends_with_newline = True
    offset = 0
    error = None
    with object_store().open(file.storage_key) as stream:
        for chunk in iter(lambda: stream.read(READ_CHUNK_BYTES), b""):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                error = f"The file is not valid UTF-8 (first bad byte at offset {offset + exc.start})."
                break
            offset += len(chunk)
            newline_count += text.count("\n")
            character_count += len(text)
            has_text = has_text or bool(text.strip())
            if text:
                ends_with_newline = text.endswith("\n")
        else:
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                error = "The file is not valid UTF-8 (it ends in the middle of a character)."
    if error is None and not has_text:
        error = "The file is empty: it has no text to train on."
    report = {
        "format": "text",
        "bytes": file.bytes,
        "characters": character_count,
        "lines": newline_count + (0 if ends_with_newline else 1),
    }
    from apps.jobs.services import jobs_advance_after_file_validation

    with transaction.atomic():
        # The same row lock job_create takes: a job created meanwhile is either seen here or sees the result.
        file = File.objects.select_for_update().get(pk=file_id)
        file.validation_report = report
        file.status = FileStatus.ERROR if error else FileStatus.PROCESSED
        file.status_details = error or ""
        file.save(update_fields=["validation_report", "status", "status_details"])
        jobs_advance_after_file_validation(file=file)
    logger.info("validated %s: %s", file.public_id, file.status)
    return file


def file_delete(*, tenant: Tenant, file: File) -> None:
    from apps.jobs.selectors import file_is_used_by_jobs

    if file_is_used_by_jobs(tenant=tenant, file=file):
        raise ApiError(
            f"File {file.public_id} is used by a fine-tuning job; delete or keep the job's data first.",
            code="file_in_use",
            param="file_id",
            status_code=409,
        )
    object_store().delete(file.storage_key)
    file.delete()
