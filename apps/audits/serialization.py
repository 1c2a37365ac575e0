"""The JSON of audits, decisions and policies (REST API and dashboard)."""

from .models import Audit, AuditPolicy, ReviewDecision
from .policy import policy_snapshot
from .selectors import approval_state


def _unix(value) -> int | None:
    return int(value.timestamp()) if value else None


def decision_to_json(decision: ReviewDecision, *, with_reviewer: bool = True) -> dict:
    body = {
        "object": "audit.review_decision",
        "id": decision.pk,
        "audit": decision.audit.public_id,
        "audit_version": decision.audit_version,
        "decision": decision.decision,
        "comment": decision.comment,
        "created_at": _unix(decision.created_at),
    }
    if with_reviewer:
        body["reviewer"] = decision.reviewer.email or decision.reviewer.get_username()
    return body


def audit_to_json(audit: Audit, *, with_results: bool = True) -> dict:
    """An audit as its tenant sees it (reviewers are platform staff: their names are not shown to tenants)."""
    body = {
        "object": "audit",
        "id": audit.public_id,
        "fine_tuning_job": audit.job.public_id,
        "model": audit.job.fine_tuned_model or audit.job.public_id,
        "checkpoint": audit.checkpoint.public_id if audit.checkpoint_id else None,
        "version": audit.version,
        "kind": audit.kind,
        "trigger": audit.trigger,
        "reference_model": audit.reference_model or None,
        "evaluation_file": audit.evaluation_file.public_id if audit.evaluation_file_id else None,
        "sensitive_attribute": audit.sensitive_attribute or None,
        "options": audit.options,
        "status": audit.status,
        "reasons": audit.reasons,
        "approval_required": audit.approval_required,
        "approval": approval_state(audit),
        "policy": audit.policy,
        "error": audit.error,
        "created_at": _unix(audit.created_at),
        "started_at": _unix(audit.started_at),
        "finished_at": _unix(audit.finished_at),
        "decisions": [
            decision_to_json(decision, with_reviewer=False) for decision in audit.decisions.select_related("audit")
        ],
    }
    if with_results:
        body["results"] = audit.results
    return body


def review_to_json(audit: Audit, *, with_results: bool = True) -> dict:
    """An audit as a staff reviewer sees it: the tenant, and who decided."""
    body = audit_to_json(audit, with_results=with_results)
    body["object"] = "audit.review"
    body["tenant"] = audit.tenant.slug
    body["decisions"] = [decision_to_json(decision) for decision in audit.decisions.select_related("reviewer")]
    return body


def policy_to_json(policy: AuditPolicy) -> dict:
    return {"object": "audit.policy", **policy_snapshot(policy)}


def audit_summary(audit: Audit | None, *, gate: Audit | None = None) -> dict | None:
    """What a job's JSON says of its audits: the latest one, and the approval state of the one that decides whether
    the model may be deployed (an older audit awaiting or refused a review still decides after a later one passed)."""
    if audit is None:
        return None
    return {
        "id": audit.public_id,
        "version": audit.version,
        "status": audit.status,
        "approval": approval_state(gate or audit),
        "gating_audit": gate.public_id if gate is not None else None,
    }
