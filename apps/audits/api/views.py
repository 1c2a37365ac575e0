"""Bias audits over REST (Tunehouse extension).

A tenant's side: `/v1/fine_tuning/jobs/{job}/audits` (list a job's audits, or run one on demand), `/v1/audits/{id}`
(one audit with its measurements) and `/v1/audit_policy` (the tenant's thresholds and approval rule).

Platform staff's side: `/v1/reviews` (the queue of audits awaiting a decision), `/v1/reviews/{id}` (the evidence)
and `/v1/reviews/{id}/decisions` (approve or reject, append-only). Those routes exist only for staff reviewers:
anyone else, a tenant's owner included, gets the same 404 as for a path that does not exist.

The views only translate HTTP; every rule lives in apps.audits.services (the same rules the admin goes through).
"""

from drf_spectacular.utils import OpenApiParameter, OpenApiTypes, extend_schema
from rest_framework import permissions
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.core.api.base import TenantAPIView
from apps.core.api.bodies import request_object
from apps.core.api.errors import ApiError
from apps.core.api.pagination import cursor_page, list_page, parse_limit
from apps.core.api.schema import ERROR_RESPONSES, PAGE_PARAMETERS, ErrorSerializer
from apps.datasets.models import File
from apps.datasets.selectors import file_get
from apps.jobs.models import FineTuningJob, JobCheckpoint
from apps.jobs.selectors import job_checkpoint_get
from apps.tenancy.context import context_for_request
from apps.tenancy.permissions import check_api_key_permissions

from ..models import Audit, AuditPolicy
from ..policy import policy_of
from ..selectors import audit_get, audits_of_job, review_audit_get, review_queue
from ..serialization import audit_to_json, decision_to_json, policy_to_json, review_to_json
from ..services import audit_create, audit_policy_update, is_reviewer, review_decide

AUDIT_PARAMETERS = (
    "checkpoint",
    "reference_model",
    "evaluation_file",
    "sensitive_attribute",
    "categories",
    "max_prompts_per_group",
    "seed",
)
POLICY_PARAMETERS = (
    "thresholds",
    "measures",
    "categories",
    "approval",
    "audit_after_training",
    "flag_only_significant",
    "reference_model",
)
DECISION_PARAMETERS = ("decision", "comment", "audit_version")
REVIEW_STATES = ("pending", "all")

_JOB_ID_PARAMETER = OpenApiParameter("public_id", str, OpenApiParameter.PATH, description="The job id (ftjob-...).")
_AUDIT_ID_PARAMETER = OpenApiParameter("public_id", str, OpenApiParameter.PATH, description="The audit id (audit-...).")
_STAFF_RESPONSES = {400: ErrorSerializer, 403: ErrorSerializer, 404: ErrorSerializer, 409: ErrorSerializer}


def _string(value, param: str) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ApiError(f"'{param}' must be a string.", param=param)
    return value


# --- a tenant's audits -------------------------------------------------------------------------------------------


class JobAuditsView(TenantAPIView):
    model = FineTuningJob

    def scoped_queryset(self):
        return FineTuningJob.objects.select_related("training_file", "tenant")

    def _checkpoint(self, job: FineTuningJob, public_id: str | None) -> JobCheckpoint | None:
        if public_id is None:
            return None
        checkpoint = job_checkpoint_get(job=job, public_id=public_id)
        if checkpoint is None:
            raise ApiError(
                f"No checkpoint {public_id} of job {job.public_id}.",
                code="not_found",
                param="checkpoint",
                status_code=404,
            )
        return checkpoint

    def _evaluation_file(self, public_id: str | None) -> File | None:
        if public_id is None:
            return None
        file = file_get(tenant=self.tenant, public_id=public_id)
        if file is None:
            # Another tenant's file reads exactly like one that does not exist.
            raise ApiError(f"No such file: {public_id}.", code="not_found", param="evaluation_file", status_code=404)
        return file

    @extend_schema(
        summary="List a fine-tuning job's bias audits, newest version first (Tunehouse)",
        operation_id="listFineTuningJobAudits",
        parameters=[_JOB_ID_PARAMETER, *PAGE_PARAMETERS],
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    def get(self, request, public_id):
        job = self.get_object()
        return Response(
            cursor_page(
                audits_of_job(tenant=self.tenant, job=job).select_related("job", "checkpoint", "evaluation_file"),
                query_params=request.query_params,
                to_json=lambda audit: audit_to_json(audit, with_results=False),
            )
        )

    @extend_schema(
        summary="Audit a fine-tuned model for bias (Tunehouse)",
        operation_id="createFineTuningJobAudit",
        description="Queues a bias audit of a succeeded job's model (or, with checkpoint, one of its checkpoints) on "
        "a GPU worker. Body (all optional): checkpoint (ftckpt-... of this job), reference_model (a pretrained "
        "catalog model or one of your fine-tuned models to compare with; default: the base model, or the policy's "
        'reference for a from-scratch model; "" for absolute values), evaluation_file and sensitive_attribute '
        "(classifiers: a labelled file and the column holding each example's group), categories (gender, "
        "race_ethnicity, religion, nationality, age, disability, sexual_orientation), max_prompts_per_group "
        "(1 to 200), seed. Each audit of a job gets the next version number; a reviewer's decision applies to the "
        "version it names.",
        parameters=[_JOB_ID_PARAMETER],
        request=OpenApiTypes.OBJECT,
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    def post(self, request, public_id):
        job = self.get_object()
        body = request_object(request, AUDIT_PARAMETERS)
        reference_model = body.get("reference_model")
        if reference_model is not None and not isinstance(reference_model, str):
            raise ApiError("reference_model must be a string (blank for absolute values).", param="reference_model")
        audit = audit_create(
            tenant=self.tenant,
            user=self.tenant_context.user,
            job=job,
            checkpoint=self._checkpoint(job, _string(body.get("checkpoint"), "checkpoint")),
            reference_model=reference_model,
            evaluation_file=self._evaluation_file(_string(body.get("evaluation_file"), "evaluation_file")),
            sensitive_attribute=_string(body.get("sensitive_attribute"), "sensitive_attribute") or "",
            categories=body.get("categories"),
            max_prompts_per_group=body.get("max_prompts_per_group"),
            seed=body.get("seed"),
        )
        return Response(audit_to_json(audit_get(tenant=self.tenant, public_id=audit.public_id)))


class AuditDetailView(TenantAPIView):
    model = Audit

    def scoped_queryset(self):
        return Audit.objects.select_related("job", "checkpoint", "evaluation_file")

    @extend_schema(
        summary="Retrieve a bias audit with its measurements (Tunehouse)",
        operation_id="retrieveAudit",
        description="status: queued, running, passed, flagged or failed; reasons: each threshold crossed; results: "
        "every measure with its confidence interval, the reference's value and the change; approval: "
        "not_required, pending, approved or rejected (the deploy gate reads it).",
        parameters=[_AUDIT_ID_PARAMETER],
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    def get(self, request, public_id):
        return Response(audit_to_json(self.get_object()))


class AuditPolicyView(TenantAPIView):
    # One row per tenant, read through policy_of(tenant=...): no id in the path, no object to look up.
    model = AuditPolicy

    @extend_schema(
        summary="Retrieve the organization's audit policy (Tunehouse)",
        operation_id="retrieveAuditPolicy",
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    def get(self, request):
        return Response(policy_to_json(policy_of(tenant=self.tenant)))

    @extend_schema(
        summary="Update the organization's audit policy (Tunehouse)",
        operation_id="updateAuditPolicy",
        description="Partial update, owners and admins only. thresholds {measure: 0..1} (sentiment_gap, "
        "hurtful_rate, hurtful_gap, crows_pairs, demographic_parity_difference, equalized_odds_difference, "
        "accuracy_gap, counterfactual_flip_rate), measures and categories (lists; empty: all), approval "
        "(always, when_flagged, never: when a staff reviewer's approval is needed before deploying), "
        "audit_after_training (true: every succeeded job is audited, and cannot be deployed before its audit), "
        "flag_only_significant (true, the default: a threshold counts only when the change's 95% interval lies "
        'above zero), reference_model (what a from-scratch model is compared with; "" for absolute values).',
        request=OpenApiTypes.OBJECT,
        responses={200: OpenApiTypes.OBJECT, 403: ErrorSerializer, **ERROR_RESPONSES},
    )
    def post(self, request):
        context = self.tenant_context
        if not context.can_manage:
            raise ApiError(
                "Changing the audit policy needs an owner or admin of this organization.",
                code="permission_denied",
                status_code=403,
            )
        body = request_object(request, POLICY_PARAMETERS)
        policy = audit_policy_update(tenant=self.tenant, user=context.user, **body)
        return Response(policy_to_json(policy))


# --- staff review --------------------------------------------------------------------------------------------------


def _caller(request):
    """The person calling: the session's user, or the user who created the API key sent."""
    context = context_for_request(request)
    if context is not None and context.api_key is not None:
        return context.user
    return request.user


class IsReviewer(permissions.BasePermission):
    """Platform staff only. Anyone else gets the very 404 of an unknown path (apps.core.views.not_found): these
    routes do not exist for them."""

    def has_permission(self, request, view) -> bool:
        if not is_reviewer(_caller(request)):
            raise ApiError(
                f"Unknown request URL: {request.method} {request.path}.", code="unknown_url", status_code=404
            )
        check_api_key_permissions(request, view)  # a reviewer's read-only key reads the queue but decides nothing
        return True


class ReviewView(APIView):
    """Not a TenantAPIView: a reviewer works across tenants (and may not decide on one they belong to)."""

    permission_classes = [IsReviewer]

    def audit(self, public_id: str) -> Audit:
        audit = review_audit_get(public_id=public_id)
        if audit is None:
            raise ApiError(f"No such audit: {public_id}.", code="not_found", status_code=404)
        return audit


class ReviewListView(ReviewView):
    @extend_schema(
        summary="The review queue (platform staff)",
        operation_id="listReviews",
        description="state=pending (the default): audits awaiting a decision, oldest first; state=all: every "
        "audit that needed a decision, newest first, paged with after/limit.",
        parameters=[
            OpenApiParameter("state", str, enum=list(REVIEW_STATES), description="pending (default) or all."),
            *PAGE_PARAMETERS,
        ],
        responses={200: OpenApiTypes.OBJECT, **_STAFF_RESPONSES},
    )
    def get(self, request):
        state = request.query_params.get("state") or "pending"
        if state not in REVIEW_STATES:
            raise ApiError(f"state must be one of {', '.join(REVIEW_STATES)}.", param="state")

        def to_json(audit):
            return review_to_json(audit, with_results=False)

        if state == "all":
            return Response(
                cursor_page(review_queue(pending_only=False), query_params=request.query_params, to_json=to_json)
            )
        # The queue keeps its own order (oldest waiting first), so it pages by count only.
        limit = parse_limit(request.query_params.get("limit"), default=100)
        return Response(list_page(list(review_queue(pending_only=True)[: limit + 1]), limit=limit, to_json=to_json))


class ReviewDetailView(ReviewView):
    @extend_schema(
        summary="An audit's evidence, for a reviewer (platform staff)",
        operation_id="retrieveReview",
        parameters=[_AUDIT_ID_PARAMETER],
        responses={200: OpenApiTypes.OBJECT, **_STAFF_RESPONSES},
    )
    def get(self, request, public_id):
        return Response(review_to_json(self.audit(public_id)))


class ReviewDecisionsView(ReviewView):
    @extend_schema(
        summary="Approve or reject an audit version (platform staff)",
        operation_id="createReviewDecision",
        description="Body: decision (approve or reject), comment (why; required), audit_version (the version you "
        "reviewed: a newer audit of the model answers 409). Decisions are append-only: record a new one to change "
        "course. A reviewer who is a member of the audited organization gets 403.",
        parameters=[_AUDIT_ID_PARAMETER],
        request=OpenApiTypes.OBJECT,
        responses={201: OpenApiTypes.OBJECT, **_STAFF_RESPONSES},
    )
    def post(self, request, public_id):
        audit = self.audit(public_id)
        body = request_object(request, DECISION_PARAMETERS)
        decision = review_decide(
            reviewer=_caller(request),
            audit=audit,
            decision=body.get("decision"),
            comment=body.get("comment"),
            audit_version=body.get("audit_version"),
        )
        return Response(decision_to_json(decision), status=201)
