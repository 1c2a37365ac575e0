from django.contrib import admin

from .models import FineTuningJob, JobStatusChange


class JobStatusChangeInline(admin.TabularInline):
    model = JobStatusChange
    extra = 0
    can_delete = False
    readonly_fields = ["from_status", "to_status", "actor", "created_at"]


@admin.register(FineTuningJob)
class FineTuningJobAdmin(admin.ModelAdmin):
    list_display = ["public_id", "tenant", "model", "status", "phase", "attempt", "created_at"]
    list_filter = ["status", "tenant"]
    search_fields = ["public_id", "fine_tuned_model"]
    readonly_fields = [f.name for f in FineTuningJob._meta.fields]
    inlines = [JobStatusChangeInline]
