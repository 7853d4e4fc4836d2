"""The status page at ``/`` in a real browser: Debian's chromium driven by Playwright.

The server runs in this process with the real renderer and the tiny model; one
job is held between sampling steps by the test (a gate in the progress
callback), so that "one running, one done, one queued, one failed" is a state
the page can be looked at, and the bar can be watched moving step by step.
Set PSD_COLLAGE_SCREENSHOT=docs/status-page.png to refresh the README's picture.
"""

from __future__ import annotations

import io
import os
import shutil
import threading
from pathlib import Path

import httpx
import pytest
from PIL import Image
from serve_helpers import make_psd, serve_in_thread, wait_for

from psd_collage.render import Renderer
from serve.app import create_app
from serve.backend import HotFolderBackend
from watcher.service import WatchOptions

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


class SteppedRenderer(Renderer):
    """The real renderer; a file named ``slow*`` waits at each sampling step for the gate."""

    gate = threading.Semaphore(0)

    def render_file(self, path, output=None, *, progress=None, **kw):  # noqa: ANN001, ANN201
        def hold(phase: str, done: int, total: int) -> None:
            progress(phase, done, total)
            if phase == "sample" and path.name.startswith("slow") and 0 < done < total:
                self.gate.acquire(timeout=120)

        return super().render_file(path, output, progress=hold, **kw)


def upload(url: str, path: Path) -> dict:
    with open(path, "rb") as fh:
        reply = httpx.post(f"{url}/api/jobs", files={"file": (path.name, fh)}, timeout=30)
    assert reply.status_code == 201, reply.text
    return reply.json()


def state(url: str, job: dict) -> str:
    return httpx.get(f"{url}/api/jobs/{job['id']}", timeout=10).json()["state"]


def phase(url: str, job: dict) -> str | None:
    return httpx.get(f"{url}/api/jobs/{job['id']}", timeout=10).json().get("phase")


@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def test_the_page_shows_queue_running_results_and_failures_live(browser, tmp_path: Path) -> None:
    settings = {"model": "tiny", "steps": 8, "variants": 2, "seed": 1}
    backend = HotFolderBackend(
        tmp_path / "hot",
        settings,
        WatchOptions(stable=0.1),
        renderer_factory=lambda defaults: SteppedRenderer(defaults=defaults),
    )
    gate = SteppedRenderer.gate
    with serve_in_thread(create_app(backend)) as url:
        try:
            first = upload(url, make_psd(tmp_path / "poster.psd", 1))
            wait_for(lambda: state(url, first) == "done", 240, "the first job")
            failing = upload(url, make_psd(tmp_path / "locked.psd", 2, tag=" [lock]"))
            wait_for(lambda: state(url, failing) == "failed", 60, "the failing job")
            slow = upload(url, make_psd(tmp_path / "slow.psd", 3))
            wait_for(lambda: phase(url, slow) == "sample", 120, "the slow job to sample")
            queued = upload(url, make_psd(tmp_path / "next.psd", 4))
            page = browser.new_page(viewport={"width": 1000, "height": 860})
            page.goto(url + "/")
            check_page(page, url, tmp_path, gate, queued, slow)
            page.close()
        finally:
            gate.release(1000)
            backend.close()


def check_page(page, url: str, tmp_path: Path, gate, queued: dict, slow: dict) -> None:  # noqa: ANN001
    page.wait_for_selector("#service.idle, #service.working")
    result = page.locator("#done .card", has_text="poster.psd")
    result.wait_for()
    thumb = result.locator("img")
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle()
    )
    assert result.locator("a", has_text="variant").count() == 2
    failure = page.locator("#failed .card", has_text="locked.psd")
    assert "every layer is locked" in failure.locator(".reason").inner_text()
    assert page.locator("#queue li", has_text="next.psd").count() == 1
    running = page.locator("#running .card", has_text="slow.psd")
    running.wait_for()

    # The bar moves: the held job is at its first sampling step; let it take one more.
    bar = "#running .bar > div"
    page.wait_for_function(f"() => parseFloat(document.querySelector('{bar}').style.width) > 0")
    before = running.locator(".bar > div").evaluate("d => parseFloat(d.style.width)")
    gate.release()
    page.wait_for_function(
        f"b => parseFloat(document.querySelector('{bar}').style.width) > b",
        arg=before,
        timeout=60_000,
    )
    assert "sampling" in running.inner_text()

    shot = page.screenshot(full_page=True)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000
    target = os.environ.get("PSD_COLLAGE_SCREENSHOT")
    if target:  # a palette PNG: a fifth of the size, the same picture for a README
        image = Image.open(io.BytesIO(shot)).convert("RGB").quantize(colors=128)
        image.save(target, optimize=True)

    # Cancel the queued job from the page. The failed one failed on its input: the page
    # says so and offers no Retry, which could only fail the same way.
    page.locator("#queue li", has_text="next.psd").get_by_role("button", name="Cancel").click()
    page.locator("#queue li", has_text="next.psd").wait_for(state="detached")
    assert not (tmp_path / "hot" / "inbox" / "next.psd").exists()
    locked = page.locator("#failed .card", has_text="locked.psd")
    assert "upload the file again" in locked.inner_text()
    assert locked.get_by_role("button", name="Retry").count() == 0

    gate.release(1000)  # let the held job finish: it moves to the results
    page.locator("#done .card", has_text="slow.psd").wait_for(timeout=60_000)
    assert httpx.get(f"{url}/api/jobs/{slow['id']}").json()["state"] == "done"
