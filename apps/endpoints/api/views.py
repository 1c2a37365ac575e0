"""`/v1/endpoints`: deploy a fine-tuned model (or one of its checkpoints) as an inference endpoint, change, stop or
delete it, classify with it (`predict`) and read its usage. Generation goes through the OpenAI-compatible
`/v1/completions` and `/v1/chat/completions` (apps.endpoints.api.inference)."""

import time

from asgiref.sync import async_to_sync
from django.db import transaction
from drf_spectacular.utils import OpenApiParameter, OpenApiTypes, extend_schema
from rest_framework.response import Response

from apps.core.api.base import TenantAPIView
from apps.core.api.errors import ApiError
from apps.core.api.schema import ERROR_RESPONSES

from ..inference import ServingClient, parse_predict_inputs, predict_token_bound
from ..limits import inference_reserve, inference_settle
from ..models import Endpoint, RequestKind
from ..selectors import USAGE_WINDOWS, endpoint_usage, endpoints_visible
from ..serialization import endpoint_to_json, usage_to_json
from ..services import (
    _UNSET,
    endpoint_delete,
    endpoint_deploy,
    endpoint_request_record,
    endpoint_set_api_keys,
    endpoint_start,
    endpoint_status_refresh,
    endpoint_stop,
    endpoint_update,
)

_UPDATABLE = (
    "name",
    "model",
    "checkpoint",
    "generation_defaults",
    "min_replicas",
    "max_replicas",
    "idle_unload_seconds",
)


class EndpointView(TenantAPIView):
    model = Endpoint

    def scoped_queryset(self):
        # A key limited to some endpoints sees only those: the others answer 404, like another tenant's.
        return endpoints_visible(tenant=self.tenant, api_key=self.tenant_context.api_key)

    def _body(self) -> dict:
        if not isinstance(self.request.data, dict):
            raise ApiError("The request body must be a JSON object.")
        body = self.request.data
        # Checked before anything changes: a key limited to some endpoints must not be able to widen its own reach.
        if "api_keys" in body and not self.tenant_context.can_manage:
            raise ApiError(
                "Choosing which API keys reach an endpoint needs an owner or admin of this organization.",
                code="permission_denied",
                status_code=403,
            )
        return body

    def _scope_keys(self, endpoint: Endpoint, body: dict) -> Endpoint:
        if "api_keys" not in body:
            return endpoint
        return endpoint_set_api_keys(tenant=self.tenant, endpoint=endpoint, key_ids=body["api_keys"])


class EndpointListCreateView(EndpointView):
    @extend_schema(
        summary="List inference endpoints (Tunehouse)",
        operation_id="listEndpoints",
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    def get(self, request):
        endpoints = [endpoint_status_refresh(endpoint=endpoint) for endpoint in self.get_queryset()]
        return Response({"object": "list", "data": [endpoint_to_json(endpoint) for endpoint in endpoints]})

    @extend_schema(
        summary="Deploy a fine-tuned model as an endpoint (Tunehouse)",
        operation_id="createEndpoint",
        description="Body: name (slug, unique in the organization), model (a fine-tuned model name or a job id), "
        "checkpoint (optional ftckpt-...), generation_defaults {max_tokens, temperature, top_p}, min_replicas, "
        "max_replicas, idle_unload_seconds, api_keys (owners and admins: ids of the API keys limited to this "
        "endpoint among others; a key listed on no endpoint reaches all of them, one listed on some only those).",
        request=OpenApiTypes.OBJECT,
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    @transaction.atomic
    def post(self, request):
        body = self._body()
        endpoint = endpoint_deploy(
            tenant=self.tenant,
            user=self.tenant_context.user,
            name=body.get("name"),
            model=body.get("model"),
            checkpoint=body.get("checkpoint"),
            generation_defaults=body.get("generation_defaults"),
            min_replicas=body.get("min_replicas"),
            max_replicas=body.get("max_replicas"),
            idle_unload_seconds=body.get("idle_unload_seconds"),
        )
        return Response(endpoint_to_json(self._scope_keys(endpoint, body)))


class EndpointDetailView(EndpointView):
    @extend_schema(
        summary="Retrieve an endpoint (Tunehouse)",
        operation_id="retrieveEndpoint",
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    def get(self, request, public_id):
        return Response(endpoint_to_json(endpoint_status_refresh(endpoint=self.get_object())))

    @extend_schema(
        summary="Update an endpoint (Tunehouse)",
        operation_id="updateEndpoint",
        description="Any of the create fields; a new model or checkpoint is a new revision (hot-swapped). "
        'state: "stopped" undeploys it, "active" deploys it again. Nothing changes when any field is refused.',
        request=OpenApiTypes.OBJECT,
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    @transaction.atomic
    def post(self, request, public_id):
        endpoint = self.get_object()
        body = self._body()
        endpoint = self._scope_keys(endpoint, body)
        state = body.get("state")
        if state not in (None, "active", "stopped"):
            raise ApiError("state must be 'active' or 'stopped'.", param="state")
        changes = {name: body[name] for name in _UPDATABLE if name in body}
        if changes:
            changes.setdefault("checkpoint", _UNSET)
            endpoint = endpoint_update(tenant=self.tenant, endpoint=endpoint, **changes)
        if state == "stopped":
            endpoint = endpoint_stop(tenant=self.tenant, endpoint=endpoint)
        elif state == "active":
            endpoint = endpoint_start(tenant=self.tenant, endpoint=endpoint)
        endpoint = self.get_queryset().get(pk=endpoint.pk)
        return Response(endpoint_to_json(endpoint))

    @extend_schema(
        summary="Delete an endpoint (Tunehouse)",
        operation_id="deleteEndpoint",
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    def delete(self, request, public_id):
        endpoint = self.get_object()
        endpoint_delete(tenant=self.tenant, endpoint=endpoint)
        return Response({"object": "endpoint.deleted", "id": public_id, "deleted": True})


class EndpointPredictView(EndpointView):
    inference_route = True  # what an inference-only API key may call

    @extend_schema(
        summary="Classify texts with a classifier endpoint (Tunehouse)",
        operation_id="predictWithEndpoint",
        description='Body: {"input": "text" | ["text", ...]}; answers a label, its score and every label\'s score '
        "per input.",
        request=OpenApiTypes.OBJECT,
        responses={200: OpenApiTypes.OBJECT, 429: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    def post(self, request, public_id):
        endpoint = self.get_object()
        api_key = self.tenant_context.api_key
        started = time.monotonic()

        def record(status_code: int, *, prompt_tokens: int = 0, error_code: str = "") -> None:
            endpoint_request_record(
                tenant=self.tenant,
                endpoint=endpoint,
                endpoint_public_id=endpoint.public_id,
                api_key=api_key,
                kind=RequestKind.PREDICT,
                status_code=status_code,
                prompt_tokens=prompt_tokens,
                latency_ms=(time.monotonic() - started) * 1000,
                error_code=error_code,
            )

        reservation = None
        try:
            inputs = parse_predict_inputs(self._body(), endpoint=endpoint)
            reservation = inference_reserve(
                tenant=self.tenant, api_key=api_key, tokens=predict_token_bound(inputs, endpoint=endpoint)
            )
            result = async_to_sync(ServingClient(endpoint).post_json)(
                "/v1/classify", {"endpoint": endpoint.public_id, "inputs": inputs}
            )
        except ApiError as error:
            record(error.status_code, error_code=error.error_code)
            if reservation is not None:
                inference_settle(reservation, used_tokens=0)
                error.headers = {**reservation.headers, **(getattr(error, "headers", None) or {})}
            raise
        prompt_tokens = int((result.get("usage") or {}).get("prompt_tokens") or 0)
        record(200, prompt_tokens=prompt_tokens)
        inference_settle(reservation, used_tokens=prompt_tokens)
        return Response(
            headers=reservation.headers,
            data={
                "object": "list",
                "endpoint": endpoint.public_id,
                "model": endpoint.name,
                "data": [
                    {"object": "prediction", "index": index, **prediction}
                    for index, prediction in enumerate(result.get("predictions") or [])
                ],
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            },
        )


class EndpointUsageView(EndpointView):
    @extend_schema(
        summary="An endpoint's usage over a window (Tunehouse)",
        operation_id="endpointUsage",
        parameters=[OpenApiParameter("window", str, enum=list(USAGE_WINDOWS), description="1h (default), 24h, 7d")],
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    def get(self, request, public_id):
        endpoint = self.get_object()
        window = request.query_params.get("window", "1h")
        if window not in USAGE_WINDOWS:
            raise ApiError("window must be 1h, 24h or 7d.", param="window")
        return Response(usage_to_json(endpoint, endpoint_usage(endpoint=endpoint, window=window)))
