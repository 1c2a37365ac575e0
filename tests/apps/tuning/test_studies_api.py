"""The REST API of hyperparameter studies (`/v1/tuning/studies`): creation with its defaults and every refusal
naming its field, lists and pages, a study's trials, cancel and promote, and tenant isolation.

No worker runs here: a created study's first advance is recorded, not run (the end-to-end tests run real trials).
Transactional because Optuna must never be called inside a Django transaction, and so that the
advance sent "after commit" is really sent.
"""

import io

import pytest

from apps.jobs.models import JobStatus
from apps.tuning.api.views import CREATE_PARAMETERS
from apps.tuning.models import Study, StudyStatus, Trial, TrialState
from tests.corpus import english_corpus
from tests.tuning_rows import unreachable_job

pytestmark = pytest.mark.django_db(transaction=True)

LEARNING_RATE = {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}
# 2 x 3 = 6 combinations.
GRID = {
    "batch_size": {"type": "categorical", "choices": [4, 8]},
    "max_steps": {"type": "int", "low": 10, "high": 30, "step": 10},
}


@pytest.fixture(autouse=True)
def _advances_recorded(advances) -> list[int]:
    """Every study here is advanced by nobody: its advance messages are recorded (tests/tuning_rows.py)."""
    return advances


def _upload(client, name: str = "stories.txt", *, seed: int = 7) -> str:
    # The same bytes uploaded twice are one file: another seed makes another file.
    stream = io.BytesIO(english_corpus(seed=seed).encode())
    stream.name = name
    response = client.post("/v1/files", {"purpose": "fine-tune", "file": stream}, format="multipart")
    assert response.status_code == 200, response.content
    return response.json()["id"]


def _create(client, training_file: str, /, **body):
    body = {
        "model": "gpt2-tiny",
        "training_file": training_file,
        "search_space": {"learning_rate": LEARNING_RATE},
        **body,
    }
    return client.post("/v1/tuning/studies", body, format="json")


def _created(client, training_file: str, /, **body) -> dict:
    response = _create(client, training_file, **body)
    assert response.status_code == 200, response.json()
    return response.json()


def _error(response, status: int = 400) -> dict:
    assert response.status_code == status, (response.status_code, response.content)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def _trial(client, study_id: str, number: int, *, state: str = TrialState.RUNNING, with_job: bool = True) -> Trial:
    """A trial row as the advancer records it, its job a real one from the jobs service, held back from the session's
    workers (tests/tuning_rows.py)."""
    study = Study.objects.get(public_id=study_id)
    job = None
    if with_job:
        job = unreachable_job(study, hyperparameters={"max_steps": 5})
    return Trial.objects.create(
        tenant=study.tenant,
        study=study,
        number=number,
        optuna_trial_id=1000 + number,
        job=job,
        params={"learning_rate": 1e-3 * (number + 1)},
        state=state,
    )


# --- create ----------------------------------------------------------------------------------------------------


def test_create_fills_in_the_defaults_and_sends_the_first_advance(tenant_a, advances):
    api = tenant_a.api()
    file_id = _upload(api)
    study = _created(api, file_id, name="lr sweep", metadata={"team": "nlp"})
    assert study["object"] == "tuning.study" and study["id"].startswith("study-")
    assert study["status"] == "running" and study["status_reason"] == ""
    assert study["model"] == "gpt2-tiny" and study["training_file"] == file_id and study["validation_file"] is None
    assert study["sampler"] == "tpe"
    assert study["objective"] == {"metric": "valid_loss", "direction": "minimize"}
    assert study["pruner"] == {"type": "none", "options": {}}
    # Without validation data there would be nothing to optimise: a tenth of the training data is held back.
    assert study["hyperparameters"] == {"validation_fraction": 0.1}
    assert study["search_space"] == {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    assert study["n_trials"] == 20 and study["max_parallel_trials"] == 1 and study["seed"] == 0
    assert study["gpu_time_budget_seconds"] is None and study["gpu_seconds_used"] == 0
    assert study["enqueued_trials"] == [] and study["best_trial"] is None and study["param_importances"] is None
    assert study["trial_counts"] == {"running": 0, "complete": 0, "pruned": 0, "failed": 0, "cancelled": 0}
    assert study["name"] == "lr sweep" and study["metadata"] == {"team": "nlp"}
    assert isinstance(study["created_at"], int) and study["finished_at"] is None
    row = Study.objects.get(public_id=study["id"])
    assert row.tenant == tenant_a.tenant and row.created_by == tenant_a.owner
    assert advances == [row.pk]


def test_create_with_a_validation_file_and_every_option(tenant_a):
    api = tenant_a.api()
    training, validation = _upload(api), _upload(api, "held-out.txt", seed=8)
    study = _created(
        api,
        training,
        validation_file=validation,
        hyperparameters={"max_steps": 40, "eval_every_steps": 10},
        search_space={"learning_rate": LEARNING_RATE, "batch_size": {"type": "categorical", "choices": [4, 8]}},
        objective={"metric": "valid_token_accuracy"},
        sampler="random",
        pruner={"type": "median", "options": {"n_warmup_steps": 10}},
        n_trials=8,
        max_parallel_trials=2,
        gpu_time_budget_seconds=3600,
        seed=7,
        enqueued_trials=[{"learning_rate": 1e-3, "batch_size": 8}],
    )
    assert study["validation_file"] == validation
    assert "validation_fraction" not in study["hyperparameters"]
    # Accuracy goes up: the direction follows the metric unless given.
    assert study["objective"] == {"metric": "valid_token_accuracy", "direction": "maximize"}
    assert study["sampler"] == "random" and study["n_trials"] == 8 and study["max_parallel_trials"] == 2
    assert study["pruner"]["type"] == "median"
    assert study["pruner"]["options"] == {"n_startup_trials": 2, "n_warmup_steps": 10, "interval_steps": 1}
    assert study["gpu_time_budget_seconds"] == 3600 and study["seed"] == 7
    assert study["enqueued_trials"] == [{"learning_rate": 1e-3, "batch_size": 8}]


def test_objective_and_pruner_options_also_come_top_level(tenant_a):
    api = tenant_a.api()
    study = _created(
        api,
        _upload(api),
        objective_metric="valid_perplexity",
        direction="minimize",
        hyperparameters={"max_steps": 50},
        pruner="successive_halving",
        pruner_options={"reduction_factor": 2},
    )
    assert study["objective"] == {"metric": "valid_perplexity", "direction": "minimize"}
    # Without eval_every_steps a pruner evaluates every tenth of max_steps.
    assert study["hyperparameters"]["eval_every_steps"] == 5
    assert study["pruner"] == {
        "type": "successive_halving",
        "options": {"min_resource": 5, "reduction_factor": 2, "min_early_stopping_rate": 0},
    }


def test_a_grid_search_runs_its_whole_grid_unless_told_otherwise(tenant_a):
    api = tenant_a.api()
    file_id = _upload(api)
    assert _created(api, file_id, sampler="grid", search_space=GRID)["n_trials"] == 6
    assert _created(api, file_id, sampler="grid", search_space=GRID, n_trials=4)["n_trials"] == 4


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"search_space": {"colour": {"type": "categorical", "choices": ["red"]}}}, "search_space.colour"),
        ({"search_space": {}}, "search_space"),
        ({"search_space": ["learning_rate"]}, "search_space"),
        (
            {"search_space": {"learning_rate": {"type": "float", "low": 0.1, "high": 0.01}}},
            "search_space.learning_rate.low",
        ),
        (
            {"search_space": {"learning_rate": {"type": "float", "low": 0, "high": 0.01, "log": True}}},
            "search_space.learning_rate.low",
        ),
        ({"search_space": {"learning_rate": {"type": "uniform"}}}, "search_space.learning_rate.type"),
        ({"search_space": {"batch_size": {"type": "int", "low": 1.5, "high": 8}}}, "search_space.batch_size.low"),
        ({"sampler": "grid"}, "search_space.learning_rate.step"),
        # Values the training config refuses, found before any trial runs.
        ({"search_space": {"learning_rate": {"type": "float", "low": 1e-4, "high": 50}}}, "search_space.learning_rate"),
        ({"search_space": {"batch_size": {"type": "int", "low": 0, "high": 8}}}, "search_space.batch_size"),
        ({"pruner": "median"}, "hyperparameters.eval_every_steps"),
        ({"pruner": "clairvoyant"}, "pruner"),
        ({"pruner": {"type": "clairvoyant"}}, "pruner.type"),
        ({"pruner": {"kind": "median"}}, "pruner.kind"),
        (
            {"pruner": "median", "hyperparameters": {"max_steps": 50}, "pruner_options": {"patience": 3}},
            "pruner_options.patience",
        ),
        (
            {"pruner": {"type": "median", "options": {"n_warmup_steps": -1}}, "hyperparameters": {"max_steps": 50}},
            "pruner.options.n_warmup_steps",
        ),
        ({"pruner": {"type": "median", "options": {}}, "pruner_options": {}}, "pruner_options"),
        ({"sampler": "bayesian"}, "sampler"),
        ({"sampler": 3}, "sampler"),
        ({"sampler": "grid", "search_space": GRID, "n_trials": 7}, "n_trials"),
        ({"n_trials": 0}, "n_trials"),
        ({"n_trials": "ten"}, "n_trials"),
        ({"n_trials": 2.5}, "n_trials"),
        ({"max_parallel_trials": 33}, "max_parallel_trials"),
        ({"gpu_time_budget_seconds": 0}, "gpu_time_budget_seconds"),
        ({"seed": -1}, "seed"),
        ({"enqueued_trials": [{"learning_rate": 0.5}]}, "enqueued_trials[0].learning_rate"),
        ({"enqueued_trials": [{"learning_rate": "fast"}]}, "enqueued_trials[0].learning_rate"),
        ({"enqueued_trials": [{"batch_size": 8}]}, "enqueued_trials[0].batch_size"),
        ({"enqueued_trials": [{}]}, "enqueued_trials[0]"),
        ({"enqueued_trials": {"learning_rate": 1e-3}}, "enqueued_trials"),
        ({"objective": {"metric": "happiness"}}, "objective.metric"),
        ({"objective": {"metric": "valid_loss", "direction": "up"}}, "objective.direction"),
        ({"objective": {"metric": "valid_loss", "goal": "min"}}, "objective.goal"),
        ({"objective": "valid_loss"}, "objective"),
        ({"objective": {"metric": "valid_loss"}, "direction": "minimize"}, "direction"),
        ({"objective_metric": "happiness"}, "objective_metric"),
        ({"objective_metric": ["valid_loss"]}, "objective_metric"),
        ({"direction": "sideways"}, "direction"),
        ({"hyperparameters": [1, 2]}, "hyperparameters"),
        ({"hyperparameters": {"max_steps": "many"}}, "hyperparameters.max_steps"),
        ({"hyperparameters": {"mode": 3}}, "hyperparameters.mode"),
        ({"model": "gpt-17"}, "model"),
        ({"model": ["gpt2-tiny"]}, "model"),
        ({"model": None}, "model"),
        ({"training_file": None}, "training_file"),
        ({"training_file": 12}, "training_file"),
        ({"training_file": "file-nope"}, "training_file"),
        ({"validation_file": "file-nope"}, "validation_file"),
        ({"name": {"first": "sweep"}}, "name"),
        ({"metadata": {"team": 5}}, "metadata.team"),
        ({"metadata": "nlp"}, "metadata"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_create_refusals_name_their_field(tenant_a, advances, body, param):
    api = tenant_a.api()
    response = _create(api, _upload(api), **body)
    error = _error(response, 404 if "file-nope" in body.values() else 400)
    assert error["param"] == param, error
    assert error["message"] and error["type"] == "invalid_request_error"
    assert not Study.objects.exists() and advances == []


ODD_VALUES = (None, True, -1, 2.5, 10**30, "", "x", [], [1], {}, {"a": 1}, [{"learning_rate": None}])


def test_odd_values_in_any_field_are_refused_never_a_500(tenant_a, advances):
    """The test client raises a view's exception instead of answering 500, so any crash fails here."""
    api = tenant_a.api()
    file_id = _upload(api)
    for name in (*CREATE_PARAMETERS, "objective.metric", "objective.direction", "pruner.type", "pruner.options"):
        for value in ODD_VALUES:
            if "." in name:
                outer, inner = name.split(".")
                body = {outer: {inner: value}}
            else:
                body = {name: value}
            if name.startswith("pruner"):
                body["hyperparameters"] = {"max_steps": 20}
            response = _create(api, file_id, **body)
            assert response.status_code in (200, 400, 404), (body, response.status_code)
            if response.status_code != 200:
                assert response.json()["error"]["message"], body
    for value in ODD_VALUES:
        response = _create(api, file_id, search_space={"learning_rate": value})
        assert response.status_code == 400 and response.json()["error"]["param"].startswith("search_space")
        response = _create(api, file_id, search_space={"batch_size": {"type": "categorical", "choices": [value]}})
        assert response.status_code in (200, 400), value
        response = _create(api, file_id, hyperparameters={"learning_rate": value})
        assert response.status_code in (200, 400), value


def test_unknown_body_keys_are_named(tenant_a):
    api = tenant_a.api()
    error = _error(_create(api, _upload(api), n_trial=5))
    assert error["param"] == "n_trial" and error["code"] == "unknown_parameter" and "n_trial" in error["message"]


@pytest.mark.parametrize("body", [[1, 2], "study", 42, None])
def test_a_body_that_is_not_an_object_is_a_400(tenant_a, body):
    response = tenant_a.api().post("/v1/tuning/studies", body, format="json")
    error = _error(response)
    assert "JSON object" in error["message"] or error["param"] == "model"


def test_a_validation_file_that_is_the_training_file_is_refused(tenant_a):
    api = tenant_a.api()
    file_id = _upload(api)
    error = _error(_create(api, file_id, validation_file=file_id))
    assert error["param"] == "validation_file"


def test_a_file_of_another_tenant_is_not_found(tenant_a, tenant_b, advances):
    file_of_a = _upload(tenant_a.api())
    api_b = tenant_b.api()
    error = _error(_create(api_b, file_of_a), 404)
    assert error["code"] == "not_found" and error["param"] == "training_file"
    error = _error(_create(api_b, _upload(api_b), validation_file=file_of_a), 404)
    assert error["code"] == "not_found" and error["param"] == "validation_file"
    assert not Study.objects.exists() and advances == []


# --- list and detail -------------------------------------------------------------------------------------------


def test_list_is_newest_first_with_pages_and_a_status_filter(tenant_a):
    api = tenant_a.api()
    file_id = _upload(api)
    first, second, third = (_created(api, file_id, name=f"sweep {index}")["id"] for index in range(3))
    listed = api.get("/v1/tuning/studies").json()
    assert listed["object"] == "list" and [study["id"] for study in listed["data"]] == [third, second, first]
    assert listed["has_more"] is False and listed["first_id"] == third and listed["last_id"] == first
    assert listed["data"][0]["object"] == "tuning.study" and "trials" not in listed["data"][0]
    page = api.get("/v1/tuning/studies", {"limit": 2}).json()
    assert [study["id"] for study in page["data"]] == [third, second] and page["has_more"] is True
    rest = api.get("/v1/tuning/studies", {"limit": 2, "after": page["last_id"]}).json()
    assert [study["id"] for study in rest["data"]] == [first] and rest["has_more"] is False
    assert api.post(f"/v1/tuning/studies/{second}/cancel").status_code == 200
    cancelled = api.get("/v1/tuning/studies", {"status": "cancelled"}).json()["data"]
    assert [study["id"] for study in cancelled] == [second]
    running = api.get("/v1/tuning/studies", {"status": "running"}).json()["data"]
    assert [study["id"] for study in running] == [third, first]
    assert _error(api.get("/v1/tuning/studies", {"status": "paused"}))["param"] == "status"
    assert _error(api.get("/v1/tuning/studies", {"limit": "lots"}))["param"] == "limit"
    assert _error(api.get("/v1/tuning/studies", {"after": "study-nope"}), 404)["param"] == "after"


def test_detail_holds_the_trials_and_the_optimisation_history(tenant_a):
    api = tenant_a.api()
    study_id = _created(api, _upload(api))["id"]
    _trial(api, study_id, 0)
    Trial.objects.filter(number=0).update(state=TrialState.COMPLETE, value=2.5, intermediate_values={"10": 3.0})
    _trial(api, study_id, 1, state=TrialState.FAILED, with_job=False)
    study = api.get(f"/v1/tuning/studies/{study_id}").json()
    assert study["id"] == study_id and study["object"] == "tuning.study"
    assert [trial["number"] for trial in study["trials"]] == [0, 1]
    assert study["trial_counts"]["complete"] == 1 and study["trial_counts"]["failed"] == 1
    assert study["optimisation_history"] == [{"number": 0, "value": 2.5, "best": 2.5}]
    complete, failed = study["trials"]
    assert complete["value"] == 2.5 and complete["intermediate_values"] == [[10, 3.0]]
    assert complete["fine_tuning_job"].startswith("ftjob-") and complete["promoted"] is False
    assert failed["fine_tuning_job"] is None and failed["progress"] is None and failed["state"] == "failed"
    error = _error(api.get("/v1/tuning/studies/study-nope"), 404)
    assert error["code"] == "not_found"


def test_trials_list_in_number_order_with_pages_and_trial_detail(tenant_a):
    api = tenant_a.api()
    study_id = _created(api, _upload(api))["id"]
    trials = [_trial(api, study_id, number, with_job=number == 0) for number in range(3)]
    listed = api.get(f"/v1/tuning/studies/{study_id}/trials").json()
    assert listed["object"] == "list" and [trial["number"] for trial in listed["data"]] == [0, 1, 2]
    assert listed["has_more"] is False and listed["first_id"] == trials[0].public_id
    page = api.get(f"/v1/tuning/studies/{study_id}/trials", {"limit": 2}).json()
    assert [trial["number"] for trial in page["data"]] == [0, 1] and page["has_more"] is True
    # The cursor is the last trial's number, or its id.
    for after in ("1", page["last_id"]):
        rest = api.get(f"/v1/tuning/studies/{study_id}/trials", {"limit": 2, "after": after}).json()
        assert [trial["number"] for trial in rest["data"]] == [2] and rest["has_more"] is False
    assert api.get(f"/v1/tuning/studies/{study_id}/trials", {"after": "9"}).json()["data"] == []
    assert _error(api.get(f"/v1/tuning/studies/{study_id}/trials", {"after": "9" * 5000}), 404)["param"] == "after"
    assert _error(api.get(f"/v1/tuning/studies/{study_id}/trials", {"after": "trial-nope"}), 404)["param"] == "after"
    assert _error(api.get(f"/v1/tuning/studies/{study_id}/trials", {"limit": 0}))["param"] == "limit"

    trial = api.get(f"/v1/tuning/studies/{study_id}/trials/0").json()
    assert trial["object"] == "tuning.trial" and trial["id"] == trials[0].public_id
    assert trial["study_id"] == study_id and trial["number"] == 0 and trial["state"] == "running"
    assert trial["params"] == {"learning_rate": 1e-3} and trial["fine_tuning_job"] == trials[0].job.public_id
    assert trial["job_status"] == trials[0].job.status and trial["retry_of"] is None
    for number in ("7", "abc", "-1", "1.0", "0x1", "99999999999999999999999", "9" * 5000):
        error = _error(api.get(f"/v1/tuning/studies/{study_id}/trials/{number}"), 404)
        assert error["code"] == "not_found", number


# --- cancel and promote ----------------------------------------------------------------------------------------


def test_cancel_ends_the_study_and_its_running_trials_once(tenant_a, advances):
    api = tenant_a.api()
    study_id = _created(api, _upload(api))["id"]
    trial = _trial(api, study_id, 0)
    response = api.post(f"/v1/tuning/studies/{study_id}/cancel")
    assert response.status_code == 200, response.json()
    study = response.json()
    assert study["id"] == study_id and study["status"] == "cancelled" and study["finished_at"] is not None
    assert "Cancelled by" in study["status_reason"]
    trial.job.refresh_from_db()
    assert trial.job.status == JobStatus.CANCELLED
    # The advancer settles the cancelled trial: it is sent again.
    assert advances.count(Study.objects.get(public_id=study_id).pk) >= 2
    error = _error(api.post(f"/v1/tuning/studies/{study_id}/cancel"))
    assert error["code"] == "study_finished" and "cancelled" in error["message"]
    assert _error(api.post("/v1/tuning/studies/study-nope/cancel"), 404)["code"] == "not_found"


def test_only_a_complete_trial_can_be_promoted(tenant_a):
    api = tenant_a.api()
    study_id = _created(api, _upload(api))["id"]
    running = _trial(api, study_id, 0)
    _trial(api, study_id, 1, state=TrialState.FAILED, with_job=False)
    for number in (0, 1):
        error = _error(api.post(f"/v1/tuning/studies/{study_id}/trials/{number}/promote"))
        assert error["code"] == "trial_not_complete" and f"Trial {number}" in error["message"]
    # Complete on the study's side but its job has not succeeded: still nothing to promote.
    Trial.objects.filter(pk=running.pk).update(state=TrialState.COMPLETE, value=1.0)
    assert _error(api.post(f"/v1/tuning/studies/{study_id}/trials/0/promote"))["code"] == "trial_not_complete"
    running.job.refresh_from_db()
    assert not running.job.fine_tuned_model and Trial.objects.get(pk=running.pk).promoted_at is None
    assert _error(api.post(f"/v1/tuning/studies/{study_id}/trials/5/promote"), 404)["code"] == "not_found"
    assert _error(api.post(f"/v1/tuning/studies/{study_id}/trials/x/promote"), 404)["code"] == "not_found"


# --- tenant isolation ------------------------------------------------------------------------------------------


def test_another_tenant_sees_none_of_a_study(tenant_a, tenant_b):
    api_a, api_b = tenant_a.api(), tenant_b.api()
    study_id = _created(api_a, _upload(api_a), name="secret sweep")["id"]
    _trial(api_a, study_id, 0)
    base = f"/v1/tuning/studies/{study_id}"
    for response in (
        api_b.get(base),
        api_b.post(f"{base}/cancel"),
        api_b.get(f"{base}/trials"),
        api_b.get(f"{base}/trials/0"),
        api_b.post(f"{base}/trials/0/promote"),
    ):
        assert _error(response, 404)["code"] == "not_found"
        assert study_id.encode() not in response.content
    listed = api_b.get("/v1/tuning/studies").json()
    assert listed["data"] == [] and b"secret sweep" not in api_b.get("/v1/tuning/studies").content
    assert _error(api_b.get("/v1/tuning/studies", {"after": study_id}), 404)["param"] == "after"
    assert Study.objects.get(public_id=study_id).status == StudyStatus.RUNNING
    assert api_a.get(base).status_code == 200
