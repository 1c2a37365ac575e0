from django.contrib import admin

from .models import ApiKey, Membership, Tenant


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    # The inference limits are edited here by platform staff (empty: the platform default); they apply on the
    # tenant's next request.
    list_display = ["slug", "name", "requests_per_minute", "tokens_per_minute", "tokens_per_day", "created_at"]
    search_fields = ["slug", "name"]
    inlines = [MembershipInline]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["name", "prefix", "tenant", "permissions", "created_at", "last_used_at", "revoked_at"]
    list_filter = ["tenant", "permissions"]
    # The hash is useless to a person and the key itself is never stored: only the key's permissions, inference caps
    # (and its revocation) are editable here.
    readonly_fields = ["public_id", "tenant", "name", "prefix", "created_by", "created_at", "last_used_at"]
    exclude = ["key_hash"]

    def has_add_permission(self, request) -> bool:
        return False
