"""`/v1/fine_tuning/jobs`: OpenAI's fine-tuning API, plus a generate call for a finished job's model."""

from rest_framework.response import Response

from apps.core.api.base import TenantAPIView
from apps.core.api.errors import ApiError
from apps.core.api.pagination import cursor_page, parse_limit
from apps.datasets.selectors import file_get

from ..models import FineTuningJob
from ..selectors import job_evaluation_get, job_evaluations, job_events_newest_first
from ..serialization import evaluation_to_json, event_to_json, job_to_json
from ..services import evaluation_create, job_cancel, job_create, job_generate, validate_base_model


def _require_string(data, name: str, *, required: bool = True, default: str = "") -> str:
    value = data.get(name, default)
    if value in (None, "") and required:
        raise ApiError(f"Missing required parameter: '{name}'.", code="missing_required_parameter", param=name)
    if value is not None and not isinstance(value, str):
        raise ApiError(f"'{name}' must be a string.", param=name)
    return value or ""


class JobListCreateView(TenantAPIView):
    model = FineTuningJob

    def scoped_queryset(self):
        return FineTuningJob.objects.select_related("training_file", "validation_file", "tenant")

    def get(self, request):
        return Response(cursor_page(self.get_queryset(), query_params=request.query_params, to_json=job_to_json))

    def post(self, request):
        data = request.data
        model = _require_string(data, "model")
        validate_base_model(model)  # before the file lookup: the cheaper mistake is reported first
        training_file_id = _require_string(data, "training_file")
        training_file = file_get(tenant=self.tenant, public_id=training_file_id)
        if training_file is None:
            raise ApiError(
                f"No such file: {training_file_id}.", code="not_found", param="training_file", status_code=404
            )
        validation_file = None
        if validation_file_id := _require_string(data, "validation_file", required=False):
            validation_file = file_get(tenant=self.tenant, public_id=validation_file_id)
            if validation_file is None:
                raise ApiError(
                    f"No such file: {validation_file_id}.", code="not_found", param="validation_file", status_code=404
                )
        hyperparameters = data.get("hyperparameters") or {}
        if not isinstance(hyperparameters, dict):
            raise ApiError("'hyperparameters' must be an object.", param="hyperparameters")
        if "seed" in data and data["seed"] is not None:
            if not isinstance(data["seed"], int):
                raise ApiError("'seed' must be an integer.", param="seed")
            hyperparameters = {**hyperparameters, "seed": data["seed"]}
        job = job_create(
            tenant=self.tenant,
            user=self.tenant_context.user,
            training_file=training_file,
            model=model,
            hyperparameters=hyperparameters,
            suffix=_require_string(data, "suffix", required=False),
            validation_file=validation_file,
        )
        return Response(job_to_json(job))


class JobDetailView(TenantAPIView):
    model = FineTuningJob

    def scoped_queryset(self):
        return FineTuningJob.objects.select_related("training_file", "validation_file", "tenant")

    def get(self, request, public_id):
        return Response(job_to_json(self.get_object()))


class JobEventsView(TenantAPIView):
    model = FineTuningJob

    def get(self, request, public_id):
        job = self.get_object()
        limit = parse_limit(request.query_params.get("limit"))
        events = job_events_newest_first(job=job, after_event_id=request.query_params.get("after"), limit=limit + 1)
        data = [event_to_json(event, job_public_id=job.public_id) for event in events[:limit]]
        return Response({"object": "list", "data": data, "has_more": len(events) > limit})


class JobCancelView(TenantAPIView):
    model = FineTuningJob

    def post(self, request, public_id):
        job = job_cancel(tenant=self.tenant, job=self.get_object(), user=self.tenant_context.user)
        job.refresh_from_db()
        return Response(job_to_json(job))


class JobGenerateView(TenantAPIView):
    """Tunehouse extension: sample text from a succeeded job's model (the dashboard's try-it box)."""

    model = FineTuningJob

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

    def get(self, request, public_id):
        job = self.get_object()
        evaluations = job_evaluations(job=job)
        return Response({"object": "list", "data": [evaluation_to_json(evaluation) for evaluation in evaluations]})

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

    def get(self, request, public_id, evaluation_id):
        evaluation = job_evaluation_get(job=self.get_object(), public_id=evaluation_id)
        if evaluation is None:
            raise ApiError(f"No such evaluation: {evaluation_id}.", code="not_found", status_code=404)
        return Response(evaluation_to_json(evaluation))
