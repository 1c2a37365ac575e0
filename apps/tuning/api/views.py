"""`/v1/tuning/studies` (Tunehouse extension): hyperparameter searches. Create a study, follow it, cancel it, read
its trials and promote the best one's model to a named fine-tuned model.

The views only translate HTTP: the body's shape is checked here (every error names its field), the tenant's files
are looked up here, and everything a trial would be refused for is checked by `apps.tuning.services.study_create`.
"""

from drf_spectacular.utils import OpenApiParameter, OpenApiTypes, extend_schema
from rest_framework.response import Response

from apps.core.api.base import TenantAPIView
from apps.core.api.errors import ApiError
from apps.core.api.pagination import cursor_page, list_page, parse_limit
from apps.core.api.schema import ERROR_RESPONSES, ORDER_PARAMETER, PAGE_PARAMETERS
from apps.datasets.models import File
from apps.datasets.selectors import file_get

from ..models import Study, StudyStatus, Trial
from ..selectors import studies_of, trial_get, trials_of
from ..serialization import study_to_json, trial_to_json
from ..services import study_cancel, study_create, trial_promote

CREATE_PARAMETERS = (
    "model",
    "training_file",
    "validation_file",
    "hyperparameters",
    "search_space",
    "objective",
    "objective_metric",
    "direction",
    "sampler",
    "pruner",
    "pruner_options",
    "n_trials",
    "max_parallel_trials",
    "gpu_time_budget_seconds",
    "seed",
    "enqueued_trials",
    "name",
    "metadata",
)
_OBJECTIVE_KEYS = ("metric", "direction")
_PRUNER_KEYS = ("type", "options")
# Trial numbers are stored as 32-bit integers: a larger one cannot name a trial, and SQLite would overflow on it.
_MAX_TRIAL_NUMBER = 2**31 - 1

_NUMBER_PARAMETER = OpenApiParameter(
    "number", int, OpenApiParameter.PATH, description="The trial's number in its study (0, 1, 2...)."
)
_STUDY_ID_PARAMETER = OpenApiParameter("public_id", str, OpenApiParameter.PATH, description="The study id (study-...).")


def _body(request) -> dict:
    body = request.data
    # A form-encoded body arrives as a QueryDict; its `.dict()` keeps the last value of each field, as DRF does.
    if hasattr(body, "dict") and callable(body.dict):
        body = body.dict()
    if not isinstance(body, dict):
        raise ApiError("The request body must be a JSON object.")
    return body


def _string(value, param: str, *, required: bool = False) -> str | None:
    if value in (None, ""):
        if required:
            raise ApiError(f"Missing required parameter: '{param}'.", code="missing_required_parameter", param=param)
        return None
    if not isinstance(value, str):
        raise ApiError(f"'{param}' must be a string.", param=param)
    return value


def _unknown_keys(value: dict, allowed: tuple[str, ...], param: str) -> None:
    for name in value:
        if name not in allowed:
            raise ApiError(
                f"{param} takes {', '.join(allowed)}; unknown: {name}.",
                code="unknown_parameter",
                param=f"{param}.{name}",
            )


def _objective(body: dict) -> tuple[str | None, str | None]:
    """`objective: {metric, direction}` or top-level `objective_metric`/`direction`: the same thing, two spellings."""
    objective = body.get("objective")
    if objective is None:
        return _string(body.get("objective_metric"), "objective_metric"), _string(body.get("direction"), "direction")
    if not isinstance(objective, dict):
        raise ApiError('objective must be an object: {"metric": ..., "direction": ...}.', param="objective")
    _unknown_keys(objective, _OBJECTIVE_KEYS, "objective")
    for spelled_twice in ("objective_metric", "direction"):
        if body.get(spelled_twice) is not None:
            raise ApiError(
                f"Give the objective either as objective or as objective_metric/direction, not both "
                f"({spelled_twice} was given too).",
                param=spelled_twice,
            )
    return _string(objective.get("metric"), "objective.metric"), _string(
        objective.get("direction"), "objective.direction"
    )


def _pruner(body: dict) -> tuple[str | None, object]:
    """`pruner` as a name, or `{type, options}`; the options may also come as top-level `pruner_options`."""
    pruner, options = body.get("pruner"), body.get("pruner_options")
    if not isinstance(pruner, dict):
        return _string(pruner, "pruner"), options
    _unknown_keys(pruner, _PRUNER_KEYS, "pruner")
    if pruner.get("options") is not None and options is not None:
        raise ApiError(
            "Give the pruner's options either as pruner.options or as pruner_options, not both.", param="pruner_options"
        )
    return _string(pruner.get("type"), "pruner.type"), pruner.get("options", options)


def _as_sent(param: str | None, body: dict) -> str | None:
    """The service names the objective and the pruner's options by their top-level spelling; an error names the field
    the caller actually wrote."""
    renames = {}
    if isinstance(body.get("objective"), dict):
        renames.update({"objective_metric": "objective.metric", "direction": "objective.direction"})
    if isinstance(body.get("pruner"), dict):
        renames["pruner"] = "pruner.type"
        if body["pruner"].get("options") is not None:
            renames["pruner_options"] = "pruner.options"
    for internal, sent in renames.items():
        if param == internal or (param or "").startswith(f"{internal}."):
            return sent + param[len(internal) :]
    return param


def _tenant_file(tenant, public_id: str | None, param: str) -> File | None:
    if public_id is None:
        return None
    file = file_get(tenant=tenant, public_id=public_id)
    if file is None:
        # Another tenant's file reads exactly like one that does not exist.
        raise ApiError(f"No such file: {public_id}.", code="not_found", param=param, status_code=404)
    return file


def _trial_number(raw: str) -> int | None:
    # The length first: int() refuses strings of thousands of digits with a ValueError of its own.
    if len(raw) <= len(str(_MAX_TRIAL_NUMBER)) and raw.isascii() and raw.isdigit() and int(raw) <= _MAX_TRIAL_NUMBER:
        return int(raw)
    return None


def _trials_after(study: Study, raw: str | None) -> int | None:
    """The `after` cursor of the trials list: a trial number, or a trial id (the page's `last_id`)."""
    if raw in (None, ""):
        return None
    if (number := _trial_number(raw)) is not None:
        return number
    number = trials_of(study=study).filter(public_id=raw).values_list("number", flat=True).first()
    if number is None:
        # Unlike a number past the end (an empty page), an unknown id would page in circles.
        raise ApiError(f"No trial '{raw}' in this study.", param="after", status_code=404)
    return number


class StudyView(TenantAPIView):
    model = Study

    def scoped_queryset(self):
        return studies_of(tenant=self.tenant)

    def trial(self, number: str) -> Trial:
        study = self.get_object()
        parsed = _trial_number(number)
        trial = trial_get(study=study, number=parsed) if parsed is not None else None
        if trial is None:
            raise ApiError(f"No trial {number} in study {study.public_id}.", code="not_found", status_code=404)
        return trial


class StudyListCreateView(StudyView):
    @extend_schema(
        summary="List hyperparameter studies (Tunehouse)",
        operation_id="listTuningStudies",
        parameters=[
            *PAGE_PARAMETERS,
            ORDER_PARAMETER,
            OpenApiParameter("status", str, enum=StudyStatus.values, description="Only the studies in this status."),
        ],
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    def get(self, request):
        studies = self.get_queryset()
        status = request.query_params.get("status")
        if status:
            if status not in StudyStatus.values:
                raise ApiError(f"status must be one of {', '.join(StudyStatus.values)}.", param="status")
            studies = studies.filter(status=status)
        return Response(cursor_page(studies, query_params=request.query_params, to_json=study_to_json))

    @extend_schema(
        summary="Create a hyperparameter study (Tunehouse)",
        operation_id="createTuningStudy",
        description="Body: model, training_file (file-...), validation_file (optional; without one a tenth of the "
        "training data is held back), hyperparameters (the base job's), search_space {name: {type: float|int|"
        "categorical, low, high, log, step, choices}}, objective {metric, direction} (or objective_metric and "
        "direction; default valid_loss, minimize), sampler (grid, random, tpe: the default), pruner (none, median, "
        "successive_halving, hyperband; or {type, options}), pruner_options, n_trials (default 20; a grid's size "
        "for grid), max_parallel_trials, gpu_time_budget_seconds, seed, enqueued_trials (parameter sets tried "
        "first), name, metadata. Each trial is a fine-tuning job.",
        request=OpenApiTypes.OBJECT,
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    def post(self, request):
        body = _body(request)
        for name in body:
            if name not in CREATE_PARAMETERS:
                raise ApiError(f"Unrecognized request argument supplied: {name}.", code="unknown_parameter", param=name)
        model = _string(body.get("model"), "model", required=True)
        training_file = _tenant_file(
            self.tenant, _string(body.get("training_file"), "training_file", required=True), "training_file"
        )
        validation_file = _tenant_file(
            self.tenant, _string(body.get("validation_file"), "validation_file"), "validation_file"
        )
        objective_metric, direction = _objective(body)
        pruner, pruner_options = _pruner(body)
        try:
            study = study_create(
                tenant=self.tenant,
                user=self.tenant_context.user,
                model=model,
                training_file=training_file,
                validation_file=validation_file,
                hyperparameters=body.get("hyperparameters"),
                search_space=body.get("search_space"),
                objective_metric=objective_metric,
                direction=direction,
                sampler=_string(body.get("sampler"), "sampler"),
                pruner=pruner,
                pruner_options=pruner_options,
                n_trials=body.get("n_trials"),
                max_parallel_trials=body.get("max_parallel_trials"),
                gpu_time_budget_seconds=body.get("gpu_time_budget_seconds"),
                seed=body.get("seed"),
                enqueued_trials=body.get("enqueued_trials"),
                name=_string(body.get("name"), "name") or "",
                metadata=body.get("metadata"),
            )
        except ApiError as exc:
            exc.param = _as_sent(exc.param, body)
            raise
        return Response(study_to_json(study))


class StudyDetailView(StudyView):
    @extend_schema(
        summary="Retrieve a study with its trials (Tunehouse)",
        operation_id="retrieveTuningStudy",
        parameters=[_STUDY_ID_PARAMETER],
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    def get(self, request, public_id):
        return Response(study_to_json(self.get_object(), with_trials=True))


class StudyCancelView(StudyView):
    @extend_schema(
        summary="Cancel a study (Tunehouse)",
        operation_id="cancelTuningStudy",
        description="The study ends now; its running trials' jobs are cancelled. The trials already finished stand.",
        parameters=[_STUDY_ID_PARAMETER],
        request=None,
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    def post(self, request, public_id):
        study = study_cancel(tenant=self.tenant, study=self.get_object(), user=self.tenant_context.user)
        return Response(study_to_json(study))


class StudyTrialsView(StudyView):
    @extend_schema(
        summary="List a study's trials in number order (Tunehouse)",
        operation_id="listTuningStudyTrials",
        parameters=[
            _STUDY_ID_PARAMETER,
            OpenApiParameter("after", str, description="The number (or id) of the last trial of the previous page."),
            OpenApiParameter("limit", int, description="1 to 100 (default 20)."),
        ],
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    def get(self, request, public_id):
        study = self.get_object()
        limit = parse_limit(request.query_params.get("limit"))
        trials = trials_of(study=study).order_by("number", "id")
        after = _trials_after(study, request.query_params.get("after"))
        if after is not None:
            trials = trials.filter(number__gt=after)
        return Response(list_page(list(trials[: limit + 1]), limit=limit, to_json=trial_to_json))


class StudyTrialDetailView(StudyView):
    @extend_schema(
        summary="Retrieve a trial of a study (Tunehouse)",
        operation_id="retrieveTuningStudyTrial",
        parameters=[_STUDY_ID_PARAMETER, _NUMBER_PARAMETER],
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    def get(self, request, public_id, number):
        return Response(trial_to_json(self.trial(number)))


class StudyTrialPromoteView(StudyView):
    @extend_schema(
        summary="Promote a complete trial's model to a fine-tuned model (Tunehouse)",
        operation_id="promoteTuningStudyTrial",
        description="The trial's job gets a fine-tuned model name: listed in /v1/models, deployable and evaluable "
        "like any other. Promoting it again answers the same name.",
        parameters=[_STUDY_ID_PARAMETER, _NUMBER_PARAMETER],
        request=None,
        responses={200: OpenApiTypes.OBJECT, **ERROR_RESPONSES},
    )
    def post(self, request, public_id, number):
        trial = self.trial(number)
        job = trial_promote(tenant=self.tenant, trial=trial, user=self.tenant_context.user)
        # Read again: the promotion named the job's model and stamped the trial, after this trial was loaded.
        trial = trial_get(study=trial.study, number=trial.number)
        return Response(
            {
                "object": "tuning.trial.promotion",
                "trial": trial_to_json(trial),
                "fine_tuned_model": job.fine_tuned_model,
                "fine_tuning_job": job.public_id,
            }
        )
