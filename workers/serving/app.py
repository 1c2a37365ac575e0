"""The serving process's HTTP API, a plain ASGI application (only the web process calls it).

``GET /healthz``, ``GET /readyz``, ``GET /v1/deployments``, ``POST /v1/generate``, ``POST /v1/classify``. Every
route but the two probes needs ``X-Serving-Token`` when SERVING_TOKEN is set. Errors look like OpenAI's:
``{"error": {"message", "code", "param", "type"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from workers.serving.batching import SamplingParams, Sequence, TokenEvent
from workers.serving.chat import ChatTemplateError, render_chat_prompt
from workers.serving.config import ServingConfig
from workers.serving.manager import EndpointNotFound, ModelManager, ModelUnavailable, ServedModel
from workers.serving.registry import CLASSIFICATION, GENERATIVE_TASKS, SEQ2SEQ, Deployment
from workers.serving.watcher import RegistryWatcher
from workers.storage import store_from_env

logger = logging.getLogger(__name__)

MAX_CHOICES = 16
MAX_STOP_STRINGS = 4
MAX_CLASSIFY_INPUTS = 256
MAX_BODY_BYTES = 8 * 1024 * 1024


# Marks the 503 of a process that has not read the registry yet, so the web process tries another one instead.
NOT_READY_HEADER = b"x-serving-not-ready"


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers or []

    def body(self) -> dict[str, Any]:
        error_type = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "code": self.code, "param": self.param, "type": error_type}}


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, "invalid_parameter", message, param)


class ServingService:
    """What the app runs: the registry watcher and the model manager (started by the ASGI lifespan)."""

    def __init__(self, config: ServingConfig) -> None:
        self.config = config
        self.watcher = RegistryWatcher(
            config.redis_url,
            config.instance_id,
            poll_seconds=config.registry_poll_seconds,
            advertised_url=config.advertised_url,
        )
        store = store_from_env(default_root=config.data_dir / "storage")
        self.manager = ModelManager(config, store, self.watcher.report_status)
        self.started = False

    def start(self) -> None:
        if self.started:
            return
        torch.set_num_threads(self.config.threads)
        self.watcher.start(self.manager)
        self.started = True

    def stop(self) -> None:
        if not self.started:
            return
        self.watcher.stop()
        self.manager.close()
        self.started = False

    @property
    def ready(self) -> bool:
        return self.watcher.registry_read.is_set()

    @property
    def knows_deployments(self) -> bool:
        return self.watcher.registry_loaded.is_set()


@dataclass
class _Response:
    status: int
    body: Any


class ServingApp:
    def __init__(self, config: ServingConfig | None = None) -> None:
        self.config = config or ServingConfig.from_env()
        self.service = ServingService(self.config)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            await self._handle(scope, receive, send)
        except ApiError as error:
            await _send_json(send, error.status, error.body(), headers=error.headers)
        except Exception:  # noqa: BLE001 - never a bare 500 page
            logger.exception("request failed")
            await _send_json(send, 500, ApiError(500, "internal_error", "The serving process failed.").body())

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await asyncio.to_thread(self.service.start)
                except Exception as error:  # noqa: BLE001
                    await send({"type": "lifespan.startup.failed", "message": str(error)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await asyncio.to_thread(self.service.stop)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _handle(self, scope, receive, send) -> None:
        method, path = scope["method"], scope["path"]
        if path == "/healthz" and method == "GET":
            await _send_json(send, 200, {"status": "ok"})
            return
        if path == "/readyz" and method == "GET":
            ready = self.service.ready
            await _send_json(send, 200 if ready else 503, {"status": "ready" if ready else "starting"})
            return
        routes = {
            ("GET", "/v1/deployments"): None,
            ("POST", "/v1/generate"): self._generate,
            ("POST", "/v1/classify"): self._classify,
        }
        if (method, path) not in routes:
            known_paths = {p for _, p in routes}
            if path in known_paths:
                raise ApiError(405, "method_not_allowed", f"{method} is not allowed on {path}.")
            raise ApiError(404, "not_found", f"No route {path}.")
        self._check_token(scope)
        if path == "/v1/deployments":
            await _send_json(send, 200, {"instance": self.config.instance_id, "data": self.service.manager.describe()})
            return
        if not self.service.knows_deployments:
            # Every endpoint would look unknown (404) until the registry is read: another process can answer.
            raise ApiError(
                503,
                "serving_not_ready",
                "The serving process is starting; try again shortly.",
                headers=[(NOT_READY_HEADER, b"1")],
            )
        body = await _read_json(receive)
        await routes[(method, path)](body, send)

    def _check_token(self, scope) -> None:
        if not self.config.token:
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-serving-token", b"")
        if not hmac.compare_digest(given, self.config.token.encode()):
            raise ApiError(401, "invalid_serving_token", "A valid X-Serving-Token header is required.")

    async def _acquire(self, body: dict) -> tuple[ServedModel, Deployment]:
        endpoint = body.get("endpoint")
        if not isinstance(endpoint, str) or not endpoint:
            raise _bad("endpoint", "endpoint must be the endpoint id (ep-…).")
        try:
            try:
                return await self.service.manager.acquire(endpoint)
            except EndpointNotFound:
                # A deployment made a moment ago may not have reached this process yet (the registry's change
                # message is on its way, or was missed until the next poll), while the web already routes requests
                # to it: read the registry once more before answering that it does not exist.
                await asyncio.to_thread(self.service.watcher.refresh)
                return await self.service.manager.acquire(endpoint)
        except EndpointNotFound:
            raise ApiError(
                404, "endpoint_not_found", f"No active deployment for endpoint {endpoint!r}.", "endpoint"
            ) from None
        except ModelUnavailable as error:
            raise ApiError(503, "model_unavailable", f"The model could not be loaded: {error}", "endpoint") from None

    # -------------------------------------------------------------------------------------------------------------
    # /v1/generate

    async def _generate(self, body: dict, send) -> None:
        served, deployment = await self._acquire(body)
        try:
            if deployment.task not in GENERATIVE_TASKS:
                raise ApiError(
                    400, "not_a_generative_model", f"Endpoint {deployment.endpoint} serves a {deployment.task} model."
                )
            prompt_ids, params, choices, extra_stop_ids = _generation_request(body, served, deployment)
            stream = bool(body.get("stream"))
            events: asyncio.Queue[TokenEvent] = asyncio.Queue()
            mailbox = _mailbox_of_running_loop()

            def emit(event: TokenEvent) -> None:
                mailbox.post(events, event)

            sequences = [
                Sequence(
                    index=index,
                    prompt_ids=prompt_ids,
                    params=params if params.seed is None else _with_seed(params, params.seed + index),
                    emit=emit,
                    adapter_name=served.adapter_name,
                    stop_token_ids=extra_stop_ids,
                )
                for index in range(choices)
            ]
            served.runner.submit(sequences)
            try:
                if stream:
                    await self._stream(send, events, choices, len(prompt_ids))
                else:
                    await self._collect(send, events, choices, len(prompt_ids), deployment)
            finally:
                for sequence in sequences:
                    sequence.cancel()
        finally:
            self.service.manager.release(served)

    async def _collect(self, send, events, choices: int, prompt_tokens: int, deployment: Deployment) -> None:
        texts = [""] * choices
        finish_reasons: list[str | None] = [None] * choices
        completion_tokens = [0] * choices
        while any(reason is None for reason in finish_reasons):
            event = await events.get()
            texts[event.index] += event.text
            completion_tokens[event.index] = event.completion_tokens
            if event.finish_reason:
                finish_reasons[event.index] = event.finish_reason
        if "error" in finish_reasons:
            raise ApiError(503, "model_unavailable", "Generation failed in the model; try again.")
        await _send_json(
            send,
            200,
            {
                "endpoint": deployment.endpoint,
                "revision": deployment.revision,
                "choices": [{"index": i, "text": texts[i], "finish_reason": finish_reasons[i]} for i in range(choices)],
                "usage": _usage(prompt_tokens, sum(completion_tokens)),
            },
        )

    async def _stream(self, send, events, choices: int, prompt_tokens: int) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            }
        )
        finished = 0
        completion_tokens = [0] * choices
        while finished < choices:
            ready = [await events.get()]
            while not events.empty():  # a slow reader gets what piled up in one write
                ready.append(events.get_nowait())
            chunk = b""
            for event in ready:
                completion_tokens[event.index] = event.completion_tokens
                if event.finish_reason:
                    finished += 1
                if event.text or event.finish_reason:
                    chunk += _sse({"index": event.index, "text": event.text, "finish_reason": event.finish_reason})
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        usage = {"usage": _usage(prompt_tokens, sum(completion_tokens))}
        await send({"type": "http.response.body", "body": _sse(usage) + b"data: [DONE]\n\n", "more_body": False})

    # -------------------------------------------------------------------------------------------------------------
    # /v1/classify

    async def _classify(self, body: dict, send) -> None:
        inputs = body.get("inputs")
        if (
            not isinstance(inputs, list)
            or not inputs
            or len(inputs) > MAX_CLASSIFY_INPUTS
            or not all(isinstance(text, str) for text in inputs)
        ):
            raise _bad("inputs", f"inputs must be a list of 1 to {MAX_CLASSIFY_INPUTS} strings.")
        served, deployment = await self._acquire(body)
        try:
            if deployment.task != CLASSIFICATION:
                raise ApiError(
                    400,
                    "not_a_classification_model",
                    f"Endpoint {deployment.endpoint} serves a {deployment.task} model.",
                )
            predictions, prompt_tokens = await asyncio.wrap_future(served.runner.submit(inputs))
        finally:
            self.service.manager.release(served)
        await _send_json(
            send,
            200,
            {
                "endpoint": deployment.endpoint,
                "revision": served.revision,
                "predictions": [{"label": p.label, "score": p.score, "scores": p.scores} for p in predictions],
                "usage": {"prompt_tokens": prompt_tokens},
            },
        )


class _LoopMailbox:
    """Hands token events from scheduler threads to one event loop with one wake-up per batch of events: a
    ``call_soon_threadsafe`` per token (a self-pipe write and a loop wake-up each) costs more CPU than decoding on
    small models, and the scheduler emits every row's token of a step together."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: list[tuple[asyncio.Queue, TokenEvent]] = []
        self._lock = threading.Lock()

    def post(self, queue: asyncio.Queue, event: TokenEvent) -> None:
        with self._lock:
            self._pending.append((queue, event))
            first = len(self._pending) == 1
        if first:
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopMailbox] = weakref.WeakKeyDictionary()


def _mailbox_of_running_loop() -> _LoopMailbox:
    loop = asyncio.get_running_loop()
    mailbox = _mailboxes.get(loop)
    if mailbox is None:
        mailbox = _mailboxes[loop] = _LoopMailbox(loop)
    return mailbox


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return SamplingParams(params.max_tokens, params.temperature, params.top_p, params.stop, seed)


def _generation_request(
    body: dict, served: ServedModel, deployment: Deployment
) -> tuple[list[int], SamplingParams, int, frozenset[int]]:
    """Validate a generate body against the deployment; nulls take its generation defaults."""
    defaults = deployment.generation_defaults
    prompt, messages = body.get("prompt"), body.get("messages")
    if (prompt is None) == (messages is None):
        raise _bad("prompt", "Send exactly one of prompt (a string) and messages (a list of {role, content}).")
    tokenizer = served.tokenizer
    stop = body.get("stop")
    if stop is None:
        stop = []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", f"stop must be a list of at most {MAX_STOP_STRINGS} non-empty strings.")
    stop_token_ids: set[int] = set()
    if messages is not None:
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise _bad("messages", "messages must be a non-empty list of {role, content} strings.")
        try:
            prompt, end_markers = render_chat_prompt(
                [{"role": m["role"], "content": m["content"]} for m in messages], tokenizer, deployment.chat_template
            )
        except ChatTemplateError as error:
            raise _bad("messages", str(error)) from None
        vocabulary = tokenizer.get_vocab()
        for marker in end_markers:
            if marker in vocabulary:
                stop_token_ids.add(vocabulary[marker])
            else:
                stop.append(marker)
    elif not isinstance(prompt, str):
        raise _bad("prompt", "prompt must be a string.")
    max_tokens = _number(body, "max_tokens", defaults.max_tokens, int, low=1, high=4096)
    temperature = _number(body, "temperature", defaults.temperature, float, low=0.0, high=5.0)
    top_p = _number(body, "top_p", defaults.top_p, float, low=0.0, high=1.0)
    if top_p == 0:
        raise _bad("top_p", "top_p must be above 0 and at most 1.")
    choices = _number(body, "n", 1, int, low=1, high=MAX_CHOICES)
    seed = body.get("seed")
    if seed is not None and (type(seed) is not int or not 0 <= seed < 2**63 - MAX_CHOICES):
        raise _bad("seed", "seed must be a non-negative integer.")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    if deployment.task == SEQ2SEQ:
        prompt_ids = tokenizer(prompt)["input_ids"]
    elif not prompt_ids:
        # An empty prompt starts from the beginning of text, as generate_text does.
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        prompt_ids = [start]
    context = deployment.max_context
    if served.max_positions:
        context = min(context, served.max_positions)
    if len(prompt_ids) + max_tokens > context:
        raise ApiError(
            400,
            "context_length_exceeded",
            f"The prompt has {len(prompt_ids)} tokens and max_tokens is {max_tokens}: together more than the "
            f"model's context of {context} tokens. Shorten the prompt or lower max_tokens.",
            "max_tokens" if len(prompt_ids) < context else "prompt",
        )
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=tuple(stop), seed=seed)
    return prompt_ids, params, choices, frozenset(stop_token_ids)


def _number(body: dict, name: str, default, kind: type, *, low: float, high: float):
    value = body.get(name)
    if value is None:
        return kind(default)
    if kind is int and type(value) is not int:
        raise _bad(name, f"{name} must be an integer from {low} to {high}.")
    if kind is float and (type(value) not in (int, float) or not math.isfinite(value)):
        raise _bad(name, f"{name} must be a number from {low} to {high}.")
    if not low <= value <= high:
        raise _bad(name, f"{name} must be from {low} to {high}; got {value}.")
    return kind(value)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


async def _read_json(receive) -> dict:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, "invalid_json", "The request body was cut off.")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, "request_too_large", f"The request body is over {MAX_BODY_BYTES} bytes.")
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    try:
        body = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        raise ApiError(400, "invalid_json", "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "The request body must be a JSON object.")
    return body


async def _send_json(send, status: int, body: Any, *, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def create_app(config: ServingConfig | None = None) -> ServingApp:
    return ServingApp(config)
