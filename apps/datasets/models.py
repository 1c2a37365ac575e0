"""Uploaded files. A file's bytes are immutable once stored; its sha256 recognises a re-upload."""

from django.conf import settings
from django.db import models

from apps.core.ids import new_public_id
from apps.tenancy.models import TenantOwnedModel


def _new_file_id() -> str:
    return new_public_id("file")


class FilePurpose(models.TextChoices):
    FINE_TUNE = "fine-tune", "fine-tune"


class FileStatus(models.TextChoices):
    # OpenAI's File statuses: uploaded (stored, checks pending), processed (checks passed), error.
    UPLOADED = "uploaded", "uploaded"
    PROCESSED = "processed", "processed"
    ERROR = "error", "error"


class File(TenantOwnedModel):
    public_id = models.CharField(max_length=40, unique=True, default=_new_file_id, editable=False)
    filename = models.CharField(max_length=255)
    purpose = models.CharField(max_length=20, choices=FilePurpose.choices, default=FilePurpose.FINE_TUNE)
    bytes = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    storage_key = models.CharField(max_length=300)
    status = models.CharField(max_length=12, choices=FileStatus.choices, default=FileStatus.UPLOADED)
    status_details = models.TextField(blank=True, default="")
    validation_report = models.JSONField(default=dict, blank=True)
    # What validation found (or the user chose): the format, the task it trains, and which columns mean what.
    format = models.CharField(max_length=30, blank=True, default="")
    task = models.CharField(max_length=30, blank=True, default="")
    column_mapping = models.JSONField(null=True, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["tenant", "sha256"])]

    def __str__(self) -> str:
        return f"{self.public_id} {self.filename}"


def _new_tokenizer_id() -> str:
    return new_public_id("tok")


class TokenizerStatus(models.TextChoices):
    TRAINING = "training", "training"
    READY = "ready", "ready"
    FAILED = "failed", "failed"


class Tokenizer(TenantOwnedModel):
    """A tokenizer a tenant trained on one of its files: stored as tokenizer.json under the tenant's prefix."""

    public_id = models.CharField(max_length=40, unique=True, default=_new_tokenizer_id, editable=False)
    name = models.CharField(max_length=100)
    algorithm = models.CharField(max_length=20)
    vocab_size = models.IntegerField()
    special_tokens = models.JSONField(default=list, blank=True)
    lowercase = models.BooleanField(default=False)
    training_file = models.ForeignKey(File, on_delete=models.PROTECT, related_name="tokenizers")
    status = models.CharField(max_length=10, choices=TokenizerStatus.choices, default=TokenizerStatus.TRAINING)
    error = models.TextField(blank=True, default="")
    storage_prefix = models.CharField(max_length=300, blank=True, default="")
    report = models.JSONField(default=dict, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.public_id} {self.name}"
