"""A hyperparameter study in a real browser: start a small grid search from the new-study form, watch the trial
table fill in without reloading, read the four charts as plotly drew them, promote the best trial; another team's
user gets 404 for the study page.

Everything is real: Chromium, uvicorn, the Celery `cpu` and `gpu` workers, Optuna on the test database, the tiny
model trained for each trial.
"""

import re

import pytest
from playwright.sync_api import expect

from tests.corpus import english_corpus

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser]

# What the charts hold, read from plotly's own data on each chart div (what is drawn, not a copy of ours).
READ_CHARTS = """() => {
  const traces = (id) => (document.getElementById(id).data || []);
  const points = (id) => traces(id).reduce((total, trace) => total + ((trace.x || trace.dimensions || []).length), 0);
  return {
    history: points("chart-history"),
    importances: (traces("chart-importances")[0] || {y: []}).y.length,
    parallel_dimensions: ((traces("chart-parallel")[0] || {}).dimensions || []).map((d) => d.label),
    intermediate_traces: traces("chart-intermediate").length,
  };
}"""


def _upload(tenant, tmp_path) -> str:
    corpus = tmp_path / "stories.txt"
    corpus.write_text(english_corpus(sentences=400), encoding="utf-8")
    with corpus.open("rb") as stream:
        response = tenant.api().post("/v1/files", {"purpose": "fine-tune", "file": stream}, format="multipart")
    assert response.status_code == 200, response.content
    return response.json()["id"]


def _sign_in(page, tenant) -> None:
    page.goto("/login/")
    page.get_by_label("Email", exact=True).fill(tenant.owner.email)
    page.get_by_label("Password", exact=True).fill(tenant.password)
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.wait_for_url(re.compile(r"/$"))


def test_a_grid_study_runs_live_in_the_browser_and_its_best_trial_is_promoted(
    browser, asgi_server, celery_workers, tenant_a, tenant_b, tmp_path
):
    file_id = _upload(tenant_a, tmp_path)
    context = browser.new_context(base_url=asgi_server, viewport={"width": 1280, "height": 900})
    other = browser.new_context(base_url=asgi_server)
    page_errors: list[str] = []
    try:
        context.set_default_timeout(30_000)
        page = context.new_page()
        page.on("pageerror", lambda error: page_errors.append(str(error)))
        _sign_in(page, tenant_a)
        page.get_by_role("link", name="Studies", exact=True).click()
        page.wait_for_url(re.compile(r"/studies/$"))
        page.goto("/studies/new/")
        # Wait until the training file has been checked: the form lists processed files only.
        for _ in range(60):
            if page.locator(f"#study-training-file option[value='{file_id}']").count():
                break
            page.wait_for_timeout(1000)
            page.reload()
        page.get_by_label("Name (optional)").fill("lr and scheduler")
        page.get_by_label("Training file").select_option(file_id)
        page.get_by_label("max_steps", exact=True).fill("8")
        page.get_by_label("eval_every_steps", exact=True).fill("4")
        # The editor adds and removes rows in the page; the study searches the two filled in.
        rows = page.locator("#search-space-rows tr")
        initial_rows = rows.count()
        page.get_by_role("button", name="Add a hyperparameter").click()
        expect(rows).to_have_count(initial_rows + 1)
        rows.last.locator("[data-remove-row]").click()
        expect(rows).to_have_count(initial_rows)
        for row, (name, choices) in zip(
            (rows.nth(0), rows.nth(1)),
            (("learning_rate", "0.001, 0.004"), ("scheduler", "linear, cosine")),
            strict=True,
        ):
            row.locator("[data-space='name']").select_option(name)
            row.locator("[data-space='type']").select_option("categorical")
            row.locator("[data-space='choices']").fill(choices)
        for extra in range(2, initial_rows):  # blank rows are left out of the search space
            expect(rows.nth(extra).locator("[data-space='choices']")).to_have_value("")
        page.get_by_label("Sampler").select_option("grid")
        page.get_by_role("button", name="Start study", exact=True).click()
        page.wait_for_url(re.compile(r"/studies/study-[^/]+/$"))
        study_url = page.url

        # The live part refreshes by itself until the study ends: four complete trials, no reload.
        expect(page.locator("#study-status")).to_have_text("succeeded", timeout=240_000)
        expect(page.locator("#study-trials tbody tr[data-state='complete']")).to_have_count(4)
        charts = page.evaluate(READ_CHARTS)
        assert charts["history"] >= 4, charts
        assert charts["importances"] == 2, charts
        assert set(charts["parallel_dimensions"]) >= {"learning_rate", "scheduler"}, charts
        assert charts["intermediate_traces"] == 4, charts

        page.get_by_role("button", name="Promote", exact=True).first.click()
        expect(page.locator("#best-model")).to_contain_text("ft:gpt2-tiny:acme:trial-")
        expect(page.locator("#deploy-best")).to_be_visible()
        assert page_errors == []

        # Another team's user: the study page does not exist for them.
        other_page = other.new_page()
        _sign_in(other_page, tenant_b)
        assert other_page.goto(study_url).status == 404
    finally:
        context.close()
        other.close()
