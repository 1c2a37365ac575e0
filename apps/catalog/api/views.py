"""`/v1/models`: the base models jobs can start from, as OpenAI Model objects with catalog details."""

from rest_framework.response import Response

from apps.core.api.base import TenantAPIView
from apps.core.api.errors import ApiError

from ..selectors import catalog_get, catalog_list
from ..serialization import catalog_entry_to_json


class ModelListView(TenantAPIView):
    def get(self, request):
        _ = self.tenant  # authenticated callers only, like every /v1 route
        return Response({"object": "list", "data": [catalog_entry_to_json(entry) for entry in catalog_list()]})


class ModelDetailView(TenantAPIView):
    def get(self, request, model_id: str):
        _ = self.tenant
        entry = catalog_get(model_id=model_id)
        if entry is None:
            raise ApiError(
                f"The model '{model_id}' does not exist.", code="model_not_found", param="model", status_code=404
            )
        return Response(catalog_entry_to_json(entry))
