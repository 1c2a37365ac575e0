"""The dashboard's main flow in a real browser, the way a new team meets Tunehouse: sign up, upload a dataset and
watch it being checked, train a tokenizer and preview the tokens, plan a job with the pre-flight estimate (and apply
one of its one-click fixes), start it, watch progress and the loss chart move live over the websocket (no reload),
see it succeed and try the model, run a second job, compare the two runs; then a user of another team gets 404 for
every page of this team's objects.

Everything is real: Chromium, uvicorn serving the ASGI app, Celery `cpu` and `gpu` workers on Redis, the tiny model.
"""

import re
import time

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, expect

from tests.corpus import english_corpus

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser]

# About 60-100 steps/s for the tiny model on 2 CPU cores: several seconds of training, so progress is observable.
MAX_STEPS = 600
SECOND_RUN_STEPS = 40
CONTEXT_LENGTH = 64

# What the job page shows, read in one go (for the live checks and for failure messages). The loss chart's points are
# plotly's own data (`gd.data`): what is drawn, not a copy kept by our script.
READ_JOB_PAGE = """() => {
  const progress = document.getElementById("job-progress");
  const chart = document.getElementById("chart-loss");
  const trace = chart && chart.data && chart.data[0];
  return {
    value: progress.value,
    max: progress.max,
    step: document.getElementById("job-step").textContent.trim(),
    loss: document.getElementById("job-loss").textContent.trim(),
    status: document.getElementById("job-status").textContent.trim(),
    connection: document.getElementById("connection").textContent.trim(),
    error: document.getElementById("job-error").textContent.trim(),
    chart_points: trace ? trace.x.length : 0,
    chart_last_step: trace && trace.x.length ? trace.x[trace.x.length - 1] : null,
  };
}"""


def _wait_live(page: Page, predicate: str, *, arg=None, timeout_s: float, what: str, logs) -> dict:
    """Waits (polling every 50 ms) until `predicate` holds on the job page; returns the page state at that moment."""
    predicate = predicate.replace("(READ)", f"({READ_JOB_PAGE})")
    try:
        handle = page.wait_for_function(predicate, arg=arg, polling=50, timeout=timeout_s * 1000)
    except PlaywrightError as exc:
        raise AssertionError(
            f"live progress: {what} was not seen within {timeout_s:.0f} s without reloading; "
            f"the page shows {page.evaluate(READ_JOB_PAGE)}. A status stuck before 'running' means no worker ran "
            f"the job; 'connection' other than 'live' means the websocket is down. Server logs: {logs}"
        ) from exc
    return handle.json_value()


def _sign_in(page: Page, email: str, password: str) -> None:
    page.goto("/login/")
    page.get_by_label("Email", exact=True).fill(email)
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.wait_for_url(re.compile(r"/$"))


def _start_job(page: Page, file_id: str, *, max_steps: int, learning_rate: str = "") -> str:
    """Fills the new-job form, waits for its pre-flight estimate, starts the job; returns the job page's URL."""
    page.get_by_role("link", name="New job", exact=True).first.click()
    page.wait_for_url(re.compile(r"/jobs/new/$"))
    page.get_by_label("Training file").select_option(file_id)
    assert page.get_by_label("Model", exact=True).input_value() == "gpt2-tiny"  # the default a newcomer gets
    page.get_by_label("max_steps", exact=True).fill(str(max_steps))
    page.get_by_label("max_length", exact=True).fill(str(CONTEXT_LENGTH))
    if learning_rate:
        page.get_by_label("learning_rate", exact=True).fill(learning_rate)
    # The estimate follows the form: the planned steps are the max_steps just typed.
    expect(page.locator("#preflight-facts")).to_contain_text(f"{max_steps:,} (", timeout=20_000)
    expect(page.locator("#preflight-facts")).to_have_attribute("data-fits", "true")
    page.get_by_role("button", name="Start training", exact=True).click()
    page.wait_for_url(re.compile(r"/jobs/ftjob-[^/]+/$"))
    return page.url


def test_a_new_team_goes_from_sign_up_to_comparing_two_runs(
    browser, asgi_server, celery_workers, service_logs, tenant_b, tmp_path
):
    from apps.datasets.models import Tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(english_corpus(sentences=600), encoding="utf-8")

    context = browser.new_context(base_url=asgi_server, viewport={"width": 1280, "height": 900})
    other_context = browser.new_context(base_url=asgi_server)
    page_errors: list[str] = []
    try:
        context.set_default_timeout(30_000)
        page = context.new_page()
        page.on("pageerror", lambda error: page_errors.append(str(error)))

        # 1. Sign up through the form, by its labels: a new team with nothing in it yet.
        page.goto("/signup/")
        page.get_by_label("Email", exact=True).fill("ada@example.com")
        page.get_by_label("Password", exact=True).fill("a long passphrase 42")
        page.get_by_label("Team name", exact=True).fill("Analytical Engines")
        page.get_by_role("button", name="Sign up", exact=True).click()
        page.wait_for_url(re.compile(r"/$"))
        expect(page.locator(".tenant-name")).to_have_text("Analytical Engines")
        expect(page.locator("#first-steps")).to_be_visible()

        # 2. Upload on the datasets page. upload.js sets the bar to 100 and reloads the page once the server answers;
        # the bar's last value and the status line are kept across that reload in sessionStorage, so the test sees
        # what the user saw. The row then turns "processed" by itself (htmx polls while a file is being checked).
        page.get_by_role("link", name="Datasets", exact=True).click()
        page.wait_for_url(re.compile(r"/datasets/$"))
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
        expect(file_row).to_have_attribute("data-status", "processed", timeout=60_000)

        # 3. Train a small tokenizer on the file, then preview the file's first examples as tokens.
        page.get_by_role("link", name="Tokenizers", exact=True).click()
        page.get_by_label("Text from file").select_option(file_id)
        page.get_by_label("Name", exact=True).fill("corpus-bpe")
        page.get_by_label("Vocabulary size").fill("400")
        page.get_by_role("button", name="Train tokenizer", exact=True).click()
        expect(page.locator("#tokenizer-status")).to_contain_text("Training tok")
        deadline = time.monotonic() + 60
        while not Tokenizer.objects.filter(name="corpus-bpe", status="ready").exists():
            assert time.monotonic() < deadline, f"the tokenizer was not trained in 60 s; server logs: {service_logs}"
            time.sleep(0.2)
        page.goto(f"/files/{file_id}/")
        page.get_by_label("Tokenizer", exact=True).select_option(Tokenizer.objects.get(name="corpus-bpe").public_id)
        page.get_by_label("Examples", exact=True).fill("3")
        page.get_by_role("button", name="Show tokens", exact=True).click()
        expect(page.locator(".preview-example")).to_have_count(3)
        assert page.locator(".preview-example").first.locator(".token").count() > 3

        # 4. Plan a job too big for this machine: the pre-flight estimate says it does not fit before anything
        # runs, and its one-click fix (a smaller batch with gradient accumulation, the same effective batch) makes
        # it fit.
        page.get_by_role("link", name="New job", exact=True).first.click()
        page.get_by_label("Training file").select_option(file_id)
        page.get_by_label("batch_size", exact=True).fill("4096")
        page.get_by_label("max_length", exact=True).fill("8192")
        warning = page.locator('#preflight-warnings li.warning[data-code="does_not_fit"]')
        expect(warning).to_be_visible(timeout=20_000)
        expect(page.locator("#preflight-facts")).to_have_attribute("data-fits", "false")
        warning.locator("button.fix").first.click()
        expect(page.locator("#preflight-facts")).to_have_attribute("data-fits", "true", timeout=20_000)
        expect(warning).to_have_count(0)
        batch_size = int(page.get_by_label("batch_size", exact=True).input_value())
        accumulation = int(page.get_by_label("gradient_accumulation_steps", exact=True).input_value())
        assert batch_size < 4096 and batch_size * accumulation >= 4096, (batch_size, accumulation)

        # 5. Start it, then watch progress and the loss chart move over the websocket, without reloading.
        job_url = _start_job(page, file_id, max_steps=MAX_STEPS)
        page.evaluate("() => { window.__marker = 1; }")
        navigations = []
        page.on("framenavigated", lambda frame: navigations.append(frame.url) if frame == page.main_frame else None)
        first = _wait_live(
            page,
            """() => {
              const state = (READ)();
              return state.value > 0 && state.value < state.max && state.chart_points > 0 && state;
            }""",
            timeout_s=120,
            what="an intermediate value of the progress bar and a first point on the loss chart",
            logs=service_logs,
        )
        assert 0 < first["value"] < first["max"] == MAX_STEPS, first
        first_loss = float(first["loss"])  # a number, not the placeholder dash
        second = _wait_live(
            page,
            """(seen) => {
              const state = (READ)();
              return Number(state.step) > seen.step && state.loss !== seen.loss && !Number.isNaN(Number(state.loss))
                && state.chart_points > seen.chart_points && state.chart_last_step > seen.chart_last_step && state;
            }""",
            arg={
                "step": int(first["step"]),
                "loss": first["loss"],
                "chart_points": first["chart_points"],
                "chart_last_step": first["chart_last_step"],
            },
            timeout_s=60,
            what=f"a step after {first['step']} with a new loss and a new point on the chart",
            logs=service_logs,
        )
        assert float(second["loss"]) != first_loss, (first, second)

        expect(page.locator("#job-status")).to_have_text("succeeded", timeout=120_000)
        expect(page.locator("#events")).to_contain_text("The job has successfully completed")
        finished = page.evaluate(READ_JOB_PAGE)
        assert finished["step"] == str(MAX_STEPS) and finished["value"] == finished["max"] == MAX_STEPS, finished
        assert finished["chart_last_step"] == MAX_STEPS, finished
        expect(page.locator("#status-timeline li[data-status='succeeded']")).to_have_count(1)
        assert page.evaluate("() => window.__marker") == 1, "the job page was reloaded"
        assert navigations == [], f"the job page navigated: {navigations}"

        # 6. Try the model.
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
            # Phone width: the page itself never scrolls sideways (wide tables and charts scroll in their cards).
            assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth + 1"), width
        page.set_viewport_size({"width": 1280, "height": 900})

        # 7. A second run with another learning rate, then compare the two from the jobs list.
        second_url = _start_job(page, file_id, max_steps=SECOND_RUN_STEPS, learning_rate="0.001")
        expect(page.locator("#job-status")).to_have_text("succeeded", timeout=120_000)
        first_id, second_id = (re.search(r"(ftjob-[^/]+)/$", url).group(1) for url in (job_url, second_url))
        page.get_by_role("link", name="Jobs", exact=True).click()
        page.wait_for_url(re.compile(r"/jobs/$"))
        for job_id in (first_id, second_id):
            page.get_by_label(f"Select {job_id} to compare").check()
        page.get_by_role("button", name="Compare selected", exact=True).click()
        page.wait_for_url(re.compile(r"/jobs/compare/"))
        differing = page.locator("#compare-table tr.differs th")
        expect(differing.filter(has_text="max_steps")).to_have_count(1)
        expect(differing.filter(has_text="learning_rate")).to_have_count(1)
        expect(page.locator("#compare-table tr:not(.differs) th", has_text="max_length")).to_have_count(1)
        page.wait_for_function(
            """() => {
              const chart = document.getElementById("compare-chart-train-loss");
              return chart && chart.data && chart.data.length === 2 && chart.data.every((trace) => trace.x.length > 1);
            }"""
        )
        trace_names = page.evaluate('() => document.getElementById("compare-chart-train-loss").data.map((t) => t.name)')
        assert sorted(name.split(" ")[0] for name in trace_names) == sorted([first_id, second_id]), trace_names
        compare_url = page.url
        assert page_errors == [], f"JavaScript errors on the pages: {page_errors}"

        # 8. Another team cannot open any of it: each page of this team's objects is a 404.
        other_page = other_context.new_page()
        _sign_in(other_page, tenant_b.owner.username, tenant_b.password)
        for url in (job_url, second_url, compare_url, f"{asgi_server}/files/{file_id}/"):
            response = other_page.goto(url)
            assert response is not None and response.status == 404, url
        for path in ("/jobs/", "/datasets/", "/"):
            other_page.goto(path)
            content = other_page.content()
            assert first_id not in content and file_id not in content, path
    finally:
        other_context.close()
        context.close()
