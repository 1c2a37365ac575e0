"""`/v1/fine_tuning/jobs`: OpenAI's fine-tuning API, plus a generate call and evaluations of a finished job's model.

The serializers below only describe the JSON for the OpenAPI schema (/v1/openapi.json); requests are checked by
`apps.jobs.openai_requests` and responses built by `apps.jobs.serialization`, as before.
"""

from drf_spectacular.utils import OpenApiParameter, OpenApiTypes, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response

from apps.core.api.base import TenantAPIView
from apps.core.api.errors import ApiError
from apps.core.api.pagination import cursor_page, parse_limit
from apps.core.api.schema import ERROR_RESPONSES, ORDER_PARAMETER, PAGE_PARAMETERS, ErrorSerializer, list_of
from apps.datasets.selectors import file_get

from ..models import FineTuningJob
from ..openai_requests import job_create_from_openai_request, parse_metadata_filter
from ..preflight import job_estimate_from_openai_request
from ..selectors import (
    METRICS_SERIES_DEFAULT_POINTS,
    METRICS_SERIES_MAX_POINTS,
    METRICS_SERIES_MIN_POINTS,
    job_checkpoint_get,
    job_checkpoints_newest_first,
    job_evaluation_get,
    job_evaluations,
    job_events_newest_first,
    job_metrics_series,
    jobs_matching_metadata,
)
from ..serialization import checkpoint_to_json, evaluation_to_json, event_to_json, job_to_json
from ..services import evaluation_create, job_cancel, job_generate, job_pause, job_resume


def _require_string(data, name: str, *, required: bool = True, default: str = "") -> str:
    value = data.get(name, default)
    if value in (None, "") and required:
        raise ApiError(f"Missing required parameter: '{name}'.", code="missing_required_parameter", param=name)
    if value is not None and not isinstance(value, str):
        raise ApiError(f"'{name}' must be a string.", param=name)
    return value or ""


# --- Shapes for the OpenAPI schema ---------------------------------------------------------------------------------


class FineTuningHyperparameters(serializers.Serializer):
    batch_size = serializers.JSONField(required=False, help_text='An integer or "auto" (the engine\'s default).')
    learning_rate_multiplier = serializers.JSONField(
        required=False, help_text='A number above 0 times the default learning rate of the job\'s mode, or "auto".'
    )
    n_epochs = serializers.JSONField(required=False, help_text='An integer or "auto".')


class CreateFineTuningJob(serializers.Serializer):
    model = serializers.CharField(help_text="A catalog model id (GET /v1/models).")
    training_file = serializers.CharField(help_text="The id of an uploaded file (file-...).")
    validation_file = serializers.CharField(required=False, allow_null=True)
    hyperparameters = serializers.DictField(
        required=False,
        help_text="OpenAI's batch_size, learning_rate_multiplier and n_epochs, plus any hyperparameter of the "
        "Tunehouse engine (mode, max_steps, learning_rate, lora_r, checkpoint_every_steps...).",
    )
    method = inline_serializer(
        "FineTuningMethod",
        {
            "type": serializers.ChoiceField(choices=["supervised", "dpo", "reinforcement"], help_text="supervised"),
            "supervised": inline_serializer(
                "FineTuningSupervisedMethod",
                {"hyperparameters": FineTuningHyperparameters(required=False)},
                required=False,
            ),
        },
        required=False,
    )
    seed = serializers.IntegerField(required=False, allow_null=True)
    suffix = serializers.CharField(required=False, allow_null=True, max_length=64)
    metadata = serializers.DictField(child=serializers.CharField(max_length=512), required=False, allow_null=True)
    integrations = serializers.ListField(required=False, allow_null=True, help_text="Must be empty.")


_job = inline_serializer(
    "FineTuningJob",
    {
        "object": serializers.CharField(default="fine_tuning.job"),
        "id": serializers.CharField(),
        "created_at": serializers.IntegerField(),
        "finished_at": serializers.IntegerField(allow_null=True),
        "model": serializers.CharField(),
        "fine_tuned_model": serializers.CharField(allow_null=True),
        "organization_id": serializers.CharField(),
        "status": serializers.ChoiceField(
            choices=["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]
        ),
        "training_file": serializers.CharField(),
        "validation_file": serializers.CharField(allow_null=True),
        "hyperparameters": serializers.DictField(),
        "trained_tokens": serializers.IntegerField(allow_null=True),
        "metrics": serializers.DictField(allow_null=True),
        "error": serializers.DictField(allow_null=True),
        "seed": serializers.IntegerField(),
        "user_provided_suffix": serializers.CharField(allow_null=True),
        "metadata": serializers.DictField(child=serializers.CharField(), allow_null=True),
        "phase": serializers.CharField(help_text="Tunehouse: what the job is doing now."),
        "progress": serializers.DictField(help_text="Tunehouse: step, total_steps, train_loss."),
    },
)
_event = inline_serializer(
    "FineTuningJobEvent",
    {
        "object": serializers.CharField(default="fine_tuning.job.event"),
        "id": serializers.CharField(),
        "created_at": serializers.IntegerField(),
        "level": serializers.ChoiceField(choices=["info", "warn", "error"]),
        "message": serializers.CharField(),
        "type": serializers.ChoiceField(choices=["message", "metrics"]),
        "data": serializers.JSONField(allow_null=True),
    },
)
_checkpoint = inline_serializer(
    "FineTuningJobCheckpoint",
    {
        "object": serializers.CharField(default="fine_tuning.job.checkpoint"),
        "id": serializers.CharField(),
        "created_at": serializers.IntegerField(),
        "fine_tuned_model_checkpoint": serializers.CharField(),
        "fine_tuning_job_id": serializers.CharField(),
        "metrics": serializers.DictField(),
        "step_number": serializers.IntegerField(),
    },
)
_evaluation = inline_serializer(
    "FineTuningJobEvaluation",
    {
        "object": serializers.CharField(default="fine_tuning.job.evaluation"),
        "id": serializers.CharField(),
        "job_id": serializers.CharField(),
        "file": serializers.CharField(),
        "status": serializers.CharField(),
        "metrics": serializers.DictField(allow_null=True),
        "samples": serializers.ListField(allow_null=True),
        "error": serializers.DictField(allow_null=True),
    },
)


# --- Views ---------------------------------------------------------------------------------------------------------


class JobListCreateView(TenantAPIView):
    model = FineTuningJob

    def scoped_queryset(self):
        return FineTuningJob.objects.select_related("training_file", "validation_file", "tenant")

    @extend_schema(
        summary="List fine-tuning jobs",
        operation_id="listFineTuningJobs",
        parameters=[
            *PAGE_PARAMETERS,
            ORDER_PARAMETER,
            OpenApiParameter(
                "metadata",
                OpenApiTypes.OBJECT,
                style="deepObject",
                explode=True,
                description="metadata[key]=value (several: all must match), or metadata=null for jobs without any.",
            ),
        ],
        responses={200: list_of("FineTuningJobList", _job), **ERROR_RESPONSES},
    )
    def get(self, request):
        metadata = parse_metadata_filter(request.query_params)
        jobs = jobs_matching_metadata(
            jobs=self.get_queryset(), pairs=metadata.pairs, without_metadata=metadata.without_metadata
        )
        return Response(cursor_page(jobs, query_params=request.query_params, to_json=job_to_json))

    @extend_schema(
        summary="Create a fine-tuning job",
        operation_id="createFineTuningJob",
        request=CreateFineTuningJob,
        parameters=[
            OpenApiParameter(
                "Idempotency-Key",
                str,
                OpenApiParameter.HEADER,
                description="The same key with the same body returns the first job; with another body, a 409.",
            )
        ],
        responses={200: _job, 409: ErrorSerializer, **ERROR_RESPONSES},
    )
    def post(self, request):
        job = job_create_from_openai_request(
            tenant=self.tenant,
            user=self.tenant_context.user,
            body=request.data,
            idempotency_key=request.headers.get("Idempotency-Key"),
        )
        return Response(job_to_json(job))


class JobEstimateView(TenantAPIView):
    """Tunehouse extension: the pre-flight estimate of a job before it is created (apps.jobs.preflight)."""

    model = FineTuningJob

    @extend_schema(
        summary="Estimate a fine-tuning job before creating it (Tunehouse)",
        operation_id="estimateFineTuningJob",
        description="The create-job body plus target_device (cpu, nvidia-h100, nvidia-h200): examples and tokens, "
        "rows packed and padded, steps, memory against the device, expected duration (measured throughput of recent "
        "jobs of the model, else FLOPs) and warnings, each with one-click fixes as field/value pairs.",
        request=CreateFineTuningJob,
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    def post(self, request):
        return Response(job_estimate_from_openai_request(tenant=self.tenant, body=request.data))


class JobDetailView(TenantAPIView):
    model = FineTuningJob

    def scoped_queryset(self):
        return FineTuningJob.objects.select_related("training_file", "validation_file", "tenant")

    @extend_schema(
        summary="Retrieve a fine-tuning job",
        operation_id="retrieveFineTuningJob",
        responses={200: _job, **ERROR_RESPONSES},
    )
    def get(self, request, public_id):
        return Response(job_to_json(self.get_object()))


class JobEventsView(TenantAPIView):
    model = FineTuningJob

    @extend_schema(
        summary="List a job's events, newest first",
        operation_id="listFineTuningEvents",
        parameters=PAGE_PARAMETERS,
        responses={200: list_of("FineTuningJobEventList", _event), **ERROR_RESPONSES},
    )
    def get(self, request, public_id):
        job = self.get_object()
        limit = parse_limit(request.query_params.get("limit"))
        events = job_events_newest_first(job=job, after_event_id=request.query_params.get("after"), limit=limit + 1)
        data = [event_to_json(event, job_public_id=job.public_id) for event in events[:limit]]
        return Response({"object": "list", "data": data, "has_more": len(events) > limit})


class JobCheckpointsView(TenantAPIView):
    model = FineTuningJob

    @extend_schema(
        summary="List a job's checkpoints, highest step first",
        operation_id="listFineTuningJobCheckpoints",
        parameters=PAGE_PARAMETERS,
        responses={200: list_of("FineTuningJobCheckpointList", _checkpoint), **ERROR_RESPONSES},
    )
    def get(self, request, public_id):
        job = self.get_object()
        limit = parse_limit(request.query_params.get("limit"), default=10)  # OpenAI's default for this list
        after = None
        if after_id := request.query_params.get("after"):
            after = job_checkpoint_get(job=job, public_id=after_id)
            if after is None:
                # Unlike an unknown event id, which restarts the list, a vanished cursor would page in circles.
                raise ApiError(f"No checkpoint '{after_id}' in this job.", param="after", status_code=404)
        checkpoints = job_checkpoints_newest_first(job=job, after=after, limit=limit + 1)
        data = [checkpoint_to_json(checkpoint) for checkpoint in checkpoints[:limit]]
        return Response(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": len(checkpoints) > limit,
            }
        )


class JobCancelView(TenantAPIView):
    model = FineTuningJob

    @extend_schema(
        summary="Cancel a fine-tuning job",
        operation_id="cancelFineTuningJob",
        request=None,
        responses={200: _job, **ERROR_RESPONSES},
    )
    def post(self, request, public_id):
        job = job_cancel(tenant=self.tenant, job=self.get_object(), user=self.tenant_context.user)
        job.refresh_from_db()
        return Response(job_to_json(job))


class JobPauseView(TenantAPIView):
    model = FineTuningJob

    @extend_schema(
        summary="Pause a fine-tuning job",
        operation_id="pauseFineTuningJob",
        description="A queued job is paused at once; a running one stops after its current step and saves a "
        "checkpoint first (its status stays running until then).",
        request=None,
        responses={200: _job, **ERROR_RESPONSES},
    )
    def post(self, request, public_id):
        job = job_pause(tenant=self.tenant, job=self.get_object(), user=self.tenant_context.user)
        job.refresh_from_db()
        return Response(job_to_json(job))


class JobResumeView(TenantAPIView):
    model = FineTuningJob

    @extend_schema(
        summary="Resume a paused fine-tuning job",
        operation_id="resumeFineTuningJob",
        description="The job is queued again and continues from its last checkpoint.",
        request=None,
        responses={200: _job, **ERROR_RESPONSES},
    )
    def post(self, request, public_id):
        job = job_resume(tenant=self.tenant, job=self.get_object(), user=self.tenant_context.user)
        job.refresh_from_db()
        return Response(job_to_json(job))


class JobGenerateView(TenantAPIView):
    """Tunehouse extension: sample text from a succeeded job's model (the dashboard's try-it box)."""

    model = FineTuningJob

    @extend_schema(
        summary="Generate text with a succeeded job's model (Tunehouse)",
        operation_id="generateWithFineTuningJob",
        request=inline_serializer(
            "GenerateWithFineTuningJob",
            {
                "prompt": serializers.CharField(required=False),
                "max_tokens": serializers.IntegerField(required=False, default=48),
                "temperature": serializers.FloatField(required=False, default=0.8),
                "seed": serializers.IntegerField(required=False, allow_null=True),
            },
        ),
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    def post(self, request, public_id):
        job = self.get_object()
        prompt = _require_string(request.data, "prompt", required=False)
        try:
            max_tokens = int(request.data.get("max_tokens", 48))
            temperature = float(request.data.get("temperature", 0.8))
            seed = request.data.get("seed")
            seed = None if seed in (None, "") else int(seed)
        except (TypeError, ValueError):
            raise ApiError("max_tokens and seed must be integers, temperature a number.", param="max_tokens") from None
        result = job_generate(
            tenant=self.tenant, job=job, prompt=prompt, max_tokens=max_tokens, temperature=temperature, seed=seed
        )
        return Response(
            {
                "object": "text_completion",
                "model": job.fine_tuned_model,
                "choices": [{"index": 0, "text": result.text, "finish_reason": result.finish_reason}],
                "usage": {
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                    "total_tokens": result.prompt_tokens + result.completion_tokens,
                },
            }
        )


class JobEvaluationListCreateView(TenantAPIView):
    """Tunehouse extension: measure a succeeded job's model on any of the tenant's datasets of its task."""

    model = FineTuningJob

    @extend_schema(
        summary="List a job's evaluations (Tunehouse)",
        operation_id="listFineTuningJobEvaluations",
        responses={200: list_of("FineTuningJobEvaluationList", _evaluation), **ERROR_RESPONSES},
    )
    def get(self, request, public_id):
        job = self.get_object()
        evaluations = job_evaluations(job=job)
        return Response({"object": "list", "data": [evaluation_to_json(evaluation) for evaluation in evaluations]})

    @extend_schema(
        summary="Evaluate a job's model on a file (Tunehouse)",
        operation_id="createFineTuningJobEvaluation",
        request=inline_serializer(
            "CreateFineTuningJobEvaluation",
            {
                "file": serializers.CharField(),
                "max_examples": serializers.IntegerField(required=False, default=200),
            },
        ),
        responses={200: _evaluation, **ERROR_RESPONSES},
    )
    def post(self, request, public_id):
        job = self.get_object()
        file_id = _require_string(request.data, "file")
        file = file_get(tenant=self.tenant, public_id=file_id)
        if file is None:
            raise ApiError(f"No such file: {file_id}.", code="not_found", param="file", status_code=404)
        evaluation = evaluation_create(
            tenant=self.tenant, job=job, file=file, max_examples=request.data.get("max_examples", 200)
        )
        return Response(evaluation_to_json(evaluation))


class JobEvaluationDetailView(TenantAPIView):
    model = FineTuningJob

    @extend_schema(
        summary="Retrieve a job's evaluation (Tunehouse)",
        operation_id="retrieveFineTuningJobEvaluation",
        responses={200: _evaluation, **ERROR_RESPONSES},
    )
    def get(self, request, public_id, evaluation_id):
        evaluation = job_evaluation_get(job=self.get_object(), public_id=evaluation_id)
        if evaluation is None:
            raise ApiError(f"No such evaluation: {evaluation_id}.", code="not_found", status_code=404)
        return Response(evaluation_to_json(evaluation))


def _parse_max_points(raw: str | None) -> int:
    if raw in (None, ""):
        return METRICS_SERIES_DEFAULT_POINTS
    try:
        max_points = int(raw)
    except ValueError:
        max_points = None
    if max_points is None or not METRICS_SERIES_MIN_POINTS <= max_points <= METRICS_SERIES_MAX_POINTS:
        raise ApiError(
            f"max_points must be a whole number between {METRICS_SERIES_MIN_POINTS} and {METRICS_SERIES_MAX_POINTS}.",
            param="max_points",
        )
    return max_points


class JobMetricsView(TenantAPIView):
    """Tunehouse extension: the job's metrics as chart points, one per step (the latest attempt's), thinned
    server-side to `max_points` (first and last step and every evaluation kept) so a long job draws fast."""

    model = FineTuningJob

    @extend_schema(
        summary="A job's metrics series (Tunehouse)",
        operation_id="listFineTuningJobMetrics",
        parameters=[
            OpenApiParameter("max_points", int, description="At most this many points (10 to 5000, default 500).")
        ],
        responses={
            200: inline_serializer(
                "FineTuningJobMetrics",
                {
                    "object": serializers.CharField(default="list"),
                    "data": serializers.ListField(
                        child=serializers.DictField(),
                        help_text="Points in step order: step, attempt, train_loss, learning_rate, grad_norm, "
                        "tokens_per_second, epoch... and the evaluation's numbers (valid_loss...) where one ran.",
                    ),
                    "downsampled": serializers.BooleanField(),
                    "total_points": serializers.IntegerField(help_text="Points before downsampling."),
                    "evaluation_metrics": serializers.ListField(child=serializers.CharField()),
                },
            ),
            **ERROR_RESPONSES,
        },
    )
    def get(self, request, public_id):
        max_points = _parse_max_points(request.query_params.get("max_points"))
        series = job_metrics_series(job=self.get_object(), max_points=max_points)
        return Response(
            {
                "object": "list",
                "data": series.points,
                "downsampled": series.downsampled,
                "total_points": series.total_points,
                "evaluation_metrics": series.evaluation_metrics,
            }
        )
