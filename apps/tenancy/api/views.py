"""API keys over REST (`/v1/api_keys`, Tunehouse extension) and the staff-only `/v1/organizations/{slug}/limits`.

Every member may list the team's keys (names and prefixes only); creating, changing (name, permissions and inference
caps) and revoking keys needs an owner or admin of the team: anyone else gets 403, and so does any API key, which acts
at most with member rights (a key must not be able to raise its own caps or permissions). Another tenant's key id is
not found (404).

The organization limits route exists only for platform staff; to anyone else it is the 404 of an unknown path.
"""

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, OpenApiTypes, extend_schema
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.core.api.base import TenantAPIView
from apps.core.api.bodies import request_object
from apps.core.api.errors import ApiError
from apps.core.api.schema import ERROR_RESPONSES, ErrorSerializer
from apps.endpoints.limits import tenant_inference_limits

from ..models import INFERENCE_LIMIT_FIELDS, ApiKey, KeyPermissions, Tenant
from ..permissions import IsPlatformStaff
from ..serialization import api_key_to_json, tenant_limits_to_json
from ..services import api_key_create, api_key_revoke, api_key_update, tenant_inference_limits_update

API_KEY_PARAMETERS = ("name", "permissions", *INFERENCE_LIMIT_FIELDS)
LIMITS_DESCRIPTION = (
    "permissions: 'all' (what a team member can do; the default), 'inference' (completions, chat completions, "
    "predictions and the model list only) or 'read_only' (reads everything, changes nothing, runs no inference); "
    "requests_per_minute, tokens_per_minute, tokens_per_day: positive whole numbers, or null for none of the key's "
    "own (the organization's limits still apply)."
)
_KEY_ID = OpenApiParameter("public_id", str, OpenApiParameter.PATH, description="The key id (key-...).")
_MANAGE_RESPONSES = {403: ErrorSerializer, **ERROR_RESPONSES}


class ApiKeyView(TenantAPIView):
    model = ApiKey

    def scoped_queryset(self):
        return ApiKey.objects.select_related("created_by")

    def ensure_can_manage(self) -> None:
        if not self.tenant_context.can_manage:
            raise ApiError(
                "Managing API keys needs an owner or admin of this organization.",
                code="permission_denied",
                status_code=403,
            )


class ApiKeyListCreateView(ApiKeyView):
    @extend_schema(
        summary="List the organization's API keys (Tunehouse)",
        operation_id="listApiKeys",
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    def get(self, request):
        return Response({"object": "list", "data": [api_key_to_json(key) for key in self.get_queryset()]})

    @extend_schema(
        summary="Create an API key (Tunehouse)",
        operation_id="createApiKey",
        description="Owners and admins only. Body: name (required); " + LIMITS_DESCRIPTION + " The answer holds the "
        "key itself (`key`) this once.",
        request=OpenApiTypes.OBJECT,
        responses={201: OpenApiTypes.OBJECT, **_MANAGE_RESPONSES},
    )
    def post(self, request):
        self.ensure_can_manage()
        body = request_object(request, API_KEY_PARAMETERS)
        name = body.get("name")
        if not isinstance(name, str):
            raise ApiError("Missing required parameter: 'name'.", code="missing_required_parameter", param="name")
        created = api_key_create(
            tenant=self.tenant,
            user=self.tenant_context.user,
            name=name,
            limits=body,
            permissions=KeyPermissions.ALL if body.get("permissions") is None else body["permissions"],
        )
        return Response(api_key_to_json(created.api_key, secret=created.secret), status=201)


class ApiKeyDetailView(ApiKeyView):
    @extend_schema(
        summary="Retrieve an API key (Tunehouse)",
        operation_id="retrieveApiKey",
        parameters=[_KEY_ID],
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    def get(self, request, public_id):
        return Response(api_key_to_json(self.get_object()))

    @extend_schema(
        summary="Rename an API key or change its permissions or limits (Tunehouse)",
        operation_id="updateApiKey",
        description="Owners and admins only; partial: the fields sent change, the others stay. Body: name; "
        + LIMITS_DESCRIPTION
        + " Takes effect on the key's next request.",
        parameters=[_KEY_ID],
        request=OpenApiTypes.OBJECT,
        responses={200: OpenApiTypes.OBJECT, **_MANAGE_RESPONSES},
    )
    def post(self, request, public_id):
        api_key = self.get_object()  # another tenant's id: 404 before any permission question
        self.ensure_can_manage()
        body = request_object(request, API_KEY_PARAMETERS)
        updated = api_key_update(
            tenant=self.tenant,
            public_id=api_key.public_id,
            name=body.get("name"),
            limits=body,
            permissions=body.get("permissions"),
        )
        return Response(api_key_to_json(updated))

    @extend_schema(
        summary="Revoke an API key (Tunehouse)",
        operation_id="revokeApiKey",
        description="Owners and admins only. The key stops authenticating at once; its row stays, marked revoked.",
        parameters=[_KEY_ID],
        responses={200: OpenApiTypes.OBJECT, **_MANAGE_RESPONSES},
    )
    def delete(self, request, public_id):
        api_key = self.get_object()
        self.ensure_can_manage()
        return Response(api_key_to_json(api_key_revoke(tenant=self.tenant, public_id=api_key.public_id)))


class OrganizationLimitsView(APIView):
    """Not a TenantAPIView: platform staff set any team's limits, whichever teams they belong to."""

    permission_classes = [IsPlatformStaff]

    @extend_schema(
        summary="An organization's inference limits (platform staff)",
        operation_id="retrieveOrganizationLimits",
        parameters=[OpenApiParameter("slug", str, OpenApiParameter.PATH, description="The organization's slug.")],
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    def get(self, request, slug):
        tenant = get_object_or_404(Tenant, slug=slug)
        return Response(tenant_limits_to_json(tenant, tenant_inference_limits(tenant)))

    @extend_schema(
        summary="Set an organization's inference limits (platform staff)",
        operation_id="updateOrganizationLimits",
        description="Partial. requests_per_minute, tokens_per_minute, tokens_per_day: positive whole numbers, or "
        "null for the platform default. Takes effect on the organization's next request, without a restart.",
        parameters=[OpenApiParameter("slug", str, OpenApiParameter.PATH, description="The organization's slug.")],
        request=OpenApiTypes.OBJECT,
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    def post(self, request, slug):
        tenant = get_object_or_404(Tenant, slug=slug)
        body = request_object(request, INFERENCE_LIMIT_FIELDS)
        tenant = tenant_inference_limits_update(tenant=tenant, limits=body)
        return Response(tenant_limits_to_json(tenant, tenant_inference_limits(tenant)))
