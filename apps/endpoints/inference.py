"""OpenAI-style inference requests: checked here, answered by the serving process over HTTP (workers/serving).

`parse_generation_request` turns a /v1/completions or /v1/chat/completions body into the serving contract's
`/v1/generate` body; `ServingClient` calls a serving process (async httpx, streaming; routed over SERVING_URL's
processes with failover, see routing.py); the `*_json` and `*_chunk` functions
shape serving's answers as OpenAI's objects.
"""

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx
from django.conf import settings

from apps.core.api.errors import ApiError

from .models import Endpoint, EndpointStatus, EndpointTask
from .registry import model_context_length
from .routing import serving_pool, serving_urls

logger = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4
SERVING_CONNECT_TIMEOUT_SECONDS = 5.0
# Serving marks its 503 with this header while it has not read the registry yet: another process can answer.
NOT_READY_HEADER = "X-Serving-Not-Ready"
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# Tokens a chat template may add around each message (role markers, separators) and around the whole prompt
# (BOS, the assistant's turn): generous next to ChatML's handful, so the prompt bound stays an upper bound.
CHAT_TEMPLATE_TOKENS_PER_MESSAGE = 16
PROMPT_SPECIAL_TOKENS = 16


@dataclass(frozen=True)
class GenerationRequest:
    payload: dict  # the serving contract's /v1/generate body
    stream: bool
    include_usage: bool
    # This process holds no tokenizer, so the prompt's tokens are bounded, not counted: see prompt_token_bound.
    prompt_token_bound: int = 0

    @property
    def max_total_tokens(self) -> int:
        """The most tokens this request can be metered for: the prompt (counted once) plus every choice's
        completion; what admission reserves against the token quotas."""
        return self.prompt_token_bound + self.payload["max_tokens"] * self.payload["n"]


def prompt_token_bound(texts: list[str], *, context_length: int, max_tokens: int, messages: int = 0) -> int:
    """An upper bound on the prompt's tokens without tokenizing: byte-level BPE (and byte-fallback) tokenizers never
    make more tokens than the text has UTF-8 bytes, plus what a chat template and special tokens add. Serving refuses
    a prompt that leaves no room for max_tokens in the model's context, so context - max_tokens bounds it as well
    (the usual case for long prompts, where bytes overestimate about fourfold)."""
    by_bytes = sum(len(text.encode()) for text in texts) + PROMPT_SPECIAL_TOKENS
    by_bytes += CHAT_TEMPLATE_TOKENS_PER_MESSAGE * messages
    return max(1, min(by_bytes, context_length - max_tokens))


def _number(body: dict, name: str, default, *, low: float, high: float, whole: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (whole and not isinstance(value, int)):
        raise ApiError(f"{name} must be {'a whole number' if whole else 'a number'}.", param=name)
    if not low <= value <= high:
        raise ApiError(f"{name} must be between {low} and {high}.", param=name)
    return value


def _stop(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError("stop must be a string or a list of non-empty strings.", param="stop")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise ApiError(f"stop takes at most {MAX_STOP_SEQUENCES} sequences.", param="stop")
    return stop


def _text_of(content, param: str) -> str:
    """A message's content: a string, or OpenAI's list of parts of which only text parts are understood."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError("Only text content parts are supported.", param=param)
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError("content must be a string or a list of text parts.", param=param)


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list.", code="missing_required_parameter", param="messages")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise ApiError(
                f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)}.", param=f"messages[{index}].role"
            )
        content = message.get("content")
        checked.append(
            {"role": message["role"], "content": "" if content is None else _text_of(content, f"messages[{index}]")}
        )
    return checked


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # the SDK's list form with one prompt
    if not isinstance(prompt, str):
        raise ApiError(
            "prompt must be a string (one prompt per request).", code="missing_required_parameter", param="prompt"
        )
    return prompt


def ensure_endpoint_answers(endpoint: Endpoint, *, generative: bool) -> None:
    if endpoint.status == EndpointStatus.STOPPED:
        raise ApiError(
            f"The endpoint '{endpoint.name}' is stopped; start it again to send requests.",
            code="endpoint_stopped",
            status_code=409,
        )
    if generative and endpoint.task == EndpointTask.CLASSIFICATION:
        raise ApiError(
            f"The endpoint '{endpoint.name}' serves a classifier; call /v1/endpoints/{endpoint.public_id}/predict.",
            code="not_a_generative_model",
            param="model",
        )
    if not generative and endpoint.task != EndpointTask.CLASSIFICATION:
        raise ApiError(
            f"The endpoint '{endpoint.name}' generates text; call /v1/completions or /v1/chat/completions.",
            code="not_a_classifier",
        )


def parse_generation_request(body: dict, *, endpoint: Endpoint, chat: bool) -> GenerationRequest:
    """Bounds before any GPU second: max_tokens (setting and the model's context), prompt characters, n."""
    ensure_endpoint_answers(endpoint, generative=True)
    defaults = endpoint.generation_defaults or {}
    if chat:
        messages, prompt = _messages(body), None
        prompt_chars = sum(len(message["content"]) for message in messages)
    else:
        messages, prompt = None, _prompt(body)
        prompt_chars = len(prompt)
    if prompt_chars > settings.INFERENCE_MAX_PROMPT_CHARS:
        raise ApiError(
            f"The prompt is {prompt_chars} characters; the limit is {settings.INFERENCE_MAX_PROMPT_CHARS}.",
            code="context_length_exceeded",
            param="messages" if chat else "prompt",
        )
    context_length = model_context_length(endpoint)
    max_tokens_limit = min(settings.INFERENCE_MAX_TOKENS, context_length)
    max_tokens_name = (
        "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    )
    max_tokens = _number(
        body,
        max_tokens_name,
        min(int(defaults.get("max_tokens", 128)), max_tokens_limit),
        low=1,
        high=max_tokens_limit,
        whole=True,
    )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError("stream must be true or false.", param="stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError("stream_options must be an object.", param="stream_options")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError("seed must be a whole number.", param="seed")
    payload = {
        "endpoint": endpoint.public_id,
        "prompt": prompt,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": _number(body, "temperature", defaults.get("temperature", 0.7), low=0.0, high=2.0),
        "top_p": _number(body, "top_p", defaults.get("top_p", 1.0), low=0.0, high=1.0),
        "stop": _stop(body),
        "n": _number(body, "n", 1, low=1, high=settings.INFERENCE_MAX_N, whole=True),
        "seed": seed,
        "stream": stream,
    }
    texts = [message["content"] for message in messages] if chat else [prompt]
    return GenerationRequest(
        payload=payload,
        stream=stream,
        include_usage=bool(stream_options.get("include_usage")),
        prompt_token_bound=prompt_token_bound(
            texts, context_length=context_length, max_tokens=max_tokens, messages=len(messages) if chat else 0
        ),
    )


def parse_predict_inputs(body: dict, *, endpoint: Endpoint) -> list[str]:
    ensure_endpoint_answers(endpoint, generative=False)
    value = body.get("input")
    inputs = [value] if isinstance(value, str) else value
    if not isinstance(inputs, list) or not inputs or not all(isinstance(item, str) for item in inputs):
        raise ApiError("input must be a string or a non-empty list of strings.", param="input")
    if len(inputs) > settings.INFERENCE_MAX_PREDICT_INPUTS:
        raise ApiError(f"input takes at most {settings.INFERENCE_MAX_PREDICT_INPUTS} texts.", param="input")
    if sum(len(item) for item in inputs) > settings.INFERENCE_MAX_PROMPT_CHARS:
        raise ApiError(
            f"The inputs hold more than {settings.INFERENCE_MAX_PROMPT_CHARS} characters.",
            code="context_length_exceeded",
            param="input",
        )
    return inputs


def predict_token_bound(inputs: list[str], *, endpoint: Endpoint) -> int:
    """An upper bound on a classification's tokens: each input's bytes plus its special tokens, at most the model's
    context (serving truncates each input to it)."""
    context_length = model_context_length(endpoint)
    return sum(min(len(text.encode()) + PROMPT_SPECIAL_TOKENS, context_length) for text in inputs)


# --- Serving client ------------------------------------------------------------------------------------------------


class ServingError(ApiError):
    """Serving answered an error (passed on with its status and code) or could not be reached (503)."""


def _serving_error_from(response_status: int, raw: bytes) -> ServingError:
    try:
        error = json.loads(raw)["error"]
        message, code, param = str(error.get("message")), error.get("code"), error.get("param")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, code, param = "The serving process answered an error.", "serving_error", None
    status = response_status if 400 <= response_status < 600 else 502
    if status >= 500 and status != 503:
        status = 502  # serving's own bug: a bad gateway from here, never a 500 of this process
    return ServingError(message, code=code or "serving_error", param=param, status_code=status)


def _unavailable(detail: str) -> ServingError:
    return ServingError(
        f"The inference service is unavailable ({detail}); try again shortly.",
        code="serving_unavailable",
        status_code=503,
    )


class ServingClient:
    """One request to serving for one endpoint, routed over SERVING_URL's processes (see routing.py): a process
    that cannot be reached, or that answers before it has read the registry, is passed over for the next one.

    Retries happen only before anything of the answer came back (nothing of it reached the caller), so a request
    is never answered twice; a read timeout is not retried (the process is alive but slow, and another try would
    only double the load). `open_stream` hands back the open stream, its first event already read (a process that
    dies between its headers and its first event is passed over too), for the caller to iterate and close."""

    def __init__(self, endpoint: Endpoint):
        if not serving_urls(settings.SERVING_URL):
            raise _unavailable("SERVING_URL is not set")
        self.pool = serving_pool(settings.SERVING_URL, backoff_seconds=settings.SERVING_FAILURE_BACKOFF_SECONDS)
        self.endpoint_id = endpoint.public_id
        # max_replicas bounds how many processes share the endpoint's traffic (and so hold its model).
        self.spread = max(1, endpoint.max_replicas or 1)
        self.headers = {"X-Serving-Token": settings.SERVING_TOKEN}
        self.timeout = httpx.Timeout(settings.SERVING_TIMEOUT_SECONDS, connect=SERVING_CONNECT_TIMEOUT_SECONDS)

    async def _send(
        self, path: str, body: dict, *, first_read: Callable[[httpx.Response], Awaitable[object]] | None = None
    ) -> tuple[str, httpx.AsyncClient, httpx.Response]:
        """The first process's open (streamed) response; the caller reads and closes it, and ends its count.
        ``first_read`` reads the beginning of a successful response while another process may still take the
        request: a process that breaks off during it is passed over like one that never answered."""
        failure = "no serving process answered"
        for url in self.pool.candidates(self.endpoint_id, spread=self.spread):
            client = httpx.AsyncClient(timeout=self.timeout)
            self.pool.begin(url)
            try:
                request = client.build_request("POST", url + path, json=body, headers=self.headers)
                response = await client.send(request, stream=True)
            except httpx.ReadTimeout as error:
                await self._abandon(url, client)
                raise _unavailable(type(error).__name__) from error
            except Exception as error:  # noqa: BLE001
                # Refused, reset, connect timeout, died before answering: nothing came back yet, so the next process
                # may answer. Not only httpx's TransportError: a connection the process reset while it was being
                # opened can surface from below httpx as another error (seen in CI when a serving process was
                # SIGKILLed: anyio's AttributeError on a socket already gone, a 500 for the caller).
                await self._abandon(url, client)
                self.pool.mark_failed(url)
                logger.warning("serving at %s failed (%r); trying the next process", url, error)
                failure = type(error).__name__
                continue
            except BaseException:  # the caller went away (cancelled): its count must not stay in flight
                await self._abandon(url, client)
                raise
            if response.status_code == 503 and response.headers.get(NOT_READY_HEADER):
                await self._abandon(url, client, response)
                self.pool.mark_failed(url)  # it is starting: let it read the registry before the next try
                failure = "serving_not_ready"
                continue
            if first_read is not None and response.status_code < 400:
                try:
                    await first_read(response)
                except httpx.ReadTimeout as error:
                    await self._abandon(url, client, response)
                    raise _unavailable(type(error).__name__) from error
                except Exception as error:  # noqa: BLE001
                    # Killed after its headers, before its answer or first event (seen in CI): nothing of it reached
                    # the caller yet.
                    await self._abandon(url, client, response)
                    self.pool.mark_failed(url)
                    logger.warning("serving at %s broke off before answering (%r); trying the next process", url, error)
                    failure = type(error).__name__
                    continue
                except BaseException:
                    await self._abandon(url, client, response)
                    raise
            self.pool.mark_up(url)
            return url, client, response
        raise _unavailable(failure)

    async def _abandon(self, url: str, client: httpx.AsyncClient, response: httpx.Response | None = None) -> None:
        """Closes ``response`` (when one came) and the client, and ends the process's in-flight count."""
        self.pool.end(url)
        if response is not None:
            await response.aclose()
        await client.aclose()

    async def post_json(self, path: str, body: dict) -> dict:
        # A successful answer is read whole while another process may still take the request.
        url, client, response = await self._send(path, body, first_read=lambda response: response.aread())
        try:
            raw = await response.aread()  # already read, unless serving answered an error
        except httpx.HTTPError as error:
            raise _unavailable(type(error).__name__) from error
        finally:
            await self._abandon(url, client, response)
        if response.status_code >= 400:
            raise _serving_error_from(response.status_code, raw)
        try:
            return json.loads(raw)
        except ValueError:
            raise ServingError("The serving process answered no JSON.", code="serving_error", status_code=502) from None

    async def open_stream(self, path: str, body: dict) -> "ServingStream":
        answered: list[ServingEvents] = []  # the events of the response that gave its first one

        async def read_first_event(response: httpx.Response) -> None:
            events = ServingEvents(response)
            await events.read_first()
            answered.append(events)

        url, client, response = await self._send(path, body, first_read=read_first_event)
        if response.status_code >= 400:
            try:
                raw = await response.aread()
            except httpx.HTTPError:
                raw = b""
            await self._abandon(url, client, response)
            raise _serving_error_from(response.status_code, raw)
        return ServingStream(client, response, answered[-1], on_close=lambda: self.pool.end(url))


class StreamBrokenOff(Exception):
    """Serving's stream ended before its first event without saying `[DONE]`."""


class ServingEvents:
    """Serving's SSE events as dicts, up to `[DONE]`, from one response; the first one can be read ahead."""

    def __init__(self, response: httpx.Response):
        self._lines = response.aiter_lines()
        self._first: dict | None = None
        self._ended = False
        self._done = False

    async def read_first(self) -> None:
        """Wait for the first event and keep it for `__aiter__`; raises if the stream breaks off before it."""
        self._first = await self._next()
        self._ended = self._first is None
        if self._ended and not self._done:
            raise StreamBrokenOff("the stream ended before its first event")

    async def _next(self) -> dict | None:
        """The next event; None at `[DONE]` or at the end of the stream."""
        async for line in self._lines:
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                self._done = True
                return None
            try:
                event = json.loads(data)
            except ValueError:
                continue
            if isinstance(event, dict):
                return event
        return None

    async def __aiter__(self) -> AsyncIterator[dict]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        while not self._ended and (event := await self._next()) is not None:
            yield event
        self._ended = True


class ServingStream:
    def __init__(self, client: httpx.AsyncClient, response: httpx.Response, events: ServingEvents, *, on_close=None):
        self.client, self.response = client, response
        self._events = events
        self._on_close = on_close

    def events(self) -> AsyncIterator[dict]:
        """Serving's SSE events as dicts, up to `[DONE]` (the first one read while the request could still fail
        over)."""
        return aiter(self._events)

    def forget(self) -> None:
        """Stop counting the stream as in flight without closing it (its event loop is gone: nothing can)."""
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    async def close(self) -> None:
        """Idempotent: the relay closes the stream when it ends and again in its `finally`."""
        try:
            await self.response.aclose()
            await self.client.aclose()
        finally:
            self.forget()


# --- OpenAI shapes ---------------------------------------------------------------------------------------------------


def new_completion_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_urlsafe(18)


def usage_json(usage: dict | None) -> dict:
    usage = usage or {}
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_json(result: dict, *, completion_id: str, model: str, chat: bool) -> dict:
    choices = []
    for choice in result.get("choices") or []:
        if chat:
            message = {"role": "assistant", "content": choice.get("text", ""), "refusal": None}
            choices.append(
                {
                    "index": choice.get("index", 0),
                    "message": message,
                    "finish_reason": choice.get("finish_reason"),
                    "logprobs": None,
                }
            )
        else:
            choices.append(
                {
                    "index": choice.get("index", 0),
                    "text": choice.get("text", ""),
                    "finish_reason": choice.get("finish_reason"),
                    "logprobs": None,
                }
            )
    return {
        "id": completion_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": f"rev-{result.get('revision')}" if result.get("revision") is not None else None,
        "choices": choices,
        "usage": usage_json(result.get("usage")),
    }


def chunk_json(
    *,
    completion_id: str,
    model: str,
    chat: bool,
    created: int,
    choices: list[dict],
    usage: dict | None = None,
    include_usage: bool = False,
) -> dict:
    chunk = {
        "id": completion_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
    }
    if include_usage:
        chunk["usage"] = usage  # null on every chunk but the last, as OpenAI sends it
    return chunk


def chunk_choice(event: dict, *, chat: bool, first_of_index: bool) -> dict:
    text = event.get("text") or ""
    if chat:
        delta = {"role": "assistant", "content": text} if first_of_index else {"content": text}
        if event.get("finish_reason") and not text and not first_of_index:
            delta = {}
        return {
            "index": event.get("index", 0),
            "delta": delta,
            "finish_reason": event.get("finish_reason"),
            "logprobs": None,
        }
    return {"index": event.get("index", 0), "text": text, "finish_reason": event.get("finish_reason"), "logprobs": None}


def sse(data) -> bytes:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n".encode()
