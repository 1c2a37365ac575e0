"""The audits API, the tenant's audit policy, the staff review routes and the deploy gate they feed.

Nothing here measures a model: on-demand audits are only queued (the `gpu` task's `.delay` is replaced by a recorder,
so no message is left in the broker), and where a test needs a finished audit it writes the row itself, with a small
hand-written `results` judged by the real policy functions (`crossed_thresholds`, `approval_required`), exactly the
verdict `audit_run` would record for those figures. tests/apps/audits/test_audit_runs.py measures real models.
"""

import os
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.contrib.auth import get_user_model
from django.db import DatabaseError, connection, transaction
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from apps.audits.models import AppendOnlyError, Audit, AuditKind, AuditPolicy, AuditStatus, ReviewDecision
from apps.audits.policy import (
    CATEGORIES,
    DEFAULT_THRESHOLDS,
    MEASURE_FAMILIES,
    approval_required,
    crossed_thresholds,
    policy_of,
    policy_snapshot,
)
from apps.core.storage import object_store, tenant_key
from apps.datasets.models import File
from apps.endpoints.registry import redis_client
from apps.jobs.models import FineTuningJob, JobCheckpoint, JobEvent, JobStatus
from apps.jobs.serialization import fine_tuned_model_name
from apps.jobs.services import job_create
from apps.tenancy.models import Membership, Role

pytestmark = pytest.mark.django_db(transaction=True)

# Deploys register in Redis: a database of their own, as tests/apps/endpoints/test_endpoints.py does, so a serving
# process started by other tests of the session never sees these model-less deployments.
_PRIVATE_REGISTRY_DATABASE = 4


@pytest.fixture(autouse=True)
def _private_registry(settings):
    settings.REDIS_URL = urlunsplit(urlsplit(os.environ["REDIS_URL"])._replace(path=f"/{_PRIVATE_REGISTRY_DATABASE}"))
    redis_client().flushdb()
    yield
    redis_client().flushdb()


@pytest.fixture(autouse=True)
def sent_audits(monkeypatch):
    """Records each audit sent to the `gpu` queue instead of sending it, with whether its row was committed by
    then (no transaction open, and another connection's view would find it: here, the row exists outside any
    atomic block)."""
    from workers.tasks.training import run_bias_audit

    sent = []

    def record(audit_pk):
        sent.append(
            {
                "audit": audit_pk,
                "in_transaction": connection.in_atomic_block,
                "row_exists": Audit.objects.filter(pk=audit_pk).exists(),
            }
        )

    monkeypatch.setattr(run_bias_audit, "delay", record)
    return sent


# --- helpers -------------------------------------------------------------------------------------------------------


def _succeeded_job(tenant, *, model: str = "gpt2-tiny", task: str = "causal_lm") -> FineTuningJob:
    """As tests/apps/endpoints/test_endpoints.py makes one: created through the service with a file still being
    checked (so nothing is dispatched), then marked succeeded with a model; the file then says what it trains."""
    file = File.objects.create(tenant=tenant, filename="t.txt", bytes=1, sha256="c" * 64, storage_key="k")
    job = job_create(tenant=tenant, user=None, training_file=file, model=model)
    File.objects.filter(pk=file.pk).update(status="processed", task=task)
    FineTuningJob.objects.filter(pk=job.pk).update(
        status=JobStatus.SUCCEEDED,
        fine_tuned_model=fine_tuned_model_name(job),
        model_storage_prefix=f"tenants/{tenant.pk}/models/{job.public_id}",
    )
    return FineTuningJob.objects.select_related("training_file", "tenant").get(pk=job.pk)


def _gap(value: float) -> dict:
    """A hand-written result: one generative measure, absolute (no reference), its confidence interval around it."""
    return {
        "measures": {
            "sentiment_gap.gender": {
                "family": "sentiment_gap",
                "higher_is_worse": True,
                "model": {"value": value, "ci": [max(value - 0.05, 0.0), value + 0.05]},
                "reference": None,
                "delta": None,
            }
        }
    }


FLAGGING = _gap(0.32)  # over sentiment_gap's default threshold of 0.10
PASSING = _gap(0.02)


def _finished_audit(job: FineTuningJob, results: dict, *, status: str | None = None) -> Audit:
    """A finished audit row of the job's next version, judged as `audit_run` judges: the tenant's policy now, the
    thresholds crossed, whether a reviewer's approval is needed."""
    snapshot = policy_snapshot(policy_of(tenant=job.tenant))
    reasons = crossed_thresholds(results, snapshot)
    flagged = bool(reasons)
    latest = Audit.objects.filter(job=job).order_by("-version").values_list("version", flat=True).first() or 0
    now = timezone.now()
    return Audit.objects.create(
        tenant=job.tenant,
        job=job,
        version=latest + 1,
        kind=AuditKind.GENERATIVE,
        options={"categories": ["gender"], "max_prompts_per_group": 20, "seed": 0},
        policy=snapshot,
        status=status or (AuditStatus.FLAGGED if flagged else AuditStatus.PASSED),
        results=results,
        reasons=[reason.to_json() for reason in reasons],
        approval_required=approval_required(snapshot, flagged=flagged),
        started_at=now,
        finished_at=now,
    )


def _user(email: str, *, staff: bool = False, superuser: bool = False):
    user = get_user_model().objects.create_user(email, email, "pw")
    user.is_staff, user.is_superuser = staff or superuser, superuser
    user.save()
    return user


def _browser(user) -> APIClient:
    client = APIClient()
    client.force_login(user)
    return client


@pytest.fixture
def reviewer():
    """A platform staff member who belongs to no tenant."""
    return _browser(_user("reviewer@platform.test", staff=True))


@pytest.fixture
def owner_a(tenant_a) -> APIClient:
    return _browser(tenant_a.owner)


def _audits_path(job) -> str:
    return f"/v1/fine_tuning/jobs/{job.public_id}/audits"


def _deploy(client, name: str, job):
    return client.post("/v1/endpoints", {"name": name, "model": job.public_id}, format="json")


def _decide(client, audit, decision: str = "approve", comment: str = "Looked at the evidence.", version=None):
    body = {"decision": decision, "comment": comment, "audit_version": audit.version if version is None else version}
    return client.post(f"/v1/reviews/{audit.public_id}/decisions", body, format="json")


def _error(response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.content)
    return response.json()["error"]


# --- on-demand audits ----------------------------------------------------------------------------------------------


def test_an_on_demand_audit_is_queued_with_the_next_version_and_sent_after_commit(tenant_a, sent_audits):
    job = _succeeded_job(tenant_a.tenant)
    api = tenant_a.api()

    first = api.post(_audits_path(job), {"categories": ["gender", "religion"], "seed": 3}, format="json")

    assert first.status_code == 200, first.content
    body = first.json()
    assert body["object"] == "audit" and body["id"].startswith("audit-")
    assert body["status"] == "queued" and body["version"] == 1 and body["kind"] == "generative"
    assert body["fine_tuning_job"] == job.public_id and body["trigger"] == "on_demand"
    # gpt2-tiny is trained from scratch and the policy names no reference: absolute values.
    assert body["reference_model"] is None and body["approval"] == "auditing"
    assert body["options"] == {"categories": ["gender", "religion"], "max_prompts_per_group": 20, "seed": 3}
    audit = Audit.objects.get(public_id=body["id"])
    assert sent_audits == [{"audit": audit.pk, "in_transaction": False, "row_exists": True}]
    assert audit.sent_at is not None
    assert JobEvent.objects.filter(job=job, message__contains=f"Bias audit {audit.public_id} (version 1) queued")

    second = api.post(_audits_path(job), {}, format="json")
    assert second.status_code == 200 and second.json()["version"] == 2
    assert second.json()["options"]["categories"] == list(CATEGORIES)
    assert len(sent_audits) == 2

    listed = api.get(_audits_path(job)).json()
    assert [item["version"] for item in listed["data"]] == [2, 1]
    assert listed["object"] == "list" and listed["has_more"] is False
    assert all("results" not in item for item in listed["data"])
    detail = api.get(f"/v1/audits/{body['id']}").json()
    assert detail["id"] == body["id"] and "results" in detail and detail["results"] is None
    # The job says where its audits stand.
    assert api.get(f"/v1/fine_tuning/jobs/{job.public_id}").json()["audit"] == {
        "id": second.json()["id"],
        "version": 2,
        "status": "queued",
        "approval": "auditing",
        "gating_audit": None,
    }


def test_an_audit_of_a_checkpoint_names_it_and_only_that_jobs_checkpoints_are_found(tenant_a, tenant_b):
    job = _succeeded_job(tenant_a.tenant)
    other = _succeeded_job(tenant_a.tenant)
    checkpoint = JobCheckpoint.objects.create(tenant=tenant_a.tenant, job=job, step_number=5, storage_prefix="p")
    of_other = JobCheckpoint.objects.create(tenant=tenant_a.tenant, job=other, step_number=5, storage_prefix="p")
    job_b = _succeeded_job(tenant_b.tenant)
    of_b = JobCheckpoint.objects.create(tenant=tenant_b.tenant, job=job_b, step_number=5, storage_prefix="p")
    api = tenant_a.api()

    response = api.post(_audits_path(job), {"checkpoint": checkpoint.public_id}, format="json")

    assert response.status_code == 200 and response.json()["checkpoint"] == checkpoint.public_id
    for foreign in (of_other, of_b):
        error = _error(api.post(_audits_path(job), {"checkpoint": foreign.public_id}, format="json"), 404)
        assert error["param"] == "checkpoint"
    assert Audit.objects.count() == 1


def test_audit_requests_that_cannot_run_are_refused_naming_the_field(tenant_a, tenant_b, sent_audits):
    api = tenant_a.api()
    job = _succeeded_job(tenant_a.tenant)
    running = _succeeded_job(tenant_a.tenant)
    FineTuningJob.objects.filter(pk=running.pk).update(status=JobStatus.RUNNING)
    seq2seq = _succeeded_job(tenant_a.tenant, model="t5-tiny", task="seq2seq")
    own_file = File.objects.create(tenant=tenant_a.tenant, filename="e.csv", bytes=1, sha256="d" * 64, storage_key="e")
    file_b = File.objects.create(tenant=tenant_b.tenant, filename="b.csv", bytes=1, sha256="e" * 64, storage_key="b")

    assert _error(api.post(_audits_path(running), {}, format="json"), 400)["code"] == "model_not_ready"
    assert _error(api.post(_audits_path(seq2seq), {}, format="json"), 400)["code"] == "audit_not_supported"
    # Another tenant's job is not found, whatever the body.
    assert _error(api.post(_audits_path(_succeeded_job(tenant_b.tenant)), {}, format="json"), 404)
    cases = [
        ({"evaluation_file": own_file.public_id}, 400, "evaluation_file"),  # classifier options, generative model
        ({"sensitive_attribute": "gender"}, 400, "evaluation_file"),
        ({"evaluation_file": file_b.public_id}, 404, "evaluation_file"),
        ({"categories": ["gender", "astrology"]}, 400, "categories"),
        ({"categories": []}, 400, "categories"),
        ({"categories": "gender"}, 400, "categories"),
        ({"max_prompts_per_group": 0}, 400, "max_prompts_per_group"),
        ({"max_prompts_per_group": True}, 400, "max_prompts_per_group"),
        ({"seed": -1}, 400, "seed"),
        ({"reference_model": 7}, 400, "reference_model"),
        ({"reference_model": "no-such-model"}, 404, "reference_model"),
        ({"checkpoint": 5}, 400, "checkpoint"),
        ({"model": "gpt2-tiny"}, 400, "model"),  # not an audit option
    ]
    for body, status, param in cases:
        error = _error(api.post(_audits_path(job), body, format="json"), status)
        assert error["param"] == param, (body, error)
    unknown = _error(api.post(_audits_path(job), {"model": "gpt2-tiny"}, format="json"), 400)
    assert unknown["code"] == "unknown_parameter" and "model" in unknown["message"]
    assert "astrology" not in CATEGORIES
    assert not Audit.objects.exists() and sent_audits == []


def test_a_classifier_audit_checks_its_evaluation_file_and_column(tenant_a):
    api = tenant_a.api()
    job = _succeeded_job(tenant_a.tenant, model="bert-tiny", task="classification")
    key = tenant_key(tenant_a.tenant.pk, "files", "held-out")
    object_store().put_bytes(key, b"text,label,gender\nshe liked it,positive,female\nhe did not,negative,male\n")
    evaluation = File.objects.create(
        tenant=tenant_a.tenant, filename="held_out.csv", bytes=70, sha256="f" * 64, storage_key=key, status="processed"
    )

    missing = _error(api.post(_audits_path(job), {"evaluation_file": evaluation.public_id}, format="json"), 400)
    assert missing["param"] == "sensitive_attribute"
    body = {"evaluation_file": evaluation.public_id, "sensitive_attribute": "age"}
    wrong_column = _error(api.post(_audits_path(job), body, format="json"), 400)
    assert wrong_column["param"] == "sensitive_attribute" and "gender" in wrong_column["message"]

    body["sensitive_attribute"] = "gender"
    response = api.post(_audits_path(job), body, format="json")
    assert response.status_code == 200, response.content
    audit = response.json()
    assert audit["kind"] == "classifier" and audit["evaluation_file"] == evaluation.public_id
    assert audit["sensitive_attribute"] == "gender"


def test_a_viewer_reads_audits_but_cannot_start_one(tenant_a):
    job = _succeeded_job(tenant_a.tenant)
    viewer = _user("viewer@acme.test")
    Membership.objects.create(tenant=tenant_a.tenant, user=viewer, role=Role.VIEWER)
    client = _browser(viewer)

    assert client.get(_audits_path(job)).status_code == 200
    assert _error(client.post(_audits_path(job), {}, format="json"), 403)
    assert not Audit.objects.exists()


# --- the policy ----------------------------------------------------------------------------------------------------


def test_the_policy_starts_at_the_defaults_and_updates_partially(tenant_a, owner_a):
    assert owner_a.get("/v1/audit_policy").json() == {
        "object": "audit.policy",
        "audit_after_training": False,
        "approval": "when_flagged",
        "flag_only_significant": True,
        "thresholds": DEFAULT_THRESHOLDS,
        "measures": list(MEASURE_FAMILIES),
        "categories": list(CATEGORIES),
        "reference_model": "",
    }

    first = owner_a.post(
        "/v1/audit_policy", {"thresholds": {"sentiment_gap": 0.2}, "approval": "always"}, format="json"
    )
    assert first.status_code == 200, first.content
    second = owner_a.post(
        "/v1/audit_policy", {"categories": ["gender", "gender"], "audit_after_training": True}, format="json"
    ).json()

    assert second["approval"] == "always" and second["audit_after_training"] is True
    assert second["thresholds"] == {**DEFAULT_THRESHOLDS, "sentiment_gap": 0.2}
    assert second["categories"] == ["gender"] and second["measures"] == list(MEASURE_FAMILIES)
    assert owner_a.get("/v1/audit_policy").json() == second
    assert policy_of(tenant=tenant_a.tenant).updated_by == tenant_a.owner


def test_policy_errors_name_the_field_and_change_nothing(tenant_a, owner_a):
    cases = [
        ({"thresholds": {"bogus_measure": 0.1}}, "thresholds.bogus_measure"),
        ({"thresholds": {"sentiment_gap": 5}}, "thresholds.sentiment_gap"),
        ({"thresholds": {"sentiment_gap": True}}, "thresholds.sentiment_gap"),
        ({"thresholds": [0.1]}, "thresholds"),
        ({"approval": "sometimes"}, "approval"),
        ({"measures": ["sentiment_gap", "vibes"]}, "measures"),
        ({"categories": ["astrology"]}, "categories"),
        ({"audit_after_training": "yes"}, "audit_after_training"),
        ({"reference_model": 3}, "reference_model"),
        # Names the service takes as its own arguments are just unknown fields here.
        ({"tenant": 1}, "tenant"),
        ({"user": 1}, "user"),
    ]
    for body, param in cases:
        error = _error(owner_a.post("/v1/audit_policy", body, format="json"), 400)
        assert error["param"] == param, (body, error)
    # A reference that is no model of this team is not found, like any object of another team.
    missing = _error(owner_a.post("/v1/audit_policy", {"reference_model": "no-such-model"}, format="json"), 404)
    assert missing["param"] == "reference_model" and missing["code"] == "not_found"
    unknown = _error(owner_a.post("/v1/audit_policy", {"approvals": "never"}, format="json"), 400)
    assert unknown["code"] == "unknown_parameter" and "approvals" in unknown["message"]
    assert owner_a.get("/v1/audit_policy").json()["thresholds"] == DEFAULT_THRESHOLDS


def test_only_owners_and_admins_change_the_policy(tenant_a):
    for role in (Role.VIEWER, Role.MEMBER):
        user = _user(f"{role}@acme.test")
        Membership.objects.create(tenant=tenant_a.tenant, user=user, role=role)
        client = _browser(user)
        assert client.get("/v1/audit_policy").status_code == 200
        assert _error(client.post("/v1/audit_policy", {"approval": "never"}, format="json"), 403)
    # An API key acts with member rights.
    assert _error(tenant_a.api().post("/v1/audit_policy", {"approval": "never"}, format="json"), 403)
    admin = _user("admin@acme.test")
    Membership.objects.create(tenant=tenant_a.tenant, user=admin, role=Role.ADMIN)
    assert _browser(admin).post("/v1/audit_policy", {"approval": "never"}, format="json").status_code == 200
    assert policy_of(tenant=tenant_a.tenant).approval == "never"


# --- the deploy gate and staff review ------------------------------------------------------------------------------


def test_a_flagged_audit_blocks_deploy_until_a_reviewer_approves_and_each_version_needs_its_own(tenant_a, reviewer):
    api = tenant_a.api()
    job = _succeeded_job(tenant_a.tenant)
    flagged = _finished_audit(job, FLAGGING)
    assert flagged.status == "flagged" and flagged.approval_required

    refused = _error(_deploy(api, "bot", job), 400)
    assert refused["code"] == "deploy_not_allowed" and "awaiting a reviewer's approval" in refused["message"]
    assert api.get(f"/v1/fine_tuning/jobs/{job.public_id}").json()["audit"]["approval"] == "pending"

    queue = reviewer.get("/v1/reviews").json()["data"]
    assert [item["id"] for item in queue] == [flagged.public_id]
    assert queue[0]["tenant"] == tenant_a.tenant.slug and "results" not in queue[0]
    evidence = reviewer.get(f"/v1/reviews/{flagged.public_id}").json()
    assert evidence["object"] == "audit.review" and evidence["results"] == FLAGGING
    assert evidence["reasons"][0]["measure"] == "sentiment_gap.gender"
    # A decision on a version the audit is not answers 409, and records nothing.
    stale = _error(_decide(reviewer, flagged, version=2), 409)
    assert stale["code"] == "audit_version_stale" and stale["param"] == "audit_version"

    approved = _decide(reviewer, flagged, comment="Gap understood; fine for the internal pilot.")

    assert approved.status_code == 201, approved.content
    decision = approved.json()
    assert decision["decision"] == "approve" and decision["audit_version"] == 1
    assert decision["reviewer"] == "reviewer@platform.test" and decision["audit"] == flagged.public_id
    assert _deploy(api, "bot", job).status_code == 200
    assert reviewer.get("/v1/reviews").json()["data"] == []
    seen_by_tenant = api.get(f"/v1/audits/{flagged.public_id}").json()
    assert seen_by_tenant["approval"] == "approved"
    # The tenant reads the verdict and its reason, not which staff member gave it.
    assert seen_by_tenant["decisions"][0]["comment"] == "Gap understood; fine for the internal pilot."
    assert "reviewer" not in seen_by_tenant["decisions"][0]
    assert JobEvent.objects.filter(job=job, message__contains="approved by a reviewer")

    # A newer audit needs its own decision; the approval of version 1 does not carry over.
    newer = _finished_audit(job, FLAGGING)
    assert "(version 2) is awaiting" in _error(_deploy(api, "bot-2", job), 400)["message"]
    assert _error(_decide(reviewer, flagged), 409)["code"] == "audit_version_stale"  # v1 is no longer the latest
    assert _error(_decide(reviewer, newer, version=1), 409)["code"] == "audit_version_stale"
    assert [item["id"] for item in reviewer.get("/v1/reviews").json()["data"]] == [newer.public_id]

    rejected = _decide(reviewer, newer, "reject", "The gap doubled since version 1; retrain on balanced data.")
    assert rejected.status_code == 201
    refusal = _error(_deploy(api, "bot-2", job), 400)
    assert refusal["code"] == "deploy_not_allowed"
    assert "rejected" in refusal["message"] and "retrain on balanced data" in refusal["message"]
    assert api.get(f"/v1/fine_tuning/jobs/{job.public_id}").json()["audit"] == {
        "id": newer.public_id,
        "version": 2,
        "status": "flagged",
        "approval": "rejected",
        "gating_audit": newer.public_id,
    }
    history = reviewer.get("/v1/reviews", {"state": "all"}).json()["data"]
    assert {item["id"] for item in history} == {flagged.public_id, newer.public_id}
    assert _error(reviewer.get("/v1/reviews", {"state": "bogus"}), 400)["param"] == "state"


def test_a_rejection_is_not_undone_by_a_later_narrower_failed_or_checkpoint_audit(tenant_a, reviewer):
    """The audit that needed a review keeps deciding: a re-audit that passes on fewer categories, one that fails, or
    a clean checkpoint's audit do not clear the final model; a decision on the gating audit still counts."""
    api = tenant_a.api()
    job = _succeeded_job(tenant_a.tenant)
    flagged = _finished_audit(job, FLAGGING)
    assert _decide(reviewer, flagged, "reject", "Hostile continuations about women.").status_code == 201

    narrower = _finished_audit(job, PASSING)
    assert narrower.status == "passed" and not narrower.approval_required
    _finished_audit(job, {}, status=AuditStatus.FAILED)
    checkpoint = JobCheckpoint.objects.create(tenant=job.tenant, job=job, step_number=5, storage_prefix="x")
    clean_checkpoint = _finished_audit(job, PASSING)
    Audit.objects.filter(pk=clean_checkpoint.pk).update(checkpoint=checkpoint)

    refusal = _error(_deploy(api, "bot", job), 400)
    assert "rejected" in refusal["message"] and "Hostile continuations" in refusal["message"]
    summary = api.get(f"/v1/fine_tuning/jobs/{job.public_id}").json()["audit"]
    assert summary["approval"] == "rejected" and summary["gating_audit"] == flagged.public_id
    # The reviewer may reconsider the gating audit (not stale although newer versions exist), and then it deploys.
    assert _decide(reviewer, flagged, "approve", "Retested by hand: acceptable for the pilot.").status_code == 201
    assert _deploy(api, "bot", job).status_code == 200


def test_the_approval_rule_decides_which_audits_need_a_reviewer(tenant_a, owner_a):
    api = tenant_a.api()

    owner_a.post("/v1/audit_policy", {"approval": "always"}, format="json")
    passed = _succeeded_job(tenant_a.tenant)
    audit = _finished_audit(passed, PASSING)
    assert audit.status == "passed" and audit.approval_required
    assert "awaiting a reviewer's approval" in _error(_deploy(api, "always", passed), 400)["message"]

    owner_a.post("/v1/audit_policy", {"approval": "never"}, format="json")
    flagged = _succeeded_job(tenant_a.tenant)
    assert _finished_audit(flagged, FLAGGING).status == "flagged"
    assert _deploy(api, "never", flagged).status_code == 200

    owner_a.post("/v1/audit_policy", {"approval": "when_flagged"}, format="json")
    clean = _succeeded_job(tenant_a.tenant)
    assert not _finished_audit(clean, PASSING).approval_required
    assert _deploy(api, "clean", clean).status_code == 200


def test_audit_after_training_blocks_a_model_with_no_finished_audit(tenant_a, owner_a):
    api = tenant_a.api()
    owner_a.post("/v1/audit_policy", {"audit_after_training": True, "approval": "never"}, format="json")
    job = _succeeded_job(tenant_a.tenant)

    refused = _error(_deploy(api, "bot", job), 400)
    assert refused["code"] == "deploy_not_allowed" and "none has run" in refused["message"]
    assert api.post(_audits_path(job), {}, format="json").status_code == 200
    assert "still queued" in _error(_deploy(api, "bot", job), 400)["message"]
    failed = _finished_audit(job, {}, status=AuditStatus.FAILED)
    assert "failed" in _error(_deploy(api, "bot", job), 400)["message"]
    assert failed.version == 2
    _finished_audit(job, PASSING)  # the latest version passes, and "never" asks no reviewer
    assert _deploy(api, "bot", job).status_code == 200


def test_review_routes_do_not_exist_for_anyone_but_staff(tenant_a):
    audit = _finished_audit(_succeeded_job(tenant_a.tenant), FLAGGING)
    member_of_nothing = _browser(_user("someone@example.test"))
    routes = [
        ("get", "/v1/reviews", None),
        ("get", f"/v1/reviews/{audit.public_id}", None),
        ("post", f"/v1/reviews/{audit.public_id}/decisions", {"decision": "approve", "comment": "ok"}),
        ("delete", f"/v1/reviews/{audit.public_id}/decisions", None),
    ]
    for client in (_browser(tenant_a.owner), tenant_a.api(), member_of_nothing, APIClient()):
        for method, path, body in routes:
            response = getattr(client, method)(path, body, format="json")
            assert _error(response, 404)["code"] == "unknown_url", (path, response.content)
    # The same answer as a path that truly does not exist.
    assert _error(Client().get("/v1/nonexistent"), 404)["code"] == "unknown_url"
    assert not ReviewDecision.objects.exists()


def test_a_reviewer_from_the_audited_team_and_bad_decisions_are_refused(tenant_a, reviewer):
    audit = _finished_audit(_succeeded_job(tenant_a.tenant), FLAGGING)
    colleague = _user("staff@acme.test", staff=True)
    Membership.objects.create(tenant=tenant_a.tenant, user=colleague, role=Role.MEMBER)

    own_team = _error(_decide(_browser(colleague), audit), 403)
    assert own_team["code"] == "own_team_review"
    path = f"/v1/reviews/{audit.public_id}/decisions"
    cases = [
        ({"decision": "approve", "audit_version": 1}, "comment"),
        ({"decision": "approve", "comment": "   ", "audit_version": 1}, "comment"),
        ({"decision": "maybe", "comment": "hm", "audit_version": 1}, "decision"),
        ({"decision": "approve", "comment": "ok"}, "audit_version"),
        ({"decision": "approve", "comment": "ok", "audit_version": "1"}, "audit_version"),
        ({"decision": "approve", "comment": "ok", "audit_version": 1, "reviewer": "me"}, "reviewer"),
    ]
    for body, param in cases:
        assert _error(reviewer.post(path, body, format="json"), 400)["param"] == param, body
    assert _error(reviewer.get("/v1/reviews/audit-nope"), 404)["code"] == "not_found"
    assert _error(reviewer.post("/v1/reviews/audit-nope/decisions", {}, format="json"), 404)
    running = _finished_audit(_succeeded_job(tenant_a.tenant), FLAGGING, status=AuditStatus.RUNNING)
    assert "nothing to review" in _error(_decide(reviewer, running), 400)["message"]
    assert not ReviewDecision.objects.exists()


def test_a_staff_reviewer_may_call_with_an_api_key_they_created(tenant_a, tenant_b):
    from apps.tenancy.services import api_key_create

    audit = _finished_audit(_succeeded_job(tenant_a.tenant), FLAGGING)
    staff = _user("ops@platform.test", staff=True)
    key = api_key_create(tenant=tenant_b.tenant, user=staff, name="reviewing").secret
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")

    assert [item["id"] for item in client.get("/v1/reviews").json()["data"]] == [audit.public_id]
    # A read-only key of theirs reads the queue but decides nothing; an inference-only one does not even read it.
    for permissions, reads in (("read_only", True), ("inference", False)):
        secret = api_key_create(tenant=tenant_b.tenant, user=staff, name=permissions, permissions=permissions).secret
        narrow = APIClient()
        narrow.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
        assert (narrow.get("/v1/reviews").status_code == 200) is reads
        assert _error(_decide(narrow, audit), 403)["code"] == "insufficient_permissions"
    assert not ReviewDecision.objects.exists()
    assert _decide(client, audit).status_code == 201
    assert ReviewDecision.objects.get().reviewer == staff


def test_decisions_are_never_changed_or_deleted(tenant_a, reviewer):
    audit = _finished_audit(_succeeded_job(tenant_a.tenant), FLAGGING)
    assert _decide(reviewer, audit, comment="Original reasoning.").status_code == 201
    decision = ReviewDecision.objects.get()
    path = f"/v1/reviews/{audit.public_id}/decisions"

    for method in ("put", "patch", "delete"):
        assert _error(getattr(reviewer, method)(path, {"comment": "x"}, format="json"), 405)
        assert _error(getattr(reviewer, method)(f"/v1/reviews/{audit.public_id}", {}, format="json"), 405)
    decision.comment = "Rewritten."
    with pytest.raises(AppendOnlyError):
        decision.save()
    with pytest.raises(AppendOnlyError):
        decision.delete()
    with pytest.raises(AppendOnlyError):
        ReviewDecision.objects.filter(pk=decision.pk).update(comment="x")
    with pytest.raises(AppendOnlyError):
        ReviewDecision.objects.filter(pk=decision.pk).delete()
    # Past the ORM, the database itself refuses (migration 0002's trigger).
    with pytest.raises(DatabaseError), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("UPDATE audits_reviewdecision SET comment = 'x'")
    if connection.vendor == "postgresql":
        with pytest.raises(DatabaseError), transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("DELETE FROM audits_reviewdecision")
    assert ReviewDecision.objects.get().comment == "Original reasoning."


def test_the_admin_records_decisions_through_the_service_and_never_edits_them(tenant_a):
    audit = _finished_audit(_succeeded_job(tenant_a.tenant), FLAGGING)
    member = _user("root@acme.test", superuser=True)
    Membership.objects.create(tenant=tenant_a.tenant, user=member, role=Role.OWNER)
    outsider = _user("root@platform.test", superuser=True)
    add = "/admin/audits/reviewdecision/add/"
    body = {"audit": audit.pk, "decision": "approve", "comment": "Reviewed in the admin."}

    refused = Client()
    refused.force_login(member)
    response = refused.post(add, body, follow=True)
    assert "member of the team that trained this model" in response.content.decode()
    assert not ReviewDecision.objects.exists()

    admin = Client()
    admin.force_login(outsider)
    assert admin.post(add, body).status_code == 302
    decision = ReviewDecision.objects.get()
    assert decision.reviewer == outsider and decision.audit_version == audit.version
    assert JobEvent.objects.filter(job=audit.job, message__contains="approved by a reviewer: Reviewed in the admin.")

    change = f"/admin/audits/reviewdecision/{decision.pk}/change/"
    page = admin.get(change)
    assert page.status_code == 200 and 'name="comment"' not in page.content.decode()  # read-only
    assert admin.post(change, {"audit": audit.pk, "decision": "reject", "comment": "changed"}).status_code == 403
    assert admin.get(f"/admin/audits/reviewdecision/{decision.pk}/delete/").status_code == 403
    decision.refresh_from_db()
    assert decision.decision == "approve" and decision.comment == "Reviewed in the admin."
    assert admin.get("/admin/audits/reviewdecision/", {"q": audit.public_id}).status_code == 200
    assert admin.get(f"/admin/audits/audit/{audit.pk}/change/").status_code == 200

    # A policy saved in the admin is checked as the API checks it.
    policy = {"tenant": tenant_a.tenant.pk, "approval": "always", "measures": "[]", "categories": "[]"}
    bad = admin.post("/admin/audits/auditpolicy/add/", {**policy, "thresholds": '{"sentiment_gap": 5}'})
    assert bad.status_code == 200 and "must be a number from 0 to 1" in bad.content.decode()
    good = admin.post("/admin/audits/auditpolicy/add/", {**policy, "thresholds": '{"sentiment_gap": 0.2}'})
    assert good.status_code == 302
    assert policy_of(tenant=tenant_a.tenant).thresholds == {"sentiment_gap": 0.2}


# --- tenants apart -------------------------------------------------------------------------------------------------


def test_another_tenant_sees_none_of_it(tenant_a, tenant_b, owner_a, reviewer):
    job = _succeeded_job(tenant_a.tenant)
    audit = _finished_audit(job, FLAGGING)
    assert _decide(reviewer, audit, "reject", comment="acme-private-reasoning").status_code == 201
    owner_a.post("/v1/audit_policy", {"approval": "always", "thresholds": {"hurtful_gap": 0.01}}, format="json")
    job_b = _succeeded_job(tenant_b.tenant)
    api_b = tenant_b.api()

    for path in (f"/v1/audits/{audit.public_id}", _audits_path(job)):
        response = api_b.get(path)
        assert _error(response, 404) and b"acme-private-reasoning" not in response.content
    assert _error(api_b.post(_audits_path(job), {}, format="json"), 404)
    assert Audit.objects.filter(job=job).count() == 1
    assert api_b.get(_audits_path(job_b)).json()["data"] == []
    assert api_b.get(f"/v1/fine_tuning/jobs/{job_b.public_id}").json()["audit"] is None
    policy_b = api_b.get("/v1/audit_policy").json()
    assert policy_b["approval"] == "when_flagged" and policy_b["thresholds"] == DEFAULT_THRESHOLDS
    # B's model is judged by B's rules: no audit, no "always" → it deploys.
    assert _deploy(api_b, "bot", job_b).status_code == 200


def test_a_change_the_interval_cannot_tell_from_noise_flags_only_when_the_policy_says_so():
    """What a SmolLM2 fine-tune on neutral data showed at 5 prompts per group: deltas over their thresholds whose
    95% intervals still include zero."""
    noisy = {"family": "sentiment_gap", "higher_is_worse": True, "delta": 0.33, "delta_ci": [-0.12, 0.59]}
    clear = {"family": "hurtful_gap", "higher_is_worse": True, "delta": 0.2, "delta_ci": [0.05, 0.4]}
    results = {"measures": {"sentiment_gap.nationality": noisy, "hurtful_gap.age": clear}}
    snapshot = policy_snapshot(AuditPolicy())
    assert snapshot["flag_only_significant"] is True
    assert [reason.measure for reason in crossed_thresholds(results, snapshot)] == ["hurtful_gap.age"]
    every_point = {**snapshot, "flag_only_significant": False}
    assert [reason.measure for reason in crossed_thresholds(results, every_point)] == [
        "hurtful_gap.age",
        "sentiment_gap.nationality",
    ]


def test_a_fine_tuned_model_says_where_its_audit_stands(tenant_a, reviewer):
    api = tenant_a.api()
    job = _succeeded_job(tenant_a.tenant)
    assert api.get(f"/v1/models/{job.fine_tuned_model}").json()["audit"] is None
    flagged = _finished_audit(job, FLAGGING)
    model = api.get(f"/v1/models/{job.fine_tuned_model}").json()
    assert model["audit"]["id"] == flagged.public_id and model["audit"]["approval"] == "pending"
