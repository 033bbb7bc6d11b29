"""The README's picture of `msdiff ui`: the page as served by default (the world's trained models),
which opens filled with `msdiff demo`'s ring and heart, after one generation, in Debian's Chromium.

    python benchmarks/ui_screenshot.py docs/images/ui.png

Needs the ui extra, playwright and /usr/bin/chromium (as tests/test_ui.py's browser test).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
TIMEOUT_MS = 300_000


def start_ui() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen(
        [sys.executable, "-m", "msdiffusion", "ui", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        if not line and server.poll() is not None:
            break
        if "trained weights are not installed" in line:
            server.terminate()
            raise SystemExit(
                "the world's weights are not in the package: the picture would show the tiny random models"
            )
        found = re.search(r"Running on local URL:\s+(\S+)", line)
        if found:
            return server, found.group(1)
    server.terminate()
    raise SystemExit("msdiff ui did not start")


def fill(page, elem_id: str, value: str) -> None:
    field = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    field.fill(value)
    field.press("Tab")  # Gradio commits a value on blur


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="PNG to write (the README's is docs/images/ui.png)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise SystemExit(
            'playwright is not installed: pip install playwright (and the ui extra: pip install -e ".[ui]")'
        )
    if not Path(CHROMIUM).is_file():
        raise SystemExit(f"no Chromium at {CHROMIUM}: apt-get install chromium")

    from msdiffusion.app.commands import WORLD_DEMO_PROMPT

    server, url = start_ui()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.wait_for_selector("#box-canvas[data-ready]")
            # the page opens filled with `msdiff demo`'s subjects: check that, then generate
            assert page.locator("#prompt textarea, #prompt input").first.input_value() == WORLD_DEMO_PROMPT
            fill(page, "seed", str(args.seed))
            page.click("#generate")
            page.wait_for_selector("#downloads a")
            page.wait_for_timeout(500)
            page.screenshot(path=args.output, full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
