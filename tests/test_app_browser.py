"""The app end to end in a real headless Chromium (Debian's /usr/bin/chromium via Playwright).

Upload a bad file (an error shows in the page), then a generated PDF; ask; watch the answer
stream in; save a screenshot (also copied to out/app_screenshot.png in the repo root).
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("BEACON_APPS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_MS = 60_000

# Counts the distinct texts the last answer bubble shows: more than one means it streamed.
WATCH_ANSWER = """
() => {
  window.__answerTexts = new Set();
  const chat = document.querySelector('#beacon-chat');
  const record = () => {
    const bots = chat.querySelectorAll('[data-testid="bot"]');
    if (bots.length) window.__answerTexts.add(bots[bots.length - 1].innerText);
  };
  new MutationObserver(record).observe(chat, {subtree: true, childList: true, characterData: true});
}
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def browser_context(tmp_path):
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh user-data-dir
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1400, "height": 900},
        )
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()


def test_upload_ask_and_watch_the_answer_stream(browser_context, tiny_model_dir, tmp_path):
    from pdf_factory import make_pdf

    from beacon_apps.engine import BeaconEngine
    from ui.app import build_app, launch_app

    pdf = make_pdf(
        tmp_path / "field-notes.pdf",
        [
            f"Page {i}: field notes about the river, the stones and the lamp {i}. " * 8
            for i in (1, 2, 3)
        ],
    )
    junk = tmp_path / "junk.pdf"
    junk.write_bytes(os.urandom(2000))
    demo = build_app(BeaconEngine(tiny_model_dir()), max_new_tokens=300)
    _, url, _ = launch_app(demo, port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        page = browser_context.new_page()
        page.goto(url)
        page.wait_for_function(
            "document.querySelector('#beacon-status')?.innerText.includes('ready')"
        )
        file_input = page.locator("#beacon-files input[type=file]")

        file_input.set_input_files(str(junk))  # a bad file: an error in the page
        page.wait_for_function(
            "document.querySelector('#beacon-info').innerText.includes('junk.pdf')"
        )
        assert "\u26a0" in page.inner_text("#beacon-info")

        page.reload()  # a new session: nothing uploaded yet
        page.wait_for_function(
            "document.querySelector('#beacon-status')?.innerText.includes('ready')"
        )
        assert "No documents yet" in page.inner_text("#beacon-info")
        file_input.set_input_files(str(pdf))
        page.wait_for_function(
            "document.querySelector('#beacon-info').innerText.includes('condensed memory')"
        )
        info = page.inner_text("#beacon-info")
        assert "field-notes.pdf" in info and "compression ratio" in info and "tokens" in info

        page.evaluate(WATCH_ANSWER)
        page.fill("#beacon-question textarea", "What do the notes say about the river?")
        page.click("#beacon-ask")
        page.wait_for_function(
            "document.querySelector('#beacon-chat').innerText.includes('cached:')"
        )
        chat = page.inner_text("#beacon-chat")
        assert "What do the notes say about the river?" in chat
        assert "cached: " in chat and "prefill" in chat
        streamed = page.evaluate("window.__answerTexts.size")
        assert streamed >= 3, f"the answer appeared in {streamed} step(s), not streamed"

        screenshot = tmp_path / "app_screenshot.png"
        page.screenshot(path=str(screenshot), full_page=True)
        assert screenshot.stat().st_size > 10_000
        (REPO_ROOT / "out").mkdir(exist_ok=True)
        shutil.copyfile(screenshot, REPO_ROOT / "out" / "app_screenshot.png")
    finally:
        demo.close()
