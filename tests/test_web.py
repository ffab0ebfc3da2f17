"""`chatlora web` in headless Chromium (Debian's package, driven by Playwright): type a message, watch
the reply stream in, clear the history. scripts/test.sh installs Chromium."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import run_cli

CHROMIUM = "/usr/bin/chromium"
# As the machine notes say: no sandbox as root, and no background traffic to hosts this machine can't reach.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# Records every text the newest chat message shows, so the test sees the reply grow.
WATCH_REPLY = """() => {
  window.replyTexts = [];
  new MutationObserver(() => {
    const messages = document.querySelectorAll('[data-testid="stChatMessage"]');
    const text = messages.length > 1 && messages[messages.length - 1].querySelector('[data-testid="stMarkdownContainer"]');
    if (text) window.replyTexts.push(text.innerText);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_url(served_runs, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("web") / "log.txt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # why one thread: see test_serve.py
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "chatlora", "web", str(served_runs[0]), "--port", str(port),
                                 "--max-tokens", "200"], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, f"the page did not start: {log.read_text()}"
        time.sleep(0.3)
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), "Chromium is missing: scripts/test.sh installs Debian's chromium package"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_chat_page_streams_a_reply_and_clears_history(page_url, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    page.goto(page_url)
    box = page.get_by_test_id("stChatInputTextArea")
    box.wait_for(timeout=60_000)
    assert page.get_by_text("Chatting with").inner_text() == "Chatting with alice"  # the run is the model chosen
    page.get_by_label("System prompt").fill("You are a gardener.")
    page.get_by_role("slider").press("Home")  # temperature 0: greedy
    page.get_by_text("Chatting with").click()  # leave the text area, so Streamlit takes its value
    page.evaluate(WATCH_REPLY)

    box.fill("What grows in the shade?")
    box.press("Enter")
    messages = page.get_by_test_id("stChatMessage")
    note = messages.nth(1).get_by_test_id("stCaptionContainer")
    note.wait_for(timeout=60_000)  # the reply's closing note: "N tokens in S s"
    assert "tokens in" in note.inner_text()
    assert "What grows in the shade?" in messages.nth(0).inner_text()
    final = messages.nth(1).get_by_test_id("stMarkdownContainer").first.inner_text().strip()
    partial = {t.strip() for t in page.evaluate("window.replyTexts") if t.strip() and len(t.strip()) < len(final)}
    assert final and len(partial) >= 2, f"the reply appeared in several steps, not at once: {partial}"
    page.screenshot(path=str(tmp_path / "chat.png"))

    page.get_by_role("button", name="Clear history").click()
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stChatMessage\"]')", timeout=30_000)
    assert messages.count() == 0 and box.is_visible()


def test_page_refuses_a_public_address(served_runs):
    result = run_cli("web", str(served_runs[0]), "--host", "0.0.0.0")
    assert result.returncode == 2 and "refusing to serve the chat page on 0.0.0.0" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_streamlit_is_reported_before_the_model_loads(served_runs, monkeypatch, capsys):
    """The page's script imported Streamlit only after the engine had loaded the model (minutes for a
    7B model) to say it was missing."""
    from chatlora.cli import main
    from chatlora.serve.engine import Engine

    for name in ("streamlit", "streamlit.web", "streamlit.web.bootstrap"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: importing it raises ImportError

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before Streamlit was checked")

    monkeypatch.setattr(Engine, "from_runs", loaded)
    assert main(["web", str(served_runs[0]), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "the chat page needs Streamlit" in err and "pip install 'chatlora[web]'" in err
