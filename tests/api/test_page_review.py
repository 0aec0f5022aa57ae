"""The page at GET / as a first-time user meets it, in a real headless Chromium against real uvicorn servers.

What a review of the page found and what must stay fixed: a phone screen, controls the user cannot see
blocking a form, unreadable uploads, a server that restarts mid-stream or is not ready yet, error bodies
that are not the API's, failed downloads, keyboard focus after Cancel, and the names of the controls.
A second review: a queued job's place that never moved, a screen reader told every preview step, an empty
progress bar under a refused request, and typed steps and t lost when the model list reloaded. Then: a
queued job's dropped stream hidden by its place in the queue. A third: a failed job that looked as if it
still ran, a lost stream that left no way to cancel its job, defaults a server's step limit refused, and
result images never freed.
Like tests/api/test_page.py: Debian's chromium driven by Playwright, nothing downloaded.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import uvicorn
from PIL import Image
from playwright.sync_api import Browser, Page, Route, expect

from app.api import create_app
from tests.api.browser import TIMEOUT_MS, chromium
from tests.api.conftest import Live, live_server, read_sse, server_settings, wait_for

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


PHONE = {"width": 375, "height": 800}
KEY = "r" * 8 + "-review-tests-key"


@pytest.fixture(scope="module")
def live(model_dirs) -> Iterator[Live]:
    """`tiny` (T = 1000, the default) and `tiny2` (T = 100)."""
    with live_server(server_settings(model_dirs, max_images=16, max_batch=16)) as server:
        yield server


@contextmanager
def open_page(
    browser: Browser, url: str, viewport: dict | None = None, key: str | None = None
) -> Iterator[Page]:
    """The page, failing the test on a script error, an alert() or a request that leaves the server.

    `key`: an API key the page already holds (entered earlier in this browser tab)."""
    context = browser.new_context(viewport=viewport or {"width": 1200, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    if key is not None:
        page.add_init_script(f"sessionStorage.setItem('ddpm-api-key', {json.dumps(key)})")
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    elsewhere: list[str] = []
    dialogs: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.on(
        "request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else elsewhere.append(r.url)
    )
    page.goto(url + "/")
    expect(page.locator("#model option").first).to_be_attached()
    yield page
    context.close()
    assert not elsewhere, f"the page requested something outside the server: {elsewhere}"
    assert not errors, f"script errors: {errors}"
    assert not dialogs, f"the page used alert() instead of saying it on the page: {dialogs}"


@pytest.fixture
def page(browser, live) -> Iterator[Page]:
    with open_page(browser, live.url) as page:
        yield page


def sample(page: Page, n: int, steps: int) -> None:
    panel = page.locator("#sample")
    panel.locator("[name=n]").fill(str(n))
    panel.locator("[name=steps]").fill(str(steps))
    panel.get_by_role("button", name="Sample").click()
    expect(panel.locator(".results img")).to_have_count(n)


def json_error(route: Route, status: int, code: str, message: str, **headers: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}})
    route.fulfill(status=status, body=body, headers={"content-type": "application/json", **headers})


def side_scroll(page: Page) -> int:
    """How many pixels the page is wider than the screen."""
    return page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")


def test_on_a_phone_the_page_is_no_wider_than_the_screen(browser, live):
    with open_page(browser, live.url, PHONE) as page:
        assert side_scroll(page) == 0  # three panels of at least 420 px made it 443 px wide
        sample(page, 4, 5)
        # The earlier-sample pickers now hold "sample 0 of job 1a2b3c (seed 4294967295)": still no wider.
        page.locator("#interpolate .source[data-side=a] .kind").select_option("sample")
        expect(page.locator("#reconstruct .pick")).to_be_visible()
        assert side_scroll(page) == 0


def test_a_source_the_user_cannot_see_does_not_block_the_form(page, tmp_path):
    upload = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8), "L").save(upload)
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    panel = page.locator("#interpolate")
    a = panel.locator(".source[data-side=a]")
    panel.locator("[name=t]").fill("5")
    panel.locator("[name=num]").fill("2")

    # An emptied seed is asked for, not silently taken as seed 0.
    a.locator(".seed").fill("")
    panel.get_by_role("button", name="Interpolate").click()
    assert a.locator(".seed").evaluate("input => input.validity.valueMissing")
    page.wait_for_timeout(300)
    assert not posts

    # A bad seed left behind a switch to "an upload" is out of sight and out of the form: it goes.
    a.locator(".seed").fill("-5")
    for side in ("a", "b"):
        source = panel.locator(f".source[data-side={side}]")
        source.locator(".kind").select_option("upload")
        source.locator(".file").set_input_files(upload)
    panel.get_by_role("button", name="Interpolate").click()
    expect(panel.locator(".results img")).to_have_count(2)
    assert [url.rsplit("/", 1)[1] for url in posts] == ["interpolate"]


def test_a_file_that_is_not_an_image_is_named_in_the_error(page, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture at all\n")
    panel = page.locator("#reconstruct")
    panel.locator(".kind").select_option("upload")
    panel.locator(".file").set_input_files(notes)
    panel.get_by_role("button", name="Reconstruct").click()
    expect(panel.locator(".error")).to_contain_text("image: notes.png is not an image this browser can read")
    expect(panel.get_by_role("button", name="Reconstruct")).to_be_enabled()


def test_a_dropped_stream_is_resumed_when_the_server_answers_again(page):
    refused: list[str] = []
    resumed_from: list[str | None] = []  # the Last-Event-ID of each connection that got through
    cut: list[str] = []  # the id of the last event of the stream that broke off

    def stream(route: Route) -> None:
        if len(refused) < 3:  # the server is away for three connections, then back
            refused.append(route.request.url)
            route.abort("connectionrefused")
            return
        resumed_from.append(route.request.headers.get("last-event-id"))
        if cut:
            route.continue_()
            return
        # The first stream that gets through breaks off before its last event ("done"): the page must
        # reconnect and say which event it saw last, for the server to send only what came after it.
        response = route.fetch()
        blocks = response.text().split("\n\n")
        done = next(k for k, block in enumerate(blocks) if "event: done" in block)
        kept = [block for block in blocks[:done] if block.strip()]
        cut.append(re.findall(r"^id: (\d+)$", "\n".join(kept), re.M)[-1])
        route.fulfill(response=response, body="".join(f"{block}\n\n" for block in kept))

    page.route("**/stream/**", stream)
    panel = page.locator("#sample")
    panel.locator("[name=n]").fill("2")
    panel.locator("[name=steps]").fill("5")
    panel.get_by_role("button", name="Sample").click()
    expect(panel.locator(".status")).to_contain_text("reconnecting")
    expect(panel.locator(".results img")).to_have_count(2)
    expect(panel.locator(".error")).to_be_hidden()
    assert len(refused) == 3
    assert len(resumed_from) == 2 and resumed_from == [None, cut[0]], (resumed_from, cut)


class Restartable:
    """A uvicorn server in a thread at one address, stopped and started again (a fresh app each time)."""

    def __init__(self, settings) -> None:
        self.settings = settings
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: uvicorn.Server | None = None

    def start(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        config = uvicorn.Config(create_app(self.settings), log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(30)
            self.sock.close()
            self.server = None


def test_a_server_restarting_mid_run_is_waited_for_and_its_answer_shown(browser, model_dirs):
    server = Restartable(server_settings(model_dirs[:1]))  # tiny: T = 1000 steps, long enough to stop mid-run
    server.start()
    try:
        with open_page(browser, server.url) as page:
            panel = page.locator("#sample")
            # 16 images of 1000 steps: several seconds, so the job is still running when the server stops
            # (it runs on through uvicorn's 2 s of graceful shutdown; one image took less on a fast CPU).
            panel.locator("[name=n]").fill("16")
            panel.get_by_role("button", name="Sample").click()
            expect(panel.locator(".status")).to_contain_text(" left")
            server.stop()
            # Away for a while: the page says it is reconnecting rather than giving up at the first refusal.
            expect(panel.locator(".status")).to_contain_text("reconnecting")
            page.wait_for_timeout(2_000)
            expect(panel.locator(".error")).to_be_hidden()
            expect(panel.get_by_role("button", name="Cancel")).to_be_enabled()
            server.start()
            # Back, but this server (jobs in memory) never heard of the job: its 404 is what the user reads.
            expect(panel.locator(".error")).to_contain_text("not found", timeout=40_000)
            expect(panel.locator(".error")).to_contain_text("(404 not_found)")
            expect(panel.get_by_role("button", name="Sample")).to_be_enabled()
            expect(panel.get_by_role("button", name="Cancel")).to_be_disabled()
    finally:
        server.stop()


def test_a_server_not_ready_yet_is_tried_again_until_the_models_come(page):
    unready: list[str] = []

    def models(route: Route) -> None:
        if len(unready) < 2:
            unready.append(route.request.url)
            json_error(route, 503, "not_ready", "model tiny is still loading", **{"Retry-After": "2"})
        else:
            route.continue_()

    page.route("**/models", models)
    page.reload()
    expect(page.locator("#page-error")).to_contain_text("model tiny is still loading")
    expect(page.locator("#page-error")).to_contain_text("trying again")
    sample = page.locator("#sample")
    sample.locator("[name=steps]").fill("5")
    sample.get_by_role("button", name="Sample").click()  # no model yet: said so, not a script's TypeError
    expect(sample.locator(".error")).to_contain_text("no model to use yet")
    expect(page.locator("#model option")).to_have_count(2, timeout=15_000)
    expect(page.locator("#page-error")).to_be_hidden()
    assert len(unready) == 2


@pytest.mark.parametrize(
    ("status", "content_type", "body", "shown"),
    [
        (400, "application/json", '{"error": "no such sampler"}', "no such sampler (400 http_error)"),
        (400, "application/json", '{"error": {"code": "odd", "message": {}}}', "400 Bad Request (400 odd)"),
        (422, "application/json", '{"detail": "n is not a number"}', "n is not a number (422 http_error)"),
        (502, "text/html", "<h1>Bad Gateway</h1>", "502 Bad Gateway (502 http_error)"),
        (202, "text/plain", "accepted, more or less", "the answer to /sample was not JSON"),
    ],
)
def test_answers_that_are_not_the_apis_errors_are_still_readable(page, status, content_type, body, shown):
    page.route("**/sample", lambda route: route.fulfill(status=status, body=body, content_type=content_type))
    panel = page.locator("#sample")
    panel.get_by_role("button", name="Sample").click()
    expect(panel.locator(".error")).to_contain_text(shown)
    text = panel.locator(".error").text_content()
    assert "[object Object]" not in text and "undefined" not in text and "Unexpected token" not in text
    expect(panel.get_by_role("button", name="Sample")).to_be_enabled()


def test_a_failed_download_is_said_in_the_panel(page):
    sample(page, 2, 5)
    page.route(
        "**/grid.png", lambda route: json_error(route, 404, "not_found", "job 1234 not found (expired)")
    )
    panel = page.locator("#sample")
    panel.get_by_role("button", name="grid.png").click()  # open_page fails the test on an alert()
    expect(panel.locator(".error")).to_have_text("job 1234 not found (expired) (404 not_found)")
    expect(panel.locator(".results img")).to_have_count(2)  # the images stay


def test_keyboard_only_a_cancelled_sample_leaves_the_focus_on_its_form(page):
    panel = page.locator("#sample")
    panel.locator("[name=n]").fill("1")  # tiny: T = 1000 steps, long enough to cancel
    panel.locator("[name=n]").press("Enter")  # submits the form
    expect(panel.locator(".status")).to_contain_text(" left")
    cancel = panel.get_by_role("button", name="Cancel")
    for _ in range(10):  # on through the form, past the disabled Sample button
        page.keyboard.press("Tab")
        if cancel.evaluate("button => button === document.activeElement"):
            break
    expect(cancel).to_be_focused()
    page.keyboard.press("Enter")
    expect(panel.locator(".status")).to_contain_text("cancelled at step")
    # Not dropped to the top of the page: on the Sample button, ready for the next try.
    expect(panel.get_by_role("button", name="Sample")).to_be_focused()


def test_every_control_has_a_name_of_its_own(page):
    for name in ("A: source", "B: source", "Image: source"):
        expect(page.get_by_role("combobox", name=name, exact=True)).to_have_count(1)
    for name in ("A: seed", "B: seed"):
        expect(page.get_by_role("spinbutton", name=name, exact=True)).to_have_count(1)
    expect(page.get_by_role("combobox", name="Image: earlier sample", exact=True)).to_have_count(1)
    page.get_by_role("combobox", name="A: source").select_option("upload")
    expect(page.get_by_role("button", name="A: image file")).to_have_count(1)
    sample(page, 2, 5)
    panel = page.locator("#sample")
    expect(panel.get_by_role("progressbar", name="Sample progress")).to_have_count(1)
    expect(panel.get_by_role("group", name="results").get_by_role("img")).to_have_count(2)


def test_a_queued_job_shows_its_place_as_it_moves_up_then_starts(browser, model_dirs):
    # One job at a time: a long job runs, another waits, and the page's job queues behind them.
    settings = server_settings(model_dirs[:1], max_batch=1, engine_policy="serial")
    with live_server(settings) as live, live.client() as client, open_page(browser, live.url) as page:
        running = client.post("/sample", json={"n": 8, "stream_every": 0}).json()  # 1000 steps: long
        wait_for(client, running["id"], lambda job: job["status"] == "running")
        ahead = client.post("/sample", json={"n": 1, "stream_every": 0}).json()
        panel = page.locator("#sample")
        panel.locator("[name=n]").fill("1")
        panel.locator("[name=steps]").fill("5")
        panel.get_by_role("button", name="Sample").click()
        status = panel.locator(".status")
        expect(status).to_have_text("queued (position 2)")
        # The stream is silent while the job waits: the page asks for its place and says it moved up.
        client.delete(f"/jobs/{ahead['id']}").raise_for_status()
        expect(status).to_have_text("queued (position 1)")
        expect(panel.get_by_role("status")).to_have_text("Sample: queued, position 1")
        client.delete(f"/jobs/{running['id']}").raise_for_status()
        expect(panel.locator(".results img")).to_have_count(1)
        expect(status).to_contain_text("done in")


# Records, in order, every text the panel's polite live regions take: what a screen reader would read out.
LISTEN = """(panel) => {
  (window.listeners || []).forEach((listener) => listener.disconnect());
  window.said = [];
  window.listeners = [];
  const live = `${panel} [aria-live=polite], ${panel} [role=status]:not([aria-live=off])`;
  for (const region of document.querySelectorAll(live)) {
    const listener = new MutationObserver(() => window.said.push(region.textContent.trim()));
    listener.observe(region, {subtree: true, childList: true, characterData: true});
    window.listeners.push(listener);
  }
}"""


def said(page: Page) -> list[str]:
    """What the live regions said since LISTEN, without clearings and without an opening "queued"."""
    texts = [text for text in page.evaluate("window.said") if text]
    return texts[1:] if texts and texts[0].startswith("Sample: queued") else texts


def test_a_screen_reader_hears_state_changes_not_every_step(page):
    panel = page.locator("#sample")
    page.select_option("#model", "tiny2")
    page.evaluate(LISTEN, "#sample")
    sample(page, 1, 100)  # a preview every 2 steps: the visible status changed 50 times
    *during, end = said(page)
    assert during == ["Sample: started", "Sample: 25 %", "Sample: 50 %", "Sample: 75 %"]
    assert re.fullmatch(r"Sample: done in [\d.]+ s, seed \d+", end), end
    expect(panel.get_by_role("status")).to_have_count(1)  # in the accessibility tree, though not shown

    page.select_option("#model", "tiny")  # T = 1000 steps: long enough to cancel
    page.evaluate(LISTEN, "#sample")
    panel.locator("[name=steps]").fill("1000")
    panel.get_by_role("button", name="Sample").click()
    expect(panel.locator(".status")).to_contain_text(" left")
    panel.get_by_role("button", name="Cancel").click()
    expect(panel.get_by_role("status")).to_have_text(re.compile(r"Sample: cancelled at step \d+ of 1000"))
    texts = said(page)
    assert texts[0] == "Sample: started" and len(texts) <= 3, texts  # and at most one quarter between


def test_a_queued_job_whose_stream_drops_says_so_until_it_is_back(browser, model_dirs):
    # The queue poll used to overwrite "reconnecting…" with the job's place 1.5 s later, and a silent
    # (queued) stream that came back never said so: the page looked fine while no stream was open.
    settings = server_settings(model_dirs[:1], max_batch=1, engine_policy="serial")
    with live_server(settings) as live, live.client() as client, open_page(browser, live.url) as page:
        running = client.post("/sample", json={"n": 8, "stream_every": 0}).json()  # 1000 steps: long
        wait_for(client, running["id"], lambda job: job["status"] == "running")
        away = [True]
        refused: list[str] = []
        polls: list[str] = []  # the page's GET /jobs/{id}: its place in the queue

        def stream(route: Route) -> None:
            if away[0]:
                refused.append(route.request.url)
                route.abort("connectionrefused")
            else:
                route.continue_()

        page.route("**/stream/**", stream)
        page.on("requestfinished", lambda r: "/jobs/" in r.url and r.method == "GET" and polls.append(r.url))
        page.evaluate(LISTEN, "#sample")
        panel = page.locator("#sample")
        panel.locator("[name=n]").fill("1")
        panel.locator("[name=steps]").fill("5")
        panel.get_by_role("button", name="Sample").click()
        status = panel.locator(".status")
        expect(status).to_contain_text("reconnecting (try 3)…")  # 1.5 s of back-off so far
        polled = len(polls)
        page.wait_for_timeout(1_600)  # the queue is polled every 1.5 s: its answer must keep the warning
        assert len(polls) > polled
        expect(status).to_have_text(re.compile(r"^queued \(position 1\); .+: reconnecting \(try [34]\)…$"))
        away[0] = False
        # The next try gets through; the job is still queued, so only the page's own event says so.
        expect(status).to_have_text("queued (position 1)", timeout=20_000)
        texts = [text for text in page.evaluate("window.said") if text]
        assert texts.count("Sample: queued, position 1") == 1, texts  # once, not after every outage news
        assert "Sample: connection lost, reconnecting" in texts and texts[-1] == "Sample: reconnected", texts
        assert len(refused) >= 3
        client.delete(f"/jobs/{running['id']}").raise_for_status()
        expect(panel.locator(".results img")).to_have_count(1)
        expect(status).to_contain_text("done in")


def test_no_progress_bar_shows_before_there_is_a_job(page):
    panel = page.locator("#sample")
    panel.locator("[name=n]").fill("99")  # over max_images: refused with 422, no job made
    panel.get_by_role("button", name="Sample").click()
    expect(panel.locator(".error")).to_contain_text("(422 validation_error)")
    expect(panel.locator("progress")).to_be_hidden()
    sample(page, 1, 5)
    expect(panel.get_by_role("progressbar", name="Sample progress")).to_be_visible()
    panel.locator("[name=n]").fill("99")  # refused again: the last job's full bar goes too
    panel.get_by_role("button", name="Sample").click()
    expect(panel.locator(".error")).to_contain_text("(422 validation_error)")
    expect(panel.locator("progress")).to_be_hidden()
    reconstruct = page.locator("#reconstruct")
    reconstruct.locator(".kind").select_option("upload")
    reconstruct.get_by_role("button", name="Reconstruct").click()  # no file: refused by the page itself
    expect(reconstruct.locator(".error")).to_contain_text("choose an image file")
    expect(reconstruct.locator("progress")).to_be_hidden()


def test_typed_steps_and_t_stay_when_the_models_reload(browser, model_dirs):
    with (
        live_server(server_settings(model_dirs, api_keys=[KEY])) as live,
        open_page(browser, live.url, key=KEY) as page,
    ):
        expect(page.locator("#model option")).to_have_count(2)
        steps = page.locator("#sample [name=steps]")
        t = page.locator("#reconstruct [name=t]")
        untouched = page.locator("#interpolate [name=t]")
        expect(steps).to_have_value("1000")  # tiny, the default model: T = 1000
        steps.fill("400")
        t.fill("30")
        # A wrong key, then the right one again: the model list reloads, and what the user typed stays.
        key = page.locator("#api-key")
        key.fill("not-the-key")
        key.press("Tab")
        expect(page.locator("#page-error")).to_contain_text("API key")
        key.fill(KEY)
        key.press("Tab")
        expect(page.locator("#page-error")).to_be_hidden()
        expect(steps).to_have_value("400")
        expect(t).to_have_value("30")
        expect(untouched).to_have_value("500")
        # Another model: only what is invalid for it goes (400 steps > T = 100); untyped fields follow it.
        page.select_option("#model", "tiny2")
        expect(steps).to_have_value("100")
        expect(t).to_have_value("30")
        expect(untouched).to_have_value("50")
        page.select_option("#model", "tiny")
        expect(steps).to_have_value("1000")
        expect(t).to_have_value("30")


# A third review: a failed job left looking as if it still ran, a stream lost with no way to cancel the job
# it left running, the forms' defaults refused by a server with a step limit, result images never freed.


def test_a_failed_job_says_so_where_it_stopped(browser, broken_model_dir):
    with live_server(server_settings([broken_model_dir])) as server, open_page(browser, server.url) as page:
        panel = page.locator("#sample")
        panel.locator("[name=n]").fill("1")
        panel.locator("[name=steps]").fill("4")
        panel.get_by_role("button", name="Sample").click()
        expect(panel.locator(".error")).to_contain_text("NaN")
        expect(panel.locator(".status")).to_have_text("failed at step 4 / 4")
        expect(panel.locator(".announce")).to_have_text("Sample: failed at step 4 of 4")
        expect(panel.get_by_role("button", name="Cancel")).to_be_disabled()
        expect(panel.get_by_role("button", name="Sample")).to_be_enabled()
        expect(panel.locator(".results img")).to_have_count(0)


def test_after_the_stream_is_lost_cancel_still_ends_the_job_and_says_how(page):
    page.route("**/stream/**", lambda route: route.abort("connectionrefused"))
    page.clock.install()  # the page's back-off between tries, skipped below
    panel = page.locator("#sample")
    # 16 images of 1000 steps on tiny: several seconds of work, still running when the page gives up (in
    # well under a second: its back-off is skipped)
    panel.locator("[name=n]").fill("16")
    panel.locator("[name=steps]").fill("1000")
    panel.get_by_role("button", name="Sample").click()
    give_up(page, panel)
    expect(panel.locator(".status")).not_to_contain_text("reconnecting")  # it no longer is
    cancel = panel.get_by_role("button", name="Cancel")
    expect(cancel).to_be_enabled()  # the only way left to stop the job the page started
    cancel.click()
    expect(panel.locator(".status")).to_contain_text("cancelled at step")
    expect(panel.locator(".error")).to_be_hidden()
    expect(cancel).to_be_disabled()


def give_up(page: Page, panel) -> None:
    """Runs the page's clock (installed) on until it gives up reconnecting to a refused stream."""
    error = panel.locator(".error")
    for _ in range(60):
        if error.is_visible():
            break
        page.clock.fast_forward(2_000)
        page.wait_for_timeout(20)
    expect(error).to_contain_text("lost the progress stream")
    expect(error).to_contain_text("the job may still be running")


def test_a_lost_jobs_cancel_does_not_outlive_the_next_submit(browser, model_dirs):
    # A server of its own: the lost job runs on after the test (nothing cancels it), holding 15 rows
    with (
        live_server(server_settings(model_dirs, max_images=16, max_batch=16)) as server,
        open_page(browser, server.url) as page,
    ):
        lost_cancel_then_submit(page)


def lost_cancel_then_submit(page: Page) -> None:
    page.route("**/stream/**", lambda route: route.abort("connectionrefused"))
    page.clock.install()
    panel = page.locator("#sample")
    panel.locator("[name=n]").fill("15")  # of the server's 16 rows: the next job need not wait for it
    panel.locator("[name=steps]").fill("1000")
    panel.get_by_role("button", name="Sample").click()
    give_up(page, panel)
    cancel = panel.get_by_role("button", name="Cancel")
    expect(cancel).to_be_enabled()
    # The next job's POST is held: while it is unanswered, Cancel must not stay armed for the lost job
    # (a click would have cancelled that one, not the job the user just asked for).
    page.unroute("**/stream/**")
    held: list[Route] = []
    page.route("**/sample", lambda route: held.append(route))
    panel.locator("[name=n]").fill("1")
    panel.locator("[name=steps]").fill("3")
    panel.get_by_role("button", name="Sample").click()
    for _ in range(100):
        if held:
            break
        page.wait_for_timeout(20)
    assert held, "the page did not POST the second job"
    expect(cancel).to_be_disabled()
    held[0].continue_()
    page.unroute("**/sample")
    page.clock.run_for(5_000)
    expect(panel.locator(".results img")).to_have_count(1)


def test_a_server_step_limit_sets_the_forms_defaults_and_they_are_accepted(browser, model_dirs):
    """tiny2 (T = 100) on a server that allows 10 steps: steps and t default to 10, not to T and T/2, and
    an interpolation's ends default to earlier samples, as a seed end needs all T steps."""
    with (
        live_server(server_settings(model_dirs[1:], max_steps=10)) as server,
        open_page(browser, server.url) as page,
    ):
        sample = page.locator("#sample")
        expect(sample.locator("[name=steps]")).to_have_value("10")
        expect(sample.locator("[name=steps]")).to_have_attribute("max", "10")
        expect(page.locator("#reconstruct [name=t]")).to_have_value("10")
        expect(page.locator("#interpolate [name=t]")).to_have_value("10")
        for end in page.locator("#interpolate .source").all():
            expect(end.locator(".kind")).to_have_value("sample")
            expect(end.locator("option[value=seed]")).to_be_disabled()
            expect(end.locator("option[value=seed]")).to_contain_text("this server allows 10")
        sample.locator("[name=n]").fill("1")
        sample.get_by_role("button", name="Sample").click()
        expect(sample.locator(".results img")).to_have_count(1)
        interpolate = page.locator("#interpolate")
        interpolate.locator("[name=num]").fill("3")
        interpolate.get_by_role("button", name="Interpolate").click()
        expect(interpolate.locator(".results img")).to_have_count(3)
        expect(interpolate.locator(".error")).to_be_hidden()


def test_the_last_jobs_images_are_freed_when_the_next_one_starts(page):
    sample(page, n=2, steps=3)
    first = page.locator("#sample .results img").evaluate_all("images => images.map((i) => i.src)")
    assert len(first) == 2 and all(src.startswith("blob:") for src in first)
    sample(page, n=1, steps=3)
    # Whether a blob URL still loads, as an image would (the page's own fetches are the routed ones).
    alive = """(srcs) => Promise.all(srcs.map((src) => new Promise((resolve) => {
      const image = new Image();
      image.onload = () => resolve(true);
      image.onerror = () => resolve(false);
      image.src = src;
    })))"""
    assert page.evaluate(alive, first) == [False, False]  # revoked
    shown = page.locator("#sample .results img").evaluate_all("images => images.map((i) => i.src)")
    assert page.evaluate(alive, shown) == [True]


def test_past_the_preview_budget_the_last_previews_stay(browser, model_dirs):
    """A job whose previews outgrow DDPM_MAX_PREVIEW_BYTES gets progress events without images: the page
    keeps showing the last previews it got (it used to empty the grid) while the steps go on."""
    with (
        live_server(server_settings(model_dirs[1:], max_preview_bytes=1500)) as server,
        open_page(browser, server.url) as page,
    ):
        page.evaluate("""() => {
          window.shown = 0;
          window.emptied = 0;
          new MutationObserver(() => {
            if (document.querySelectorAll("#sample .previews img").length) window.shown++;
            else if (window.shown) window.emptied++;
          }).observe(document.querySelector("#sample .previews"), {childList: true, subtree: true});
        }""")
        sample(page, n=1, steps=60)  # a preview every step (60 ≤ the page's 60 a job)
        assert page.evaluate("window.shown") > 0 and page.evaluate("window.emptied") == 0
        link = page.locator("#sample .results a").first.get_attribute("download")
        with server.client() as client, client.stream("GET", f"/stream/{link.split('-')[0]}") as response:
            progress = [e.data for e in read_sse(response) if e.event == "progress"]
        assert progress[0]["x0"] and progress[-1]["x0"] == [], "the budget was not reached: no test"
