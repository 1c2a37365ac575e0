"""Browser fixtures: one headless Debian Chromium per browser test, driven through Playwright's sync API.

Playwright's own browser download cannot work offline, so the browser is the system Chromium that `make test`
installs (its `browser` target). A missing Chromium fails the browser tests loudly; it never skips them.
"""

import shutil
from pathlib import Path

import pytest

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium_path() -> str:
    for candidate in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium"):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail(
        "Browser tests need Debian's Chromium, which was not found on PATH or at /usr/bin/chromium. "
        "Run `make test` (its `browser` target installs it), or `sudo apt-get install chromium` once.",
        pytrace=False,
    )


@pytest.fixture
def browser(service_env):
    """A headless Chromium for one test (about a second to start).

    Playwright's sync API keeps an asyncio event loop marked as running in this thread for as long as it is started,
    so every Django ORM call made meanwhile in this thread (the tenant fixtures' setup, the transactional database
    flush at teardown, any query in a test) would raise SynchronousOnlyOperation. We therefore set
    DJANGO_ALLOW_ASYNC_UNSAFE for exactly the lifetime of the browser, which is one test: a longer-lived Playwright
    would leave its running loop (and the variable) behind for the tests after it, breaking their async_to_sync
    calls and `check --deploy`. The ORM still runs synchronously in one thread (Playwright only switches greenlets
    inside its own calls), so nothing unsafe actually happens. Depending on `service_env` snapshots the environment
    of the uvicorn and Celery subprocesses before the variable is set, so the real servers keep Django's async-safety
    check.
    """
    from playwright.sync_api import sync_playwright

    executable = _chromium_path()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
            try:
                yield chromium
            finally:
                chromium.close()
