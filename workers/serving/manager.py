"""Which models this process has loaded: on-demand loads, an LRU memory budget, idle unloads and hot swaps.

Every deployment revision that serves requests is a ``ServedModel``. A request ``acquire``s the endpoint's current
one (loading it first if needed) and ``release``s it when its last token is out. When the registry announces a new
revision of a loaded endpoint, the new one loads in the background while the old one keeps serving; new requests
switch over once it is ready, and the old one is freed when its last in-flight request finishes — so a redeploy
never fails a request.

LoRA adapters of causal LMs that name the same base folder share one base model: a PeftModel with one adapter per
deployment revision, and one scheduler that batches per adapter.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.serving.batching import GenerationScheduler
from workers.serving.classifying import ClassificationBatcher
from workers.serving.config import ServingConfig, dtype_name
from workers.serving.loading import (
    MODEL_LOADING_LOCK,
    ModelLoadError,
    base_model_folder,
    is_adapter_folder,
    load_plain_model,
    load_tokenizer,
    local_model_folder,
    max_positions,
    model_memory_bytes,
    place_model,
)
from workers.serving.placement import keeps_warm_replica
from workers.serving.registry import (
    CAUSAL_LM,
    CLASSIFICATION,
    FAILED,
    LOADING,
    READY,
    SEQ2SEQ,
    UNLOADED,
    Deployment,
)
from workers.serving.seq2seq import Seq2SeqRunner
from workers.storage import ObjectStore

logger = logging.getLogger(__name__)

StatusReporter = Callable[[str, int, str, "str | None"], None]


class EndpointNotFound(LookupError):
    pass


class ModelUnavailable(RuntimeError):
    pass


@dataclass
class _SharedBase:
    """A base model that several adapter deployments use, wrapped in one PeftModel with one scheduler."""

    folder: Path
    model: Any
    scheduler: GenerationScheduler
    memory_bytes: int
    adapters: set[str] = field(default_factory=set)


@dataclass(eq=False)
class ServedModel:
    """One loaded revision of one deployment."""

    deployment: Deployment
    tokenizer: Any
    runner: GenerationScheduler | ClassificationBatcher | Seq2SeqRunner
    memory_bytes: int
    max_positions: int | None
    adapter_name: str | None = None
    shared_base: _SharedBase | None = None
    in_flight: int = 0
    last_used: float = field(default_factory=time.time)
    loaded_at: float = field(default_factory=time.time)
    retiring: bool = False

    @property
    def endpoint(self) -> str:
        return self.deployment.endpoint

    @property
    def revision(self) -> int:
        return self.deployment.revision

    def describe(self, state: str) -> dict[str, Any]:
        parameter = next(self.runner.model.parameters())
        generating = isinstance(self.runner, GenerationScheduler)
        return {
            "endpoint": self.endpoint,
            "revision": self.revision,
            "task": self.deployment.task,
            "state": state,
            "memory_bytes": self.memory_bytes,
            # What SERVING_DEVICE and SERVING_DTYPE resolved to here (auto differs between machines), and a
            # generating model's key/value cache dtype (float32 for a bf16 model on a CPU: workers.serving.attention).
            "device": parameter.device.type,
            "dtype": dtype_name(parameter.dtype),
            "kv_cache_dtype": dtype_name(self.runner.cache_dtype or parameter.dtype) if generating else None,
            "last_used": self.last_used,
            "loaded_at": self.loaded_at,
            "in_flight": self.in_flight,
            "adapter": self.adapter_name,
            "shared_base": str(self.shared_base.folder) if self.shared_base else None,
            "forward_passes": self.runner.forward_passes,
            # Where a generating model's scheduler spends its time (see workers.serving.batching.TIMING_PARTS).
            "scheduler": self.runner.timing_report() if hasattr(self.runner, "timing_report") else None,
        }


class ModelManager:
    def __init__(self, config: ServingConfig, store: ObjectStore, report_status: StatusReporter) -> None:
        self.config = config
        self.store = store
        self.report_status = report_status
        self.deployments: dict[str, Deployment] = {}
        self._served: dict[str, ServedModel] = {}
        self._retiring: list[ServedModel] = []
        self._loads: dict[tuple[str, int], concurrent.futures.Future] = {}
        self._failures: dict[tuple[str, int], str] = {}
        self._bases: dict[Path, _SharedBase] = {}
        self._live_urls: frozenset[str] = frozenset()
        self._lock = threading.RLock()
        self._adapter_lock = threading.Lock()
        self._loader = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="serving-load")

    # ---------------------------------------------------------------------------------------------------------
    # Registry

    def update_registry(self, deployments: dict[str, Deployment]) -> None:
        """Apply the registry as just read: start hot swaps and eager loads, drop stopped or removed deployments."""
        with self._lock:
            previous, self.deployments = self.deployments, dict(deployments)
            for endpoint, served in list(self._served.items()):
                current = deployments.get(endpoint)
                if current is None or not current.active:
                    del self._served[endpoint]
                    self._retire(served)
                    self.report_status(endpoint, served.revision, UNLOADED, None)
                elif current.revision != served.revision:
                    self._start_load(current)  # the old revision serves until the new one is ready
            for endpoint, deployment in deployments.items():
                if not deployment.active:
                    continue
                changed = previous.get(endpoint) != deployment
                if changed:
                    # A republished deployment gets another try at a load that failed.
                    self._failures.pop((endpoint, deployment.revision), None)
                eager = self._keeps_warm(deployment) and endpoint not in self._served
                if eager and (endpoint, deployment.revision) not in self._failures:
                    self._start_load(deployment)
            self._sweep_locked()

    def sweep(self) -> None:
        with self._lock:
            self._sweep_locked()

    def set_live_processes(self, urls: set[str]) -> None:
        """The advertised URLs of the serving processes alive now (this one's included once it has registered)."""
        with self._lock:
            self._live_urls = frozenset(urls)

    def _keeps_warm(self, deployment: Deployment) -> bool:
        """Whether this process holds one of the endpoint's ``min_replicas`` warm replicas: loaded eagerly, never
        unloaded for idleness, evicted last. With several processes only the first ``min_replicas`` of the endpoint's
        rendezvous ranking do (the ones the web sends its requests to); the others load it on demand, like any
        endpoint, when a request fails over to them."""
        return keeps_warm_replica(
            endpoint=deployment.endpoint,
            min_replicas=deployment.min_replicas,
            own_url=self.config.advertised_url,
            live_urls=self._live_urls,
        )

    def _sweep_locked(self) -> None:
        """Unload deployments idle past their idle_unload_seconds; free retired revisions with nothing in flight."""
        now = time.time()
        for endpoint, served in list(self._served.items()):
            deployment = self.deployments.get(endpoint, served.deployment)
            if (
                served.in_flight == 0
                and not self._keeps_warm(deployment)
                and now - served.last_used > deployment.idle_unload_seconds
            ):
                del self._served[endpoint]
                self._retire(served)
                self.report_status(endpoint, served.revision, UNLOADED, None)
        for served in list(self._retiring):
            if served.in_flight == 0:
                self._retiring.remove(served)
                self._free(served)

    # ---------------------------------------------------------------------------------------------------------
    # Requests

    async def acquire(self, endpoint: str) -> tuple[ServedModel, Deployment]:
        """The endpoint's serving model (loading it if needed), counted as in use until ``release``."""
        while True:
            with self._lock:
                deployment = self.deployments.get(endpoint)
                if deployment is None or not deployment.active:
                    raise EndpointNotFound(endpoint)
                served = self._served.get(endpoint)
                if served is not None:
                    served.in_flight += 1
                    served.last_used = time.time()
                    return served, deployment
                failure = self._failures.get((endpoint, deployment.revision))
                if failure is not None:
                    raise ModelUnavailable(failure)
                future = self._start_load(deployment)
            # A failure is recorded by the loader; the next round of the loop reports it.
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(future)

    def release(self, served: ServedModel) -> None:
        with self._lock:
            served.in_flight -= 1
            served.last_used = time.time()
            if served.retiring and served.in_flight == 0 and served in self._retiring:
                self._retiring.remove(served)
                self._free(served)

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = [served.describe(READY) for served in self._served.values()]
            rows += [served.describe("retiring") for served in self._retiring]
            loading = {key for key, future in self._loads.items() if not future.done()}
            rows += [{"endpoint": endpoint, "revision": revision, "state": LOADING} for endpoint, revision in loading]
            rows += [
                {"endpoint": endpoint, "revision": revision, "state": FAILED, "error": error}
                for (endpoint, revision), error in self._failures.items()
            ]
            return rows

    def current_states(self) -> list[tuple[str, int, str, str | None]]:
        """(endpoint, revision, state, error) of what this process holds now, for the status heartbeat: the serving
        revision ready, loads in progress, and failed loads of revisions still deployed."""
        with self._lock:
            states = [(served.endpoint, served.revision, READY, None) for served in self._served.values()]
            states += [
                (endpoint, revision, LOADING, None)
                for (endpoint, revision), future in self._loads.items()
                if not future.done()
            ]
            states += [
                (endpoint, revision, FAILED, error)
                for (endpoint, revision), error in self._failures.items()
                if (deployment := self.deployments.get(endpoint)) is not None and deployment.revision == revision
            ]
            return states

    def close(self) -> None:
        with self._lock:
            for served in list(self._served.values()) + self._retiring:
                self._free(served)
            self._served.clear()
            self._retiring.clear()
        self._loader.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------------------------------------------------
    # Loading and freeing

    def _start_load(self, deployment: Deployment) -> concurrent.futures.Future:
        key = (deployment.endpoint, deployment.revision)
        future = self._loads.get(key)
        if future is None:
            future = self._loader.submit(self._load, deployment)
            self._loads[key] = future
            self.report_status(deployment.endpoint, deployment.revision, LOADING, None)
        return future

    def _load(self, deployment: Deployment) -> None:
        key = (deployment.endpoint, deployment.revision)
        try:
            folder = local_model_folder(self.store, self.config.cache_dir, deployment)
            self._make_room(_estimated_bytes(folder), keep=deployment.endpoint)
            served = self._build(deployment, folder)
        except Exception as error:  # noqa: BLE001 - any load failure is reported, never crashes the process
            logger.exception("loading %s revision %s failed", *key)
            message = str(error) if isinstance(error, ModelLoadError) else f"{type(error).__name__}: {error}"
            with self._lock:
                self._failures[key] = message
                self._loads.pop(key, None)
            self.report_status(deployment.endpoint, deployment.revision, FAILED, message)
            raise
        with self._lock:
            self._loads.pop(key, None)
            current = self.deployments.get(deployment.endpoint)
            if current is None or not current.active or current.revision != deployment.revision:
                self._free(served)  # superseded while it loaded
                return
            old = self._served.get(deployment.endpoint)
            self._served[deployment.endpoint] = served
            if old is not None:
                self._retire(old)
        self.report_status(deployment.endpoint, deployment.revision, READY, None)

    def _build(self, deployment: Deployment, folder: Path) -> ServedModel:
        if is_adapter_folder(folder) or deployment.adapter:
            if deployment.task == CAUSAL_LM:
                return self._build_shared_adapter(deployment, folder)
            return self._build_merged_adapter(deployment, folder)
        tokenizer = load_tokenizer(folder)
        model = self._place(load_plain_model(folder, deployment.task))
        return self._wrap(deployment, model, tokenizer, model_memory_bytes(model))

    def _place(self, model):
        return place_model(model, device=self.config.device, dtype=self.config.dtype)

    def _wrap(self, deployment: Deployment, model, tokenizer, memory_bytes: int) -> ServedModel:
        positions = max_positions(model)
        if deployment.task == CAUSAL_LM:
            runner: Any = GenerationScheduler(
                model,
                tokenizer,
                max_batch_size=self.config.max_batch_size,
                name=deployment.endpoint,
                max_positions=positions,
            )
        elif deployment.task == CLASSIFICATION:
            runner = ClassificationBatcher(
                model,
                tokenizer,
                max_length=min(deployment.max_context, positions or deployment.max_context),
                wait_seconds=self.config.classify_wait_seconds,
            )
        elif deployment.task == SEQ2SEQ:
            runner = Seq2SeqRunner(
                model,
                tokenizer,
                max_batch_size=self.config.max_batch_size,
                gather_seconds=self.config.seq2seq_gather_seconds,
                name=deployment.endpoint,
            )
        else:
            raise ModelLoadError(f"Unknown task {deployment.task!r}.")
        return ServedModel(deployment, tokenizer, runner, memory_bytes, positions)

    def _build_merged_adapter(self, deployment: Deployment, folder: Path) -> ServedModel:
        from peft import PeftModel

        base_folder = base_model_folder(folder, deployment)
        base = load_plain_model(base_folder, deployment.task)
        with MODEL_LOADING_LOCK:
            merged = PeftModel.from_pretrained(base, folder, is_trainable=False).merge_and_unload()
        model = self._place(merged)  # merged in float32 first, so the serving dtype rounds only once
        tokenizer = load_tokenizer(folder, fallback_folder=base_folder)
        return self._wrap(deployment, model, tokenizer, model_memory_bytes(model))

    def _build_shared_adapter(self, deployment: Deployment, folder: Path) -> ServedModel:
        from peft import PeftModel

        base_folder = base_model_folder(folder, deployment).resolve()
        adapter_name = re.sub(r"\W", "_", f"{deployment.endpoint}_r{deployment.revision}")
        tokenizer = load_tokenizer(folder, fallback_folder=base_folder)
        # One lookup-or-create at a time, so two adapters of a new base never build two bases.
        with self._adapter_lock:
            with self._lock:
                shared = self._bases.get(base_folder)
            if shared is None:
                base = load_plain_model(base_folder, CAUSAL_LM)
                with MODEL_LOADING_LOCK:
                    model = PeftModel.from_pretrained(base, folder, adapter_name=adapter_name, is_trainable=False)
                model = self._place(model)
                scheduler = GenerationScheduler(
                    model,
                    load_tokenizer(base_folder),
                    max_batch_size=self.config.max_batch_size,
                    name=base_folder.name,
                    max_positions=max_positions(base),
                )
                shared = _SharedBase(base_folder, model, scheduler, model_memory_bytes(model))
                with self._lock:
                    self._bases[base_folder] = shared
                adapter_bytes = 0
            else:
                with shared.scheduler.model_lock, MODEL_LOADING_LOCK:
                    before = model_memory_bytes(shared.model)
                    shared.model.load_adapter(
                        folder, adapter_name=adapter_name, is_trainable=False, low_cpu_mem_usage=False
                    )
                    # peft puts the new adapter on the base's device but keeps it in float32: cast it like the rest.
                    self._place(shared.model)
                    adapter_bytes = model_memory_bytes(shared.model) - before
            shared.adapters.add(adapter_name)
        return ServedModel(
            deployment,
            tokenizer,
            shared.scheduler,
            adapter_bytes,
            shared.scheduler.max_positions,
            adapter_name=adapter_name,
            shared_base=shared,
        )

    def _retire(self, served: ServedModel) -> None:
        served.retiring = True
        if served.in_flight == 0:
            self._free(served)
        else:
            self._retiring.append(served)

    def _free(self, served: ServedModel) -> None:
        shared = served.shared_base
        if shared is None:
            served.runner.close()
            return
        shared.adapters.discard(served.adapter_name)
        if shared.adapters:
            with shared.scheduler.model_lock:
                shared.model.delete_adapter(served.adapter_name)
            return
        shared.scheduler.close()
        self._bases.pop(shared.folder, None)

    def _resident_bytes(self) -> int:
        models = list(self._served.values()) + self._retiring
        return sum(s.memory_bytes for s in models) + sum(base.memory_bytes for base in self._bases.values())

    def _make_room(self, needed: int, *, keep: str) -> None:
        """Evict least-recently-used idle deployments until ``needed`` more bytes fit the budget."""
        with self._lock:
            budget = self.config.memory_budget_bytes
            candidates = sorted(
                (s for s in self._served.values() if s.endpoint != keep),
                key=lambda s: (self._keeps_warm(self.deployments.get(s.endpoint, s.deployment)), s.last_used),
            )
            for served in candidates:
                if self._resident_bytes() + needed <= budget:
                    return
                if served.in_flight > 0 or served.runner.active_sequences:
                    continue
                logger.info("evicting %s to make room", served.endpoint)
                del self._served[served.endpoint]
                self._retire(served)
                self.report_status(served.endpoint, served.revision, UNLOADED, None)


def _estimated_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))
