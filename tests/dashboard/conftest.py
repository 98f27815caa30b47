"""Fixtures of the dashboard's tests: a headless Chromium driven by Playwright.

The browser is Debian's ``chromium`` (``make test`` installs it through
``scripts/bootstrap-chromium.sh``); Playwright drives it by ``executable_path`` and never
downloads a browser of its own. Where it cannot be had, the browser tests are skipped with
the reason, loudly.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

CHROMIUM = os.environ.get("SETPOINT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ROOT = Path(__file__).resolve().parents[2]


def _missing_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed: pip install -e '.[dev]' (make venv)"
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        return (
            f"no Chromium at {CHROMIUM}: run scripts/bootstrap-chromium.sh as root"
            " (make test does), or apt-get install chromium"
        )
    return None


# Module scope, not session: Playwright's sync API keeps an event loop running in this
# thread while it is open, and the suites after ours call asyncio.run().
@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    reason = _missing_browser()
    if reason is not None:
        print(f"\n!!! SKIPPING THE BROWSER TESTS: {reason} !!!\n", file=sys.stderr)
        pytest.skip(f"BROWSER TESTS SKIPPED: {reason}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    context = chromium.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.console_errors = errors  # type: ignore[attr-defined]
    try:
        yield page
    finally:
        context.close()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the page screenshots go: docs/img/ with SETPOINT_SCREENSHOTS=docs (make
    screenshots), else a temporary directory (so a test run leaves the tree clean)."""
    if os.environ.get("SETPOINT_SCREENSHOTS") == "docs":
        return ROOT / "docs" / "img"
    return tmp_path_factory.mktemp("screenshots")
