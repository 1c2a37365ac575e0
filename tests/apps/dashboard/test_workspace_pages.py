"""Home, datasets, jobs and settings pages: each shows its own tenant's rows, nothing of another tenant's, and the
parts htmx refreshes come back alone when htmx asks for them."""

import re
from datetime import UTC, datetime, timedelta

import pytest
from django.test import Client

from apps.datasets.models import File, FileStatus
from apps.jobs.models import FineTuningJob, JobStatus
from apps.tenancy.usage import month_start, tenant_usage

pytestmark = pytest.mark.django_db

HTMX = {"HTTP_HX_REQUEST": "true"}


def _file(tenant, name: str, *, status=FileStatus.PROCESSED, size: int = 1000, rows: int | None = 12) -> File:
    return File.objects.create(
        tenant=tenant,
        filename=name,
        bytes=size,
        sha256=name.ljust(64, "0")[:64],
        storage_key=f"tenants/{tenant.pk}/files/{name}",
        status=status,
        task="chat" if status == FileStatus.PROCESSED else "",
        validation_report={"ok": True, "rows": rows} if rows is not None else {},
    )


def _job(tenant, file, *, status=JobStatus.SUCCEEDED, model="gpt2-tiny", suffix="", **fields) -> FineTuningJob:
    return FineTuningJob.objects.create(
        tenant=tenant, training_file=file, model=model, suffix=suffix, status=status, **fields
    )


def _browser(fixture) -> Client:
    client = Client()
    client.force_login(fixture.owner)
    return client


def _job_ids(response) -> list[str]:
    return re.findall(r'<tr data-job-id="([^"]+)"', response.content.decode())


@pytest.fixture
def workspaces(tenant_a, tenant_b):
    """A has files and jobs in every state; B has its own, with names that must never appear on A's pages."""
    a_file = _file(tenant_a.tenant, "a-corpus.jsonl", rows=1234, size=2048)
    a_checking = _file(tenant_a.tenant, "a-checking.txt", status=FileStatus.UPLOADED, rows=None)
    now = datetime.now(UTC)
    a_running = _job(
        tenant_a.tenant, a_file, status=JobStatus.RUNNING, suffix="a-running", steps_completed=30, total_steps=100,
        started_at=now - timedelta(minutes=5),
    )  # fmt: skip
    a_queued = _job(tenant_a.tenant, a_file, status=JobStatus.QUEUED, model="qwen-small", suffix="a-queued")
    a_done = _job(
        tenant_a.tenant, a_file, suffix="a-done", trained_tokens=5000, steps_completed=10, total_steps=10,
        started_at=now - timedelta(hours=1), finished_at=now - timedelta(minutes=30),
    )  # fmt: skip
    b_file = _file(tenant_b.tenant, "b-secret-corpus.jsonl")
    b_job = _job(tenant_b.tenant, b_file, status=JobStatus.RUNNING, suffix="b-secret-suffix")
    return {
        "a": tenant_a,
        "b": tenant_b,
        "a_file": a_file,
        "a_checking": a_checking,
        "a_running": a_running,
        "a_queued": a_queued,
        "a_done": a_done,
        "b_secrets": [b_file.public_id, "b-secret-corpus", b_job.public_id, "b-secret-suffix"],
    }


def _assert_nothing_of_b(response, w):
    body = response.content.decode()
    for secret in w["b_secrets"]:
        assert secret not in body


# -- home ----------------------------------------------------------------------------------------------------------
def test_home_shows_recent_and_running_jobs_and_usage(workspaces):
    w = workspaces
    response = _browser(w["a"]).get("/")
    assert response.status_code == 200
    body = response.content.decode()
    running_work = body[body.index('id="running-work"') : body.index('id="recent-jobs"')]
    assert w["a_running"].public_id in running_work and w["a_queued"].public_id in running_work
    assert w["a_done"].public_id not in running_work
    assert 'hx-trigger="every 5s"' in running_work
    assert set(_job_ids(response)) >= {w["a_running"].public_id, w["a_queued"].public_id, w["a_done"].public_id}
    assert 'id="first-steps"' not in body
    assert re.search(r'id="usage-jobs">3:', body)
    assert 'id="usage-tokens-month">5,000<' in body
    assert 'id="usage-files">2 (1 being checked)' in body
    _assert_nothing_of_b(response, w)


def test_home_of_an_empty_team_shows_first_steps(tenant_a):
    body = _browser(tenant_a).get("/").content.decode()
    assert 'id="first-steps"' in body
    for link in ('href="/datasets/"', 'href="/models/"', 'href="/jobs/new/"'):
        assert link in body
    assert 'id="no-running-work"' in body and 'hx-trigger="every 30s"' in body


def test_home_running_work_alone_for_htmx(workspaces):
    w = workspaces
    response = _browser(w["a"]).get("/", HTTP_HX_TARGET="running-work", **HTMX)
    body = response.content.decode()
    assert "<html" not in body
    assert 'id="running-work"' in body and w["a_running"].public_id in body
    assert 'id="recent-jobs"' not in body
    assert "HX-Request" in response["Vary"]
    _assert_nothing_of_b(response, w)


def test_a_history_restore_gets_the_whole_page(workspaces):
    response = _browser(workspaces["a"]).get(
        "/jobs/", HTTP_HX_TARGET="job-list", HTTP_HX_HISTORY_RESTORE_REQUEST="true", **HTMX
    )
    assert b"<html" in response.content


# -- datasets ------------------------------------------------------------------------------------------------------
def test_datasets_lists_files_with_status_task_examples_and_size(workspaces):
    w = workspaces
    response = _browser(w["a"]).get("/datasets/")
    body = response.content.decode()
    row = re.search(rf'<tr data-file-id="{w["a_file"].public_id}".*?</tr>', body, re.S).group(0)
    assert "a-corpus.jsonl" in row and f'href="/files/{w["a_file"].public_id}/"' in row
    assert "processed" in row and "chat" in row and "1,234" in row and "2.0\xa0KB" in row
    checking = re.search(rf'<tr data-file-id="{w["a_checking"].public_id}".*?</tr>', body, re.S).group(0)
    assert "checking…" in checking
    # The upload card the browser test drives is still there.
    for marker in ('id="upload-file"', "Upload a dataset", 'id="upload-progress"', 'id="upload-status"'):
        assert marker in body
    assert 'href="/tokenizers/"' in body
    _assert_nothing_of_b(response, w)


def test_datasets_table_polls_only_while_a_file_is_being_checked(workspaces):
    w = workspaces
    browser = _browser(w["a"])
    part = browser.get("/datasets/", HTTP_HX_TARGET="file-list", **HTMX).content.decode()
    assert "<html" not in part and 'id="files"' in part
    assert 'hx-trigger="every 3s"' in part
    File.objects.filter(pk=w["a_checking"].pk).update(status=FileStatus.PROCESSED)
    part = browser.get("/datasets/", HTTP_HX_TARGET="file-list", **HTMX).content.decode()
    assert "hx-trigger" not in part


# -- jobs ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def many_jobs(workspaces):
    """60 more succeeded jobs of A's (63 in all: three pages of 25), newest last created."""
    w = workspaces
    for index in range(60):
        _job(w["a"].tenant, w["a_file"], suffix=f"sweep-{index:02d}")
    return w


def test_jobs_list_is_paged_newest_first(many_jobs):
    w = many_jobs
    browser = _browser(w["a"])
    first = browser.get("/jobs/")
    ids = _job_ids(first)
    assert len(ids) == 25
    newest = FineTuningJob.objects.for_tenant(w["a"].tenant).order_by("-created_at", "-id")
    assert ids == [job.public_id for job in newest[:25]]
    body = first.content.decode()
    assert "63 jobs" in body and "Page 1 of 3" in body
    assert 'href="/jobs/new/"' in body and 'id="compare-selected"' in body
    assert f'name="jobs" value="{ids[0]}"' in body
    last = browser.get("/jobs/?page=last")
    assert _job_ids(last) == [job.public_id for job in newest[50:]]
    assert _job_ids(browser.get("/jobs/?page=3")) == _job_ids(last)
    assert _job_ids(browser.get("/jobs/?page=999")) == _job_ids(last)
    assert _job_ids(browser.get("/jobs/?page=nonsense")) == ids
    _assert_nothing_of_b(first, w)


def test_jobs_list_filters_by_status_and_searches(many_jobs):
    w = many_jobs
    browser = _browser(w["a"])
    assert _job_ids(browser.get("/jobs/?status=running")) == [w["a_running"].public_id]
    assert _job_ids(browser.get("/jobs/?q=QWEN")) == [w["a_queued"].public_id]
    assert _job_ids(browser.get("/jobs/?q=sweep-07")) == [FineTuningJob.objects.get(suffix="sweep-07").public_id]
    assert _job_ids(browser.get(f"/jobs/?q={w['a_done'].public_id}")) == [w["a_done"].public_id]
    assert _job_ids(browser.get("/jobs/?status=queued&q=sweep")) == []
    assert b"No jobs match these filters." in browser.get("/jobs/?status=failed").content
    # An unknown status is no filter, and B's jobs are never found, even by their exact id.
    assert len(_job_ids(browser.get("/jobs/?status=bogus"))) == 25
    response = browser.get("/jobs/?q=b-secret-suffix")
    assert _job_ids(response) == []
    assert _job_ids(browser.get(f"/jobs/?q={w['b_secrets'][2]}")) == []


def test_jobs_list_answers_htmx_with_the_rows_part_and_keeps_filters_in_page_links(many_jobs):
    w = many_jobs
    response = _browser(w["a"]).get("/jobs/?status=succeeded&page=2", HTTP_HX_TARGET="job-list", **HTMX)
    body = response.content.decode()
    assert "<html" not in body and 'id="job-filters"' not in body
    assert '<div id="job-list">' in body
    assert len(_job_ids(response)) == 25 and "61 jobs match" in body and "page 2 of 3" in body
    assert 'hx-get="?status=succeeded&amp;page=3"' in body and 'hx-push-url="true"' in body
    assert "HX-Request" in response["Vary"]


def test_jobs_list_query_count_does_not_grow_with_rows(many_jobs, django_assert_max_num_queries):
    browser = _browser(many_jobs["a"])
    browser.get("/jobs/")  # the session and the tenant context are loaded once
    with django_assert_max_num_queries(8):
        browser.get("/jobs/?page=2")


def test_job_rows_show_progress_and_duration(workspaces):
    w = workspaces
    body = _browser(w["a"]).get("/jobs/").content.decode()
    running = re.search(rf'<tr data-job-id="{w["a_running"].public_id}".*?</tr>', body, re.S).group(0)
    assert 'max="100" value="30"' in running and "30 / 100 steps" in running and "5\xa0minutes" in running
    done = re.search(rf'<tr data-job-id="{w["a_done"].public_id}".*?</tr>', body, re.S).group(0)
    assert "30\xa0minutes" in done


# -- settings and usage --------------------------------------------------------------------------------------------
def test_settings_shows_members_limits_and_usage(workspaces, settings):
    w = workspaces
    settings.MAX_RUNNING_JOBS_PER_TENANT = 3
    w["a"].tenant.max_upload_bytes = 10 * 1024 * 1024
    w["a"].tenant.save()
    response = _browser(w["a"]).get("/settings/")
    body = response.content.decode()
    assert "owner@acme.test" in body and 'id="add-member"' in body
    assert 'href="/settings/api-keys/"' in body
    assert re.search(r'id="limit-upload">10\.0\xa0MB <small>\(set for this team\)', body)
    assert re.search(r'id="limit-running-jobs">3 <small>\(platform default', body)
    assert 'id="usage-tokens-all-time">5,000<' in body
    assert 'id="usage-training-time">0.50 h<' in body
    assert "owner@globex.test" not in body
    _assert_nothing_of_b(response, w)


def test_usage_is_computed_from_the_tenants_rows(workspaces):
    w = workspaces
    tenant = w["a"].tenant
    now = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
    this_month = month_start(now)
    assert this_month == datetime(2026, 3, 1, tzinfo=UTC)
    # Finished this month: 2 h of training, 700 tokens; finished last month: counts only in the all-time total.
    _job(tenant, w["a_file"], trained_tokens=700, started_at=this_month - timedelta(hours=1),
         finished_at=this_month + timedelta(hours=1))  # fmt: skip
    _job(tenant, w["a_file"], status=JobStatus.FAILED, trained_tokens=300,
         started_at=this_month - timedelta(days=3), finished_at=this_month - timedelta(days=2))  # fmt: skip
    # a_done finished "now" (real time): keep it out of March 2026 by moving it into the past.
    FineTuningJob.objects.filter(pk=w["a_done"].pk).update(
        started_at=this_month - timedelta(days=40), finished_at=this_month - timedelta(days=39)
    )
    usage = tenant_usage(tenant=tenant, now=now, with_all_time=True)
    assert usage.storage_bytes == 2048 + 1000
    assert (usage.file_count, usage.files_processing) == (2, 1)
    assert usage.jobs_by_status == {"queued": 1, "running": 1, "succeeded": 2, "failed": 1}
    assert usage.job_count == 5
    assert usage.trained_tokens_this_month == 700
    assert usage.trained_tokens_all_time == 700 + 300 + 5000
    assert usage.training_time_this_month == timedelta(hours=2)
    assert not usage.is_empty
    assert tenant_usage(tenant=w["b"].tenant, now=now).jobs_by_status == {"running": 1}
