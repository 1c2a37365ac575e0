"""Admin for audits: policies, audits (results read-only) and review decisions.

Decisions are append-only: the admin can list and add them, never change or delete one, and adding goes through
`services.review_decide`, so the rules of the API hold here too (a staff reviewer, never a member of the audited
tenant, with a comment, on the audit's latest version)."""

from django import forms
from django.contrib import admin, messages
from django.http import HttpResponseRedirect

from apps.core.api.errors import ApiError

from .models import Audit, AuditPolicy, ReviewDecision
from .policy import checked_policy_fields
from .services import review_decide


class AuditPolicyForm(forms.ModelForm):
    """The JSON fields are checked as the API checks them (apps.audits.policy.checked_policy_fields), so a policy
    saved here can always be judged by."""

    class Meta:
        model = AuditPolicy
        fields = [
            "tenant",
            "audit_after_training",
            "approval",
            "thresholds",
            "measures",
            "categories",
            "reference_model",
        ]

    def clean(self):
        cleaned = super().clean()
        # A cleared JSON box means "the defaults", as an absent row does.
        for name, empty in (("thresholds", {}), ("measures", []), ("categories", [])):
            if name in cleaned and cleaned[name] in (None, ""):
                cleaned[name] = empty
        try:
            checked = checked_policy_fields(
                **{name: cleaned.get(name) for name in ("thresholds", "measures", "categories", "approval")}
            )
        except ApiError as exc:
            field = (exc.param or "").split(".", 1)[0]
            raise forms.ValidationError({field if field in self.fields else None: str(exc.detail)}) from exc
        cleaned.update(checked)
        return cleaned


@admin.register(AuditPolicy)
class AuditPolicyAdmin(admin.ModelAdmin):
    form = AuditPolicyForm
    list_display = ["tenant", "approval", "audit_after_training", "reference_model", "updated_at"]
    list_filter = ["approval", "audit_after_training"]
    search_fields = ["tenant__slug"]
    readonly_fields = ["updated_by", "updated_at"]


class ReviewDecisionInline(admin.TabularInline):
    model = ReviewDecision
    extra = 0
    can_delete = False
    fields = readonly_fields = ["audit_version", "decision", "comment", "reviewer", "created_at"]

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Audit)
class AuditAdmin(admin.ModelAdmin):
    list_display = ["public_id", "tenant", "job", "version", "kind", "status", "approval_required", "finished_at"]
    list_filter = ["status", "kind", "approval_required", "trigger"]
    search_fields = ["public_id", "job__public_id", "tenant__slug"]
    # What an audit measured and concluded is evidence: nobody edits it by hand.
    readonly_fields = [field.name for field in Audit._meta.fields]
    inlines = [ReviewDecisionInline]

    def has_add_permission(self, request) -> bool:
        # Audits are created through the API (or after training), which checks the job and queues the run.
        return False


class ReviewDecisionForm(forms.ModelForm):
    class Meta:
        model = ReviewDecision
        fields = ["audit", "decision", "comment"]
        help_texts = {
            "audit": "Your decision applies to this audit's current version, which must be its job's latest.",
            "comment": "Why: the tenant reads it, and a rejection's comment is what their deploy refusal says.",
        }


@admin.register(ReviewDecision)
class ReviewDecisionAdmin(admin.ModelAdmin):
    form = ReviewDecisionForm
    list_display = ["audit", "audit_version", "decision", "reviewer", "created_at"]
    list_filter = ["decision", "created_at"]
    search_fields = ["audit__public_id", "audit__job__public_id", "audit__tenant__slug", "comment"]
    list_select_related = ["audit", "reviewer"]
    raw_id_fields = ["audit"]

    def get_readonly_fields(self, request, obj=None):
        if obj is not None:
            return ["audit", "audit_version", "decision", "comment", "reviewer", "created_at"]
        return []

    def get_fields(self, request, obj=None):
        if obj is not None:
            return ["audit", "audit_version", "decision", "comment", "reviewer", "created_at"]
        return ["audit", "decision", "comment"]

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def save_model(self, request, obj, form, change) -> None:
        # Recorded by the service (which checks the reviewer and the version, and moves the job on); the form only
        # gathers the fields. The version is the audit's own: the reviewer decides on what the page shows now.
        audit = form.cleaned_data["audit"]
        recorded = review_decide(
            reviewer=request.user,
            audit=audit,
            decision=form.cleaned_data["decision"],
            comment=form.cleaned_data["comment"],
            audit_version=audit.version,
        )
        # The admin goes on with `obj` (its log entry, the "added" message, the redirect): make it the row recorded.
        for field in ("pk", "audit_version", "comment", "reviewer_id", "created_at"):
            setattr(obj, field, getattr(recorded, field))
        obj._state.adding = False
        obj._state.db = recorded._state.db

    def add_view(self, request, form_url="", extra_context=None):
        try:
            return super().add_view(request, form_url, extra_context)
        except ApiError as exc:
            # The service refused (the reviewer is a member of the audited tenant, the audit is unfinished or no
            # longer the latest...): the admin's transaction is rolled back, nothing is recorded, and the reviewer
            # is told why on a fresh form.
            self.message_user(request, str(exc.detail), level=messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())
