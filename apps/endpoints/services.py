"""Writes of endpoints: deploy, update (a new model is a new revision, hot-swapped by serving), stop, start,
delete, status from serving's reports, and the usage row of each inference request.

Every write that changes what serving should load publishes the endpoint to the registry once its transaction
commits (apps.endpoints.registry).
"""

import re
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction

from apps.catalog.selectors import catalog_get
from apps.core.api.errors import ApiError
from apps.jobs.models import FineTuningJob, JobCheckpoint, JobStatus
from apps.jobs.services import file_engine_task
from apps.tenancy.models import ApiKey, Tenant
from apps.tenancy.selectors import active_api_keys_for_tenant

from .models import Endpoint, EndpointRequest, EndpointStatus, EndpointTask
from .registry import instance_reports, registry_publish, registry_remove

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
MAX_REPLICAS = 16
MAX_IDLE_UNLOAD_SECONDS = 7 * 86_400
DEFAULT_IDLE_UNLOAD_SECONDS = 900
_UNSET = object()


def deploy_gate(job: FineTuningJob) -> str | None:
    """Whether `job`'s model may be deployed: None allows it, a sentence refuses it (a 400 with that message).

    A study's trial must be promoted first, and the tenant's audit policy may ask for a passed audit or a reviewer's
    approval (apps.audits.services.audit_deploy_refusal)."""
    from apps.audits.services import audit_deploy_refusal
    from apps.tuning.services import job_is_unpromoted_trial

    if job_is_unpromoted_trial(job):
        return (
            f"Job {job.public_id} is a trial of a hyperparameter study; promote it from the study "
            "(POST /v1/tuning/studies/{study}/trials/{number}/promote) to deploy its model."
        )
    return audit_deploy_refusal(job)


def _not_found(what: str, value: str, param: str) -> ApiError:
    return ApiError(f"No such {what}: '{value}'.", code="not_found", param=param, status_code=404)


def _job_for_model(tenant: Tenant, model: str) -> FineTuningJob:
    """A job of this tenant named by its id or its fine-tuned model name; another tenant's is simply not found."""
    if not isinstance(model, str) or not model:
        raise ApiError("Missing required parameter: 'model'.", code="missing_required_parameter", param="model")
    jobs = FineTuningJob.objects.for_tenant(tenant).select_related("training_file", "tenant")
    job = jobs.filter(public_id=model).first() or jobs.filter(fine_tuned_model=model).first()
    if job is None:
        raise _not_found("model", model, "model")
    if job.status != JobStatus.SUCCEEDED or not job.model_storage_prefix:
        raise ApiError(
            f"Job {job.public_id} has no model to deploy (status: {job.status}); deploy a succeeded job.",
            code="model_not_ready",
            param="model",
        )
    if (refusal := deploy_gate(job)) is not None:
        raise ApiError(refusal, code="deploy_not_allowed", param="model")
    return job


def _checkpoint_of(job: FineTuningJob, checkpoint_id) -> JobCheckpoint | None:
    if checkpoint_id in (None, ""):
        return None
    if not isinstance(checkpoint_id, str):
        raise ApiError("checkpoint must be a checkpoint id (ftckpt-...).", param="checkpoint")
    checkpoint = JobCheckpoint.objects.filter(tenant_id=job.tenant_id, job=job, public_id=checkpoint_id).first()
    if checkpoint is None:
        raise _not_found("checkpoint of this model", checkpoint_id, "checkpoint")
    if not checkpoint.storage_prefix:
        raise ApiError(f"Checkpoint {checkpoint_id} has no stored files to serve.", param="checkpoint")
    return checkpoint


def _task_of(job: FineTuningJob) -> str:
    task = job.hyperparameters.get("task") or file_engine_task(job.training_file)
    return task if task in EndpointTask.values else EndpointTask.CAUSAL_LM


def _checked_name(tenant: Tenant, name, *, exclude_pk: int | None = None) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ApiError(
            "name must be 1 to 64 lowercase letters, digits, '-' or '_', starting with a letter or digit.",
            param="name",
        )
    # The name is what callers put in `model`: it must not read as an endpoint id or a catalog model.
    if name.startswith("ep-") or catalog_get(model_id=name) is not None:
        raise ApiError(f"'{name}' is reserved (an endpoint id or a catalog model); pick another name.", param="name")
    taken = Endpoint.objects.for_tenant(tenant).filter(name=name)
    if exclude_pk is not None:
        taken = taken.exclude(pk=exclude_pk)
    if taken.exists():
        raise ApiError(f"An endpoint named '{name}' already exists.", code="endpoint_name_taken", param="name")
    return name


_GENERATION_DEFAULT_BOUNDS = {"max_tokens": (1, None), "temperature": (0.0, 2.0), "top_p": (0.0, 1.0)}


def _checked_generation_defaults(value, *, base: dict) -> dict:
    if value is None:
        return base
    if not isinstance(value, dict):
        raise ApiError("generation_defaults must be an object.", param="generation_defaults")
    merged = dict(base)
    for key, raw in value.items():
        if key not in _GENERATION_DEFAULT_BOUNDS:
            raise ApiError(
                f"generation_defaults.{key} is not a setting; use max_tokens, temperature or top_p.",
                param=f"generation_defaults.{key}",
            )
        low, high = _GENERATION_DEFAULT_BOUNDS[key]
        high = settings.INFERENCE_MAX_TOKENS if key == "max_tokens" else high
        is_number = isinstance(raw, int | float) and not isinstance(raw, bool)
        if not is_number or (key == "max_tokens" and not isinstance(raw, int)) or not low <= raw <= high:
            raise ApiError(
                f"generation_defaults.{key} must be a number from {low} to {high}.",
                param=f"generation_defaults.{key}",
            )
        merged[key] = raw
    return merged


@dataclass(frozen=True)
class Scale:
    min_replicas: int
    max_replicas: int
    idle_unload_seconds: int


def _whole(value, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(f"{name} must be a whole number from {low} to {high}.", param=name)
    return value


def _checked_scale(*, min_replicas, max_replicas, idle_unload_seconds, current: Scale) -> Scale:
    scale = Scale(
        min_replicas=current.min_replicas if min_replicas is None else _whole(min_replicas, "min_replicas", 0, 16),
        max_replicas=current.max_replicas
        if max_replicas is None
        else _whole(max_replicas, "max_replicas", 1, MAX_REPLICAS),
        idle_unload_seconds=current.idle_unload_seconds
        if idle_unload_seconds is None
        else _whole(idle_unload_seconds, "idle_unload_seconds", 0, MAX_IDLE_UNLOAD_SECONDS),
    )
    if scale.min_replicas > scale.max_replicas:
        raise ApiError("min_replicas may not exceed max_replicas.", param="min_replicas")
    return scale


def _status_after_registering(endpoint: Endpoint) -> str:
    """With min_replicas 0 serving loads the model on the first request, so a registered endpoint is ready at once
    (a failed load then turns it failed); with warm replicas it is deploying until one reports ready."""
    return EndpointStatus.READY if endpoint.min_replicas == 0 else EndpointStatus.DEPLOYING


def _publish_on_commit(endpoint: Endpoint) -> None:
    pk = endpoint.pk
    transaction.on_commit(lambda: registry_publish(endpoint_pk=pk))


@transaction.atomic
def endpoint_deploy(
    *,
    tenant: Tenant,
    user: AbstractBaseUser | None,
    name,
    model,
    checkpoint=None,
    generation_defaults=None,
    min_replicas=None,
    max_replicas=None,
    idle_unload_seconds=None,
) -> Endpoint:
    job = _job_for_model(tenant, model)
    scale = _checked_scale(
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        idle_unload_seconds=idle_unload_seconds,
        current=Scale(min_replicas=0, max_replicas=1, idle_unload_seconds=DEFAULT_IDLE_UNLOAD_SECONDS),
    )
    endpoint = Endpoint(
        tenant=tenant,
        name=_checked_name(tenant, name),
        job=job,
        checkpoint=_checkpoint_of(job, checkpoint),
        task=_task_of(job),
        generation_defaults=_checked_generation_defaults(
            generation_defaults, base={"max_tokens": 128, "temperature": 0.7, "top_p": 1.0}
        ),
        min_replicas=scale.min_replicas,
        max_replicas=scale.max_replicas,
        idle_unload_seconds=scale.idle_unload_seconds,
        created_by=user if user is not None and user.is_authenticated else None,
    )
    endpoint.status = _status_after_registering(endpoint)
    try:
        with transaction.atomic():
            endpoint.save()
    except IntegrityError:  # the same name created at the same moment by another request
        raise ApiError(
            f"An endpoint named '{name}' already exists.", code="endpoint_name_taken", param="name"
        ) from None
    _publish_on_commit(endpoint)
    return endpoint


@transaction.atomic
def endpoint_update(
    *,
    tenant: Tenant,
    endpoint: Endpoint,
    name=None,
    model=None,
    checkpoint=_UNSET,
    generation_defaults=None,
    min_replicas=None,
    max_replicas=None,
    idle_unload_seconds=None,
) -> Endpoint:
    """A new model or checkpoint is a new revision: serving loads it beside the old one and switches when it is
    ready (hot swap), so callers see no gap. Other changes keep the revision."""
    if endpoint.tenant_id != tenant.pk:
        raise _not_found("endpoint", endpoint.public_id, "endpoint")
    # of=self: PostgreSQL cannot lock the nullable side (checkpoint) of the outer join select_related makes.
    endpoint = Endpoint.objects.select_for_update(of=("self",)).select_related("job", "checkpoint").get(pk=endpoint.pk)
    job = endpoint.job if model is None else _job_for_model(tenant, model)
    if checkpoint is _UNSET:
        # Naming another model without a checkpoint serves that model's final weights.
        new_checkpoint = endpoint.checkpoint if model is None else None
    else:
        new_checkpoint = _checkpoint_of(job, checkpoint)
    if name is not None:
        endpoint.name = _checked_name(tenant, name, exclude_pk=endpoint.pk)
    endpoint.generation_defaults = _checked_generation_defaults(generation_defaults, base=endpoint.generation_defaults)
    scale = _checked_scale(
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        idle_unload_seconds=idle_unload_seconds,
        current=Scale(endpoint.min_replicas, endpoint.max_replicas, endpoint.idle_unload_seconds),
    )
    endpoint.min_replicas, endpoint.max_replicas = scale.min_replicas, scale.max_replicas
    endpoint.idle_unload_seconds = scale.idle_unload_seconds
    if job.pk != endpoint.job_id or (new_checkpoint.pk if new_checkpoint else None) != endpoint.checkpoint_id:
        endpoint.job, endpoint.checkpoint, endpoint.task = job, new_checkpoint, _task_of(job)
        endpoint.revision += 1
        endpoint.error = None
        if endpoint.status != EndpointStatus.STOPPED:
            endpoint.status = _status_after_registering(endpoint)
    try:
        with transaction.atomic():
            endpoint.save()
    except IntegrityError:
        raise ApiError(
            f"An endpoint named '{name}' already exists.", code="endpoint_name_taken", param="name"
        ) from None
    _publish_on_commit(endpoint)
    return endpoint


@transaction.atomic
def endpoint_stop(*, tenant: Tenant, endpoint: Endpoint) -> Endpoint:
    """Undeploys: serving unloads the model (state `stopped` in the registry); requests to it answer 409."""
    return _endpoint_set_running(tenant=tenant, endpoint=endpoint, running=False)


def endpoint_start(*, tenant: Tenant, endpoint: Endpoint) -> Endpoint:
    return _endpoint_set_running(tenant=tenant, endpoint=endpoint, running=True)


@transaction.atomic
def _endpoint_set_running(*, tenant: Tenant, endpoint: Endpoint, running: bool) -> Endpoint:
    """Stop or start under the row's lock (a redeploy may be changing it), publishing the change once it commits."""
    if endpoint.tenant_id != tenant.pk:
        raise _not_found("endpoint", endpoint.public_id, "endpoint")
    endpoint = Endpoint.objects.select_for_update().get(pk=endpoint.pk)
    stopped = endpoint.status == EndpointStatus.STOPPED
    if running and stopped:
        endpoint.status, endpoint.error = _status_after_registering(endpoint), None
    elif not running and not stopped:
        endpoint.status = EndpointStatus.STOPPED
    else:
        return endpoint
    endpoint.save(update_fields=["status", "error", "updated_at"])
    _publish_on_commit(endpoint)
    return endpoint


@transaction.atomic
def endpoint_delete(*, tenant: Tenant, endpoint: Endpoint) -> None:
    """Removes the endpoint and its registry entry; its usage rows stay (metering)."""
    if endpoint.tenant_id != tenant.pk:
        raise _not_found("endpoint", endpoint.public_id, "endpoint")
    public_id = endpoint.public_id
    endpoint.delete()
    transaction.on_commit(lambda: registry_remove(endpoint_public_id=public_id))


# More would be a list nobody can review on the endpoint page.
MAX_SCOPED_KEYS = 100


def endpoint_set_api_keys(*, tenant: Tenant, endpoint: Endpoint, key_ids) -> Endpoint:
    """Sets which of the tenant's API keys are limited to (among others) this endpoint, by key id (``key-...``).
    A key listed on no endpoint reaches all of the tenant's endpoints; one listed on some reaches only those, and
    the others answer 404 to it. Only the tenant's active keys can be named; an unknown or revoked one (or another
    tenant's) is not found, and nothing changes."""
    if endpoint.tenant_id != tenant.pk:
        raise _not_found("endpoint", endpoint.public_id, "endpoint")
    if (
        not isinstance(key_ids, list)
        or len(key_ids) > MAX_SCOPED_KEYS
        or not all(isinstance(key_id, str) and key_id for key_id in key_ids)
    ):
        raise ApiError(f"api_keys must be a list of at most {MAX_SCOPED_KEYS} API key ids.", param="api_keys")
    keys = {key.public_id: key for key in active_api_keys_for_tenant(tenant=tenant).filter(public_id__in=key_ids)}
    for key_id in key_ids:
        if key_id not in keys:
            raise _not_found("API key", key_id, "api_keys")
    endpoint.api_keys.set(list(keys.values()))
    return endpoint


def endpoint_status_refresh(*, endpoint: Endpoint) -> Endpoint:
    """Brings the row's status up to what serving reported for the current revision (reports about an older
    revision are the previous model's and do not count). Stopped endpoints stay stopped."""
    if endpoint.status == EndpointStatus.STOPPED:
        return endpoint
    try:
        reports = [
            r for r in instance_reports(endpoint_public_id=endpoint.public_id) if r.get("revision") == endpoint.revision
        ]
    except Exception:  # noqa: BLE001 - Redis down: show the last known status rather than fail the page
        return endpoint
    states = {report.get("state") for report in reports}
    failed = [report for report in reports if report.get("state") == "failed"]
    if "ready" in states:
        status, error = EndpointStatus.READY, None
    elif failed:
        message = failed[0].get("error") or "The serving process could not load this model."
        status, error = EndpointStatus.FAILED, {"code": "model_load_failed", "message": str(message)}
    else:
        status, error = _status_after_registering(endpoint), None
    if (status, error) != (endpoint.status, endpoint.error):
        Endpoint.objects.filter(pk=endpoint.pk, revision=endpoint.revision).exclude(
            status=EndpointStatus.STOPPED
        ).update(status=status, error=error)
        endpoint.status, endpoint.error = status, error
    return endpoint


def endpoint_request_record(
    *,
    tenant: Tenant,
    endpoint: Endpoint | None,
    endpoint_public_id: str,
    api_key: ApiKey | None,
    kind: str,
    status_code: int,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    latency_ms: int = 0,
    time_to_first_token_ms: int | None = None,
    error_code: str = "",
) -> EndpointRequest:
    return EndpointRequest.objects.create(
        tenant=tenant,
        endpoint=endpoint,
        endpoint_public_id=endpoint_public_id,
        api_key=api_key,
        kind=kind,
        status_code=status_code,
        prompt_tokens=max(0, int(prompt_tokens or 0)),
        completion_tokens=max(0, int(completion_tokens or 0)),
        latency_ms=max(0, int(latency_ms)),
        time_to_first_token_ms=None if time_to_first_token_ms is None else max(0, int(time_to_first_token_ms)),
        error_code=(error_code or "")[:64],
    )
