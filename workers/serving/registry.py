"""The deployment registry in Redis, written by the web process, and the status this process reports back.

Keys (the contract with ``apps/endpoints``):

- hash ``serving:deployments``: endpoint id → deployment JSON;
- channel ``serving:deployments:changed``: an endpoint id after each change;
- hash ``serving:status:<endpoint>``: instance id → ``{"revision", "state", "error", "updated_at"}``; each process
  writes only its own field, and rewrites its current states every registry poll;
- key ``serving:instance:<instance id>``: set by each live process with a short expiry and renewed every poll, so
  the web process counts only the reports of processes that are still alive (several run side by side, and one that
  was killed never takes its reports back); its value is the process's advertised URL, and the set
  ``serving:instances`` lists the ids, so each process knows its live peers to place warm replicas
  (``workers/serving/placement.py``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

DEPLOYMENTS_KEY = "serving:deployments"
CHANGED_CHANNEL = "serving:deployments:changed"
STATUS_KEY_PREFIX = "serving:status:"
INSTANCE_KEY_PREFIX = "serving:instance:"
INSTANCES_KEY = "serving:instances"

CAUSAL_LM = "causal_lm"
CLASSIFICATION = "classification"
SEQ2SEQ = "seq2seq"
GENERATIVE_TASKS = (CAUSAL_LM, SEQ2SEQ)

LOADING = "loading"
READY = "ready"
FAILED = "failed"
UNLOADED = "unloaded"


@dataclass(frozen=True)
class GenerationDefaults:
    """What a generate request gets for each parameter it leaves null."""

    max_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 1.0


@dataclass(frozen=True)
class Deployment:
    """One endpoint's current deployment, as the web process published it."""

    endpoint: str
    tenant_id: int
    revision: int
    task: str
    model_prefix: str
    """Object-store prefix of the Hugging Face model folder (an adapter folder when ``adapter``)."""
    adapter: bool = False
    base_model_dir: str | None = None
    """Local folder of the base model an adapter applies to."""
    chat_template: str | None = None
    generation_defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    max_context: int = 1024
    idle_unload_seconds: float = 900
    min_replicas: int = 0
    state: str = "active"

    @property
    def active(self) -> bool:
        return self.state == "active"

    @classmethod
    def from_json(cls, raw: str | bytes) -> Deployment:
        data: dict[str, Any] = json.loads(raw)
        defaults = data.get("generation_defaults") or {}
        return cls(
            endpoint=str(data["endpoint"]),
            tenant_id=int(data.get("tenant_id") or 0),
            revision=int(data["revision"]),
            task=str(data.get("task") or CAUSAL_LM),
            model_prefix=str(data["model_prefix"]),
            adapter=bool(data.get("adapter")),
            base_model_dir=data.get("base_model_dir") or None,
            chat_template=data.get("chat_template") or None,
            generation_defaults=GenerationDefaults(
                max_tokens=int(defaults.get("max_tokens") or GenerationDefaults.max_tokens),
                temperature=float(defaults.get("temperature", GenerationDefaults.temperature)),
                top_p=float(defaults.get("top_p", GenerationDefaults.top_p)),
            ),
            max_context=int(data.get("max_context") or 1024),
            idle_unload_seconds=float(data.get("idle_unload_seconds") or 900),
            min_replicas=int(data.get("min_replicas") or 0),
            state=str(data.get("state") or "active"),
        )


def status_value(*, revision: int, state: str, error: str | None = None) -> str:
    return json.dumps({"revision": revision, "state": state, "error": error, "updated_at": time.time()})
