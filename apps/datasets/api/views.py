"""`/v1/files` (OpenAI's Files API, purpose `fine-tune`) plus validation, token preview and `/v1/tokenizers`."""

import json

from drf_spectacular.utils import OpenApiParameter, OpenApiTypes, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response

from apps.core.api.base import TenantAPIView
from apps.core.api.errors import ApiError
from apps.core.api.pagination import cursor_page
from apps.core.api.schema import (
    ERROR_RESPONSES,
    ORDER_PARAMETER,
    PAGE_PARAMETERS,
    ErrorSerializer,
    deleted,
    list_of,
)
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


# --- Shapes for the OpenAPI schema ---------------------------------------------------------------------------------

_file = inline_serializer(
    "File",
    {
        "object": serializers.CharField(default="file"),
        "id": serializers.CharField(),
        "bytes": serializers.IntegerField(),
        "created_at": serializers.IntegerField(),
        "expires_at": serializers.IntegerField(allow_null=True),
        "filename": serializers.CharField(),
        "purpose": serializers.CharField(default="fine-tune"),
        "status": serializers.ChoiceField(choices=["uploaded", "processed", "error"]),
        "status_details": serializers.CharField(allow_null=True),
        "sha256": serializers.CharField(help_text="Tunehouse: the content's SHA-256."),
        "format": serializers.CharField(allow_null=True, help_text="Tunehouse: the format validation found."),
        "task": serializers.CharField(allow_null=True, help_text="Tunehouse: the task the file trains."),
        "column_mapping": serializers.DictField(allow_null=True, help_text="Tunehouse: which columns mean what."),
        "validation_report": serializers.DictField(allow_null=True, help_text="Tunehouse: what validation found."),
    },
)
_tokenizer = inline_serializer(
    "Tokenizer",
    {
        "object": serializers.CharField(default="tokenizer"),
        "id": serializers.CharField(),
        "name": serializers.CharField(),
        "created_at": serializers.IntegerField(),
        "algorithm": serializers.CharField(),
        "vocab_size": serializers.IntegerField(),
        "special_tokens": serializers.ListField(child=serializers.CharField()),
        "lowercase": serializers.BooleanField(),
        "training_file": serializers.CharField(),
        "status": serializers.ChoiceField(choices=["training", "ready", "failed"]),
        "error": serializers.CharField(allow_null=True),
        "report": serializers.DictField(allow_null=True),
    },
)
_preview_example = inline_serializer(
    "FilePreviewExample",
    {
        "line": serializers.IntegerField(help_text="The example's line in the file."),
        "truncated": serializers.BooleanField(),
        "num_tokens": serializers.IntegerField(),
        "num_trained": serializers.IntegerField(),
        "tokens": serializers.ListField(
            child=inline_serializer(
                "FilePreviewToken",
                {
                    "id": serializers.IntegerField(),
                    "token": serializers.CharField(),
                    "text": serializers.CharField(),
                    "trained": serializers.BooleanField(),
                },
            )
        ),
    },
)


class FileListCreateView(TenantAPIView):
    model = File

    @extend_schema(
        summary="List files",
        operation_id="listFiles",
        parameters=[
            *PAGE_PARAMETERS,
            ORDER_PARAMETER,
            OpenApiParameter("purpose", str, description="Only files of this purpose (fine-tune)."),
        ],
        responses={200: list_of("FileList", _file), **ERROR_RESPONSES},
    )
    def get(self, request):
        files = self.get_queryset()
        if purpose := request.query_params.get("purpose"):
            files = files.filter(purpose=purpose)
        return Response(cursor_page(files, query_params=request.query_params, to_json=file_to_json))

    @extend_schema(
        summary="Upload a file",
        operation_id="createFile",
        request={
            "multipart/form-data": inline_serializer(
                "CreateFile",
                {
                    "file": serializers.FileField(
                        help_text="The dataset: .jsonl, .json, .csv, .tsv, .parquet or .txt."
                    ),
                    "purpose": serializers.ChoiceField(choices=["fine-tune"]),
                    "column_mapping": serializers.JSONField(
                        required=False, help_text="Tunehouse: a JSON object naming which columns mean what."
                    ),
                },
            )
        },
        responses={200: _file, 413: ErrorSerializer, **ERROR_RESPONSES},
    )
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

    @extend_schema(summary="Retrieve a file", operation_id="retrieveFile", responses={200: _file, **ERROR_RESPONSES})
    def get(self, request, public_id):
        return Response(file_to_json(self.get_object()))

    @extend_schema(
        summary="Delete a file",
        operation_id="deleteFile",
        responses={200: deleted("FileDeleted", "file"), **ERROR_RESPONSES},
    )
    def delete(self, request, public_id):
        file = self.get_object()
        file_delete(tenant=self.tenant, file=file)
        return Response({"object": "file", "id": public_id, "deleted": True})


class FileContentView(TenantAPIView):
    model = File

    @extend_schema(
        summary="Download a file's content",
        operation_id="downloadFile",
        responses={(200, "application/octet-stream"): OpenApiTypes.BINARY, 404: ErrorSerializer},
    )
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

    @extend_schema(
        summary="Validate a file again (Tunehouse)",
        operation_id="validateFile",
        request=inline_serializer(
            "ValidateFile",
            {
                "tokenizer": serializers.CharField(
                    required=False, help_text="A tokenizer id (tok-...) for the token-length histogram."
                ),
                "max_length": serializers.IntegerField(required=False, default=1024),
                "validation_file": serializers.CharField(
                    required=False, help_text="A file id (file-...) to measure the overlap with."
                ),
            },
        ),
        responses={202: _file, **ERROR_RESPONSES},
    )
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

    @extend_schema(
        summary="Preview a file's first examples as tokens (Tunehouse)",
        operation_id="previewFile",
        parameters=[
            OpenApiParameter(
                "tokenizer",
                str,
                required=True,
                description="A tokenizer id (tok-...) or a pretrained catalog model id.",
            ),
            OpenApiParameter("template", str, enum=["chatml", "llama3", "plain"], description="Default chatml."),
            OpenApiParameter("train_on", str, enum=["completions", "all"], description="Default completions."),
            OpenApiParameter("max_length", int, description="8 to 131072 (default 1024)."),
            OpenApiParameter("limit", int, description="How many examples (default 5)."),
        ],
        responses={
            200: inline_serializer(
                "FilePreview",
                {
                    "object": serializers.CharField(default="list"),
                    "data": serializers.ListField(child=_preview_example),
                    "file": serializers.CharField(),
                    "tokenizer": serializers.CharField(),
                },
            ),
            **ERROR_RESPONSES,
        },
    )
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

    @extend_schema(
        summary="List tokenizers (Tunehouse)",
        operation_id="listTokenizers",
        parameters=[*PAGE_PARAMETERS, ORDER_PARAMETER],
        responses={200: list_of("TokenizerList", _tokenizer), **ERROR_RESPONSES},
    )
    def get(self, request):
        return Response(cursor_page(self.get_queryset(), query_params=request.query_params, to_json=tokenizer_to_json))

    @extend_schema(
        summary="Train a tokenizer on a file (Tunehouse)",
        operation_id="createTokenizer",
        request=inline_serializer(
            "CreateTokenizer",
            {
                "training_file": serializers.CharField(help_text="The id of an uploaded file (file-...)."),
                "name": serializers.CharField(required=False),
                "algorithm": serializers.ChoiceField(
                    choices=["bpe", "wordpiece", "unigram"], required=False, default="bpe"
                ),
                "vocab_size": serializers.IntegerField(required=False, default=8000),
                "special_tokens": serializers.ListField(child=serializers.CharField(), required=False),
                "lowercase": serializers.BooleanField(required=False, default=False),
            },
        ),
        responses={200: _tokenizer, **ERROR_RESPONSES},
    )
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

    @extend_schema(
        summary="Retrieve a tokenizer (Tunehouse)",
        operation_id="retrieveTokenizer",
        responses={200: _tokenizer, **ERROR_RESPONSES},
    )
    def get(self, request, public_id):
        return Response(tokenizer_to_json(self.get_object()))

    @extend_schema(
        summary="Delete a tokenizer (Tunehouse)",
        operation_id="deleteTokenizer",
        responses={200: deleted("TokenizerDeleted", "tokenizer"), **ERROR_RESPONSES},
    )
    def delete(self, request, public_id):
        tokenizer_delete(tenant=self.tenant, tokenizer=self.get_object())
        return Response({"object": "tokenizer", "id": public_id, "deleted": True})
