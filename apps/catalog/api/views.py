"""`/v1/models`: the catalog's base models (shared by every tenant) and the calling tenant's own fine-tuned models,
as OpenAI Model objects."""

from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response

from apps.core.api.base import TenantAPIView
from apps.core.api.errors import ApiError
from apps.core.api.schema import ErrorSerializer
from apps.jobs.models import FineTuningJob
from apps.jobs.selectors import fine_tuned_model_get, fine_tuned_models
from apps.jobs.serialization import job_audit_summary

from ..selectors import catalog_get, catalog_list
from ..serialization import catalog_entry_to_json


def fine_tuned_model_to_json(job: FineTuningJob) -> dict:
    """An OpenAI Model object for a succeeded job's model; owned by the tenant, as OpenAI's say the organisation."""
    return {
        "id": job.fine_tuned_model,
        "object": "model",
        "created": int((job.finished_at or job.created_at).timestamp()),
        "owned_by": job.tenant.slug,
        # Tunehouse additions: where it came from.
        "base_model": job.model,
        "fine_tuning_job": job.public_id,
    }


_model = inline_serializer(
    "Model",
    {
        "id": serializers.CharField(help_text="A catalog id, or ft:<base>:<tenant>:<suffix>:<id> for a fine-tune."),
        "object": serializers.CharField(default="model"),
        "created": serializers.IntegerField(),
        "owned_by": serializers.CharField(help_text='"tunehouse" for the catalog, the tenant for its fine-tunes.'),
    },
)


class ModelListView(TenantAPIView):
    inference_route = True  # an inference-only API key lists what it can call

    @extend_schema(
        summary="List models: the catalog's base models, then this tenant's fine-tuned models",
        operation_id="listModels",
        responses={
            200: inline_serializer(
                "ModelList",
                {"object": serializers.CharField(default="list"), "data": serializers.ListField(child=_model)},
            )
        },
    )
    def get(self, request):
        catalog = [catalog_entry_to_json(entry) for entry in catalog_list()]
        own = [fine_tuned_model_to_json(job) for job in fine_tuned_models(tenant=self.tenant)]
        # The tenant's ready inference endpoints, by the name /v1/completions and /v1/chat/completions take.
        from apps.endpoints.selectors import endpoints_ready
        from apps.endpoints.serialization import endpoint_model_json

        ready = endpoints_ready(tenant=self.tenant, api_key=self.tenant_context.api_key)
        served = [endpoint_model_json(endpoint) for endpoint in ready]
        return Response({"object": "list", "data": catalog + own + served})


class ModelDetailView(TenantAPIView):
    inference_route = True

    @extend_schema(
        summary="Retrieve a catalog model or one of this tenant's fine-tuned models",
        operation_id="retrieveModel",
        parameters=[OpenApiParameter("model_id", str, OpenApiParameter.PATH)],
        responses={200: _model, 404: ErrorSerializer},
    )
    def get(self, request, model_id: str):
        if (entry := catalog_get(model_id=model_id)) is not None:
            return Response(catalog_entry_to_json(entry))
        # Another tenant's fine-tuned model is simply not among this tenant's: 404, like an unknown name.
        if (job := fine_tuned_model_get(tenant=self.tenant, model_id=model_id)) is not None:
            # One model asked for: its bias-audit standing too (the list leaves it out, one query per model).
            return Response({**fine_tuned_model_to_json(job), "audit": job_audit_summary(job)})
        raise ApiError(
            f"The model '{model_id}' does not exist.", code="model_not_found", param="model", status_code=404
        )
