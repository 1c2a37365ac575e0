"""`/v1/files`: OpenAI's Files API (purpose `fine-tune`)."""

from rest_framework import status
from rest_framework.response import Response

from apps.core.api.base import TenantAPIView
from apps.core.api.errors import ApiError
from apps.core.api.pagination import cursor_page
from apps.core.storage import object_store
from apps.core.streaming import stream_download

from ..models import File
from ..services import READ_CHUNK_BYTES, file_delete, file_upload, max_upload_bytes

# Multipart framing around the file itself: field names, boundaries and headers.
_MULTIPART_OVERHEAD_BYTES = 64 * 1024


def file_to_json(file: File) -> dict:
    return {
        "object": "file",
        "id": file.public_id,
        "bytes": file.bytes,
        "created_at": int(file.created_at.timestamp()),
        "expires_at": None,
        "filename": file.filename,
        "purpose": file.purpose,
        "status": file.status,
        "status_details": file.status_details or None,
        # Tunehouse additions
        "sha256": file.sha256,
        "validation_report": file.validation_report or None,
    }


class FileListCreateView(TenantAPIView):
    model = File

    def get(self, request):
        files = self.get_queryset()
        if purpose := request.query_params.get("purpose"):
            files = files.filter(purpose=purpose)
        return Response(cursor_page(files, query_params=request.query_params, to_json=file_to_json))

    def post(self, request):
        limit = max_upload_bytes(self.tenant)
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
        if declared > limit + _MULTIPART_OVERHEAD_BYTES:
            # Refused before a byte of the body is read.
            raise ApiError(
                f"The file is larger than this tenant's limit of {limit} bytes.",
                code="file_too_large",
                param="file",
                status_code=413,
            )
        upload = request.FILES.get("file")
        if upload is None:
            raise ApiError("Attach the file as the multipart field 'file'.", param="file")
        file = file_upload(
            tenant=self.tenant,
            user=self.tenant_context.user,
            filename=upload.name,
            chunks=upload.chunks(READ_CHUNK_BYTES),
            purpose=request.data.get("purpose", ""),
        )
        return Response(file_to_json(file), status=status.HTTP_200_OK)


class FileDetailView(TenantAPIView):
    model = File

    def get(self, request, public_id):
        return Response(file_to_json(self.get_object()))

    def delete(self, request, public_id):
        file = self.get_object()
        file_delete(tenant=self.tenant, file=file)
        return Response({"object": "file", "id": public_id, "deleted": True})


class FileContentView(TenantAPIView):
    model = File

    def get(self, request, public_id):
        file = self.get_object()
        return stream_download(request, object_store().open(file.storage_key), size=file.bytes, filename=file.filename)
