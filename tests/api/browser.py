"""What the page's browser tests share: Debian's chromium, driven by Playwright (no browser download).

Import it before playwright: where chromium is missing, the importing test module fails to import (a
failure, not a skip: CI must not pass without the browser tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.fail("needs Debian's chromium (apt-get install chromium; `make test` does)", pytrace=False)

from playwright.sync_api import Browser, sync_playwright  # noqa: E402

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
TIMEOUT_MS = 30_000


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless chromium for a test module's `browser` fixture."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()
