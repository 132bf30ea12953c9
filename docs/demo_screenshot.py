"""Take docs/demo.png: serve `vqgan demo` with the quickstart prior, sample a built-in map in
headless Chromium (Debian's package via Playwright), screenshot the page.

    python docs/demo_screenshot.py --prior runs/quickstart_prior/prior.safetensors \
        --tokenizer runs/quickstart/tokenizer.safetensors --size 512x320 --map-seed 1000007
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", required=True)
    ap.add_argument("--tokenizer")
    ap.add_argument("--size", default="512x320")
    ap.add_argument("--map-seed", default="1000007")
    ap.add_argument("--seed", default="0")
    ap.add_argument("--window", default="exact")
    ap.add_argument("--out", default=str(REPO / "docs" / "demo.png"))
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "vqgan_cli", "demo", "--prior", a.prior, "--port", str(port)]
    if a.tokenizer:
        cmd += ["--tokenizer", a.tokenizer]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)))
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector("#sample")
            page.fill("#map_seed input", a.map_seed)
            page.keyboard.press("Enter")
            page.fill("#size input", a.size)
            page.keyboard.press("Enter")
            page.fill("#seed input", a.seed)
            page.get_by_role("radio", name=a.window, exact=True).check()
            time.sleep(1)
            page.click("#sample")
            page.wait_for_function("() => document.querySelector('#agreement').innerText.includes('agreement')",
                                   timeout=600_000)
            time.sleep(1)
            page.screenshot(path=a.out, full_page=True)
            print(page.inner_text("#status"), "|", page.inner_text("#agreement"))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(20)


if __name__ == "__main__":
    main()
