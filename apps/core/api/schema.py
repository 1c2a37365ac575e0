"""Documentation-only shapes for the OpenAPI schema (/v1/openapi.json) of the views that build their JSON by hand.

Nothing here validates a request or renders a response: the views and their services do that. These only tell
drf-spectacular (and so the docs page and generated clients) what goes in and comes out.
"""

from drf_spectacular.utils import OpenApiParameter, inline_serializer
from rest_framework import serializers


class ErrorDetailSerializer(serializers.Serializer):
    message = serializers.CharField(help_text="A sentence for people.")
    type = serializers.CharField(help_text="invalid_request_error, authentication_error, conflict_error...")
    param = serializers.CharField(allow_null=True, help_text="The request parameter at fault, if any.")
    code = serializers.CharField(allow_null=True, help_text="Stable, for programs: not_found, invalid_request...")


class ErrorSerializer(serializers.Serializer):
    """OpenAI's error object, so SDKs raise their usual exception types."""

    error = ErrorDetailSerializer()


ERROR_RESPONSES = {400: ErrorSerializer, 404: ErrorSerializer}

PAGE_PARAMETERS = [
    OpenApiParameter("after", str, description="The last id of the previous page."),
    OpenApiParameter("limit", int, description="1 to 100 (default 20)."),
]
ORDER_PARAMETER = OpenApiParameter(
    "order", str, enum=["desc", "asc"], description="desc (newest first, the default) or asc."
)


def list_of(name: str, item) -> serializers.Serializer:
    """OpenAI's cursor list: `{"object": "list", "data": [...], "has_more", "first_id", "last_id"}`."""
    return inline_serializer(
        name,
        {
            "object": serializers.CharField(default="list"),
            "data": serializers.ListField(child=item),
            "has_more": serializers.BooleanField(),
            "first_id": serializers.CharField(allow_null=True, required=False),
            "last_id": serializers.CharField(allow_null=True, required=False),
        },
    )


def deleted(name: str, object_type: str) -> serializers.Serializer:
    """`{"id", "object", "deleted": true}`, the answer to a DELETE."""
    return inline_serializer(
        name,
        {
            "id": serializers.CharField(),
            "object": serializers.CharField(default=object_type),
            "deleted": serializers.BooleanField(),
        },
    )
