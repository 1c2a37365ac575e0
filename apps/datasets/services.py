"""Writes for files and tokenizers: streamed upload into the object store, validation and tokenizer training on the
`cpu` queue, guarded deletion. The reading and checking itself lives in the Django-free `workers.ml.data`."""

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from apps.core.api.errors import ApiError
from apps.core.ids import new_public_id
from apps.core.storage import local_copy_of_object, local_copy_of_prefix, object_store, tenant_key
from apps.tenancy.models import Tenant
from workers.ml.data.examples import Example, example_text
from workers.ml.data.formats import (
    SUPPORTED_EXTENSIONS,
    ColumnMapping,
    ReadLimits,
    UnsupportedFormat,
    iter_examples,
)
from workers.ml.data.templates import CHAT_TEMPLATES, ensure_template_tokens, preview_examples
from workers.ml.data.validation import validate_dataset
from workers.ml.errors import TrainingDataError
from workers.ml.tokenizer_training import (
    TokenizerSpec,
    load_tokenizer,
    save_tokenizer,
    tokenizer_report,
    train_tokenizer,
)

from .models import File, FilePurpose, FileStatus, Tokenizer, TokenizerStatus

logger = logging.getLogger(__name__)

READ_CHUNK_BYTES = 1024 * 1024
_COLUMN_ROLES = ("text", "label", "source", "target", "sensitive")
# Tokenizer training reads at most this many examples: enough for a stable vocabulary, bounded in time.
TOKENIZER_TRAINING_MAX_EXAMPLES = 200_000
_TOKENIZER_REPORT_SAMPLE = 500
PREVIEW_MAX_EXAMPLES = 20
TRAIN_ON_CHOICES = ("completions", "all")


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


def parse_column_mapping(raw: dict | None) -> dict | None:
    """The user's column choice, e.g. {"text": "review", "label": "stars"}; None lets validation detect it."""
    if raw in (None, "", {}):
        return None
    if not isinstance(raw, dict):
        raise ApiError(
            'column_mapping must be an object such as {"text": "review", "label": "stars"}.', param="column_mapping"
        )
    unknown = set(raw) - set(_COLUMN_ROLES)
    if unknown:
        raise ApiError(
            f"Unknown column role '{sorted(unknown)[0]}'; use any of: {', '.join(_COLUMN_ROLES)}.",
            param=f"column_mapping.{sorted(unknown)[0]}",
        )
    for role, column in raw.items():
        if not isinstance(column, str) or not column.strip() or len(column) > 200:
            raise ApiError(f"column_mapping.{role} must name a column.", param=f"column_mapping.{role}")
    return {role: column.strip() for role, column in raw.items()}


def file_upload(
    *,
    tenant: Tenant,
    user: AbstractBaseUser | None,
    filename: str,
    chunks: Iterable[bytes],
    purpose: str,
    column_mapping: dict | None = None,
) -> File:
    """Streams the upload into the store (never whole in memory) and queues its validation.

    An identical re-upload (same bytes, purpose and column mapping in the same tenant) returns the file already
    stored instead of a copy.
    """
    if purpose not in FilePurpose.values:
        raise ApiError(
            f"'{purpose}' is not a supported purpose; use one of: {', '.join(FilePurpose.values)}.", param="purpose"
        )
    filename = (filename or "").replace("\\", "/").rsplit("/", 1)[-1].strip()[:255]
    if not filename.lower().endswith(SUPPORTED_EXTENSIONS):
        raise ApiError(
            f"Unsupported file type for '{filename}': upload one of {', '.join(SUPPORTED_EXTENSIONS)}.",
            code="unsupported_file_type",
            param="file",
        )
    column_mapping = parse_column_mapping(column_mapping)
    limit = max_upload_bytes(tenant)
    store = object_store()
    # Written straight to its final key (no second copy of a large file); removed again if it is a re-upload.
    file = File(tenant=tenant, filename=filename, purpose=purpose, created_by=user, column_mapping=column_mapping)
    file.public_id = new_public_id("file")
    file.storage_key = tenant_key(tenant.pk, "files", file.public_id)
    digest = hashlib.sha256()
    size = [0]
    try:
        store.put_stream(file.storage_key, _hashing(chunks, digest, limit, size))
    except BaseException:
        store.delete(file.storage_key)
        raise
    file.sha256 = digest.hexdigest()
    file.bytes = size[0]

    same_bytes = File.objects.for_tenant(tenant).filter(sha256=file.sha256, purpose=purpose)
    # filter(column_mapping=None) would match a JSON null, not a missing mapping (SQL NULL).
    existing = (
        same_bytes.filter(column_mapping__isnull=True)
        if column_mapping is None
        else same_bytes.filter(column_mapping=column_mapping)
    ).first()
    if existing is not None:
        store.delete(file.storage_key)
        return existing
    file.save()

    from workers.tasks.datasets import validate_file

    transaction.on_commit(lambda: validate_file.delay(file.pk))
    return file


def file_local_path(file: File) -> Path:
    """Files are immutable, so a local copy keyed by the public id never goes stale."""
    suffix = "".join(Path(file.filename).suffixes[-2:]) or ".bin"
    return local_copy_of_object(
        file.storage_key, Path(settings.WORK_DIR) / "files" / str(file.tenant_id) / f"{file.public_id}{suffix}"
    )


def _read_limits() -> ReadLimits:
    return ReadLimits(max_decompressed_bytes=settings.DATASET_MAX_DECOMPRESSED_BYTES)


def _token_counter(tokenizer):
    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    return count


def file_validate(
    *, file_id: int, tokenizer_id: int | None = None, max_length: int = 1024, validation_file_id: int | None = None
) -> File:
    """Reads the whole file once and stores the report; the file becomes `processed` or `error`.

    With a validation file, the report also counts the examples that appear in both (leakage between the splits).
    """
    file = File.objects.get(pk=file_id)
    validation_file = (
        File.objects.for_tenant(file.tenant_id).filter(pk=validation_file_id).first() if validation_file_id else None
    )
    tokenizer = None
    if tokenizer_id is not None:
        asset = Tokenizer.objects.for_tenant(file.tenant_id).filter(pk=tokenizer_id).first()
        tokenizer = tokenizer_load(asset) if asset is not None and asset.status == TokenizerStatus.READY else None
    mapping = ColumnMapping.from_dict(file.column_mapping) if file.column_mapping else None
    report = validate_dataset(
        str(file_local_path(file)),
        filename=file.filename,
        column_mapping=mapping,
        token_counter=_token_counter(tokenizer) if tokenizer is not None else None,
        max_length=max_length,
        validation_path=str(file_local_path(validation_file)) if validation_file else None,
        validation_filename=validation_file.filename if validation_file else None,
        limits=_read_limits(),
    )
    if validation_file is not None and report.get("validation_overlap") is not None:
        report["validation_overlap"]["validation_file"] = validation_file.public_id
    if tokenizer is not None and report.get("token_lengths"):
        report["token_lengths"]["tokenizer"] = asset.public_id

    from apps.jobs.services import jobs_advance_after_file_validation

    with transaction.atomic():
        # The same row lock job_create takes: a job created meanwhile is either seen here or sees the result.
        file = File.objects.select_for_update().get(pk=file_id)
        file.validation_report = report
        file.format = report.get("format") or ""
        file.task = report.get("task") or ""
        if file.status == FileStatus.UPLOADED:
            file.status = FileStatus.PROCESSED if report["ok"] else FileStatus.ERROR
            file.status_details = "" if report["ok"] else _summary(report)
        # `column_mapping` stays what the user chose (part of the file's identity for re-uploads); a detected
        # mapping is in the report.
        file.save(update_fields=["validation_report", "format", "task", "status", "status_details"])
        jobs_advance_after_file_validation(file=file)
    logger.info("validated %s: %s", file.public_id, file.status)
    return file


def _summary(report: dict) -> str:
    """One sentence for the file's status_details: the first error and how many there are."""
    errors = report.get("errors") or []
    if not errors:
        return "The file did not pass validation."
    first = errors[0]
    where = f"line {first['line']}: " if first.get("line") else ""
    more = report.get("error_count", len(errors)) - 1
    return f"{where}{first['message']}" + (f" (and {more} more problems)" if more > 0 else "")


def file_revalidate(
    *, tenant: Tenant, file: File, tokenizer: Tokenizer | None, max_length: int, validation_file: File | None = None
) -> None:
    """Queues a fresh report, e.g. to see token lengths under another tokenizer or maximum length, or the overlap
    with a validation file."""
    if not 8 <= max_length <= 131072:
        raise ApiError("max_length must be between 8 and 131072.", param="max_length")
    if tokenizer is not None and tokenizer.status != TokenizerStatus.READY:
        raise ApiError(f"Tokenizer {tokenizer.public_id} is {tokenizer.status}, not ready.", param="tokenizer")
    from workers.tasks.datasets import validate_file

    if validation_file is not None and validation_file.tenant_id != tenant.pk:
        raise ApiError("No such file.", code="not_found", param="validation_file", status_code=404)
    tokenizer_pk = tokenizer.pk if tokenizer else None
    validation_pk = validation_file.pk if validation_file else None
    transaction.on_commit(lambda: validate_file.delay(file.pk, tokenizer_pk, max_length, validation_pk))


def file_preview(
    *, file: File, tokenizer: Tokenizer | str, template: str, train_on: str, max_length: int, limit: int
) -> list[dict]:
    """The first examples as tokens, each marked trained or masked: the labels the trainer would compute.

    ``tokenizer`` is one of the tenant's tokenizer assets, or the id of a pretrained catalog model whose own tokenizer
    a fine-tuning job would use (e.g. ``smollm2-135m-instruct``).
    """
    if template not in CHAT_TEMPLATES:
        raise ApiError(f"Unknown template '{template}'; use one of: {', '.join(CHAT_TEMPLATES)}.", param="template")
    if train_on not in TRAIN_ON_CHOICES:
        raise ApiError("train_on must be 'completions' or 'all'.", param="train_on")
    if not 8 <= max_length <= 131072:
        raise ApiError("max_length must be between 8 and 131072.", param="max_length")
    if not 1 <= limit <= PREVIEW_MAX_EXAMPLES:
        raise ApiError(f"limit must be between 1 and {PREVIEW_MAX_EXAMPLES}.", param="limit")
    if isinstance(tokenizer, str):
        loaded = _catalog_tokenizer(tokenizer)
    elif tokenizer.status != TokenizerStatus.READY:
        raise ApiError(f"Tokenizer {tokenizer.public_id} is {tokenizer.status}, not ready.", param="tokenizer")
    else:
        loaded = tokenizer_load(tokenizer)
    examples = _valid_examples(file, limit)
    # As the trainer does: the template's markers become single special tokens, so the preview shows what trains.
    ensure_template_tokens(loaded, template)
    try:
        return preview_examples(
            examples,
            loaded,
            template=template,
            train_on=train_on,
            max_length=max_length,
            limit=limit,
        )
    except ValueError as exc:
        raise ApiError(str(exc), code="preview_not_available", param="file_id") from exc


def _catalog_tokenizer(model_id: str):
    from apps.catalog.models import EntryKind
    from apps.catalog.selectors import catalog_entry_ready, catalog_get, catalog_model_folder

    entry = catalog_get(model_id=model_id)
    if entry is None or entry.kind != EntryKind.PRETRAINED:
        raise ApiError(
            f"No such tokenizer: {model_id}. Use one of your tokenizers (tok-…) or a pretrained catalog model id.",
            code="not_found",
            param="tokenizer",
            status_code=404,
        )
    if not catalog_entry_ready(entry):
        raise ApiError(
            f"The weights of {model_id} are not on this server yet.", code="model_not_ready", param="tokenizer"
        )
    return load_tokenizer(catalog_model_folder(entry))


def _valid_examples(file: File, limit: int) -> list[Example]:
    mapping = ColumnMapping.from_dict(file.column_mapping) if file.column_mapping else None
    try:
        rows = iter_examples(
            str(file_local_path(file)), filename=file.filename, column_mapping=mapping, limits=_read_limits()
        )
        return list(islice((row for row in rows if isinstance(row, Example)), limit))
    except UnsupportedFormat as exc:
        raise ApiError(str(exc), code=getattr(exc, "code", "unsupported_file_type"), param="file_id") from exc


def file_delete(*, tenant: Tenant, file: File) -> None:
    from apps.jobs.selectors import file_is_used_by_jobs

    if (
        file_is_used_by_jobs(tenant=tenant, file=file)
        or Tokenizer.objects.for_tenant(tenant).filter(training_file=file).exists()
    ):
        raise ApiError(
            f"File {file.public_id} is used by a fine-tuning job or a tokenizer; it is kept so they stay reproducible.",
            code="file_in_use",
            param="file_id",
            status_code=409,
        )
    object_store().delete(file.storage_key)
    file.delete()


def tokenizer_create(
    *,
    tenant: Tenant,
    user: AbstractBaseUser | None,
    training_file: File,
    name: str,
    algorithm: str,
    vocab_size: int,
    special_tokens: list[str] | None = None,
    lowercase: bool = False,
) -> Tokenizer:
    if training_file.tenant_id != tenant.pk:
        raise ApiError("No such file.", code="not_found", param="training_file", status_code=404)
    if training_file.status == FileStatus.ERROR:
        raise ApiError(
            f"File {training_file.public_id} failed validation; fix it before training a tokenizer on it.",
            code="invalid_training_file",
            param="training_file",
        )
    try:
        spec = TokenizerSpec(
            algorithm=algorithm, vocab_size=vocab_size, special_tokens=tuple(special_tokens or ()), lowercase=lowercase
        )
    except TrainingDataError as exc:
        raise ApiError(exc.message, code=exc.code, param=exc.param) from exc
    tokenizer = Tokenizer.objects.create(
        tenant=tenant,
        name=(name or f"{spec.algorithm}-{spec.vocab_size}")[:100],
        algorithm=spec.algorithm,
        vocab_size=spec.vocab_size,
        special_tokens=list(spec.special_tokens),
        lowercase=spec.lowercase,
        training_file=training_file,
        created_by=user,
    )
    from workers.tasks.datasets import train_tokenizer_asset

    transaction.on_commit(lambda: train_tokenizer_asset.delay(tokenizer.pk))
    return tokenizer


def tokenizer_train(*, tokenizer_id: int) -> Tokenizer:
    """Trains the tokenizer on its file's text (queue `cpu`), stores it and its report."""
    tokenizer = Tokenizer.objects.select_related("training_file").get(pk=tokenizer_id)
    if tokenizer.status != TokenizerStatus.TRAINING:
        return tokenizer  # a redelivered task: the work is done
    file = tokenizer.training_file
    mapping = ColumnMapping.from_dict(file.column_mapping) if file.column_mapping else None
    spec = TokenizerSpec(
        algorithm=tokenizer.algorithm,
        vocab_size=tokenizer.vocab_size,
        special_tokens=tuple(tokenizer.special_tokens),
        lowercase=tokenizer.lowercase,
    )
    work_dir = Path(tempfile.mkdtemp(prefix="tokenizer-", dir=_ensure_dir(Path(settings.WORK_DIR) / "tmp")))
    try:
        path = str(file_local_path(file))
        sample: list[str] = []

        def texts() -> Iterator[str]:
            rows = iter_examples(path, filename=file.filename, column_mapping=mapping, limits=_read_limits())
            examples = (row for row in rows if isinstance(row, Example))
            for example in islice(examples, TOKENIZER_TRAINING_MAX_EXAMPLES):
                text = example_text(example)
                if len(sample) < _TOKENIZER_REPORT_SAMPLE:
                    sample.append(text)
                yield text

        trained = train_tokenizer(texts(), spec)
        if not sample:
            raise TrainingDataError("empty_training_file", "The file has no valid examples to train a tokenizer on.")
        report = tokenizer_report(trained, sample)
        save_tokenizer(trained, work_dir / "tokenizer")
        prefix = tenant_key(tokenizer.tenant_id, "tokenizers", tokenizer.public_id)
        object_store().upload_dir(prefix, work_dir / "tokenizer")
        tokenizer.storage_prefix = prefix
        tokenizer.report = report
        tokenizer.status = TokenizerStatus.READY
        tokenizer.save(update_fields=["storage_prefix", "report", "status"])
    except (TrainingDataError, UnsupportedFormat) as exc:
        _tokenizer_failed(tokenizer, getattr(exc, "message", str(exc)))
    except Exception:
        # Not the user's fault, but the asset must not stay "training" forever.
        _tokenizer_failed(tokenizer, "Tokenizer training stopped on an internal error; try again or contact support.")
        raise
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return tokenizer


def _tokenizer_failed(tokenizer: Tokenizer, message: str) -> None:
    tokenizer.status = TokenizerStatus.FAILED
    tokenizer.error = message
    tokenizer.save(update_fields=["status", "error"])


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def tokenizer_load(tokenizer: Tokenizer):
    """The tokenizer unpacked on this machine (downloaded once; assets are immutable)."""
    target = Path(settings.WORK_DIR) / "tokenizers" / str(tokenizer.tenant_id) / tokenizer.public_id
    local_copy_of_prefix(tokenizer.storage_prefix, target)
    return load_tokenizer(target)


def tokenizer_delete(*, tenant: Tenant, tokenizer: Tokenizer) -> None:
    if tokenizer.storage_prefix:
        object_store().delete_prefix(tokenizer.storage_prefix + "/")
    tokenizer.delete()
