"""Bias audits in the dashboard: the job page's "Bias audit" card and its run form, one audit's evidence page for its
tenant, the team's audit policy (a card on the settings page), and the staff review queue with its decision form.

Reads go through apps.audits.selectors and writes through apps.audits.services, whose ApiError sentences are shown on
the page as they are, with what the user typed kept (never a 500). An audit's `results` are written by the audit
library and may grow new keys: they are normalised here into plain rows and cells (numbers formatted, unknown shapes
shown as text) so the templates only ever loop over well-formed lists and never fail on an unexpected shape.

Tenants see their own audits through `tenant_object_or_404` (another team's audit is "not found"); the review pages
are for platform staff only (`is_reviewer`): to anyone else, tenant owners included, they do not exist (404). The
reviewers' identities are shown to reviewers only."""

import json
import math

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from apps.audits.models import ApprovalRule, Audit, Decision
from apps.audits.policy import CATEGORIES, DEFAULT_THRESHOLDS, MEASURE_FAMILIES, policy_of, policy_snapshot
from apps.audits.selectors import (
    approval_state,
    audit_get,
    audits_of_job,
    gating_audit,
    latest_audit,
    review_audit_get,
    review_queue,
)
from apps.audits.services import audit_create, audit_policy_update, is_reviewer, review_decide
from apps.catalog.models import EntryKind, EntryStatus
from apps.catalog.selectors import catalog_get, catalog_list
from apps.core.api.errors import ApiError
from apps.dashboard.access import require_tenant, tenant_object_or_404
from apps.datasets.selectors import file_get
from apps.jobs.models import JobStatus
from apps.jobs.selectors import files_evaluable, fine_tuned_models, job_get
from apps.jobs.services import file_engine_task
from apps.tenancy.selectors import membership_get

AUDITS_LISTED_ON_JOB = 10
REFERENCE_MODELS_OFFERED = 100
REVIEWS_PER_PAGE = 25
# Bounds on what one audit page renders, whatever the results hold.
MAX_TABLE_ROWS = 200
MAX_WORST_EXAMPLES = 100
MAX_CELL_CHARS = 2_000
_WRITE_REFUSED = "Your role in this team can only read: ask an owner or admin for the member role."
_KIND_OF_TASK = {"causal_lm": "generative", "classification": "classifier"}
APPROVAL_LABELS = {
    "not_audited": "not audited",
    "auditing": "audit running",
    "failed": "audit failed",
    "not_required": "no approval needed",
    "pending": "awaiting a reviewer",
    "approved": "approved by a reviewer",
    "rejected": "rejected by a reviewer",
    "superseded": "replaced by a newer audit awaiting review",
}
APPROVAL_RULE_LABELS = {
    ApprovalRule.ALWAYS: "Always: every audited model waits for a reviewer",
    ApprovalRule.WHEN_FLAGGED: "When flagged: only a model that crosses a threshold waits for a reviewer",
    ApprovalRule.NEVER: "Never: audits inform, they do not hold a deploy",
}
FAMILY_HINTS = {
    "sentiment_gap": "largest gap between groups' mean sentiment of continuations (−1 … 1)",
    "hurtful_rate": "share of all continuations with a hurtful word",
    "hurtful_gap": "largest gap between groups' shares of continuations with a hurtful word",
    "crows_pairs": "share of CrowS-Pairs pairs where the stereotype is likelier (above 0.5 without a reference)",
    "demographic_parity_difference": "classifiers: gap in positive-prediction rates between groups",
    "equalized_odds_difference": "classifiers: gap in error rates between groups",
    "accuracy_gap": "classifiers: gap in accuracy between groups",
    "counterfactual_flip_rate": "share of predictions that change when group words are swapped",
}


# --- cells: any JSON value, made safe to show -----------------------------------------------------------------------


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _format_number(value: float) -> str:
    if value == int(value) and abs(value) < 1e9:
        return f"{int(value):d}"
    if abs(value) >= 0.001:
        return f"{value:.3f}"
    return f"{value:.2e}"


def _cell(value) -> str:
    """One value as text: numbers rounded, yes/no, nested data as compact JSON, everything bounded in length."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    number = _number(value)
    if number is not None:
        return _format_number(number)
    if isinstance(value, int | float):  # NaN or infinity
        return str(value)
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = str(value)
    return text if len(text) <= MAX_CELL_CHARS else text[:MAX_CELL_CHARS] + "…"


def _short(value) -> str:
    """A threshold as people type it (0.1, not 0.100)."""
    number = _number(value)
    return f"{number:g}" if number is not None else _cell(value)


def _interval(value) -> list[float] | None:
    if isinstance(value, list | tuple) and len(value) == 2:
        low, high = _number(value[0]), _number(value[1])
        if low is not None and high is not None:
            return [low, high]
    return None


def _interval_text(interval: list[float] | None) -> str:
    return f"{_format_number(interval[0])} … {_format_number(interval[1])}" if interval else ""


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _label(name) -> str:
    return str(name).replace("_", " ")


def _table(raw, *, key_name: str = "name") -> dict:
    """Rows and columns from a list of objects, an object of objects (its keys become the first column, `key_name`)
    or an object of values; anything else is one text cell."""
    if isinstance(raw, dict):
        items = list(raw.items())
        if items and all(isinstance(value, dict) for _, value in items):
            rows = [{key_name: key, **{k: v for k, v in value.items() if k != key_name}} for key, value in items]
        else:
            rows = [{key_name: key, "value": value} for key, value in items]
    elif isinstance(raw, list):
        rows = [row if isinstance(row, dict) else {"value": row} for row in raw]
    elif raw is None:
        rows = []
    else:
        return {"columns": [], "rows": [], "text": _cell(raw), "more": 0}
    columns: list[str] = []
    for row in rows[:MAX_TABLE_ROWS]:
        columns.extend(str(key) for key in row if str(key) not in columns)
    shown = [
        [_cell(row.get(column)) if column in row else "" for column in columns]
        for row in ({str(key): value for key, value in row.items()} for row in rows[:MAX_TABLE_ROWS])
    ]
    return {
        "columns": [_label(column) for column in columns],
        "rows": shown,
        "text": "",
        "more": max(0, len(rows) - MAX_TABLE_ROWS),
    }


def _titled_tables(raw, *, key_name: str = "name") -> list[dict]:
    """{name: table-like} as one titled table each; anything else as one untitled table."""
    if isinstance(raw, dict) and raw and all(isinstance(value, dict | list) for value in raw.values()):
        tables = [{"title": _label(name), **_table(value, key_name=key_name)} for name, value in raw.items()]
    elif raw in (None, {}, []):
        tables = []
    else:
        tables = [{"title": "", **_table(raw, key_name=key_name)}]
    return [table for table in tables if table["rows"] or table["text"]]


# --- an audit's evidence ------------------------------------------------------------------------------------------


def _reasons(audit: Audit) -> list[dict]:
    reasons = []
    for reason in audit.reasons if isinstance(audit.reasons, list) else []:
        if isinstance(reason, dict):
            reasons.append(
                {
                    "measure": _cell(reason.get("measure")),
                    "value": _cell(reason.get("value")),
                    "threshold": _cell(reason.get("threshold")),
                    "message": _cell(reason.get("message") or reason.get("measure")),
                }
            )
        else:
            reasons.append({"measure": "", "value": "", "threshold": "", "message": _cell(reason)})
    return reasons


def _estimate(raw) -> dict:
    estimate = _dict(raw)
    value, interval = _number(estimate.get("value")), _interval(estimate.get("ci"))
    return {"value": value, "text": _cell(value) if value is not None else "—", "ci": interval}


def _measures(audit: Audit, results: dict) -> list[dict]:
    thresholds = {**DEFAULT_THRESHOLDS, **_dict(_dict(audit.policy).get("thresholds"))}
    crossed = {reason.get("measure") for reason in audit.reasons or [] if isinstance(reason, dict)}
    rows = []
    for key, raw in sorted(_dict(results.get("measures")).items(), key=lambda item: str(item[0])):
        measure = _dict(raw)
        family = str(measure.get("family") or str(key).split(".", 1)[0])
        category = measure.get("category") or (str(key).split(".", 1)[1] if "." in str(key) else "")
        delta = _number(measure.get("delta"))
        rows.append(
            {
                "key": str(key),
                "family": family,
                "category": str(category),
                "higher_is_worse": measure.get("higher_is_worse", True) is not False,
                "model": _estimate(measure.get("model")),
                "reference": _estimate(measure.get("reference")) if measure.get("reference") is not None else None,
                "delta": _cell(delta) if delta is not None else "—",
                "delta_value": delta,
                "delta_ci": _interval(measure.get("delta_ci")),
                "threshold": _cell(thresholds.get(family)),
                "crossed": key in crossed,
                "groups": _table(measure.get("groups"), key_name="group") if measure.get("groups") else None,
            }
        )
    return rows


def _worst_examples(results: dict) -> list[dict]:
    raw = results.get("worst_examples")
    examples = []
    for item in raw[:MAX_WORST_EXAMPLES] if isinstance(raw, list) else []:
        if not isinstance(item, dict):
            examples.append({"category": "", "group": "", "prompt": _cell(item), "continuation": "", "scores": []})
            continue
        known = ("category", "group", "prompt", "continuation")
        examples.append(
            {
                **{name: _cell(item.get(name)) if item.get(name) is not None else "" for name in known},
                "scores": [
                    {"name": _label(name), "value": _cell(value)} for name, value in item.items() if name not in known
                ],
            }
        )
    return examples


def _data_audit(results: dict) -> list[dict]:
    """The training data's group-term frequencies per category, its label balance, and whatever else it reports."""
    tables = []
    for name, value in _dict(results.get("data")).items():
        if name == "categories" and isinstance(value, dict):
            for category, content in value.items():
                groups = _dict(content).get("groups", content)
                tables.append({"title": f"Group terms: {_label(category)}", **_table(groups, key_name="group")})
        else:
            shaped = value if isinstance(value, dict | list) else {name: value}
            tables.append({"title": _label(name).capitalize(), **_table(shaped)})
    return [table for table in tables if table["rows"] or table["text"]]


def _chart_data(measures: list[dict]) -> list[dict]:
    """What the interval chart draws: each measure's model and reference estimate with its interval."""
    points = []
    for row in measures:
        entry = {"measure": row["key"], "crossed": row["crossed"]}
        for side in ("model", "reference"):
            estimate = row[side]
            if estimate and estimate["value"] is not None:
                entry[side] = {"value": estimate["value"], "ci": estimate["ci"]}
        if "model" in entry:
            points.append(entry)
    return points


def audit_evidence(audit: Audit, *, with_reviewers: bool) -> dict:
    """Everything the evidence partial shows. Reviewers' names only when `with_reviewers` (staff pages)."""
    results = _dict(audit.results)
    measures = _measures(audit, results)
    decisions = audit.decisions.select_related("reviewer") if with_reviewers else audit.decisions.all()
    return {
        "audit": audit,
        "status": audit.status,
        "approval": approval_state(audit),
        "approval_label": APPROVAL_LABELS.get(approval_state(audit), approval_state(audit)),
        "reference": audit.reference_model,
        "absolute": not audit.reference_model or results.get("reference") is False,
        "reasons": _reasons(audit),
        "measures": measures,
        "has_reference_column": any(row["reference"] is not None for row in measures),
        "chart": _chart_data(measures),
        "tables": _titled_tables(results.get("tables"), key_name="group"),
        "worst_examples": _worst_examples(results),
        "data_tables": _data_audit(results),
        "sources": _table(results.get("sources"), key_name="source") if results.get("sources") else None,
        "settings": _table(results.get("settings")) if results.get("settings") else None,
        "options": _table(audit.options) if audit.options else None,
        "error": _cell(_dict(audit.error).get("message") or audit.error) if audit.error else "",
        "decisions": [
            {
                "decision": decision.decision,
                "comment": decision.comment,
                "audit_version": decision.audit_version,
                "created_at": decision.created_at,
                "reviewer": (decision.reviewer.email or decision.reviewer.get_username()) if with_reviewers else "",
            }
            for decision in decisions
        ],
        "with_reviewers": with_reviewers,
        "finished": audit.is_finished,
    }


@login_required
def audit_detail(request, public_id: str):
    audit = tenant_object_or_404(request, audit_get, public_id, "audit")
    return render(request, "dashboard/audit_detail.html", {"evidence": audit_evidence(audit, with_reviewers=False)})


# --- the job page's card and its run form -------------------------------------------------------------------------


def _job_kind(job) -> str | None:
    """generative, classifier, or None for a model audits do not measure (the service's own rule)."""
    task = job.hyperparameters.get("task") if isinstance(job.hyperparameters, dict) else None
    return _KIND_OF_TASK.get(task or file_engine_task(job.training_file))


def _default_reference(job, policy) -> str:
    # As apps.audits.services: a fine-tune against its pretrained base, a from-scratch model against the policy's pick.
    entry = catalog_get(model_id=job.model)
    if entry is not None and entry.kind == EntryKind.PRETRAINED:
        return job.model
    return policy.reference_model


def _reference_choices(tenant, *, job=None, current: str = "") -> list[dict]:
    """Blank (absolute values), the job's pretrained base, the ready pretrained catalog models and the tenant's other
    fine-tuned models; the current value is always among them."""
    choices = [{"value": "", "label": "None: absolute values"}]
    seen = {""}

    def add(value: str, label: str) -> None:
        if value and value not in seen:
            seen.add(value)
            choices.append({"value": value, "label": label})

    if job is not None:
        entry = catalog_get(model_id=job.model)
        if entry is not None and entry.kind == EntryKind.PRETRAINED:
            add(job.model, f"{job.model} (its base model)")
    for entry in catalog_list().filter(kind=EntryKind.PRETRAINED, status=EntryStatus.READY):
        add(entry.model_id, f"{entry.model_id} (pretrained)")
    for other in fine_tuned_models(tenant=tenant)[:REFERENCE_MODELS_OFFERED]:
        if job is None or other.pk != job.pk:
            add(other.fine_tuned_model, f"{other.fine_tuned_model} ({other.public_id})")
    add(current, current)
    return choices


def job_audit_card(request, job, *, form: dict | None = None) -> dict:
    """The job page's "Bias audit" card: the latest audit, earlier versions, and the run form (with the input and
    error of a refused run when `form` is given)."""
    context = require_tenant(request)
    if job.status != JobStatus.SUCCEEDED:
        return {"audit_card": None}
    latest = latest_audit(job=job)
    # The audit whose review decides the final model's deploy may be an older one than the latest.
    gate = gating_audit(job=job)
    policy = policy_of(tenant=context.tenant)
    snapshot = policy_snapshot(policy)
    kind = _job_kind(job)
    values = (form or {}).get("values") or {
        "reference_model": _default_reference(job, policy),
        "categories": snapshot["categories"],
        "evaluation_file": "",
        "sensitive_attribute": "",
    }
    error = (form or {}).get("error")
    return {
        "audit_card": {
            "latest": latest,
            "latest_approval": APPROVAL_LABELS.get(approval_state(latest), "") if latest else "",
            "approval": approval_state(latest),
            "gate": gate if gate is not None and latest is not None and gate.pk != latest.pk else None,
            "gate_state": approval_state(gate) if gate is not None else "",
            "gate_approval": APPROVAL_LABELS.get(approval_state(gate), "") if gate is not None else "",
            "reasons": _reasons(latest) if latest else [],
            "error": _cell(_dict(latest.error).get("message") or latest.error) if latest and latest.error else "",
            "history": list(audits_of_job(tenant=context.tenant, job=job)[:AUDITS_LISTED_ON_JOB]),
            "kind": kind,
            "can_write": context.can_write,
            "references": _reference_choices(context.tenant, job=job, current=values["reference_model"]),
            "categories": [
                {"value": name, "label": _label(name), "checked": name in values["categories"]} for name in CATEGORIES
            ],
            "evaluation_files": files_evaluable(tenant=context.tenant) if kind == "classifier" else [],
            "values": values,
            "error_message": (error or {}).get("message", ""),
            "error_field": ((error or {}).get("param") or "").split(".", 1)[0],
        }
    }


@login_required
@require_POST
def job_audit_create(request, public_id: str):
    context = require_tenant(request)
    job = tenant_object_or_404(request, job_get, public_id, "job")
    post = request.POST
    values = {
        "reference_model": post.get("reference_model", "").strip(),
        "categories": [name for name in post.getlist("categories") if name],
        "evaluation_file": post.get("evaluation_file", "").strip(),
        "sensitive_attribute": post.get("sensitive_attribute", "").strip(),
    }
    if not context.can_write:
        error, status = {"message": _WRITE_REFUSED, "param": None}, 403
    else:
        try:
            audit = audit_create(
                tenant=context.tenant,
                user=request.user,
                job=job,
                reference_model=values["reference_model"],
                evaluation_file=_evaluation_file(context.tenant, values["evaluation_file"]),
                sensitive_attribute=values["sensitive_attribute"],
                categories=values["categories"],
            )
        except ApiError as exc:
            if job.status != JobStatus.SUCCEEDED:
                # The page shows no audit card for such a job: the sentence goes out as a message instead.
                messages.error(request, str(exc.detail))
                return redirect("dashboard:job-detail", public_id=job.public_id)
            error, status = {"message": str(exc.detail), "param": exc.param}, exc.status_code
        else:
            messages.success(request, f"Bias audit {audit.public_id} (version {audit.version}) queued.")
            return redirect(reverse("dashboard:job-detail", args=[job.public_id]) + "#audit-card")
    from apps.dashboard.views_jobs import job_page

    return job_page(request, job, audit_form={"values": values, "error": error}, status=status)


def _evaluation_file(tenant, public_id: str):
    if not public_id:
        return None
    file = file_get(tenant=tenant, public_id=public_id)
    if file is None:
        raise ApiError("No such file.", code="not_found", param="evaluation_file", status_code=404)
    return file


# --- the team's audit policy (a card on the settings page) --------------------------------------------------------


def audit_policy_card(context, *, form: dict | None = None) -> dict:
    """The settings page's "Audit policy" card, as saved or (after a refused save) as typed."""
    policy = policy_of(tenant=context.tenant)
    snapshot = policy_snapshot(policy)
    values = (form or {}).get("values") or {
        "audit_after_training": policy.audit_after_training,
        "flag_only_significant": policy.flag_only_significant,
        "approval": policy.approval,
        "thresholds": {name: _short(value) for name, value in (policy.thresholds or {}).items()},
        "measures": snapshot["measures"],
        "categories": snapshot["categories"],
        "reference_model": policy.reference_model,
    }
    error = (form or {}).get("error")
    error_param = (error or {}).get("param") or ""
    return {
        "audit_policy": {
            "can_manage": context.can_manage,
            "values": values,
            "approval_rules": [{"value": value, "label": APPROVAL_RULE_LABELS[value]} for value in ApprovalRule.values],
            "thresholds": [
                {
                    "family": family,
                    "label": _label(family),
                    "hint": FAMILY_HINTS.get(family, ""),
                    "default": _short(default),
                    "value": values["thresholds"].get(family, ""),
                    "invalid": error_param == f"thresholds.{family}",
                    "audited": family in values["measures"],
                }
                for family, default in DEFAULT_THRESHOLDS.items()
            ],
            "categories": [
                {"value": name, "label": _label(name), "checked": name in values["categories"]} for name in CATEGORIES
            ],
            "references": _reference_choices(context.tenant, current=values["reference_model"]),
            "updated_at": policy.updated_at if policy.pk else None,
            "error_message": (error or {}).get("message", ""),
            "error_field": error_param.split(".", 1)[0],
        }
    }


class _FormError(Exception):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message, self.param = message, param


def _threshold(raw: str):
    """A typed threshold: a number when it reads as one, else the text itself, so the service's sentence names it."""
    try:
        return float(raw)
    except ValueError:
        return raw


@login_required
def audit_policy_save(request):
    context = require_tenant(request)
    if request.method != "POST":
        return redirect(reverse("dashboard:settings") + "#audit-policy")
    # Like the settings page's other writes: not found for a role that cannot manage the team.
    if not context.can_manage:
        raise Http404("Only owners and admins change the audit policy.")
    post = request.POST
    typed_thresholds = {family: post.get(f"threshold-{family}", "").strip() for family in MEASURE_FAMILIES}
    values = {
        "audit_after_training": bool(post.get("audit_after_training")),
        "flag_only_significant": bool(post.get("flag_only_significant")),
        "approval": post.get("approval", ""),
        "thresholds": {family: text for family, text in typed_thresholds.items() if text},
        "measures": [name for name in post.getlist("measures") if name],
        "categories": [name for name in post.getlist("categories") if name],
        "reference_model": post.get("reference_model", "").strip(),
    }
    try:
        for name in ("measures", "categories"):
            if not values[name]:
                raise _FormError(f"Tick at least one of the {name} to audit.", name)
        audit_policy_update(
            tenant=context.tenant,
            user=request.user,
            audit_after_training=values["audit_after_training"],
            flag_only_significant=values["flag_only_significant"],
            approval=values["approval"],
            # Blank means the platform default, which then follows future changes of the default.
            thresholds={family: _threshold(text) for family, text in values["thresholds"].items()},
            # Everything ticked is stored as "all", so a measure or category added later is audited too.
            measures=[] if set(values["measures"]) == set(MEASURE_FAMILIES) else values["measures"],
            categories=[] if set(values["categories"]) == set(CATEGORIES) else values["categories"],
            reference_model=values["reference_model"],
        )
    except _FormError as exc:
        error, status = {"message": exc.message, "param": exc.param}, 400
    except ApiError as exc:
        error, status = {"message": str(exc.detail), "param": exc.param}, exc.status_code
    else:
        messages.success(request, "Audit policy saved: it applies to audits that finish from now on.")
        return redirect(reverse("dashboard:settings") + "#audit-policy")
    from apps.dashboard.views_workspace import settings_render

    return settings_render(request, context, audit_policy_form={"values": values, "error": error}, status=status)


# --- staff review -------------------------------------------------------------------------------------------------


def _require_reviewer(request) -> None:
    # The review pages do not exist for anyone but platform staff (tenant owners included).
    if not is_reviewer(request.user):
        raise Http404("No such page.")


@login_required
def reviews(request):
    _require_reviewer(request)
    tab = "all" if request.GET.get("tab") == "all" else "pending"
    paginator = Paginator(review_queue(pending_only=tab == "pending"), REVIEWS_PER_PAGE)
    page = paginator.get_page(request.GET.get("page"))
    rows = []
    for audit in page:
        state = approval_state(audit)
        rows.append(
            {
                "audit": audit,
                "reasons": len(audit.reasons) if isinstance(audit.reasons, list) else 0,
                "approval": state,
                "approval_label": APPROVAL_LABELS.get(state, state),
            }
        )
    return render(request, "dashboard/reviews.html", {"tab": tab, "page": page, "rows": rows})


def _review_context(request, audit: Audit, *, comment: str = "", error: str = "") -> dict:
    # Only the audit that decides its model's deploy takes a decision (the service's own rule).
    gate = gating_audit(job=audit.job, checkpoint_id=audit.checkpoint_id)
    own_team = membership_get(user=request.user, tenant_id=audit.tenant_id) is not None
    return {
        "evidence": audit_evidence(audit, with_reviewers=True),
        "tenant": audit.tenant,
        "gate": gate,
        "own_team": own_team,
        "reviewable": gate is not None and gate.pk == audit.pk,
        "comment": comment,
        "error": error,
    }


def _version(raw: str):
    try:
        return int(raw)
    except ValueError:
        return None


@login_required
def review_detail(request, public_id: str):
    _require_reviewer(request)
    audit = review_audit_get(public_id=public_id)
    if audit is None:
        raise Http404("No such audit.")
    if request.method != "POST":
        return render(request, "dashboard/review_detail.html", _review_context(request, audit))
    comment = request.POST.get("comment", "")
    try:
        decided = review_decide(
            reviewer=request.user,
            audit=audit,
            decision=request.POST.get("decision", ""),
            comment=comment,
            audit_version=_version(request.POST.get("audit_version", "")),
        )
    except ApiError as exc:
        context = _review_context(request, audit, comment=comment, error=str(exc.detail))
        return render(request, "dashboard/review_detail.html", context, status=exc.status_code)
    verb = "approved" if decided.decision == Decision.APPROVE else "rejected"
    messages.success(
        request, f"Audit {audit.public_id} (version {decided.audit_version}) of {audit.tenant.name} {verb}."
    )
    return redirect("dashboard:reviews")
