from django.contrib import admin

from .models import CatalogModel


@admin.register(CatalogModel)
class CatalogModelAdmin(admin.ModelAdmin):
    list_display = ["model_id", "kind", "model_type", "parameter_count", "context_length", "licence", "status"]
    list_filter = ["kind", "status", "builtin"]
    search_fields = ["model_id", "name"]
    # Weights are added with `manage.py import_model` (which checks the folder); the admin edits descriptions only.
    readonly_fields = [
        "model_id", "kind", "model_type", "tasks", "parameter_count", "context_length", "source", "architecture",
        "size", "folder", "status", "builtin", "created_at", "updated_at",
    ]  # fmt: skip

    def has_add_permission(self, request):
        return False
