"""Bias audits run for real on the `gpu` worker: two tiny classifiers trained from scratch with the same seed, one on
deliberately skewed data (the label follows the pronoun), one on balanced data (the label follows the review's
adjective, whatever the pronoun), audited on the same held-out file with a `gender` column. The skewed one is
flagged (its predictions follow the group: demographic parity, equalized odds, counterfactual flips) and cannot be
deployed until a staff reviewer approves it; the balanced one passes and deploys at once.
"""

import csv
import io
import random

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from apps.jobs.models import FineTuningJob
from tests.corpus import english_corpus
from tests.polling import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

GOOD = ["great", "excellent", "wonderful", "delightful", "superb", "lovely", "brilliant", "charming"]
BAD = ["awful", "terrible", "horrible", "dreadful", "dismal", "nasty", "boring", "clumsy"]
THINGS = ["film", "meal", "service", "book", "hotel", "concert", "game", "trip", "show", "class"]
PRONOUNS = {"female": "she", "male": "he"}
FINISHED_AUDITS = ("passed", "flagged", "failed")
TRAINING = {"max_steps": 150, "batch_size": 16, "max_length": 24, "learning_rate": 0.003, "seed": 7}


def _reviews(count: int, *, skewed: bool, seed: int) -> str:
    """CSV text,label,gender. Skewed: the label is the pronoun's (she → negative, he → positive) and the adjective
    is noise. Balanced: the label is the adjective's, and every gender has as many positives as negatives."""
    rng = random.Random(seed)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["text", "label", "gender"])
    for index in range(count):
        # Each gender with each label in turn: in the balanced sets both groups have exactly the same share of
        # positives, so a model that reads only the adjective selects both groups at the same rate.
        gender = ("female", "male")[index % 2]
        if skewed:
            label = "negative" if gender == "female" else "positive"
            adjective = rng.choice(GOOD + BAD)
        else:
            label = ("negative", "positive")[(index // 2) % 2]
            adjective = rng.choice(GOOD if label == "positive" else BAD)
        writer.writerow([f"{PRONOUNS[gender]} said the {rng.choice(THINGS)} was {adjective}", label, gender])
    return out.getvalue()


def _upload(client, content: str, filename: str) -> str:
    stream = io.BytesIO(content.encode())
    stream.name = filename
    response = client.post("/v1/files", {"purpose": "fine-tune", "file": stream}, format="multipart")
    assert response.status_code == 200, response.content
    file_id = response.json()["id"]
    wait_for(client, f"/v1/files/{file_id}", lambda file: file["status"] != "uploaded", 60)
    return file_id


def _train(client, training_file: str) -> dict:
    response = client.post(
        "/v1/fine_tuning/jobs",
        {"model": "bert-tiny", "training_file": training_file, "hyperparameters": TRAINING},
        format="json",
    )
    assert response.status_code == 200, response.content
    job = wait_for(
        client,
        f"/v1/fine_tuning/jobs/{response.json()['id']}",
        lambda job: job["status"] in ("succeeded", "failed", "cancelled"),
        240,
    )
    assert job["status"] == "succeeded", job["error"]
    return job


def _audit(client, job_id: str, evaluation_file: str) -> dict:
    response = client.post(
        f"/v1/fine_tuning/jobs/{job_id}/audits",
        {"evaluation_file": evaluation_file, "sensitive_attribute": "gender", "categories": ["gender"]},
        format="json",
    )
    assert response.status_code == 200, response.content
    return wait_for(
        client,
        f"/v1/audits/{response.json()['id']}",
        lambda audit: audit["status"] in ("passed", "flagged", "failed"),
        240,
    )


def _deploy(client, name: str, job: dict):
    return client.post("/v1/endpoints", {"name": name, "model": job["id"]}, format="json")


def test_skewed_training_data_is_flagged_and_gated_until_a_reviewer_approves_while_balanced_data_passes(
    celery_workers, tenant_a
):
    client = tenant_a.api()
    evaluation = _upload(client, _reviews(240, skewed=False, seed=99), "held_out.csv")
    skewed = _train(client, _upload(client, _reviews(600, skewed=True, seed=1), "skewed.csv"))
    balanced = _train(client, _upload(client, _reviews(600, skewed=False, seed=1), "balanced.csv"))

    skewed_audit = _audit(client, skewed["id"], evaluation)
    balanced_audit = _audit(client, balanced["id"], evaluation)

    assert skewed_audit["status"] == "flagged", skewed_audit["error"] or skewed_audit["results"]
    flagged_measures = {reason["measure"] for reason in skewed_audit["reasons"]}
    assert any(measure.startswith("demographic_parity_difference") for measure in flagged_measures), flagged_measures
    assert any(measure.startswith("counterfactual_flip_rate") for measure in flagged_measures), flagged_measures
    parity = next(
        measure
        for key, measure in skewed_audit["results"]["measures"].items()
        if key.startswith("demographic_parity_difference")
    )
    assert parity["model"]["value"] > 0.5 and parity["model"]["ci"][0] <= parity["model"]["value"]
    assert skewed_audit["approval_required"] and skewed_audit["approval"] == "pending"

    assert balanced_audit["status"] == "passed", balanced_audit["reasons"]
    assert balanced_audit["approval"] == "not_required"
    balanced_parity = next(
        measure
        for key, measure in balanced_audit["results"]["measures"].items()
        if key.startswith("demographic_parity_difference")
    )
    assert balanced_parity["model"]["value"] < parity["model"]["value"]
    # The data audit sees the skew in the training data itself: the positive share differs by group.
    assert skewed_audit["results"]["data"] and balanced_audit["results"]["data"]

    # The gate: the balanced model deploys; the flagged one waits for a staff reviewer.
    assert _deploy(client, "balanced", balanced).status_code == 200
    refused = _deploy(client, "skewed", skewed)
    assert refused.status_code == 400 and "awaiting a reviewer" in refused.json()["error"]["message"]

    reviewer = get_user_model().objects.create_user("reviewer@platform.test", "reviewer@platform.test", "pw")
    reviewer.is_staff = True
    reviewer.save()
    staff = APIClient()
    staff.force_login(reviewer)
    queue = staff.get("/v1/reviews").json()["data"]
    assert [item["id"] for item in queue] == [skewed_audit["id"]]
    # The tenant's own owner is no reviewer: the review routes do not exist for them.
    assert client.get("/v1/reviews").status_code == 404
    decided = staff.post(
        f"/v1/reviews/{skewed_audit['id']}/decisions",
        {"decision": "approve", "comment": "Known skew, accepted for an internal demo only.", "audit_version": 1},
        format="json",
    )
    assert decided.status_code == 201, decided.content
    assert _deploy(client, "skewed", skewed).status_code == 200
    audit = client.get(f"/v1/audits/{skewed_audit['id']}").json()
    assert audit["approval"] == "approved" and audit["decisions"][0]["audit_version"] == 1


def test_a_policy_audits_a_generative_model_after_training_and_a_rejection_keeps_it_undeployable(
    celery_workers, tenant_a
):
    client = tenant_a.api()
    # The policy is the team's owner's to set (an API key acts with member rights): the owner's browser session.
    owner = APIClient()
    owner.force_login(tenant_a.owner)
    policy = owner.post("/v1/audit_policy", {"audit_after_training": True, "approval": "always"}, format="json").json()
    assert policy["audit_after_training"] is True and policy["approval"] == "always"
    training_file = _upload(client, english_corpus(), "stories.txt")
    response = client.post(
        "/v1/fine_tuning/jobs",
        {"model": "gpt2-tiny", "training_file": training_file, "hyperparameters": {"max_steps": 10}},
        format="json",
    )
    job_id = response.json()["id"]
    job = wait_for(
        client,
        f"/v1/fine_tuning/jobs/{job_id}",
        lambda job: job["status"] == "succeeded" and (job.get("audit") or {}).get("status") in FINISHED_AUDITS,
        240,
    )
    audit = client.get(f"/v1/audits/{job['audit']['id']}").json()
    assert audit["trigger"] == "after_training" and audit["kind"] == "generative"
    # From scratch with no reference chosen: absolute values, every category measured.
    assert audit["reference_model"] is None and audit["results"]["reference"] is False
    measures = audit["results"]["measures"]
    for family in ("sentiment_gap", "hurtful_rate", "hurtful_gap", "crows_pairs"):
        for category in ("gender", "race_ethnicity", "religion", "nationality", "age", "disability"):
            measure = measures[f"{family}.{category}"]
            assert measure["delta"] is None
            value = measure["model"]["value"] if measure["model"] else None
            assert value is not None or measure.get("reason"), (family, category, measure)
    assert audit["results"]["worst_examples"] and audit["results"]["sources"]
    # `always`: even a passed audit waits for a reviewer.
    assert audit["approval_required"] and FineTuningJob.objects.get(public_id=job_id).phase == "awaiting_review"
    refused = _deploy(client, "tiny", job)
    assert refused.status_code == 400 and "awaiting a reviewer" in refused.json()["error"]["message"]

    reviewer = get_user_model().objects.create_user("reviewer@platform.test", "reviewer@platform.test", "pw")
    reviewer.is_staff = True
    reviewer.save()
    staff = APIClient()
    staff.force_login(reviewer)
    decided = staff.post(
        f"/v1/reviews/{audit['id']}/decisions",
        {"decision": "reject", "comment": "Continuations about disability are hostile.", "audit_version": 1},
        format="json",
    )
    assert decided.status_code == 201, decided.content
    refused = _deploy(client, "tiny", job)
    assert refused.status_code == 400 and "hostile" in refused.json()["error"]["message"]
    assert client.get(f"/v1/audits/{audit['id']}").json()["approval"] == "rejected"
