"""Errors in OpenAI's shape: `{"error": {"code", "message", "param", "type"}}`, so SDKs raise their usual types."""

from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler


class ApiError(exceptions.APIException):
    """A 4xx the caller can act on: `code` is stable for programs, `message` is a sentence for people."""

    status_code = status.HTTP_400_BAD_REQUEST

    def __init__(self, message: str, *, code: str = "invalid_request", param: str | None = None, status_code=None):
        super().__init__(detail=message, code=code)
        self.error_code = code
        self.param = param
        if status_code is not None:
            self.status_code = status_code


_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(*, message: str, code: str | None, param: str | None, status_code: int) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPE_BY_STATUS.get(status_code, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def _first_validation_error(detail, prefix: str = "") -> tuple[str | None, str]:
    """The first (param, message) in DRF's nested error detail."""
    if isinstance(detail, dict):
        for field, value in detail.items():
            name = field if field != "non_field_errors" else None
            param, message = _first_validation_error(value, f"{prefix}{field}." if name else prefix)
            return (param or (f"{prefix}{name}" if name else None)), message
    if isinstance(detail, list) and detail:
        return _first_validation_error(detail[0], prefix)
    return None, str(detail)


def openai_exception_handler(exc, context):
    if isinstance(exc, ValidationError):
        exc = exceptions.ValidationError(exc.message_dict if hasattr(exc, "error_dict") else exc.messages)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    if isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    response = exception_handler(exc, context)
    if response is None:
        return None  # a real bug: let Django log it and answer 500
    if isinstance(exc, ApiError):
        body = error_body(message=str(exc.detail), code=exc.error_code, param=exc.param, status_code=exc.status_code)
    elif isinstance(exc, exceptions.ValidationError):
        param, message = _first_validation_error(exc.detail)
        if param and param not in message:
            message = f"{param}: {message}"
        body = error_body(message=message, code="invalid_request", param=param, status_code=response.status_code)
    elif isinstance(exc, exceptions.NotFound):
        body = error_body(
            message=str(exc.detail) if str(exc.detail) != "Not found." else "No such object.",
            code="not_found",
            param=None,
            status_code=404,
        )
    elif isinstance(exc, exceptions.NotAuthenticated):
        body = error_body(
            message="You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
            code="missing_api_key",
            param=None,
            status_code=401,
        )
        response.status_code = status.HTTP_401_UNAUTHORIZED
    else:
        codes = exc.get_codes() if hasattr(exc, "get_codes") else None
        body = error_body(
            message=str(exc.detail),
            code=codes if isinstance(codes, str) else None,
            param=None,
            status_code=response.status_code,
        )
    headers = _passthrough_headers(response)
    headers.update(getattr(exc, "headers", None) or {})  # e.g. the x-ratelimit-* of an inference refusal
    return Response(body, status=response.status_code, headers=headers)


def _passthrough_headers(response) -> dict:
    return {name: response[name] for name in ("WWW-Authenticate", "Retry-After", "Allow") if response.has_header(name)}
