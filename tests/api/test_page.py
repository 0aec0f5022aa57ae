"""The page at GET /, in a real headless Chromium (Debian's, driven by Playwright: no browser download)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect

from tests.api.browser import TIMEOUT_MS, chromium
from tests.api.conftest import Live, live_server, server_settings

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


KEY = "p" * 8 + "-page-tests-key"

# Records, in order, every x̂₀ preview the page replaces (the src it had) and the arrival of results,
# so a test can tell what was on screen before the final images.
WATCH = """(panel) => {
  window.seen = [];
  new MutationObserver((records) => {
    for (const r of records) {
      if (r.type === "attributes" && r.target.closest(`${panel} .previews`)) {
        const index = [...r.target.parentNode.children].indexOf(r.target);
        window.seen.push({kind: "preview", index, src: r.oldValue});
      }
      for (const node of r.addedNodes) {
        if (node.closest && node.closest(`${panel} .results`)) window.seen.push({kind: "result"});
      }
    }
  }).observe(document.body, {subtree: true, childList: true, attributes: true, attributeFilter: ["src"],
                             attributeOldValue: true});
}"""


@pytest.fixture(scope="module")
def live(model_dirs) -> Iterator[Live]:
    with live_server(server_settings(model_dirs, max_images=16, max_batch=16)) as server:
        yield server


@contextmanager
def open_page(browser: Browser, live: Live) -> Iterator[Page]:
    """The page, failing the test on a script error or on any request that leaves this server."""
    context = browser.new_context(viewport={"width": 1200, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    elsewhere: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on(
        "request",
        lambda r: None if r.url.startswith((live.url, "data:", "blob:")) else elsewhere.append(r.url),
    )
    page.goto(live.url + "/")
    yield page
    context.close()
    assert not elsewhere, f"the page requested something outside the server: {elsewhere}"
    assert not errors, f"script errors: {errors}"


@pytest.fixture
def page(browser, live) -> Iterator[Page]:
    with open_page(browser, live) as page:
        yield page


def seen_before_results(page: Page) -> list[dict]:
    seen = page.evaluate("window.seen")
    first = next((k for k, record in enumerate(seen) if record["kind"] == "result"), len(seen))
    return seen[:first]


def test_a_sample_forms_live_then_an_interpolation_row_appears(page, tmp_path):
    expect(page.locator("#model option")).to_have_count(2)
    page.select_option("#model", "tiny2")
    expect(page.locator("#model-info")).to_contain_text("8×8 grayscale · T = 100")

    page.evaluate(WATCH, "#sample")
    sample = page.locator("#sample")
    sample.locator("[name=n]").fill("4")
    sample.locator("[name=steps]").fill("40")
    sample.locator("[name=seed]").fill("7")
    sample.get_by_role("button", name="Sample").click()
    results = sample.locator(".results img")
    expect(results).to_have_count(4)
    expect(sample.locator(".status")).to_contain_text("seed 7")
    assert sample.locator("progress").evaluate("bar => bar.value === bar.max && bar.max === 40")

    # At least three different x̂₀ previews of the first image were on screen before the final images.
    previews = {r["src"] for r in seen_before_results(page) if r["kind"] == "preview" and r["index"] == 0}
    previews.discard(None)
    assert len(previews) >= 3 and all(src.startswith("data:image/png;base64,") for src in previews)

    # Final images: the model's 8×8 pixels shown crisply at 12×, each a download link.
    first = results.first
    assert first.evaluate("img => [img.naturalWidth, img.getBoundingClientRect().width]") == [8, 96]
    assert first.evaluate("img => getComputedStyle(img).imageRendering") == "pixelated"
    with page.expect_download() as download:
        sample.locator(".results a").first.click()
    saved = Image.open(download.value.path())
    assert saved.size == (8, 8) and saved.mode == "L"
    expect(sample.get_by_role("button", name="grid.png")).to_be_visible()

    # Interpolate between the first two samples: the row forms live, then one row of five λ.
    page.evaluate(WATCH, "#interpolate")
    panel = page.locator("#interpolate")
    for side, index in (("a", 0), ("b", 1)):
        source = panel.locator(f".source[data-side={side}]")
        source.locator(".kind").select_option("sample")
        source.locator(".pick").select_option(index=index)
    panel.locator("[name=t]").fill("30")
    panel.locator("[name=num]").fill("5")
    panel.get_by_role("button", name="Interpolate").click()
    row = panel.locator(".results img")
    expect(row).to_have_count(5)
    tops = row.evaluate_all("imgs => imgs.map(img => img.getBoundingClientRect().top)")
    assert len(set(tops)) == 1  # one row: rows = t, columns = λ
    assert len([r for r in seen_before_results(page) if r["kind"] == "preview"]) >= 3

    page.screenshot(path=tmp_path / "page.png", full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_api_errors_are_shown_as_readable_messages(page):
    sample = page.locator("#sample")
    expect(page.locator("#model option")).to_have_count(2)
    sample.locator("[name=n]").fill("99")
    sample.get_by_role("button", name="Sample").click()
    expect(sample.locator(".error")).to_have_text(
        "n: at most 16 images per request (DDPM_MAX_IMAGES) (422 validation_error)"
    )
    expect(sample.get_by_role("button", name="Sample")).to_be_enabled()
    reconstruct = page.locator("#reconstruct")
    reconstruct.get_by_role("button", name="Reconstruct").click()  # no earlier sample of this model yet
    expect(reconstruct.locator(".error")).to_contain_text("there is no earlier sample of this model yet")


def test_cancel_stops_a_running_sample(page, tmp_path):
    sample = page.locator("#sample")
    expect(page.locator("#model option")).to_have_count(2)
    sample.locator("[name=n]").fill("1")  # tiny: T = 1000 steps, long enough to cancel
    sample.get_by_role("button", name="Sample").click()
    expect(sample.locator(".status")).to_contain_text(" left")  # step, t and an ETA
    expect(sample.locator(".previews img")).to_have_count(1)
    page.screenshot(path=tmp_path / "running.png")
    sample.get_by_role("button", name="Cancel").click()
    expect(sample.locator(".status")).to_contain_text("cancelled at step")
    expect(sample.locator(".results img")).to_have_count(0)


def test_with_an_api_key_the_page_streams_and_uploads(browser, model_dirs, tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (20, 20, 4), dtype=np.uint8)
    upload = tmp_path / "upload.png"
    Image.fromarray(rgba, "RGBA").save(upload)  # any size and mode: the page converts it for the model
    with (
        live_server(server_settings(model_dirs[1:], api_keys=[KEY])) as live,
        open_page(browser, live) as page,
    ):
        expect(page.locator("#page-error")).to_contain_text("missing API key")
        page.fill("#api-key", KEY)
        page.locator("#api-key").dispatch_event("change")
        expect(page.locator("#model option")).to_have_count(1)
        expect(page.locator("#page-error")).to_be_hidden()

        sample = page.locator("#sample")
        sample.locator("[name=n]").fill("2")
        sample.locator("[name=steps]").fill("5")
        sample.get_by_role("button", name="Sample").click()
        expect(sample.locator(".results img")).to_have_count(2)  # fetched with the key, as blobs

        panel = page.locator("#reconstruct")
        panel.locator(".kind").select_option("upload")
        panel.locator(".file").set_input_files(upload)
        panel.locator("[name=t]").fill("10")
        panel.locator("[name=n]").fill("3")
        panel.get_by_role("button", name="Reconstruct").click()
        expect(panel.locator(".results img")).to_have_count(3)
        # The server took the upload: the page made an 8×8 grayscale PNG of the 20×20 RGBA file.
        assert panel.locator(".results img").first.evaluate("img => img.naturalWidth") == 8
