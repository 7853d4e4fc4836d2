"""Starting ``psd-collage serve`` for the tests: as a subprocess, or in this process."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from psd_tools import PSDImage
from psd_tools.api.layers import PixelLayer

TINY = ["--model", "tiny", "--variants", "2", "--seed", "1", "--steps", "2"]


def make_psd(path: Path, seed: int, size: int = 64, tag: str = "") -> Path:
    """A small two-layer collage: a background and a captioned box (``tag`` on both)."""
    rng = np.random.default_rng(seed)
    psd = PSDImage.new("RGB", (size, size))
    back = np.full((size, size, 3), rng.integers(0, 255, 3), np.uint8)
    psd.append(PixelLayer.frompil(Image.fromarray(back, "RGB"), psd, f"green grass{tag}", 0, 0))
    box = np.full((size // 2, size // 2, 3), rng.integers(0, 255, 3), np.uint8)
    psd.append(PixelLayer.frompil(Image.fromarray(box, "RGB"), psd, f"a red box{tag}", 16, 16))
    psd.save(path)
    return path


@contextlib.contextmanager
def serve_process(root: Path, log: Path, *args: str) -> Iterator[str]:
    """Run ``psd-collage serve ROOT --port 0 ARGS``; yields its base URL."""
    cmd = [sys.executable, "-m", "psd_collage.cli", "serve", str(root), "--port", "0", *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            match = re.search(r"serving (http://[\d.]+:\d+)/", log.read_text(errors="replace"))
            if match:
                break
            assert proc.poll() is None, f"serve exited early: {log.read_text()}"
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.1)
        yield match.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:  # noqa: ANN001
    """Run an ASGI app with uvicorn on a free localhost port in a thread; yields its URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        app.state.end_streams()
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_for(predicate, timeout: float, what: str):  # noqa: ANN001, ANN201
    """Poll until ``predicate()`` is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
