"""Step 1 in a real browser: sign in, upload a text file, start training, and watch live progress arrive on the job
page over the websocket (no reload), then try the model; another tenant gets a 404 for the same job page.

Everything is real: Chromium, uvicorn serving the ASGI app, Celery `cpu` and `gpu` workers on Redis, the tiny model.
"""

import re

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, expect

from tests.corpus import english_corpus

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser]

# About 60-100 steps/s for the tiny model on 2 CPU cores: several seconds of training, so progress is observable.
MAX_STEPS = 600
CONTEXT_LENGTH = 64

# What the job page shows, read in one go (for the live checks and for failure messages).
READ_JOB_PAGE = """() => {
  const progress = document.getElementById("job-progress");
  return {
    value: progress.value,
    max: progress.max,
    step: document.getElementById("job-step").textContent.trim(),
    loss: document.getElementById("job-loss").textContent.trim(),
    status: document.getElementById("job-status").textContent.trim(),
    connection: document.getElementById("connection").textContent.trim(),
    error: document.getElementById("job-error").textContent.trim(),
  };
}"""


def _sign_in(page: Page, tenant) -> None:
    page.goto("/login/")
    page.get_by_label("Email", exact=True).fill(tenant.owner.username)
    page.get_by_label("Password", exact=True).fill(tenant.password)
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.wait_for_url(re.compile(r"/$"))
    expect(page.get_by_role("heading", name="New training job")).to_be_visible()
    expect(page.locator(".tenant-name")).to_have_text(tenant.tenant.name)


def _wait_live(page: Page, predicate: str, *, arg=None, timeout_s: float, what: str, logs) -> dict:
    """Waits (polling every 50 ms) until `predicate` holds on the job page; returns the page state at that moment."""
    try:
        handle = page.wait_for_function(predicate, arg=arg, polling=50, timeout=timeout_s * 1000)
    except PlaywrightError as exc:
        raise AssertionError(
            f"live progress: {what} was not seen within {timeout_s:.0f} s without reloading; "
            f"the page shows {page.evaluate(READ_JOB_PAGE)}. A status stuck before 'running' means no worker ran "
            f"the job; 'connection' other than 'live' means the websocket is down. Server logs: {logs}"
        ) from exc
    return handle.json_value()


def test_job_page_shows_live_progress_without_reloading(
    browser, asgi_server, celery_workers, service_logs, tenant_a, tenant_b, tmp_path
):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(english_corpus(sentences=600), encoding="utf-8")

    context = browser.new_context(base_url=asgi_server, viewport={"width": 1280, "height": 900})
    other_context = browser.new_context(base_url=asgi_server)
    try:
        context.set_default_timeout(30_000)
        page = context.new_page()

        # 1. Sign in through the form, by its labels.
        _sign_in(page, tenant_a)

        # 2. Upload. home.js sets the bar to 100 and reloads the page once the server answers; the bar's last value
        # and the status line are kept across that reload in sessionStorage, so the test sees what the user saw.
        page.evaluate(
            """() => window.addEventListener("beforeunload", () => {
                 sessionStorage.setItem("uploadProgress", String(document.getElementById("upload-progress").value));
                 sessionStorage.setItem("uploadStatus", document.getElementById("upload-status").textContent);
               })"""
        )
        page.get_by_label("Upload a dataset", exact=False).set_input_files(corpus)
        with page.expect_navigation():
            page.get_by_role("button", name="Upload", exact=True).click()
        assert page.evaluate('() => sessionStorage.getItem("uploadProgress")') == "100"
        assert re.match(r"Uploaded corpus\.txt as file-", page.evaluate('() => sessionStorage.getItem("uploadStatus")'))
        file_row = page.locator("#files tbody tr[data-file-id]", has_text="corpus.txt")
        expect(file_row).to_have_count(1)
        file_id = file_row.get_attribute("data-file-id")

        # 3. New training job from that file, long enough to watch.
        page.get_by_label("Training file").select_option(file_id)
        assert page.get_by_label("Model", exact=True).input_value() == "gpt2-tiny"  # the default a newcomer gets
        page.get_by_label("max_steps", exact=True).fill(str(MAX_STEPS))
        page.get_by_label("max_length", exact=True).fill(str(CONTEXT_LENGTH))
        page.get_by_role("button", name="Start training", exact=True).click()
        page.wait_for_url(re.compile(r"/jobs/[^/]+/$"))
        job_url = page.url
        page.evaluate("() => { window.__marker = 1; }")
        navigations = []
        page.on("framenavigated", lambda frame: navigations.append(frame.url) if frame == page.main_frame else None)

        # 4. Live progress over the websocket, without reloading.
        first = _wait_live(
            page,
            """() => {
              const progress = document.getElementById("job-progress");
              return progress.value > 0 && progress.value < progress.max && (READ)();
            }""".replace("(READ)", f"({READ_JOB_PAGE})"),
            timeout_s=120,
            what="an intermediate value of the progress bar",
            logs=service_logs,
        )
        assert 0 < first["value"] < first["max"] == MAX_STEPS, first
        first_loss = float(first["loss"])  # a number, not the placeholder dash
        second = _wait_live(
            page,
            """(seen) => {
              const step = Number(document.getElementById("job-step").textContent);
              const loss = document.getElementById("job-loss").textContent.trim();
              return step > seen.step && loss !== seen.loss && !Number.isNaN(Number(loss)) && (READ)();
            }""".replace("(READ)", f"({READ_JOB_PAGE})"),
            arg={"step": int(first["step"]), "loss": first["loss"]},
            timeout_s=60,
            what=f"a step after {first['step']} with a new loss",
            logs=service_logs,
        )
        assert int(second["step"]) > int(first["step"]), (first, second)
        assert float(second["loss"]) != first_loss, (first, second)

        expect(page.locator("#job-status")).to_have_text("succeeded", timeout=120_000)
        expect(page.locator("#events")).to_contain_text("The job has successfully completed")
        finished = page.evaluate(READ_JOB_PAGE)
        assert finished["step"] == str(MAX_STEPS) and finished["value"] == finished["max"] == MAX_STEPS, finished
        assert page.evaluate("() => window.__marker") == 1, "the job page was reloaded"
        assert navigations == [], f"the job page navigated: {navigations}"

        # 5. Try the model.
        expect(page.get_by_role("heading", name="Try the model")).to_be_visible()
        prompt = page.get_by_label("Prompt").input_value()
        page.get_by_role("button", name="Generate", exact=True).click()
        page.wait_for_function(
            """(prompt) => {
              const text = document.getElementById("generate-output").textContent;
              return text.startsWith(prompt) && text.length > prompt.length;
            }""",
            arg=prompt,
            timeout=60_000,
        )

        for width, height in ((1280, 900), (390, 844)):
            page.set_viewport_size({"width": width, "height": height})
            page.screenshot(path=tmp_path / f"job-{width}.png", full_page=True)
        assert page.evaluate("() => window.__marker") == 1

        # 6. Another tenant cannot open the job page.
        other_page = other_context.new_page()
        _sign_in(other_page, tenant_b)
        response = other_page.goto(job_url)
        assert response is not None and response.status == 404
    finally:
        other_context.close()
        context.close()
