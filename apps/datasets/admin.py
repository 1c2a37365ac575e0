from django.contrib import admin

from .models import File


@admin.register(File)
class FileAdmin(admin.ModelAdmin):
    list_display = ["public_id", "tenant", "filename", "bytes", "status", "created_at"]
    list_filter = ["status", "tenant"]
    search_fields = ["public_id", "filename", "sha256"]
    readonly_fields = [f.name for f in File._meta.fields]
