"""The base-model catalog: pretrained models in the model cache folder and the architectures trained from scratch.

Shared by every tenant (a tenant's own fine-tuned models live with its jobs). Entries come from code
(`builtin.BUILTIN_ENTRIES`, synced by ``manage.py prepare_catalog``) or from a staff member's import of an HF
safetensors folder (``manage.py import_model``); their ids are stable and documented.
"""

from django.db import models


class EntryKind(models.TextChoices):
    PRETRAINED = "pretrained"
    ARCHITECTURE = "architecture"


class EntryStatus(models.TextChoices):
    READY = "ready"
    # A pretrained entry whose folder is not (yet) in this machine's model cache: `prepare_catalog` converts it.
    MISSING = "missing"


class CatalogModel(models.Model):
    model_id = models.SlugField(max_length=100, unique=True, help_text="Stable id used as a job's `model`.")
    name = models.CharField(max_length=200)
    description = models.TextField()
    kind = models.CharField(max_length=20, choices=EntryKind.choices)
    model_type = models.CharField(max_length=50, help_text="transformers model_type, e.g. llama, bert, gpt2, t5.")
    tasks = models.JSONField(default=list, help_text="Tasks it can be trained for: causal_lm, classification, seq2seq.")
    default_mode = models.CharField(max_length=20, help_text="from_scratch, full or lora when a job names none.")
    parameter_count = models.BigIntegerField()
    context_length = models.IntegerField()
    licence = models.CharField(max_length=100)
    source = models.CharField(max_length=300, help_text="Where the weights came from (wheel, import, architecture).")
    # From-scratch entries: the architecture and named size the engine builds.
    architecture = models.CharField(max_length=20, blank=True, default="")
    size = models.CharField(max_length=20, blank=True, default="")
    # Pretrained entries: the folder name inside settings.MODEL_CACHE_DIR.
    folder = models.CharField(max_length=200, blank=True, default="")
    status = models.CharField(max_length=20, choices=EntryStatus.choices, default=EntryStatus.READY)
    builtin = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["kind", "parameter_count", "model_id"]

    def __str__(self) -> str:
        return self.model_id
