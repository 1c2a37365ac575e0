"""Reads of the base-model catalog (shared by every tenant)."""

from pathlib import Path

from django.conf import settings
from django.db.models import QuerySet

from .models import CatalogModel, EntryKind, EntryStatus


def catalog_list() -> QuerySet[CatalogModel]:
    return CatalogModel.objects.all()


def catalog_get(*, model_id: str) -> CatalogModel | None:
    return CatalogModel.objects.filter(model_id=model_id).first()


def catalog_model_folder(entry: CatalogModel) -> Path:
    """Where a pretrained entry's safetensors folder lives on this machine."""
    return Path(settings.MODEL_CACHE_DIR) / entry.folder


def catalog_training_base(entry: CatalogModel, *, mode: str | None) -> dict:
    """The training-config fields that say what a job starts from: an architecture and size from scratch, or the
    entry's folder with a fine-tuning mode (the entry's default when the job names none)."""
    if entry.kind == EntryKind.ARCHITECTURE:
        return {"mode": "from_scratch", "architecture": entry.architecture, "model_size": entry.size}
    return {"mode": mode or entry.default_mode, "base_model": str(catalog_model_folder(entry))}


def catalog_entry_ready(entry: CatalogModel) -> bool:
    return entry.status == EntryStatus.READY and (
        entry.kind == EntryKind.ARCHITECTURE or (catalog_model_folder(entry) / "config.json").is_file()
    )
