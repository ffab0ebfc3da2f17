"""Regenerate docs/web-chat.png: start `chatlora web RUN`, ask the page a question in headless
Chromium (Debian's package, as the tests use it), and screenshot the streamed reply.

    python scripts/web_screenshot.py runs/demo-... [--question "..."] [--out docs/web-chat.png]
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--question", default="Why do we see lightning before we hear thunder?")
    p.add_argument("--system", default="")
    p.add_argument("--out", default="docs/web-chat.png")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "chatlora", "web", args.run, "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 640})
            page.goto(url)
            box = page.get_by_test_id("stChatInputTextArea")
            box.wait_for(timeout=120_000)
            if args.system:
                page.get_by_label("System prompt").fill(args.system)
                page.get_by_text("Chatting with").click()
            box.fill(args.question)
            box.press("Enter")
            page.get_by_test_id("stChatMessage").nth(1).get_by_test_id("stCaptionContainer").wait_for(timeout=300_000)
            page.screenshot(path=args.out)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
