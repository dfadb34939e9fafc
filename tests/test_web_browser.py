"""The search page in a real headless Chromium (Playwright driving Debian's /usr/bin/chromium).

uvicorn serves ``create_app`` on a free loopback port in a thread; the gallery and the colour
encoder are those of ``tests.test_serve`` (so "red" has a known best match). The page is opened
with ``?token=`` to exercise the cookie flow.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "browser-token"

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is absent (apt-get install -y chromium)", allow_module_level=True)
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

from tbps.serve import create_app
from tests.test_serve import ColourEncoder, open_gallery_index


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn in a daemon thread; ``url`` once started; ``stop()`` asks it to exit."""

    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    encoder = ColourEncoder()
    index = open_gallery_index(tmp_path_factory.mktemp("browser"), encoder)
    srv = ServerThread(create_app(index, encoder, token=TOKEN)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    # the browser logs every 4xx; the 422 of the bad-filter test is expected
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" and "status of 422" not in m.text else None)
    yield pg
    ctx.close()
    assert not errors, errors  # no JS exceptions or console errors


def _cards(page):
    return page.eval_on_selector_all(
        "#results .card",
        """cards => cards.map(c => ({
            id: +c.dataset.id, score: +c.dataset.score,
            text: c.querySelector('.score').textContent,
            loaded: c.querySelector('img').complete && c.querySelector('img').naturalWidth > 0,
            alt: c.querySelector('img').alt }))""",
    )


def _wait_images(page):
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results .card img')].every(i => i.complete && i.naturalWidth > 0)",
        timeout=15000,
    )


def test_search_enlarge_and_shareable_url(server, page):
    page.goto(f"{server.url}/?token={TOKEN}")
    # the token went into an HttpOnly cookie and out of the address bar
    assert "token" not in page.url
    page.wait_for_function("() => document.querySelector('#gallery-size').textContent.includes('10 images')")

    page.fill("#q", "a man in a red coat")
    page.press("#q", "Enter")
    page.wait_for_selector("#results .card")
    _wait_images(page)
    cards = _cards(page)
    assert len(cards) == 10  # k=20 is clamped to the gallery size
    scores = [c["score"] for c in cards]
    assert scores == sorted(scores, reverse=True)
    assert cards[0]["alt"] == "p08.png"  # the all-red person
    assert {c["alt"] for c in cards[1:3]} == {"p00.png", "p01.png"}  # half red
    assert all(c["loaded"] for c in cards)
    assert cards[0]["text"] == f"{scores[0]:.3f}"
    assert "10 results" in page.text_content("#status")

    # the URL holds the query
    assert "q=a+man+in+a+red+coat" in page.url and "k=20" in page.url

    # click to enlarge: the full image and its metadata
    page.click("#results .card >> nth=0")
    page.wait_for_selector("#viewer[open]")
    page.wait_for_function("() => { const i = document.querySelector('#viewer-img'); return i.complete && i.naturalWidth > 0; }")
    assert page.eval_on_selector("#viewer-img", "i => [i.naturalWidth, i.naturalHeight]") == [24, 48]
    assert page.text_content("#viewer-title") == "p08.png"
    meta = dict(page.eval_on_selector_all("#viewer-meta tr", "rows => rows.map(r => [r.cells[0].textContent, r.cells[1].textContent])"))
    assert meta["camera"] == "c3" and meta["person_id"] == "8"
    page.keyboard.press("ArrowRight")  # next result
    assert page.text_content("#viewer-title") == cards[1]["alt"]
    page.keyboard.press("Escape")
    page.wait_for_selector("#viewer", state="hidden")


def test_shared_url_runs_the_search(server, page):
    page.goto(f"{server.url}/?token={TOKEN}")  # sets the cookie in this fresh context
    page.goto(f"{server.url}/?q=purple&k=3")
    page.wait_for_selector("#results .card")
    _wait_images(page)
    cards = _cards(page)
    assert len(cards) == 3 and page.input_value("#q") == "purple" and page.input_value("#k") == "3"
    assert cards[0]["alt"] == "p07.png"  # the only purple
    # back/forward replays the searches
    page.fill("#q", "green")
    page.press("#q", "Enter")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('green')")
    page.go_back()
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('purple')")
    assert page.input_value("#q") == "purple"


def test_filters_and_errors_show_in_the_page(server, page):
    page.goto(f"{server.url}/?token={TOKEN}")
    page.click("#filters-box summary")
    page.fill("#where", "camera = 'c1'")
    page.fill("#q", "black")
    page.press("#q", "Enter")
    page.wait_for_selector("#results .card")
    cards = _cards(page)
    assert len(cards) == 4 and "where=camera" in page.url
    page.fill("#where", "colour = 'red'")
    page.press("#q", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    assert "colour" in page.text_content("#error")
    assert page.eval_on_selector_all("#results .card", "c => c.length") == 0


def test_without_token_the_page_says_how_to_get_in(server, browser):
    ctx = browser.new_context()
    pg = ctx.new_page()
    resp = pg.goto(f"{server.url}/")
    assert resp.status == 401 and "token" in pg.content()
    ctx.close()


def test_search_by_example_image(server, page, tmp_path):
    from PIL import Image

    from tests.test_serve import PALETTE

    path = tmp_path / "query.png"
    Image.new("RGB", (20, 40), PALETTE["yellow"]).save(path)
    page.goto(f"{server.url}/?token={TOKEN}")
    page.set_input_files("#image-file", str(path))
    page.wait_for_selector("#results .card")
    assert _cards(page)[0]["alt"] == "p04.png"  # the yellow top
    assert "query.png" in page.text_content("#status")


def take_screenshot(url: str, query: str, out: Path, k: int = 20) -> None:
    """Save a PNG of the page showing results for ``query`` (used for docs/screenshot-search.png)."""
    from urllib.parse import urlencode

    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = b.new_page(viewport={"width": 1360, "height": 900}, device_scale_factor=1)
        pg.goto(f"{url}/?{urlencode({'q': query, 'k': k})}")
        pg.wait_for_selector("#results .card")
        _wait_images(pg)
        pg.screenshot(path=str(out))
        b.close()
