"""`vqgan demo` in a real browser: the page served by the command, driven by headless Chromium
(Debian's package, through Playwright's ``executable_path``; no browser download). Press Sample,
wait for the image, check its size and that the downloaded PNG is `vqgan sample`'s; paint a stroke
on the map and sample again (the same PNG as `vqgan sample --cond` of the painted map); upload a
file that is not an image and read the message; the next sample still works. A second page waits
in the queue, and closing the first tab mid-job lets it start at once."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from factory import demo_checkpoints as make_checkpoints
from PIL import Image
from typer.testing import CliRunner

from vqgan_cli.cli import app as cli_app
from vqgan_cli.data.landscapes import render_landscape

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REPO = Path(__file__).resolve().parents[1]


def _missing() -> str | None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        return 'gradio is not installed (pip install -e ".[demo]")'
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; no browser download needed)"
    if CHROMIUM is None:
        return "chromium is not installed (apt-get install chromium; .ci/run does this)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_page(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vqgan demo exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"vqgan demo did not answer within {timeout:.0f} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`python -m vqgan_cli demo` on a free loopback port with a tiny map-conditioned prior."""
    from vqgan_cli.evaluate.map_agreement import fit_cell_classifier

    tmp_path = tmp_path_factory.mktemp("served")
    ckpts = make_checkpoints(tmp_path / "ckpts")
    clf = fit_cell_classifier(seeds=range(2), sizes=((32, 32),), factor=4, steps=30).save(tmp_path / "clf.npz")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), TORCH_HOME=str(tmp_path / "torch"), OMP_NUM_THREADS="1",
               GRADIO_TEMP_DIR=str(tmp_path / "gradio"), GRADIO_ANALYTICS_ENABLED="False",
               VQGAN_DEMO_CLASSIFIER=str(clf), TMPDIR=str(tmp_path))
    log = tmp_path / "demo.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "vqgan_cli", "demo", "--prior", str(ckpts["labels"]),
                                 "--port", str(port), "--device", "cpu"], cwd=tmp_path, env=env,
                                stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_page(url, proc, log)
        yield url, ckpts, tmp_path
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def press_sample_and_wait(page, timeout_ms: int = 60_000) -> str:
    page.click("#sample")
    page.wait_for_function("() => { const s = document.querySelector('#status');"
                           " return s && /^(done|\\*?\\*?Error|Error)/.test(s.innerText.trim()); }",
                           timeout=timeout_ms)
    return page.inner_text("#status").strip()


def test_sample_download_and_bad_upload_in_chromium(served) -> None:
    from playwright.sync_api import sync_playwright

    url, ckpts, tmp = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.wait_for_selector("#sample")
            # the first map reaches the canvas before the size changes: two canvas updates in quick
            # succession can finish out of order in Gradio's ImageEditor (it loads images async)
            page.wait_for_function("() => document.querySelector('#status').innerText.trim() === 'map ready'")
            page.wait_for_timeout(500)
            page.fill("#size input", "40x32")
            page.keyboard.press("Enter")
            page.fill("#seed input", "2")
            page.keyboard.press("Tab")
            status = press_sample_and_wait(page)
            assert status.startswith("done"), status
            page.wait_for_function("() => { const i = document.querySelector('#image img');"
                                   " return i && i.complete && i.naturalWidth > 0; }")
            size = page.eval_on_selector("#image img", "i => [i.naturalWidth, i.naturalHeight]")
            assert size == [40, 32]
            links = page.eval_on_selector_all("#files a", "els => els.map(e => e.href)")
            png_url = next(h for h in links if h.endswith(".png"))
            page_png = page.request.get(png_url).body()
            r = CliRunner().invoke(cli_app, ["sample", "--prior", str(ckpts["labels"]), "--cond",
                                             "builtin:landscapes:7", "--size", "40x32", "--n", "1", "--seed", "2",
                                             "--device", "cpu", "--out", str(tmp / "cli")])
            assert r.exit_code == 0, r.output
            assert page_png == (tmp / "cli" / "0000_seed2.png").read_bytes()

            # a painted map: a stroke of the first brush colour (sky) across the built-in map
            page.get_by_role("radio", name="paint", exact=True).check()
            page.wait_for_function("() => document.querySelector('#status').innerText.trim() === 'map ready'")
            # put the current (40x32) map on the canvas now: the page's first map and the resized
            # one reached the canvas in quick succession, and Gradio's ImageEditor loads images
            # asynchronously, so on a busy machine the first could land last (seen once in CI)
            page.get_by_role("button", name="paint on this map").click()
            page.wait_for_timeout(1000)  # let the canvas take the map before drawing on it
            page.click("#paint button[aria-label=Brush]")
            box = page.locator("#paint canvas").first.bounding_box()
            x, y = box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.55  # inside the map
            page.mouse.move(x, y)
            page.mouse.down()
            for i in range(15):
                page.mouse.move(x + i * box["width"] * 0.015, y)
            page.mouse.up()
            status = press_sample_and_wait(page)
            assert status.startswith("done"), status
            command = page.input_value("#command textarea")
            cond = Path(command.split("--cond ")[1].split()[0])
            painted = np.asarray(Image.open(cond))
            builtin = render_landscape(7, 32, 40).labels  # the map the canvas started from
            assert painted.shape == builtin.shape
            assert (painted != builtin).any() and (painted == builtin).mean() > 0.5
            assert set(np.unique(painted[painted != builtin])) == {0}  # the stroke is sky
            links = page.eval_on_selector_all("#files a", "els => els.map(e => e.href)")
            page_png = page.request.get(next(h for h in links if h.endswith(".png"))).body()
            r = CliRunner().invoke(cli_app, ["sample", "--prior", str(ckpts["labels"]), "--cond", str(cond),
                                             "--size", "40x32", "--n", "1", "--seed", "2", "--device", "cpu",
                                             "--out", str(tmp / "cli_paint")])
            assert r.exit_code == 0, r.output
            assert page_png == (tmp / "cli_paint" / "0000_seed2.png").read_bytes()

            bad = tmp / "notes.png"
            bad.write_text("not a picture at all")
            page.get_by_role("radio", name="upload", exact=True).check()
            page.set_input_files("#upload input[type=file]", str(bad))
            page.wait_for_function("() => document.querySelector('#status').innerText.includes('not an image')",
                                   timeout=30_000)
            status = press_sample_and_wait(page)
            assert "not an image" in status

            page.get_by_role("radio", name="built-in", exact=True).check()
            status = press_sample_and_wait(page)
            assert status.startswith("done"), status  # the next request works
        finally:
            browser.close()


def test_a_closed_tab_ends_its_job_and_the_queue_moves_on(served) -> None:
    from playwright.sync_api import sync_playwright

    url, _, _ = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            first, second = (browser.new_page() for _ in range(2))
            for page in (first, second):
                page.goto(url)
                page.wait_for_selector("#sample")
                page.fill("#size input", "512x512")  # 16k tokens: long enough to close mid-job
                page.keyboard.press("Enter")
            first.click("#sample")
            first.wait_for_function("() => document.querySelector('#status').innerText.startsWith('sampling')")
            second.click("#sample")
            second.wait_for_function("() => document.querySelector('#status').innerText.includes('queue')")
            first.close(run_before_unload=True)
            second.wait_for_function("() => document.querySelector('#status').innerText.startsWith('sampling')",
                                     timeout=15_000)  # the closed tab ended its job; slack for a loaded CI
            second.click("#stop")
            second.wait_for_function("() => document.querySelector('#status').innerText.includes('Stopped')",
                                     timeout=5_000)
        finally:
            browser.close()
