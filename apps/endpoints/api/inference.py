"""OpenAI-compatible `/v1/completions` and `/v1/chat/completions`, as async Django views.

Plain Django views rather than DRF ones because DRF views are synchronous: a streamed answer would hold a worker
thread for its whole length. Under ASGI (uvicorn) each stream is a coroutine relaying serving's SSE as OpenAI's
chunks. Authentication is the same as the REST API's: an API key (`Authorization: Bearer`), or the dashboard's
session with its CSRF token. Errors use OpenAI's shape.
"""

import asyncio
import concurrent.futures
import json
import logging
import time
import weakref
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from apps.core.api.errors import ApiError, error_body
from apps.tenancy.context import TenantContext, context_for_api_key
from apps.tenancy.services import api_key_authenticate

from ..inference import (
    GenerationRequest,
    ServingClient,
    chunk_choice,
    chunk_json,
    completion_json,
    new_completion_id,
    parse_generation_request,
    sse,
    usage_json,
)
from ..limits import RateLimited, Reservation, inference_reserve, inference_settle
from ..models import Endpoint, RequestKind
from ..selectors import endpoint_for_model
from ..services import endpoint_request_record

logger = logging.getLogger(__name__)


def _error_response(error: ApiError) -> JsonResponse:
    response = JsonResponse(
        error_body(message=str(error.detail), code=error.error_code, param=error.param, status_code=error.status_code),
        status=error.status_code,
    )
    if isinstance(error, RateLimited):
        response["Retry-After"] = str(error.retry_after)
    for name, value in (getattr(error, "headers", None) or {}).items():
        response[name] = value  # x-ratelimit-* on refusals by the limits too
    if error.status_code == 401:
        response["WWW-Authenticate"] = 'Bearer realm="api"'
    return response


class _CsrfCheck(CsrfViewMiddleware):
    def _reject(self, request, reason):
        return reason


def _tenant_context(request: HttpRequest) -> TenantContext:
    """The API key's tenant, or the signed-in session's (which must carry its CSRF token, as DRF requires)."""
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, secret = header.partition(" ")
        api_key = api_key_authenticate(secret=secret.strip()) if scheme.lower() == "bearer" else None
        if api_key is None:
            raise ApiError(
                "Incorrect API key provided, or the key was revoked.", code="invalid_api_key", status_code=401
            )
        context = context_for_api_key(api_key)
        if not context.can_run_inference:
            raise ApiError(
                f"This API key is read-only: it cannot run inference ({request.method} {request.path}).",
                code="insufficient_permissions",
                status_code=403,
            )
        return context
    context = getattr(request, "tenant_context", None)
    if context is None:
        raise ApiError(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
            code="missing_api_key",
            status_code=401,
        )
    check = _CsrfCheck(lambda r: None)
    check.process_request(request)
    if (reason := check.process_view(request, None, (), {})) is not None:
        raise ApiError(f"CSRF check failed: {reason}", code="csrf_failed", status_code=403)
    return context


@dataclass
class _Admitted:
    context: TenantContext
    endpoint: Endpoint
    generation: GenerationRequest
    model: str
    reservation: Reservation

    def rate_limit_headers(self, response):
        for name, value in self.reservation.headers.items():
            response[name] = value
        return response


def _admit(request: HttpRequest, body, *, chat: bool, started: float) -> _Admitted:
    """Who asks, for which endpoint, within which limits and bounds. Raises ApiError; once the endpoint is known,
    a refusal is metered like any other answer."""
    context = _tenant_context(request)
    if not isinstance(body, dict):
        raise ApiError("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError("Missing required parameter: 'model'.", code="missing_required_parameter", param="model")
    endpoint = endpoint_for_model(tenant=context.tenant, model=model, api_key=context.api_key)
    if endpoint is None:
        # Another tenant's endpoint (or one the key may not use) reads exactly like a name that does not exist.
        raise ApiError(f"The model '{model}' does not exist.", code="model_not_found", param="model", status_code=404)
    try:
        # Parsed first: the reservation needs max_tokens and n, and a malformed request should not use up a slot.
        generation = parse_generation_request(body, endpoint=endpoint, chat=chat)
        reservation = inference_reserve(
            tenant=context.tenant, api_key=context.api_key, tokens=generation.max_total_tokens
        )
    except ApiError as error:
        _record(
            context, endpoint, chat=chat, status_code=error.status_code, started=started, error_code=error.error_code
        )
        raise
    return _Admitted(context=context, endpoint=endpoint, generation=generation, model=model, reservation=reservation)


def _record(
    context,
    endpoint,
    *,
    chat: bool,
    status_code: int,
    started: float,
    usage: dict | None = None,
    first_token_at: float | None = None,
    error_code: str = "",
    reservation: Reservation | None = None,
    usage_unknown: bool = False,
) -> None:
    """Meters the request and settles its token reservation to what was metered; `usage_unknown` (tokens went out
    but serving's count never came) keeps the whole reservation instead."""
    usage = usage_json(usage)
    endpoint_request_record(
        tenant=context.tenant,
        endpoint=endpoint,
        endpoint_public_id=endpoint.public_id,
        api_key=context.api_key,
        kind=RequestKind.CHAT if chat else RequestKind.COMPLETION,
        status_code=status_code,
        prompt_tokens=usage["prompt_tokens"],
        completion_tokens=usage["completion_tokens"],
        latency_ms=(time.monotonic() - started) * 1000,
        time_to_first_token_ms=None if first_token_at is None else (first_token_at - started) * 1000,
        error_code=error_code,
    )
    if reservation is not None:
        inference_settle(reservation, used_tokens=None if usage_unknown else usage["total_tokens"])


async def _generate(request: HttpRequest, *, chat: bool):
    started = time.monotonic()
    try:
        body = json.loads(request.body or b"null")
    except ValueError:
        return _error_response(ApiError("The request body is not valid JSON."))
    try:
        admitted = await sync_to_async(_admit)(request, body, chat=chat, started=started)
    except ApiError as error:
        return _error_response(error)
    record = sync_to_async(_record)
    context, endpoint = admitted.context, admitted.endpoint
    try:
        client = ServingClient(endpoint)
        if not admitted.generation.stream:
            result = await client.post_json("/v1/generate", admitted.generation.payload)
        else:
            stream = await client.open_stream("/v1/generate", admitted.generation.payload)
    except ApiError as error:
        await record(
            context,
            endpoint,
            chat=chat,
            status_code=error.status_code,
            started=started,
            error_code=error.error_code,
            reservation=admitted.reservation,
        )
        return admitted.rate_limit_headers(_error_response(error))
    completion_id = new_completion_id(chat)
    if not admitted.generation.stream:
        await record(
            context,
            endpoint,
            chat=chat,
            status_code=200,
            started=started,
            usage=result.get("usage"),
            first_token_at=time.monotonic(),
            reservation=admitted.reservation,
        )
        return admitted.rate_limit_headers(
            JsonResponse(completion_json(result, completion_id=completion_id, model=admitted.model, chat=chat))
        )
    relay = _Relay(stream, admitted, chat=chat, completion_id=completion_id, started=started)
    response = _RelayResponse(relay.chunks(), relay, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # a proxy in front must not hold the tokens back
    return admitted.rate_limit_headers(response)


# Relays finished from outside their loop (see _Relay.finish_soon): referenced until done.
_finishing: set[concurrent.futures.Future] = set()


class _Relay:
    """Serving's events as OpenAI chunks (``chunks``); the request is metered and serving's stream closed once
    however it ends: at the end of the stream, or in the generator's ``finally`` when the client goes away or serving
    breaks off mid-stream.

    A client that leaves before Django starts iterating (while middleware still runs after the view, or while the
    headers go out) never starts the generator, and an async generator that never started runs no ``finally``: the
    serving connection, its in-flight count and the request's metering would be left behind. ``finish_soon`` covers
    that case; the response calls it when Django closes it and when it is dropped unclosed."""

    def __init__(self, stream, admitted: _Admitted, *, chat: bool, completion_id: str, started: float) -> None:
        self.stream, self.admitted, self.chat = stream, admitted, chat
        self.completion_id, self.started = completion_id, started
        self.usage: dict | None = None
        self.first_token_at: float | None = None
        self.status_code, self.error_code = 200, ""
        self.relaying = False
        self._recorded = False
        self._loop = asyncio.get_running_loop()

    async def chunks(self):
        self.relaying = True
        created = int(time.time())
        include_usage = self.admitted.generation.include_usage
        seen_indexes = set()
        try:
            async for event in self.stream.events():
                if "usage" in event and "text" not in event:
                    self.usage = event["usage"]
                    continue
                if "error" in event:
                    self.status_code = 502
                    self.error_code = str((event["error"] or {}).get("code") or "serving_error")
                    yield sse({"error": event["error"]})
                    break
                if self.first_token_at is None and event.get("text"):
                    self.first_token_at = time.monotonic()
                index = event.get("index", 0)
                choice = chunk_choice(event, chat=self.chat, first_of_index=index not in seen_indexes)
                seen_indexes.add(index)
                yield sse(self._chunk(created, choices=[choice], include_usage=include_usage))
            # Metered before the closing chunks: a client that reads its usage right after [DONE] must find this row.
            await self.finish()
            if include_usage and self.status_code == 200:
                yield sse(self._chunk(created, choices=[], usage=usage_json(self.usage), include_usage=True))
            yield sse("[DONE]")
        except Exception:
            self.status_code, self.error_code = 502, "stream_interrupted"
            raise
        finally:
            await self.finish()  # the client went away or serving broke off: the request is still metered

    def _chunk(self, created: int, **fields) -> dict:
        return chunk_json(
            completion_id=self.completion_id, model=self.admitted.model, chat=self.chat, created=created, **fields
        )

    async def finish(self) -> None:
        """Close serving's stream (idempotent) and meter the request, once."""
        await self.stream.close()
        if self._recorded:
            return
        self._recorded = True
        await sync_to_async(_record)(
            self.admitted.context,
            self.admitted.endpoint,
            chat=self.chat,
            status_code=self.status_code,
            started=self.started,
            usage=self.usage,
            first_token_at=self.first_token_at,
            error_code=self.error_code,
            reservation=self.admitted.reservation,
            # Text went out but serving's count did not come (client gone, stream broken): charge the worst case.
            usage_unknown=self.usage is None and self.first_token_at is not None,
        )

    def finish_soon(self) -> None:
        """From any thread: finish a relay whose generator never ran, on the event loop its stream belongs to."""
        if self.relaying or self._recorded:
            return
        self.status_code, self.error_code = 499, "client_disconnected"  # nothing reached the client
        try:
            future = asyncio.run_coroutine_threadsafe(self.finish(), self._loop)
        except RuntimeError:  # the loop is gone, and the connection with it: only the in-flight count is left
            self.stream.forget()
            logger.warning("a relay was dropped after its event loop closed; the request is not metered")
            return
        _finishing.add(future)
        future.add_done_callback(_finishing.discard)


class _RelayResponse(StreamingHttpResponse):
    """Finishes a relay that never ran when Django closes the response (the client left while the headers went out)
    or when the response is dropped unclosed (the client left while middleware ran after the view)."""

    def __init__(self, content, relay: _Relay, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.relay = relay
        weakref.finalize(self, relay.finish_soon).atexit = False

    def close(self) -> None:
        super().close()
        self.relay.finish_soon()


@csrf_exempt  # checked in _tenant_context for session callers only; API keys need none
@require_POST
async def completions(request: HttpRequest):
    return await _generate(request, chat=False)


@csrf_exempt
@require_POST
async def chat_completions(request: HttpRequest):
    return await _generate(request, chat=True)
