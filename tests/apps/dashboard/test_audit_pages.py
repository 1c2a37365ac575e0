"""The bias-audit pages: the job page's "Bias audit" card and run form, one audit's evidence page (/audits/<id>/),
the audit-policy card on the settings page, and the staff review queue and decision form (/reviews/, /reviews/<id>/).

No audit runs here (no workers): the run form only sends the audit to a recorder standing in for the Celery task.
Tests that need a finished audit create Audit rows directly, with hand-written `results` in the shape the audit
library writes, to check how the pages render them; decisions go through the real review service."""

import re

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from apps.audits.models import Audit, AuditPolicy, ReviewDecision
from apps.audits.policy import CATEGORIES, MEASURE_FAMILIES
from apps.audits.services import review_decide
from apps.datasets.models import File
from apps.jobs.models import FineTuningJob, JobStatus
from apps.jobs.serialization import fine_tuned_model_name
from apps.jobs.services import job_create
from apps.tenancy.models import Membership

pytestmark = pytest.mark.django_db(transaction=True)

FORM_CONTROL = re.compile(r"<(input|select|textarea)\b([^>]*)>")

RESULTS = {
    "kind": "generative",
    "version": 1,
    "reference": True,
    "measures": {
        "sentiment_gap.gender": {
            "family": "sentiment_gap",
            "category": "gender",
            "higher_is_worse": True,
            "model": {"value": 0.31, "ci": [0.12, 0.5]},
            "reference": {"value": 0.05, "ci": [0.01, 0.09]},
            "delta": 0.26,
            "delta_ci": [0.07, 0.45],
            "groups": {
                "female": {"n": 20, "model": -0.2, "reference": 0.1},
                "male": {"n": 20, "model": 0.11, "reference": 0.15},
            },
        },
        "hurtful_gap.religion": {
            "family": "hurtful_gap",
            "category": "religion",
            "higher_is_worse": True,
            "model": {"value": 0.02, "ci": [0.0, 0.04]},
            "reference": {"value": 0.01, "ci": [0.0, 0.03]},
            "delta": 0.01,
            "delta_ci": [-0.02, 0.04],
            "groups": {"christian": {"n": 20, "model": 0.0, "reference": None}},
        },
    },
    "tables": {"by_group": [{"group": "female", "accuracy": 0.8, "f1": 0.75, "selection_rate": 0.4, "n": 20}]},
    "worst_examples": [
        {
            "category": "gender",
            "group": "female",
            "prompt": "The woman worked as",
            "continuation": "a dreadful unpleasant clerk",
            "sentiment": -0.8,
            "hurtful": True,
        }
    ],
    "data": {
        "categories": {
            "gender": {"groups": {"female": {"count": 10, "share": 0.1}, "male": {"count": 90, "share": 0.9}}}
        },
        "label_balance": {"positive": 60, "negative": 40},
    },
    "sources": {"bold": {"licence": "CC-BY-SA-4.0", "url": "https://example.org/bold"}},
    "settings": {"max_prompts_per_group": 20, "seed": 0},
}
REASONS = [
    {
        "measure": "sentiment_gap.gender",
        "value": 0.26,
        "threshold": 0.1,
        "message": "sentiment_gap.gender: 0.260 more than its reference, over the threshold of 0.1.",
    }
]


class DelayRecorder:
    """Stands in for `run_bias_audit.delay`: records the audit ids a form sent, runs nothing."""

    def __init__(self):
        self.sent: list[int] = []

    def __call__(self, audit_id: int):
        self.sent.append(audit_id)


@pytest.fixture
def sent(monkeypatch) -> DelayRecorder:
    from workers.tasks.training import run_bias_audit

    recorder = DelayRecorder()
    monkeypatch.setattr(run_bias_audit, "delay", recorder)
    return recorder


def _succeeded_job(tenant, *, task: str = "chat", suffix: str = "") -> FineTuningJob:
    """A job as a finished run leaves it (succeeded, a named model in the store), made through the jobs service."""
    file = File.objects.create(
        tenant=tenant,
        filename=f"train-{task}.jsonl",
        bytes=1,
        sha256="c" * 64,
        storage_key=f"tenants/{tenant.pk}/files/train-{task}-{suffix}",
        status="processed",
        task=task,
    )
    job = job_create(tenant=tenant, user=None, training_file=file, model="gpt2-tiny", suffix=suffix)
    FineTuningJob.objects.filter(pk=job.pk).update(
        status=JobStatus.SUCCEEDED,
        fine_tuned_model=fine_tuned_model_name(job),
        model_storage_prefix=f"tenants/{tenant.pk}/models/{job.public_id}",
        finished_at=timezone.now(),
    )
    job.refresh_from_db()
    return job


def _finished_audit(job, *, version: int = 1, status: str = "flagged", results=None, reasons=None, **fields) -> Audit:
    """An audit row as the worker leaves it, with hand-written results (no audit runs in these tests)."""
    return Audit.objects.create(
        tenant=job.tenant,
        job=job,
        version=version,
        kind="generative",
        reference_model=fields.pop("reference_model", "smollm2-135m-instruct"),
        options={"categories": ["gender", "religion"], "max_prompts_per_group": 20, "seed": 0},
        policy={"thresholds": {"sentiment_gap": 0.1, "hurtful_gap": 0.05}, "approval": "when_flagged"},
        status=status,
        results=RESULTS if results is None else results,
        reasons=REASONS if reasons is None else reasons,
        approval_required=fields.pop("approval_required", status == "flagged"),
        finished_at=timezone.now(),
        **fields,
    )


def _browser(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _member(tenant, role: str, *, username: str, staff: bool = False):
    user = get_user_model().objects.create_user(username=username, email=username, is_staff=staff)
    Membership.objects.create(tenant=tenant, user=user, role=role)
    return user


@pytest.fixture
def reviewer():
    """Platform staff, member of no team."""
    return get_user_model().objects.create_user(
        username="reviewer@platform.test", email="reviewer@platform.test", is_staff=True
    )


def _section(html: str, section_id: str) -> str:
    start = html.index(f'id="{section_id}"')
    return html[start : html.index("</section>", start)]


def _assert_every_control_is_labelled(html: str) -> None:
    controls = 0
    for _, attributes in FORM_CONTROL.findall(html):
        if 'type="hidden"' in attributes:
            continue
        match = re.search(r'\bid="([^"]+)"', attributes)
        assert match, f"a form control without an id: {attributes}"
        assert f'<label for="{match.group(1)}"' in html, f"no label for #{match.group(1)}"
        controls += 1
    assert controls


# --- the job page's card and run form ---------------------------------------------------------------------------


def test_a_succeeded_jobs_page_has_the_audit_card_and_run_form(tenant_a):
    job = _succeeded_job(tenant_a.tenant)
    other = _succeeded_job(tenant_a.tenant, suffix="earlier")

    response = _browser(tenant_a.owner).get(f"/jobs/{job.public_id}/")

    assert response.status_code == 200
    card = _section(response.content.decode(), "audit-card")
    assert 'id="job-audit-none"' in card and 'id="audit-form"' in card
    assert f'action="/jobs/{job.public_id}/audits/"' in card
    # References: absolute values (the default for a from-scratch model) and the team's other fine-tuned models.
    assert '<option value="" selected>None: absolute values</option>' in card
    assert f'<option value="{other.fine_tuned_model}">' in card
    assert f'value="{job.fine_tuned_model}"' not in card
    # Every category is ticked by default (the policy's default), and a generative audit asks for no file.
    assert card.count('name="categories"') == len(CATEGORIES) and card.count(" checked") == len(CATEGORIES)
    assert 'name="evaluation_file"' not in card and 'name="sensitive_attribute"' not in card
    _assert_every_control_is_labelled(card)


def test_a_classifiers_form_asks_for_an_evaluation_file_and_its_group_column(tenant_a):
    job = _succeeded_job(tenant_a.tenant, task="classification")

    card = _section(_browser(tenant_a.owner).get(f"/jobs/{job.public_id}/").content.decode(), "audit-card")

    assert 'id="audit-evaluation-file"' in card and 'id="audit-sensitive-attribute"' in card
    assert f'<option value="{job.training_file.public_id}">' in card
    _assert_every_control_is_labelled(card)


def test_an_unfinished_job_has_no_audit_card(tenant_a):
    job = _succeeded_job(tenant_a.tenant)
    FineTuningJob.objects.filter(pk=job.pk).update(status=JobStatus.RUNNING)

    html = _browser(tenant_a.owner).get(f"/jobs/{job.public_id}/").content.decode()

    assert 'id="audit-card"' not in html


def test_the_card_shows_the_latest_audit_its_approval_and_reasons(tenant_a):
    job = _succeeded_job(tenant_a.tenant)
    first = _finished_audit(job, version=1, status="passed", reasons=[])
    latest = _finished_audit(job, version=2)

    card = _section(_browser(tenant_a.owner).get(f"/jobs/{job.public_id}/").content.decode(), "audit-card")

    assert f'href="/audits/{latest.public_id}/"' in card and "Version 2" in card
    assert '<span class="badge status-flagged" id="job-audit-status">flagged</span>' in card
    assert "awaiting a reviewer" in card
    assert "sentiment_gap.gender: 0.260 more than its reference" in card
    assert f'href="/audits/{first.public_id}/"' in card  # earlier versions stay listed
    assert "Run a new audit" in card


def test_the_card_says_when_an_older_audit_still_decides_the_deploy(tenant_a):
    job = _succeeded_job(tenant_a.tenant)
    flagged = _finished_audit(job, version=1)
    _finished_audit(job, version=2, status="passed", reasons=[])

    card = _section(_browser(tenant_a.owner).get(f"/jobs/{job.public_id}/").content.decode(), "audit-card")

    assert "no approval needed" in card
    gate = re.search(r'<p id="job-audit-gate">(.*?)</p>', card, re.S).group(1)
    assert f'href="/audits/{flagged.public_id}/"' in gate and "awaiting a reviewer" in gate


def test_the_run_form_queues_an_audit_and_returns_to_the_job(tenant_a, sent):
    job = _succeeded_job(tenant_a.tenant)
    browser = _browser(tenant_a.owner)

    response = browser.post(
        f"/jobs/{job.public_id}/audits/", {"reference_model": "", "categories": ["gender", "religion"]}
    )

    assert response.status_code == 302 and response["Location"] == f"/jobs/{job.public_id}/#audit-card"
    audit = Audit.objects.get(job=job)
    assert audit.version == 1 and audit.kind == "generative" and audit.reference_model == ""
    assert audit.options["categories"] == ["gender", "religion"] and audit.created_by == tenant_a.owner
    assert sent.sent == [audit.pk]
    html = browser.get(f"/jobs/{job.public_id}/").content.decode()
    assert f"Bias audit {audit.public_id} (version 1) queued." in html
    assert '<span class="badge status-queued" id="job-audit-status">queued</span>' in html


def test_a_refused_run_re_renders_the_job_page_with_the_input_kept(tenant_a, sent):
    job = _succeeded_job(tenant_a.tenant)
    other = _succeeded_job(tenant_a.tenant, suffix="earlier")
    browser = _browser(tenant_a.owner)

    # No category ticked: the service's sentence, the chosen reference still selected.
    response = browser.post(f"/jobs/{job.public_id}/audits/", {"reference_model": other.fine_tuned_model})

    assert response.status_code == 400
    card = _section(response.content.decode(), "audit-card")
    assert "categories must be a non-empty list" in card and 'id="audit-form-error"' in card
    assert f'<option value="{other.fine_tuned_model}" selected>' in card
    assert " checked" not in card

    # A reference that is no model of this team is refused by name, and the ticked categories stay ticked.
    response = browser.post(
        f"/jobs/{job.public_id}/audits/", {"reference_model": "nobody-s-model", "categories": ["age"]}
    )
    assert response.status_code == 404
    card = _section(response.content.decode(), "audit-card")
    assert "No such model to compare with" in card and 'aria-invalid="true"' in card
    assert 'id="audit-category-age" name="categories" value="age" checked' in card
    assert not Audit.objects.exists() and sent.sent == []


def test_a_classifier_run_with_a_column_but_no_file_keeps_the_column(tenant_a, sent):
    job = _succeeded_job(tenant_a.tenant, task="classification")

    response = _browser(tenant_a.owner).post(
        f"/jobs/{job.public_id}/audits/",
        {"reference_model": "", "categories": ["gender"], "evaluation_file": "", "sensitive_attribute": "gender"},
    )

    assert response.status_code == 400
    card = _section(response.content.decode(), "audit-card")
    assert "sensitive_attribute needs an evaluation_file" in card and 'value="gender"' in card
    assert not Audit.objects.exists()


def test_a_viewer_sees_the_audit_but_no_run_form(tenant_a, sent):
    job = _succeeded_job(tenant_a.tenant)
    _finished_audit(job)
    viewer = _browser(_member(tenant_a.tenant, "viewer", username="viewer@acme.test"))

    card = _section(viewer.get(f"/jobs/{job.public_id}/").content.decode(), "audit-card")
    assert 'id="audit-form"' not in card and 'id="job-audit-read-only"' in card

    response = viewer.post(f"/jobs/{job.public_id}/audits/", {"reference_model": "", "categories": ["gender"]})
    assert response.status_code == 403 and "can only read" in response.content.decode()
    assert Audit.objects.count() == 1 and sent.sent == []


# --- the tenant's audit page ------------------------------------------------------------------------------------


def test_the_audit_page_shows_the_evidence_without_reviewer_identities(tenant_a, reviewer):
    job = _succeeded_job(tenant_a.tenant)
    audit = _finished_audit(job)
    review_decide(reviewer=reviewer, audit=audit, decision="reject", comment="Too large a gap.", audit_version=1)

    response = _browser(tenant_a.owner).get(f"/audits/{audit.public_id}/")

    assert response.status_code == 200
    html = response.content.decode()
    assert 'id="audit-status" class="badge status-flagged">flagged<' in html
    assert "rejected by a reviewer" in html and 'id="audit-version">1<' in html
    assert "<code>smollm2-135m-instruct</code>" in html
    # Reasons, and the measures table: values with their intervals, reference, delta, threshold, the crossed row.
    assert "sentiment_gap.gender: 0.260 more than its reference, over the threshold of 0.1." in html
    measures = _section(html, "audit-measures-card")
    crossed = re.search(r'<tr data-measure="sentiment_gap.gender" class="crossed">(.*?)</tr>', measures, re.S).group(1)
    assert "0.310 <small>[0.120, 0.500]</small>" in crossed and "0.050 <small>[0.010, 0.090]</small>" in crossed
    assert "0.260 <small>[0.070, 0.450]</small>" in crossed and "<td>0.100</td>" in crossed and "crossed" in crossed
    assert '<tr data-measure="hurtful_gap.religion">' in measures
    # Per-group rows (collapsible), classifier tables, worst examples, the data audit, sources and licences.
    assert '<details class="audit-groups" data-measure="sentiment_gap.gender">' in measures
    assert '<th scope="row">female</th><td>20</td><td>-0.200</td><td>0.100</td>' in measures
    assert "selection rate" in html
    worst = _section(html, "audit-worst")
    assert "The woman worked as" in worst and "a dreadful unpleasant clerk" in worst and "-0.800" in worst
    data = _section(html, "audit-data")
    assert "Group terms: gender" in data and "<td>90</td><td>0.900</td>" in data and "Label balance" in data
    assert "CC-BY-SA-4.0" in _section(html, "audit-sources")
    # The decision history: what and why, never who.
    decisions = _section(html, "audit-decisions")
    assert "Too large a gap." in decisions and "reject" in decisions
    assert "reviewer@platform.test" not in html and "Reviewer" not in decisions
    assert 'id="audit-chart-data"' in html and "dashboard/audit.js" in html


def test_results_of_any_shape_render_without_error(tenant_a):
    """The audit library may change its output: odd shapes are shown as text, never a template error."""
    job = _succeeded_job(tenant_a.tenant)
    odd = {
        "measures": {
            "crows_pairs.gender": {"model": {"value": "n/a", "ci": [1]}, "reference": 3, "delta": None, "groups": "x"},
            "weird": [1, 2],
            "huge.age": {
                "model": {"value": 1e300, "ci": ["a", "b"]},
                "groups": [{"group": "old"}, 5],
                "delta": "x" * 5000,
            },
        },
        "tables": 7,
        "worst_examples": {"not": "a list"},
        "data": {"categories": ["gender"], "label_balance": "balanced", "other": {"a": {"b": {"c": 1}}}},
        "sources": ["bold", {"name": "honest"}],
        "settings": "defaults",
    }
    for index, results in enumerate((odd, [], "text", None, {"measures": None, "worst_examples": [None, "x"]})):
        audit = _finished_audit(job, version=index + 1, results=results, reasons=["not a dict", {"value": 2}])
        response = _browser(tenant_a.owner).get(f"/audits/{audit.public_id}/")
        assert response.status_code == 200, results
        assert "not a dict" in response.content.decode()


def test_a_failed_and_a_running_audit_say_so(tenant_a):
    job = _succeeded_job(tenant_a.tenant)
    failed = _finished_audit(job, status="failed", results=None, reasons=[], error={"message": "out of memory"})
    Audit.objects.filter(pk=failed.pk).update(results=None)
    running = Audit.objects.create(tenant=tenant_a.tenant, job=job, version=2, kind="generative", status="running")
    browser = _browser(tenant_a.owner)

    assert "The audit failed: out of memory" in browser.get(f"/audits/{failed.public_id}/").content.decode()
    html = browser.get(f"/audits/{running.public_id}/").content.decode()
    assert 'id="audit-waiting"' in html and "absolute values" in html


def test_another_tenant_gets_not_found_on_the_audit_page_and_run_form(tenant_a, tenant_b, sent):
    job = _succeeded_job(tenant_a.tenant)
    audit = _finished_audit(job)
    intruder = _browser(tenant_b.owner)

    assert intruder.get(f"/audits/{audit.public_id}/").status_code == 404
    assert intruder.post(f"/jobs/{job.public_id}/audits/", {"categories": ["gender"]}).status_code == 404
    assert Audit.objects.count() == 1 and sent.sent == []


# --- staff review -----------------------------------------------------------------------------------------------


def test_the_queue_lists_a_pending_flagged_audit_for_staff(tenant_a, reviewer):
    job = _succeeded_job(tenant_a.tenant)
    audit = _finished_audit(job)
    passed = _finished_audit(_succeeded_job(tenant_a.tenant, suffix="fine"), status="passed", reasons=[])

    response = _browser(reviewer).get("/reviews/")

    assert response.status_code == 200
    html = response.content.decode()
    row = re.search(rf'<tr data-audit-id="{audit.public_id}">(.*?)</tr>', html, re.S).group(1)
    assert tenant_a.tenant.name in row and job.fine_tuned_model in row and "version 1" in row
    assert "flagged" in row and "<td>1</td>" in row
    assert f'href="/reviews/{audit.public_id}/"' in row
    assert passed.public_id not in html  # the policy asked no review of it
    assert 'id="reviews-link" aria-current="page">Reviews</a>' in html


def test_approving_with_a_comment_records_it_and_leaves_the_queue(tenant_a, reviewer):
    job = _succeeded_job(tenant_a.tenant)
    audit = _finished_audit(job)
    browser = _browser(reviewer)

    page = browser.get(f"/reviews/{audit.public_id}/")
    assert page.status_code == 200
    html = page.content.decode()
    assert f'id="review-tenant">{tenant_a.tenant.name}' in html
    assert '<input type="hidden" name="audit_version" value="1">' in html
    assert "sentiment_gap.gender: 0.260" in html and 'class="crossed"' in html
    _assert_every_control_is_labelled(_section(html, "review-form-card"))

    response = browser.post(
        f"/reviews/{audit.public_id}/", {"decision": "approve", "comment": "Gap explained.", "audit_version": "1"}
    )

    assert response.status_code == 302 and response["Location"] == "/reviews/"
    decision = ReviewDecision.objects.get(audit=audit)
    assert decision.decision == "approve" and decision.comment == "Gap explained." and decision.reviewer == reviewer
    queue = browser.get("/reviews/").content.decode()
    assert "approved." in queue and f'data-audit-id="{audit.public_id}"' not in queue
    everything = browser.get("/reviews/?tab=all").content.decode()
    assert audit.public_id in everything and "approved by a reviewer" in everything
    # The reviewer's page names who decided; the tenant's page does not.
    assert "reviewer@platform.test" in browser.get(f"/reviews/{audit.public_id}/").content.decode()
    assert "reviewer@platform.test" not in _browser(tenant_a.owner).get(f"/audits/{audit.public_id}/").content.decode()


def test_a_decision_without_a_comment_is_a_message_and_records_nothing(tenant_a, reviewer):
    audit = _finished_audit(_succeeded_job(tenant_a.tenant))

    response = _browser(reviewer).post(
        f"/reviews/{audit.public_id}/", {"decision": "reject", "comment": "   ", "audit_version": "1"}
    )

    assert response.status_code == 400
    assert 'id="review-error"' in response.content.decode() and "needs a comment" in response.content.decode()
    assert not ReviewDecision.objects.exists()


def test_a_stale_version_is_refused_with_the_comment_kept(tenant_a, reviewer):
    job = _succeeded_job(tenant_a.tenant)
    old = _finished_audit(job, version=1)
    _finished_audit(job, version=2)

    response = _browser(reviewer).post(
        f"/reviews/{old.public_id}/", {"decision": "approve", "comment": "Looks fine to me.", "audit_version": "1"}
    )

    assert response.status_code == 409
    html = response.content.decode()
    assert "the audit that decides this model is version 2" in html and ">Looks fine to me.</textarea>" in html
    assert 'id="review-not-reviewable"' in html
    assert not ReviewDecision.objects.exists()


def test_review_pages_do_not_exist_for_a_tenant_owner(tenant_a):
    audit = _finished_audit(_succeeded_job(tenant_a.tenant))
    owner = _browser(tenant_a.owner)

    assert owner.get("/reviews/").status_code == 404
    assert owner.get("/reviews/?tab=all").status_code == 404
    assert owner.get(f"/reviews/{audit.public_id}/").status_code == 404
    response = owner.post(
        f"/reviews/{audit.public_id}/", {"decision": "approve", "comment": "ok", "audit_version": "1"}
    )
    assert response.status_code == 404 and not ReviewDecision.objects.exists()
    assert 'id="reviews-link"' not in owner.get("/").content.decode()
    assert Client().get("/reviews/").status_code == 302  # anonymous: to the login page


def test_a_staff_member_of_the_team_cannot_decide(tenant_a):
    audit = _finished_audit(_succeeded_job(tenant_a.tenant))
    insider = _browser(_member(tenant_a.tenant, "member", username="staff@acme.test", staff=True))

    page = insider.get(f"/reviews/{audit.public_id}/")
    assert page.status_code == 200 and 'id="review-own-team"' in page.content.decode()

    response = insider.post(
        f"/reviews/{audit.public_id}/", {"decision": "approve", "comment": "Ours is fine.", "audit_version": "1"}
    )
    assert response.status_code == 403
    html = response.content.decode()
    assert "another reviewer must decide" in html and ">Ours is fine.</textarea>" in html
    assert not ReviewDecision.objects.exists()


def test_an_unknown_audit_is_not_found_for_staff(reviewer):
    assert _browser(reviewer).get("/reviews/audit-nope/").status_code == 404


# --- the audit policy card on the settings page -----------------------------------------------------------------


def _policy_form(**overrides) -> dict:
    form = {
        "audit_after_training": "1",
        "approval": "always",
        "threshold-sentiment_gap": "0.2",
        "measures": ["sentiment_gap", "hurtful_gap", "crows_pairs"],
        "categories": ["gender", "religion"],
        "reference_model": "",
    }
    form.update(overrides)
    return form


def test_the_settings_page_shows_the_policy_with_its_defaults(tenant_a):
    html = _browser(tenant_a.owner).get("/settings/").content.decode()

    card = _section(html, "audit-policy")
    assert 'id="audit-policy-form"' in card and 'id="audit-policy-save"' in card
    assert 'placeholder="0.1"' in card and "<td>0.05</td>" in card  # the defaults, shown beside each field
    assert '<option value="when_flagged" selected>' in card
    assert card.count('name="measures"') == len(MEASURE_FAMILIES) and card.count('name="categories"') == len(CATEGORIES)
    assert "The platform defaults apply" in card
    _assert_every_control_is_labelled(card)


def test_the_owner_saves_the_policy(tenant_a):
    browser = _browser(tenant_a.owner)

    response = browser.post("/settings/audit-policy/", _policy_form())

    assert response.status_code == 302 and response["Location"] == "/settings/#audit-policy"
    policy = AuditPolicy.objects.get(tenant=tenant_a.tenant)
    assert policy.audit_after_training and policy.approval == "always"
    assert policy.thresholds == {"sentiment_gap": 0.2}
    assert policy.measures == ["sentiment_gap", "hurtful_gap", "crows_pairs"]
    assert policy.categories == ["gender", "religion"] and policy.updated_by == tenant_a.owner
    card = _section(browser.get("/settings/").content.decode(), "audit-policy")
    assert 'value="0.2"' in card and 'id="policy-after-training" name="audit_after_training" value="1" checked' in card
    assert 'id="policy-measure-accuracy_gap" name="measures" value="accuracy_gap">' in card
    assert "Last saved" in card


def test_a_refused_policy_is_shown_with_the_input_kept(tenant_a):
    browser = _browser(tenant_a.owner)

    response = browser.post("/settings/audit-policy/", _policy_form(**{"threshold-hurtful_gap": "2"}))

    assert response.status_code == 400
    card = _section(response.content.decode(), "audit-policy")
    assert "thresholds.hurtful_gap must be a number from 0 to 1." in card
    assert 'value="2"' in card and 'value="0.2"' in card and '<option value="always" selected>' in card
    response = browser.post("/settings/audit-policy/", _policy_form(categories=[]))
    assert response.status_code == 400 and "Tick at least one of the categories" in response.content.decode()
    assert not AuditPolicy.objects.exists()


def test_a_reader_sees_the_policy_read_only_and_cannot_save_it(tenant_a):
    AuditPolicy.objects.create(tenant=tenant_a.tenant, approval="never")
    for role in ("viewer", "member"):
        reader = _browser(_member(tenant_a.tenant, role, username=f"{role}@acme.test"))
        card = _section(reader.get("/settings/").content.decode(), "audit-policy")
        assert 'id="audit-policy-read-only"' in card and 'id="audit-policy-save"' not in card
        assert '<select id="policy-approval" name="approval" disabled>' in card

        assert reader.post("/settings/audit-policy/", _policy_form()).status_code == 404
        assert AuditPolicy.objects.get(tenant=tenant_a.tenant).approval == "never"
