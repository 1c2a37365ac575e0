"""Reading a request's JSON object body against the fields a route knows, for the Tunehouse routes that take a
plain object instead of a serializer."""

from .errors import ApiError


def request_object(request, allowed: tuple[str, ...]) -> dict:
    """The body as a dict; a body that is not a JSON object, or names a field not in ``allowed``, is a 400 (OpenAI
    refuses unknown arguments the same way, so a typo never passes silently)."""
    body = request.data
    # A form-encoded body arrives as a QueryDict; its `.dict()` keeps the last value of each field, as DRF does.
    if hasattr(body, "dict") and callable(body.dict):
        body = body.dict()
    if not isinstance(body, dict):
        raise ApiError("The request body must be a JSON object.")
    for name in body:
        if name not in allowed:
            raise ApiError(
                f"Unrecognized request argument supplied: {name}. Known: {', '.join(allowed)}.",
                code="unknown_parameter",
                param=name,
            )
    return body
