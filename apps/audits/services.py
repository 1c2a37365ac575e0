"""Writes for bias audits: a tenant's policy, creating an audit (on demand, or after training when the policy asks),
running it on a `gpu` worker (workers.ml.audit measures the model and its reference), judging it by the policy, the
review decisions of platform staff, and the deploy gate that reads them.
"""

import logging
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Max, Q
from django.utils import timezone

from apps.catalog.models import EntryKind
from apps.catalog.selectors import catalog_entry_ready, catalog_get, catalog_model_folder
from apps.core.api.errors import ApiError
from apps.core.storage import local_copy_of_prefix
from apps.datasets.models import File, FileStatus
from apps.datasets.services import file_local_path
from apps.jobs.models import FineTuningJob, JobCheckpoint, JobPhase, JobStatus
from apps.jobs.services import file_engine_task, job_event_record
from apps.tenancy.models import Membership, Tenant

from .models import (
    Audit,
    AuditKind,
    AuditPolicy,
    AuditStatus,
    AuditTrigger,
    Decision,
    ReviewDecision,
)
from .policy import (
    CATEGORIES,
    approval_required,
    checked_policy_fields,
    crossed_thresholds,
    policy_of,
    policy_snapshot,
)

logger = logging.getLogger(__name__)

# How much of a dataset an audit reads: enough for stable group statistics, bounded for time and memory.
MAX_AUDIT_EXAMPLES = 2_000
MAX_TRAINING_TEXTS = 5_000
DEFAULT_PROMPTS_PER_GROUP = 20
# A queued audit's message is sent again after this long (it waits behind training on the `gpu` queue meanwhile).
AUDIT_RESEND_SECONDS = 1_800
MAX_PROMPTS_PER_GROUP = 200
_KIND_OF_TASK = {"causal_lm": AuditKind.GENERATIVE, "classification": AuditKind.CLASSIFIER}


# --- policy ------------------------------------------------------------------------------------------------------


def audit_policy_update(*, tenant: Tenant, user: AbstractBaseUser | None, **fields) -> AuditPolicy:
    checked = checked_policy_fields(
        thresholds=fields.pop("thresholds", None),
        measures=fields.pop("measures", None),
        categories=fields.pop("categories", None),
        approval=fields.pop("approval", None),
        audit_after_training=fields.pop("audit_after_training", None),
        flag_only_significant=fields.pop("flag_only_significant", None),
    )
    reference = fields.pop("reference_model", None)
    if fields:
        name = sorted(fields)[0]
        raise ApiError(f"Unknown policy field: {name}.", code="unknown_parameter", param=name)
    if reference is not None:
        if not isinstance(reference, str):
            raise ApiError("reference_model must be a string (blank for none).", param="reference_model")
        if reference:
            _reference_target(tenant, reference, task=None)
        checked["reference_model"] = reference
    with transaction.atomic():
        policy, _ = AuditPolicy.objects.select_for_update().get_or_create(tenant=tenant)
        for name, value in checked.items():
            setattr(policy, name, value)
        policy.updated_by = user
        policy.save()
    return policy


# --- creating --------------------------------------------------------------------------------------------------


def _job_task(job: FineTuningJob) -> str | None:
    return job.hyperparameters.get("task") or file_engine_task(job.training_file)


def _reference_target(tenant: Tenant, reference: str, *, task: str | None) -> str:
    """Checks a reference: a ready pretrained catalog model, or a succeeded job of this tenant (by id or model
    name). Returns the reference as stored."""
    entry = catalog_get(model_id=reference)
    if entry is not None:
        if entry.kind != EntryKind.PRETRAINED or not catalog_entry_ready(entry):
            raise ApiError(
                f"{reference} has no trained weights to compare with: pick a pretrained catalog model or one of "
                "your fine-tuned models.",
                param="reference_model",
            )
        if task is not None and task not in entry.tasks:
            raise ApiError(
                f"{reference} does not do {task}; it cannot be this model's reference.", param="reference_model"
            )
        return reference
    jobs = FineTuningJob.objects.for_tenant(tenant).filter(status=JobStatus.SUCCEEDED)
    job = jobs.filter(public_id=reference).first() or jobs.filter(fine_tuned_model=reference).first()
    if job is None or not job.model_storage_prefix:
        raise ApiError(
            f"No such model to compare with: '{reference}'.", code="not_found", param="reference_model", status_code=404
        )
    return reference


def _default_reference(job: FineTuningJob, policy: AuditPolicy) -> str:
    """A fine-tune is compared with the base it started from; a from-scratch model with the tenant's chosen
    reference, or with nothing (absolute values)."""
    entry = catalog_get(model_id=job.model)
    if entry is not None and entry.kind == EntryKind.PRETRAINED:
        return job.model
    return policy.reference_model


def _checked_evaluation_file(tenant: Tenant, file: File | None, sensitive_attribute: str) -> None:
    if file is None:
        if sensitive_attribute:
            raise ApiError(
                "sensitive_attribute needs an evaluation_file that has that column.", param="evaluation_file"
            )
        return
    if file.tenant_id != tenant.pk:
        raise ApiError("No such file.", code="not_found", param="evaluation_file", status_code=404)
    if file.status != FileStatus.PROCESSED:
        raise ApiError(f"File {file.public_id} is {file.status}; audit on a processed file.", param="evaluation_file")
    if not sensitive_attribute:
        raise ApiError(
            "Name the column of evaluation_file that holds each example's group (sensitive_attribute).",
            param="sensitive_attribute",
        )
    from workers.ml.data.formats import UnsupportedFormat, detect_columns, detect_format

    path = str(file_local_path(file))
    try:
        columns, _, _ = detect_columns(path, filename=file.filename, fmt=detect_format(path, filename=file.filename))
    except UnsupportedFormat as exc:
        raise ApiError(f"evaluation_file cannot be read as a table: {exc}", param="evaluation_file") from exc
    if sensitive_attribute not in columns:
        raise ApiError(
            f"evaluation_file has no column '{sensitive_attribute}'; it has: {', '.join(columns)}.",
            param="sensitive_attribute",
        )


def _whole(value, param: str, *, low: int, high: int, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(f"{param} must be a whole number from {low} to {high}.", param=param)
    return value


def audit_create(
    *,
    tenant: Tenant,
    user: AbstractBaseUser | None,
    job: FineTuningJob,
    checkpoint: JobCheckpoint | None = None,
    reference_model: str | None = None,
    evaluation_file: File | None = None,
    sensitive_attribute: str = "",
    categories: list | None = None,
    max_prompts_per_group: int | None = None,
    seed: int | None = None,
    trigger: str = AuditTrigger.ON_DEMAND,
) -> Audit:
    """Queues an audit of a succeeded job's model (or one of its checkpoints) for a `gpu` worker."""
    if job.tenant_id != tenant.pk:
        raise ApiError("No such job.", code="not_found", status_code=404)
    if job.status != JobStatus.SUCCEEDED or not job.model_storage_prefix:
        raise ApiError(f"Job {job.public_id} has no model to audit (status: {job.status}).", code="model_not_ready")
    if checkpoint is not None and checkpoint.job_id != job.pk:
        raise ApiError("No such checkpoint of this job.", code="not_found", param="checkpoint", status_code=404)
    task = _job_task(job)
    kind = _KIND_OF_TASK.get(task)
    if kind is None:
        raise ApiError(
            f"Job {job.public_id} trained a {task} model; audits measure generative and classification models.",
            code="audit_not_supported",
        )
    policy = policy_of(tenant=tenant)
    if reference_model is None:
        reference = _default_reference(job, policy)
        if reference and reference == policy.reference_model:
            # The team's reference for from-scratch models may not suit this one (a classifier for a generative
            # model, or deleted since): then this audit reports absolute values rather than not running at all.
            try:
                _reference_target(tenant, reference, task=task)
            except ApiError:
                reference = ""
    else:
        reference = reference_model
    if not isinstance(reference, str):
        raise ApiError("reference_model must be a string (blank for absolute values).", param="reference_model")
    if reference:
        _reference_target(tenant, reference, task=task)
    if kind == AuditKind.GENERATIVE and (evaluation_file is not None or sensitive_attribute):
        raise ApiError("evaluation_file and sensitive_attribute are for classifier audits.", param="evaluation_file")
    _checked_evaluation_file(tenant, evaluation_file, sensitive_attribute)
    chosen = policy_snapshot(policy)["categories"] if categories is None else categories
    if not isinstance(chosen, list) or not chosen or any(name not in CATEGORIES for name in chosen):
        raise ApiError(f"categories must be a non-empty list drawn from: {', '.join(CATEGORIES)}.", param="categories")
    options = {
        "categories": list(dict.fromkeys(chosen)),
        "max_prompts_per_group": _whole(
            max_prompts_per_group,
            "max_prompts_per_group",
            low=1,
            high=MAX_PROMPTS_PER_GROUP,
            default=DEFAULT_PROMPTS_PER_GROUP,
        ),
        "seed": _whole(seed, "seed", low=0, high=2**31 - 1, default=0),
    }
    with transaction.atomic():
        locked = FineTuningJob.objects.select_for_update().get(pk=job.pk)
        version = (Audit.objects.filter(job=locked).aggregate(latest=Max("version"))["latest"] or 0) + 1
        audit = Audit.objects.create(
            tenant=tenant,
            job=locked,
            checkpoint=checkpoint,
            version=version,
            kind=kind,
            trigger=trigger,
            reference_model=reference,
            evaluation_file=evaluation_file,
            sensitive_attribute=sensitive_attribute,
            options=options,
            created_by=user,
        )
        job_event_record(
            job=locked,
            message=f"Bias audit {audit.public_id} (version {version}) queued"
            + (f", compared with {reference}" if reference else ", absolute values (no reference)"),
            data={"audit": audit.public_id, "version": version},
        )
        if trigger == AuditTrigger.AFTER_TRAINING:
            FineTuningJob.objects.filter(pk=locked.pk).update(phase=JobPhase.AUDITING)
        transaction.on_commit(lambda: _send_audit(audit.pk))
    return audit


def _send_audit(audit_pk: int) -> None:
    from workers.tasks.training import run_bias_audit

    try:
        run_bias_audit.delay(audit_pk)
    except Exception:
        # The broker is down: the recovery loop (audits_recover) sends queued audits again.
        logger.warning("audit %s: could not be sent; the recovery loop will", audit_pk)
        return
    Audit.objects.filter(pk=audit_pk).update(sent_at=timezone.now())


def audits_after_job_succeeded(job: FineTuningJob) -> None:
    """In the transaction that records a job's success: an audit when the tenant's policy asks for one after
    training. A study's trial is audited when promoted, not every trial."""
    policy = policy_of(tenant=job.tenant)
    if not policy.audit_after_training or _KIND_OF_TASK.get(_job_task(job)) is None:
        return
    if FineTuningJob.objects.filter(pk=job.pk, study_trial__isnull=False).exists():
        return
    try:
        audit_create(tenant=job.tenant, user=None, job=job, trigger=AuditTrigger.AFTER_TRAINING)
    except ApiError as exc:
        # The job has succeeded whatever the audit's fate: say why none runs (the deploy gate keeps refusing).
        job_event_record(job=job, level="warn", message=f"The bias audit after training could not start: {exc.detail}")


def audits_recover() -> list[str]:
    """Queued audits never sent (the broker was down) or sent long ago (the message was lost with a Redis restart)
    are sent again; a duplicate is harmless, the worker claims an audit once."""
    resend_before = timezone.now() - timedelta(seconds=AUDIT_RESEND_SECONDS)
    waiting = Audit.objects.filter(status=AuditStatus.QUEUED).filter(
        Q(sent_at__isnull=True, created_at__lt=timezone.now() - timedelta(seconds=5)) | Q(sent_at__lt=resend_before)
    )
    sent = []
    for audit in waiting[:20]:
        _send_audit(audit.pk)
        sent.append(audit.public_id)
    return sent


# --- running -------------------------------------------------------------------------------------------------


def _claim(audit_id: int) -> Audit | None:
    with transaction.atomic():
        audit = Audit.objects.select_for_update().filter(pk=audit_id, status=AuditStatus.QUEUED).first()
        if audit is None:
            return None
        audit.status, audit.started_at = AuditStatus.RUNNING, timezone.now()
        audit.save(update_fields=["status", "started_at"])
    return Audit.objects.select_related("job__tenant", "job__training_file", "checkpoint", "evaluation_file").get(
        pk=audit.pk
    )


def _model_folder(audit: Audit) -> Path:
    job = audit.job
    root = Path(settings.WORK_DIR) / "models" / str(job.tenant_id)
    if audit.checkpoint is not None:
        return local_copy_of_prefix(
            audit.checkpoint.storage_prefix, root / f"{job.public_id}-{audit.checkpoint.public_id}"
        )
    return local_copy_of_prefix(job.model_storage_prefix, root / job.public_id)


def _reference_folder(audit: Audit) -> Path | None:
    if not audit.reference_model:
        return None
    entry = catalog_get(model_id=audit.reference_model)
    if entry is not None:
        return catalog_model_folder(entry)
    jobs = FineTuningJob.objects.for_tenant(audit.tenant_id).filter(status=JobStatus.SUCCEEDED)
    job = (
        jobs.filter(public_id=audit.reference_model).first()
        or jobs.filter(fine_tuned_model=audit.reference_model).first()
    )
    if job is None:
        raise ApiError(f"The reference {audit.reference_model} is gone.", code="reference_not_found")
    return local_copy_of_prefix(
        job.model_storage_prefix, Path(settings.WORK_DIR) / "models" / str(job.tenant_id) / job.public_id
    )


def _file_texts(file: File, limit: int) -> tuple[list[str], list[str] | None]:
    """The texts (and labels, for labelled data) of a file, as training saw them."""
    from workers.ml.data.examples import Example, example_text
    from workers.ml.data.formats import ColumnMapping, iter_examples

    mapping = ColumnMapping(**file.column_mapping) if file.column_mapping else None
    texts, labels = [], []
    for example in iter_examples(str(file_local_path(file)), filename=file.filename, column_mapping=mapping):
        if not isinstance(example, Example):
            continue
        texts.append(example_text(example))
        labels.append(example.fields.get("label"))
        if len(texts) >= limit:
            break
    return texts, (labels if any(label is not None for label in labels) else None)


def _labelled_examples(audit: Audit) -> list[dict]:
    """The evaluation file's rows as {text, label, group}, the group read from the sensitive-attribute column."""
    import dataclasses

    from workers.ml.data.examples import DatasetTask, Example
    from workers.ml.data.formats import ColumnMapping, detect_columns, detect_format, iter_examples

    file = audit.evaluation_file
    path = str(file_local_path(file))
    fmt = detect_format(path, filename=file.filename)
    if file.column_mapping:
        mapping = ColumnMapping(**{key: value for key, value in file.column_mapping.items() if value})
    else:
        _, mapping, _ = detect_columns(path, filename=file.filename, fmt=fmt)
    mapping = dataclasses.replace(mapping, sensitive=audit.sensitive_attribute)
    examples = []
    for example in iter_examples(path, filename=file.filename, fmt=fmt, column_mapping=mapping):
        if not isinstance(example, Example) or example.task != DatasetTask.CLASSIFICATION:
            continue
        if example.fields.get("sensitive"):
            fields = example.fields
            examples.append({"text": fields["text"], "label": fields["label"], "group": fields["sensitive"]})
        if len(examples) >= MAX_AUDIT_EXAMPLES:
            break
    return examples


def audit_run(*, audit_id: int) -> None:
    """Runs a queued audit on this worker and records its verdict; a failure is recorded, never raised."""
    audit = _claim(audit_id)
    if audit is None:
        return
    try:
        results = _measure(audit)
    except Exception as exc:
        logger.exception("audit %s failed", audit.public_id)
        _finish(audit, status=AuditStatus.FAILED, error={"code": "audit_failed", "message": str(exc)[:2000]})
        return
    snapshot = policy_snapshot(policy_of(tenant=audit.job.tenant))
    reasons = crossed_thresholds(results, snapshot)
    flagged = bool(reasons)
    _finish(
        audit,
        status=AuditStatus.FLAGGED if flagged else AuditStatus.PASSED,
        results=results,
        reasons=[reason.to_json() for reason in reasons],
        policy=snapshot,
        approval_required=approval_required(snapshot, flagged=flagged),
    )


def _measure(audit: Audit) -> dict:
    from workers.ml.audit import AuditSpec, run_audit

    texts, labels = _file_texts(audit.job.training_file, MAX_TRAINING_TEXTS)
    reference = _reference_folder(audit)
    spec = AuditSpec(
        kind=audit.kind,
        model_dir=str(_model_folder(audit)),
        reference_dir=str(reference) if reference is not None else None,
        categories=tuple(audit.options["categories"]),
        max_prompts_per_group=audit.options["max_prompts_per_group"],
        seed=audit.options["seed"],
        examples=_labelled_examples(audit) if audit.evaluation_file_id else None,
        training_texts=texts,
        training_labels=labels,
    )
    return run_audit(spec)


def _finish(audit: Audit, *, status: str, **fields) -> None:
    with transaction.atomic():
        Audit.objects.filter(pk=audit.pk).update(status=status, finished_at=timezone.now(), **fields)
        audit.refresh_from_db()
        latest = Audit.objects.filter(job=audit.job).order_by("-version").first()
        if latest is not None and latest.pk == audit.pk:
            phase = JobPhase.AWAITING_REVIEW if audit.approval_required else JobPhase.DONE
            FineTuningJob.objects.filter(pk=audit.job_id, status=JobStatus.SUCCEEDED).update(phase=phase)
        verdict = {
            AuditStatus.PASSED: "passed",
            AuditStatus.FLAGGED: f"flagged ({len(audit.reasons)} thresholds crossed)",
            AuditStatus.FAILED: "failed: " + ((audit.error or {}).get("message") or ""),
        }[status]
        job_event_record(
            job=audit.job,
            level="warn" if status != AuditStatus.PASSED else "info",
            message=f"Bias audit {audit.public_id} {verdict}"
            + ("; a reviewer's approval is needed before deploying" if audit.approval_required else ""),
            data={"audit": audit.public_id, "status": status},
        )


# --- review ------------------------------------------------------------------------------------------------------


def is_reviewer(user) -> bool:
    return bool(user is not None and getattr(user, "is_authenticated", False) and user.is_staff and user.is_active)


def review_decide(*, reviewer, audit: Audit, decision: str, comment: str, audit_version) -> ReviewDecision:
    """Records a staff reviewer's decision on the audit version they saw, which must be the one that decides its
    model (selectors.gating_audit). Nobody reviews their own team's model."""
    from .selectors import gating_audit

    if not is_reviewer(reviewer):
        raise ApiError("Not found.", code="not_found", status_code=404)
    if Membership.objects.filter(tenant_id=audit.tenant_id, user=reviewer).exists():
        raise ApiError(
            "You are a member of the team that trained this model: another reviewer must decide.",
            code="own_team_review",
            status_code=403,
        )
    if decision not in Decision.values:
        raise ApiError(f"decision must be one of {', '.join(Decision.values)}.", param="decision")
    if not isinstance(comment, str) or not comment.strip():
        raise ApiError("A decision needs a comment saying why.", code="missing_comment", param="comment")
    if isinstance(audit_version, bool) or not isinstance(audit_version, int):
        raise ApiError("audit_version (the version you reviewed) is required.", param="audit_version")
    with transaction.atomic():
        audit = Audit.objects.select_for_update().get(pk=audit.pk)
        if not audit.is_finished or audit.status == AuditStatus.FAILED:
            raise ApiError(f"Audit {audit.public_id} is {audit.status}: there is nothing to review.", param="audit")
        gate = gating_audit(job=audit.job, checkpoint_id=audit.checkpoint_id)
        if gate is None or audit_version != audit.version or gate.pk != audit.pk:
            current = gate.version if gate is not None else audit.version
            raise ApiError(
                f"You reviewed version {audit_version}, but the audit that decides this model is version "
                f"{current}: review that one.",
                code="audit_version_stale",
                param="audit_version",
                status_code=409,
            )
        recorded = ReviewDecision.objects.create(
            audit=audit, audit_version=audit.version, decision=decision, comment=comment.strip(), reviewer=reviewer
        )
        FineTuningJob.objects.filter(pk=audit.job_id, phase=JobPhase.AWAITING_REVIEW).update(phase=JobPhase.DONE)
        job_event_record(
            job=audit.job,
            message=f"Bias audit {audit.public_id} (version {audit.version}) "
            + ("approved" if decision == Decision.APPROVE else "rejected")
            + f" by a reviewer: {recorded.comment}",
            data={"audit": audit.public_id, "decision": decision},
        )
    return recorded


# --- the deploy gate -------------------------------------------------------------------------------------------


def audit_deploy_refusal(job: FineTuningJob) -> str | None:
    """Why `job`'s model may not be deployed yet under its tenant's audit policy, or None.

    The final model's audits decide (a clean checkpoint's audit does not clear the final model): the newest audit
    that required approval must carry an approval as its latest decision, whatever audits came after it; and when
    the policy audits after training, a finished, successful audit must exist."""
    from .selectors import gating_audit

    policy = policy_of(tenant=job.tenant)
    audits = Audit.objects.filter(job=job, checkpoint__isnull=True)
    gate = gating_audit(job=job)
    if gate is not None:
        decision = gate.decisions.order_by("-id").first()
        if decision is None:
            return (
                f"Job {job.public_id}'s bias audit {gate.public_id} (version {gate.version}) is awaiting a "
                "reviewer's approval."
            )
        if decision.decision == Decision.REJECT:
            return f"Job {job.public_id}'s bias audit was rejected by a reviewer: {decision.comment}"
        return None
    if not policy.audit_after_training:
        return None
    if audits.filter(status__in=[AuditStatus.PASSED, AuditStatus.FLAGGED]).exists():
        return None
    latest = audits.order_by("-version").first()
    if latest is None:
        return f"Job {job.public_id} must pass its bias audit first; none has run (POST …/audits)."
    if latest.status == AuditStatus.FAILED:
        return f"Job {job.public_id}'s bias audit {latest.public_id} failed; run it again before deploying."
    return f"Job {job.public_id}'s bias audit {latest.public_id} is still {latest.status}."
