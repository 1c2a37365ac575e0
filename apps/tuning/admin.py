from django.contrib import admin

from .models import Study, Trial


@admin.register(Study)
class StudyAdmin(admin.ModelAdmin):
    list_display = ("public_id", "tenant", "name", "sampler", "pruner", "status", "n_trials", "created_at")
    list_filter = ("status", "sampler", "pruner")
    search_fields = ("public_id", "name")


@admin.register(Trial)
class TrialAdmin(admin.ModelAdmin):
    list_display = ("public_id", "study", "number", "state", "value", "job")
    list_filter = ("state",)
    search_fields = ("public_id", "study__public_id")
