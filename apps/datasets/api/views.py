"""`/v1/files` (OpenAI's Files API, purpose `fine-tune`) plus validation, token preview and `/v1/tokenizers`."""

import json

from rest_framework.response import Response

from apps.core.api.base import TenantAPIView
from apps.core.api.errors import ApiError
from apps.core.api.pagination import cursor_page
from apps.core.storage import object_store
from apps.core.streaming import stream_download

from ..models import File, Tokenizer
from ..selectors import file_get, tokenizer_get
from ..services import (
    READ_CHUNK_BYTES,
    file_delete,
    file_preview,
    file_revalidate,
    file_upload,
    max_upload_bytes,
    tokenizer_create,
    tokenizer_delete,
)

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
        "format": file.format or None,
        "task": file.task or None,
        "column_mapping": file.column_mapping or (file.validation_report or {}).get("column_mapping"),
        "validation_report": file.validation_report or None,
    }


def tokenizer_to_json(tokenizer: Tokenizer) -> dict:
    return {
        "object": "tokenizer",
        "id": tokenizer.public_id,
        "name": tokenizer.name,
        "created_at": int(tokenizer.created_at.timestamp()),
        "algorithm": tokenizer.algorithm,
        "vocab_size": tokenizer.vocab_size,
        "special_tokens": tokenizer.special_tokens,
        "lowercase": tokenizer.lowercase,
        "training_file": tokenizer.training_file.public_id,
        "status": tokenizer.status,
        "error": tokenizer.error or None,
        "report": tokenizer.report or None,
    }


def _int_param(raw, name: str, default: int) -> int:
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ApiError(f"{name} must be a whole number.", param=name) from None


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
        column_mapping = request.data.get("column_mapping") or None
        if isinstance(column_mapping, str):
            try:
                column_mapping = json.loads(column_mapping)
            except json.JSONDecodeError:
                raise ApiError("column_mapping must be a JSON object.", param="column_mapping") from None
        file = file_upload(
            tenant=self.tenant,
            user=self.tenant_context.user,
            filename=upload.name,
            chunks=upload.chunks(READ_CHUNK_BYTES),
            purpose=request.data.get("purpose", ""),
            column_mapping=column_mapping,
        )
        return Response(file_to_json(file))


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


def _tenant_tokenizer(view: TenantAPIView, public_id) -> Tokenizer | None:
    if public_id in (None, ""):
        return None
    tokenizer = tokenizer_get(tenant=view.tenant, public_id=str(public_id))
    if tokenizer is None:
        raise ApiError(f"No such tokenizer: {public_id}.", code="not_found", param="tokenizer", status_code=404)
    return tokenizer


class FileValidateView(TenantAPIView):
    """Re-runs validation: with a tokenizer for the token-length histogram, with a validation file for the overlap
    between the two; answers 202 and the file."""

    model = File

    def post(self, request, public_id):
        file = self.get_object()
        tokenizer = _tenant_tokenizer(self, request.data.get("tokenizer"))
        max_length = _int_param(request.data.get("max_length"), "max_length", 1024)
        validation_file = None
        if validation_id := request.data.get("validation_file"):
            validation_file = file_get(tenant=self.tenant, public_id=str(validation_id))
            if validation_file is None:
                raise ApiError(
                    f"No such file: {validation_id}.", code="not_found", param="validation_file", status_code=404
                )
        file_revalidate(
            tenant=self.tenant, file=file, tokenizer=tokenizer, max_length=max_length, validation_file=validation_file
        )
        return Response(file_to_json(file), status=202)


class FilePreviewView(TenantAPIView):
    """The first examples as tokens, each marked trained or masked, for a tokenizer, template and train_on."""

    model = File

    def get(self, request, public_id):
        file = self.get_object()
        params = request.query_params
        reference = params.get("tokenizer")
        if not reference:
            raise ApiError(
                "Choose a tokenizer for the preview: ?tokenizer=tok-… or a pretrained catalog model id.",
                param="tokenizer",
            )
        # A tenant's tokenizer asset (tok-…), or a pretrained catalog model's own tokenizer, which is not tenant data.
        tokenizer = _tenant_tokenizer(self, reference) if reference.startswith("tok-") else reference
        examples = file_preview(
            file=file,
            tokenizer=tokenizer,
            template=params.get("template", "chatml"),
            train_on=params.get("train_on", "completions"),
            max_length=_int_param(params.get("max_length"), "max_length", 1024),
            limit=_int_param(params.get("limit"), "limit", 5),
        )
        label = tokenizer if isinstance(tokenizer, str) else tokenizer.public_id
        return Response({"object": "list", "data": examples, "file": file.public_id, "tokenizer": label})


class TokenizerListCreateView(TenantAPIView):
    model = Tokenizer

    def scoped_queryset(self):
        return Tokenizer.objects.select_related("training_file")

    def get(self, request):
        return Response(cursor_page(self.get_queryset(), query_params=request.query_params, to_json=tokenizer_to_json))

    def post(self, request):
        data = request.data
        file_id = data.get("training_file")
        if not isinstance(file_id, str) or not file_id:
            raise ApiError("Missing required parameter: 'training_file'.", param="training_file")
        training_file = file_get(tenant=self.tenant, public_id=file_id)
        if training_file is None:
            raise ApiError(f"No such file: {file_id}.", code="not_found", param="training_file", status_code=404)
        special_tokens = data.get("special_tokens") or []
        if not isinstance(special_tokens, list):
            raise ApiError("special_tokens must be a list of strings.", param="special_tokens")
        tokenizer = tokenizer_create(
            tenant=self.tenant,
            user=self.tenant_context.user,
            training_file=training_file,
            name=str(data.get("name") or ""),
            algorithm=str(data.get("algorithm") or "bpe"),
            vocab_size=_int_param(data.get("vocab_size"), "vocab_size", 8000),
            special_tokens=special_tokens,
            lowercase=bool(data.get("lowercase", False)),
        )
        return Response(tokenizer_to_json(tokenizer))


class TokenizerDetailView(TenantAPIView):
    model = Tokenizer

    def scoped_queryset(self):
        return Tokenizer.objects.select_related("training_file")

    def get(self, request, public_id):
        return Response(tokenizer_to_json(self.get_object()))

    def delete(self, request, public_id):
        tokenizer_delete(tenant=self.tenant, tokenizer=self.get_object())
        return Response({"object": "tokenizer", "id": public_id, "deleted": True})
