"""``psd-collage serve ROOT --broker URL``: the API and the page over the Celery farm.

A real ``redis-server``, one ``psd-collage worker`` (tiny model) and the server as
processes: the server claims and queues like ``watch --broker``, the worker renders,
and the API shows the farm's status from Redis, workers included.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from serve_helpers import make_psd, serve_process, wait_for
from test_farm import RedisServer, start_worker, stop


@pytest.fixture
def redis_url(tmp_path: Path):
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def first_status(url: str) -> dict:
    with httpx.stream("GET", f"{url}/api/events", timeout=30) as events:
        for line in events.iter_lines():
            if line.startswith("data: "):
                return json.loads(line[6:])
    raise AssertionError("no status event")


def test_uploads_are_rendered_by_a_farm_worker_and_the_workers_are_shown(
    redis_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "hot"
    with serve_process(
        root, tmp_path / "serve.log", "--broker", redis_url, "--stable", "0.2"
    ) as url:
        worker = start_worker(root, redis_url, "w1", tmp_path / "worker.log")
        try:
            with open(make_psd(tmp_path / "farm.psd", 1), "rb") as fh:
                job = httpx.post(f"{url}/api/jobs", files={"file": ("farm.psd", fh)}).json()
            assert job["state"] == "queued"
            done = wait_for(
                lambda: (
                    (j := httpx.get(f"{url}/api/jobs/{job['id']}").json())["state"]
                    in ("done", "failed")
                    and j
                ),
                240,
                "the farm to render the upload",
            )
            assert done["state"] == "done", done
            assert done["worker"] == "w1"
            result = httpx.get(f"{url}{done['result']}")
            assert result.content == (root / "done" / "farm.psd").read_bytes()
            status = wait_for(lambda: (s := first_status(url))["workers"] and s, 30, "workers")
            assert [w["name"] for w in status["workers"]] == ["w1"]
        finally:
            stop(worker)


def test_with_a_broker_render_options_belong_to_the_workers(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "psd_collage.cli", "serve", str(tmp_path / "hot")]
    run = subprocess.run(
        [*cmd, "--broker", "redis://127.0.0.1:9/0", "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == (
        "error: with --broker the workers render: give --steps to psd-collage worker "
        "(or put it in ROOT/collage.toml), not to serve"
    )
