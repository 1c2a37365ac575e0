from .models import CatalogModel


def catalog_entry_to_json(entry: CatalogModel) -> dict:
    """An OpenAI Model object (id, object, created, owned_by) with the catalog's own fields."""
    return {
        "id": entry.model_id,
        "object": "model",
        "created": int(entry.created_at.timestamp()),
        "owned_by": "tunehouse",
        "name": entry.name,
        "description": entry.description,
        "kind": entry.kind,
        "model_type": entry.model_type,
        "tasks": entry.tasks,
        "default_mode": entry.default_mode,
        "parameter_count": entry.parameter_count,
        "context_length": entry.context_length,
        "licence": entry.licence,
        "source": entry.source,
        "status": entry.status,
    }
