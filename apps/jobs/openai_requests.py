"""OpenAI's fine-tuning requests, translated into what Tunehouse's services take.

OpenAI's create-job body (`model`, `training_file`, `hyperparameters`, `method`, `seed`, `suffix`, `metadata`,
`integrations`...) becomes the arguments of `job_create`, and the engine's own hyperparameters stay accepted next to
OpenAI's three as extension fields. The parsing functions are pure (no database); `job_create_from_openai_request`
is the one door that adds the lookups and calls the service.
"""

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth.models import AbstractBaseUser

from apps.catalog.selectors import catalog_training_base
from apps.core.api.errors import ApiError
from apps.datasets.models import File
from apps.datasets.selectors import file_get
from apps.tenancy.models import Tenant
from workers.ml.config import DEFAULT_LEARNING_RATES, MAX_LEARNING_RATE

from .models import FineTuningJob
from .services import job_create, validate_base_model

AUTO = "auto"
# OpenAI's own hyperparameters; "auto" in any of them means "the engine's default", so the key is dropped.
OPENAI_HYPERPARAMETERS = ("batch_size", "learning_rate_multiplier", "n_epochs")
MAX_SUFFIX_CHARS = 64
SUPPORTED_METHODS = ("supervised",)
KNOWN_METHODS = ("supervised", "dpo", "reinforcement")
CREATE_PARAMETERS = (
    "model",
    "training_file",
    "validation_file",
    "hyperparameters",
    "method",
    "seed",
    "suffix",
    "metadata",
    "integrations",
)


@dataclass(frozen=True)
class JobCreateRequest:
    """A checked create-job body: hyperparameters merged from `hyperparameters`, `method` and `seed`."""

    model: str
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]
    """OpenAI's and the engine's names together, "auto" already dropped; `learning_rate_multiplier` not yet turned
    into a learning rate (that needs the job's training mode: `engine_hyperparameters`)."""
    suffix: str
    metadata: Any
    """As sent; `job_create` checks it against OpenAI's limits."""
    hyperparameter_params: dict[str, str] = field(default_factory=dict)
    """Where each hyperparameter was given (`hyperparameters.x`, `method.supervised.hyperparameters.x`, `seed`), so
    an error names the parameter the caller actually wrote."""


def parse_job_create_request(body: object) -> JobCreateRequest:
    """Checks the shape of OpenAI's create-job body and merges its hyperparameters; raises ApiError (400) naming
    the parameter at fault."""
    body = _plain_dict(body)
    if not isinstance(body, dict):
        raise ApiError("The request body must be a JSON object.")
    for name in body:
        if name not in CREATE_PARAMETERS:
            raise ApiError(f"Unrecognized request argument supplied: {name}.", code="unknown_parameter", param=name)
    _check_integrations(body.get("integrations"))
    hyperparameters, params = _merged_hyperparameters(body)
    return JobCreateRequest(
        model=_string(body, "model", required=True),
        training_file=_string(body, "training_file", required=True),
        validation_file=_string(body, "validation_file") or None,
        hyperparameters=hyperparameters,
        suffix=_suffix(body.get("suffix")),
        metadata=body.get("metadata"),
        hyperparameter_params=params,
    )


def engine_hyperparameters(request: JobCreateRequest, *, mode: str | None) -> dict[str, Any]:
    """The request's hyperparameters in the engine's terms: `learning_rate_multiplier` x the default learning rate
    of the job's training `mode` (from_scratch, full, lora, qlora) becomes `learning_rate`."""
    hyperparameters = dict(request.hyperparameters)
    multiplier = hyperparameters.pop("learning_rate_multiplier", None)
    if multiplier is None:
        return hyperparameters
    param = request.hyperparameter_params.get("learning_rate_multiplier", "hyperparameters.learning_rate_multiplier")
    if "learning_rate" in hyperparameters:
        raise ApiError(
            "Give either learning_rate (an absolute rate) or learning_rate_multiplier (a factor of the default rate), "
            "not both.",
            param=param,
        )
    default_learning_rate = DEFAULT_LEARNING_RATES.get(mode) if isinstance(mode, str) else None
    if default_learning_rate is None:
        # An unknown mode: resolving the hyperparameters rejects it with its own message, which is the one to show.
        return hyperparameters
    learning_rate = multiplier * default_learning_rate
    if learning_rate > MAX_LEARNING_RATE:
        raise ApiError(
            f"learning_rate_multiplier {multiplier} gives a learning rate of {learning_rate:g} for {mode} training "
            f"(default {default_learning_rate:g}); the most is {MAX_LEARNING_RATE:g}.",
            param=param,
        )
    hyperparameters["learning_rate"] = learning_rate
    return hyperparameters


def request_fingerprint(body: object) -> str:
    """SHA-256 of the body as canonical JSON (sorted keys, no spaces): the same request with its keys in another
    order or other spacing has the same fingerprint."""
    canonical = json.dumps(_plain_dict(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class MetadataFilter:
    """OpenAI's jobs-list filter: `metadata[key]=value` pairs (all must match) or `metadata=null` (jobs without)."""

    pairs: tuple[tuple[str, str], ...] = ()
    without_metadata: bool = False

    def __bool__(self) -> bool:
        return bool(self.pairs) or self.without_metadata


_METADATA_QUERY_KEY = re.compile(r"^metadata\[(?P<key>.*)\]$")


def parse_metadata_filter(query_params: Mapping) -> MetadataFilter:
    pairs = []
    for name, values in _query_lists(query_params):
        if match := _METADATA_QUERY_KEY.match(name):
            if not match["key"]:
                raise ApiError("Name the metadata key to filter on: metadata[key]=value.", param="metadata")
            pairs.extend((match["key"], value) for value in values)
    bare = [value for name, values in _query_lists(query_params) if name == "metadata" for value in values]
    if bare and bare != ["null"]:
        raise ApiError(
            "Filter on metadata with metadata[key]=value, or metadata=null for jobs without metadata.", param="metadata"
        )
    if bare and pairs:
        raise ApiError("Use either metadata=null or metadata[key]=value filters, not both.", param="metadata")
    return MetadataFilter(pairs=tuple(pairs), without_metadata=bool(bare))


def job_create_from_openai_request(
    *, tenant: Tenant, user: AbstractBaseUser | None, body: object, idempotency_key: str | None
) -> FineTuningJob:
    """POST /v1/fine_tuning/jobs: parses OpenAI's body, finds the files and creates the job (the first one again
    when `idempotency_key` was already used with the same body)."""
    request = parse_job_create_request(body)
    entry = validate_base_model(request.model)  # before the file lookups: the cheaper mistake is reported first
    training_file = _tenant_file(tenant, request.training_file, param="training_file")
    validation_file = None
    if request.validation_file:
        validation_file = _tenant_file(tenant, request.validation_file, param="validation_file")
    requested_mode = request.hyperparameters.get("mode")
    mode = catalog_training_base(entry, mode=requested_mode if isinstance(requested_mode, str) else None)["mode"]
    return job_create(
        tenant=tenant,
        user=user,
        training_file=training_file,
        model=request.model,
        hyperparameters=engine_hyperparameters(request, mode=mode),
        suffix=request.suffix,
        validation_file=validation_file,
        metadata=request.metadata,
        idempotency_key=idempotency_key,
        request_fingerprint=request_fingerprint(body),
    )


def _tenant_file(tenant: Tenant, public_id: str, *, param: str) -> File:
    file = file_get(tenant=tenant, public_id=public_id)
    if file is None:
        raise ApiError(f"No such file: {public_id}.", code="not_found", param=param, status_code=404)
    return file


def _plain_dict(body: object) -> object:
    # A form-encoded body arrives as a QueryDict; its `.dict()` keeps the last value of each field, as DRF does.
    return body.dict() if hasattr(body, "dict") and callable(body.dict) else body


def _query_lists(query_params: Mapping) -> list[tuple[str, list[str]]]:
    if hasattr(query_params, "lists"):
        return list(query_params.lists())
    return [(name, value if isinstance(value, list) else [value]) for name, value in query_params.items()]


def _string(body: dict, name: str, *, required: bool = False) -> str:
    value = body.get(name)
    if value in (None, ""):
        if required:
            raise ApiError(f"Missing required parameter: '{name}'.", code="missing_required_parameter", param=name)
        return ""
    if not isinstance(value, str):
        raise ApiError(f"'{name}' must be a string.", param=name)
    return value


def _suffix(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ApiError("'suffix' must be a string.", param="suffix")
    if len(value) > MAX_SUFFIX_CHARS:
        raise ApiError(f"suffix must be at most {MAX_SUFFIX_CHARS} characters; got {len(value)}.", param="suffix")
    if ":" in value:
        # The fine-tuned model's name is `ft:<base>:<tenant>:<suffix>:<id>`: a colon would make it ambiguous.
        raise ApiError("suffix may not contain ':', which separates the parts of a model name.", param="suffix")
    return value


def _check_integrations(integrations: object) -> None:
    if integrations is None:
        return
    if not isinstance(integrations, list):
        raise ApiError("'integrations' must be a list.", param="integrations")
    if integrations:
        raise ApiError(
            "Integrations (such as wandb) are not supported by this server; follow a job through its events, its "
            "websocket or webhooks instead.",
            code="unsupported_parameter",
            param="integrations",
        )


def _merged_hyperparameters(body: dict) -> tuple[dict[str, Any], dict[str, str]]:
    """`hyperparameters`, `method.supervised.hyperparameters` and `seed` as one set; the same name with two different
    values is a 400 naming the second place it was given."""
    merged: dict[str, Any] = {}
    params: dict[str, str] = {}
    sources = [("hyperparameters", _object(body.get("hyperparameters"), "hyperparameters"))]
    sources.append(("method.supervised.hyperparameters", _method_hyperparameters(body.get("method"))))
    if body.get("seed") is not None:
        seed = body["seed"]
        if type(seed) is not int:
            raise ApiError("'seed' must be an integer.", param="seed")
        sources.append(("", {"seed": seed}))
    for prefix, hyperparameters in sources:
        for name, value in hyperparameters.items():
            param = f"{prefix}.{name}" if prefix else name
            _check_openai_value(name, value, param)
            if name in merged and merged[name] != value:
                raise ApiError(
                    f"{param} is {value!r} but {params[name]} is {merged[name]!r}; give it once, or the same value.",
                    code="conflicting_parameters",
                    param=param,
                )
            merged[name] = value
            params[name] = param
    for name in OPENAI_HYPERPARAMETERS:
        if merged.get(name) == AUTO:
            del merged[name]
    return merged, params


def _method_hyperparameters(method: object) -> dict[str, Any]:
    if method is None:
        return {}
    if not isinstance(method, dict):
        raise ApiError('\'method\' must be an object such as {"type": "supervised"}.', param="method")
    method_type = method.get("type")
    if method_type is None:
        raise ApiError(
            "Missing required parameter: 'method.type'.", code="missing_required_parameter", param="method.type"
        )
    if method_type not in KNOWN_METHODS:
        raise ApiError(
            f"method.type must be one of {', '.join(KNOWN_METHODS)}; got {method_type!r}.", param="method.type"
        )
    if method_type not in SUPPORTED_METHODS:
        raise ApiError(
            f'The {method_type} fine-tuning method is not supported by this server; use "supervised".',
            code="unsupported_method",
            param="method.type",
        )
    for name in method:
        if name not in ("type", method_type):
            raise ApiError(
                f"Unrecognized argument method.{name} for a {method_type} job.",
                code="unknown_parameter",
                param=f"method.{name}",
            )
    supervised = _object(method.get("supervised"), "method.supervised")
    for name in supervised:
        if name != "hyperparameters":
            raise ApiError(
                f"Unrecognized argument method.supervised.{name}.",
                code="unknown_parameter",
                param=f"method.supervised.{name}",
            )
    return _object(supervised.get("hyperparameters"), "method.supervised.hyperparameters")


def _object(value: object, param: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(f"'{param}' must be an object.", param=param)
    return value


def _check_openai_value(name: str, value: object, param: str) -> None:
    """OpenAI's three accept a number or "auto"; the engine checks every other hyperparameter itself."""
    if name not in OPENAI_HYPERPARAMETERS or value == AUTO:
        return
    if name == "learning_rate_multiplier":
        if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
            raise ApiError(f'{param} must be a number above 0 or "auto"; got {value!r}.', param=param)
    elif type(value) is not int:
        raise ApiError(f'{param} must be an integer or "auto"; got {value!r}.', param=param)
