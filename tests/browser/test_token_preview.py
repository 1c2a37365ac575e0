"""Step 2 in a real browser: a chat file's first examples shown as tokens, trained ones told apart from masked ones,
rendered from the same labels the trainer computes; user text is shown as text, never as markup."""

import json

import pytest
from playwright.sync_api import expect

from tests.polling import wait_for
from workers.ml.data.samples import write_sample_datasets

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.browser]


def test_token_preview_colours_trained_and_masked_tokens(browser, asgi_server, celery_workers, tenant_a, tmp_path):
    api = tenant_a.api()
    chat_path = write_sample_datasets(str(tmp_path))["chat.jsonl"]
    # The second row carries markup in its content: it must appear as text in the preview.
    with open(chat_path, encoding="utf-8") as handle:
        rows = handle.readlines()
    markup = {"messages": [{"role": "user", "content": "<b>bold?</b>"}, {"role": "assistant", "content": "<i>no</i>"}]}
    rows.insert(1, json.dumps(markup) + "\n")
    with open(chat_path, "w", encoding="utf-8") as handle:
        handle.writelines(rows)
    with open(chat_path, "rb") as handle:
        file = api.post("/v1/files", {"purpose": "fine-tune", "file": handle}, format="multipart").json()
    wait_for(api, f"/v1/files/{file['id']}", lambda f: f["status"] == "processed")
    tokenizer = api.post(
        "/v1/tokenizers",
        {"training_file": file["id"], "algorithm": "bpe", "vocab_size": 400, "name": "chat-bpe"},
        format="json",
    ).json()
    wait_for(api, f"/v1/tokenizers/{tokenizer['id']}", lambda t: t["status"] == "ready")

    context = browser.new_context(base_url=asgi_server, viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.goto("/login/")
        page.get_by_label("Email", exact=True).fill(tenant_a.owner.username)
        page.get_by_label("Password", exact=True).fill(tenant_a.password)
        page.get_by_role("button", name="Sign in", exact=True).click()
        page.goto(f"/files/{file['id']}/")
        expect(page.locator("#file-task")).to_have_text("chat")
        page.get_by_label("Tokenizer", exact=True).select_option(tokenizer["id"])
        page.get_by_label("Chat template").select_option("chatml")
        page.get_by_label("Examples", exact=True).fill("20")
        page.get_by_role("button", name="Show tokens", exact=True).click()
        expect(page.locator(".preview-example").first).to_be_visible()
        trained = page.locator(".preview-example").first.locator(".token.trained")
        masked = page.locator(".preview-example").first.locator(".token.masked")
        assert trained.count() > 0 and masked.count() > 0
        trained_text = "".join(trained.all_text_contents())
        masked_text = "".join(masked.all_text_contents())
        assert "<|im_end|>" in trained_text and "assistant" in masked_text
        # Switching to "all tokens" leaves nothing masked.
        page.get_by_label("Train on").select_option("all")
        page.get_by_role("button", name="Show tokens", exact=True).click()
        expect(page.locator(".preview-example").first.locator(".token.masked")).to_have_count(0)
        # The markup row: shown as text, no <b> or <i> element was created from user data.
        page.goto(f"/files/{file['id']}/")
        page.get_by_label("Examples", exact=True).fill("20")
        page.get_by_role("button", name="Show tokens", exact=True).click()
        expect(page.locator("#preview-output")).to_contain_text("bold")
        assert page.locator("#preview-output b, #preview-output i").count() == 0
        page.screenshot(path=str(tmp_path / "preview.png"), full_page=True)
    finally:
        context.close()
