"""``psd-collage serve``: the HTTP API over real HTTP, against a real server process.

One server (tiny model, 64 px canvases, 2 steps) serves the whole module; each
test sends its own files. Auth, host and size rules use servers of their own,
which never render, so they start in a second.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from psd_tools import PSDImage
from serve_helpers import TINY, make_psd, serve_process, wait_for

from serve.book import JobBook, parse_settings
from watcher.layout import Layout


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """(base URL, ROOT, a folder for inputs); --stable 1 keeps an upload queued for a second."""
    base = tmp_path_factory.mktemp("serve")
    root = base / "hot"
    args = [*TINY, "--stable", "1", "--max-steps", "20"]  # an operator's limit
    with serve_process(root, base / "serve.log", *args) as url:
        yield url, root, base


def job_state(url: str, job_id: str) -> dict:
    return httpx.get(f"{url}/api/jobs/{job_id}", timeout=10).json()


def finished(url: str, job_id: str, timeout: float = 240) -> dict:
    return wait_for(
        lambda: (j := job_state(url, job_id))["state"] in ("done", "failed") and j,
        timeout,
        f"job {job_id} to finish",
    )


def upload(url: str, path: Path, settings: str | None = None, **kw) -> httpx.Response:
    data = {"settings": settings} if settings is not None else {}
    with open(path, "rb") as fh:
        return httpx.post(
            f"{url}/api/jobs", files={"file": (path.name, fh)}, data=data, timeout=30, **kw
        )


def test_an_upload_is_rendered_and_its_result_preview_and_variants_come_back(server) -> None:
    url, root, base = server
    reply = upload(url, make_psd(base / "meadow.psd", 1), '{"prompt": "a sunny meadow"}')
    assert reply.status_code == 201, reply.text
    job = reply.json()
    assert job["state"] == "queued" and job["name"] == "meadow.psd"
    # It landed in the inbox with its settings as a sidecar (taken after the 1 s window).
    assert (root / "inbox" / "meadow.psd").exists()
    assert "a sunny meadow" in (root / "inbox" / "meadow.psd.toml").read_text()

    done = finished(url, job["id"])
    assert done["state"] == "done", done
    assert [v["seed"] for v in done["variants"]] == [1, 2]
    assert any(j["id"] == job["id"] for j in httpx.get(f"{url}/api/jobs").json()["jobs"])

    result = httpx.get(f"{url}{done['result']}")
    assert result.status_code == 200
    assert result.content == (root / "done" / "meadow.psd").read_bytes()
    assert (root / "originals" / "meadow.psd.toml").read_text().count("a sunny meadow") == 1
    preview = httpx.get(f"{url}{done['preview']}")
    assert preview.content[:8] == b"\x89PNG\r\n\x1a\n"

    psd = PSDImage.open(root / "done" / "meadow.psd")
    first = np.asarray(Image.open(_png(httpx.get(f"{url}{done['variants'][0]['png']}"))))
    second = np.asarray(Image.open(_png(httpx.get(f"{url}{done['variants'][1]['png']}"))))
    assert first.shape == second.shape == (64, 64, 3)
    # The first variant is the visible one: the document's own composite.
    assert np.abs(first.astype(int) - np.asarray(psd.topil().convert("RGB"), int)).max() <= 1
    assert (first != second).any()
    small = Image.open(_png(httpx.get(f"{url}{done['variants'][0]['png']}?max=32")))
    assert small.size == (32, 32)
    assert httpx.get(f"{url}/api/jobs/{job['id']}/variants/2.png").status_code == 404


def _png(response: httpx.Response):  # noqa: ANN202
    import io

    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    return io.BytesIO(response.content)


def test_events_push_queued_running_with_moving_progress_then_done(server) -> None:
    url, _root, base = server
    seen: list[dict] = []
    with httpx.stream("GET", f"{url}/api/events", timeout=240) as events:
        job = upload(url, make_psd(base / "steps.psd", 2), "steps = 12\nvariants = 1").json()
        event = None
        for line in events.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "status":
                mine = [j for j in json.loads(line[6:])["jobs"] if j["id"] == job["id"]]
                if mine:
                    seen.append(mine[0])
                    if mine[0]["state"] in ("done", "failed"):
                        break
    states = [s["state"] for s in seen]
    assert states[0] == "queued" and states[-1] == "done", states
    assert states.index("running") < len(states) - 1
    steps = [s["progress"]["done"] for s in seen if s.get("phase") == "sample"]
    # How many sampling steps an event shows depends on the machine's speed (status.json is
    # written at most every 0.5 s); that the bar moves step by step is checked in a browser,
    # with the job held between steps (test_status_page.py).
    assert steps and steps == sorted(steps), seen


def test_a_queued_job_is_cancelled_and_a_failed_one_retried(server) -> None:
    url, root, base = server
    queued = upload(url, make_psd(base / "cancel me.psd", 3)).json()
    reply = httpx.delete(f"{url}/api/jobs/{queued['id']}")
    assert reply.status_code == 200 and reply.json()["state"] == "cancelled"
    assert not (root / "inbox" / "cancel me.psd").exists()
    assert httpx.get(f"{url}/api/jobs/{queued['id']}").status_code == 404

    # Every layer locked: nothing may change, so the render fails with a plain reason.
    bad = upload(url, make_psd(base / "locked.psd", 4, tag=" [lock]")).json()
    failed = finished(url, bad["id"])
    assert failed["state"] == "failed" and "every layer is locked" in failed["error"]
    assert httpx.delete(f"{url}/api/jobs/{bad['id']}").status_code == 409
    assert (root / "failed" / "locked.error.txt").exists()

    # It failed on its input: the same file would fail the same way, so no retry is offered.
    assert failed["cause"] == "input" and failed["retryable"] is False
    assert "fix what the error says and upload the file again" in failed["note"]
    reply = httpx.post(f"{url}/api/jobs/{bad['id']}/retry")
    assert reply.status_code == 409 and "failed on its input" in reply.json()["error"]
    assert sorted(p.name for p in (root / "failed").iterdir()) == ["locked.error.txt", "locked.psd"]


def test_bad_uploads_get_one_plain_reason(server) -> None:
    url, root, base = server
    (base / "notes.txt").write_text("hello")
    assert "not a .psd or .psb" in upload(url, base / "notes.txt").json()["error"]
    (base / "fake.psd").write_text("hello")
    reply = upload(url, base / "fake.psd")
    assert reply.status_code == 400 and "not a Photoshop file" in reply.json()["error"]
    reply = upload(url, make_psd(base / "typo.psd", 5), "stepz = 3")
    assert reply.status_code == 400
    assert reply.json()["error"] == (
        "the upload's settings: unknown setting 'stepz' (did you mean 'steps'?)"
    )
    reply = upload(url, base / "typo.psd", '{"variants": 500}')
    assert reply.status_code == 400 and "out of range" in reply.json()["error"]
    # The operator's policy holds for uploads as for sidecars.
    reply = upload(url, base / "typo.psd", "steps = 30")
    assert reply.status_code == 400 and "over the limit max_steps=20" in reply.json()["error"]
    reply = upload(url, base / "typo.psd", "allow_pickle = true")
    assert reply.status_code == 400 and "operator-only" in reply.json()["error"]
    assert httpx.post(f"{url}/api/jobs", data={"x": "1"}).status_code == 400
    assert not any(p.name.startswith(("fake", "typo")) for p in (root / "inbox").iterdir())
    assert httpx.get(f"{url}/api/jobs/nope").status_code == 404


def test_two_uploads_of_one_name_stay_two_jobs(server) -> None:
    url, root, base = server
    path = make_psd(base / "twin.psd", 6)
    first, second = upload(url, path).json(), upload(url, path).json()
    assert (first["name"], second["name"]) == ("twin.psd", "twin (2).psd")
    assert finished(url, first["id"])["state"] == "done"
    assert finished(url, second["id"])["state"] == "done"
    assert (root / "done" / "twin.psd").exists() and (root / "done" / "twin (2).psd").exists()


def test_nothing_outside_root_is_served(server, tmp_path: Path) -> None:
    url, _root, _ = server
    for path in ("/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd"):
        assert httpx.get(f"{url}{path}").status_code == 404
    assert httpx.get(f"{url}/api/jobs/..%2F..%2Fetc/result").status_code == 404
    # A status entry (from a hostile or confused hot folder) naming a path out of ROOT.
    layout = Layout.create(tmp_path / "root")
    (tmp_path / "secret.psd").write_text("secret")
    (layout.done / "link.psd").symlink_to(tmp_path / "secret.psd")
    entries = [
        {"job": "j1", "name": "a.psd", "outcome": "done", "done": "../secret.psd"},
        {"job": "j2", "name": "b.psd", "outcome": "done", "done": "done/link.psd"},
    ]
    book = JobBook(layout, lambda: {"recent": entries})
    for job in ("j1", "j2"):
        with pytest.raises(Exception, match="not a file in the hot folder"):
            book.path_of(job, "done")


def test_settings_are_checked_like_a_sidecar_and_kept_as_toml() -> None:
    checked, text = parse_settings('{"prompt": "x", "layers": {"red car": {"noise": 0.3}}}')
    assert checked["prompt"] == "x" and "[layers." in text and "noise = 0.3" in text
    assert parse_settings("steps = 3")[0] == {"steps": 3}
    with pytest.raises(Exception, match="noise=2"):
        parse_settings('[layers."a"]\nnoise = 2')


def cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "psd_collage.cli", "serve", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_another_host_needs_a_token_and_a_taken_port_is_one_error_line(tmp_path: Path) -> None:
    run = cli(str(tmp_path / "hot"), "--host", "0.0.0.0")
    assert run.returncode == 2 and run.stderr.startswith("error: --host 0.0.0.0")
    assert "--token" in run.stderr and "Traceback" not in run.stderr
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = cli(str(tmp_path / "hot"), "--port", str(port))
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert f"cannot listen on 127.0.0.1:{port}" in run.stderr


def test_with_a_token_every_request_without_it_gets_401(tmp_path: Path) -> None:
    with serve_process(tmp_path / "hot", tmp_path / "log", "--token", "s3cret") as url:
        for method, path in [
            ("GET", "/"),
            ("GET", "/api/jobs"),
            ("GET", "/api/events"),
            ("GET", "/static/app.js"),
            ("POST", "/api/jobs"),
            ("DELETE", "/api/jobs/x"),
        ]:
            assert httpx.request(method, f"{url}{path}").status_code == 401, path
            wrong = {"Authorization": "Bearer nope"}
            assert httpx.request(method, f"{url}{path}", headers=wrong).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{url}/api/jobs", headers=good).json() == {"jobs": []}
        # A browser logs in once with ?token=; the cookie carries it (EventSource, <img>).
        with httpx.Client(base_url=url, follow_redirects=True) as browser:
            page = browser.get("/?token=s3cret")
            assert page.status_code == 200 and "psd-collage" in page.text
            assert browser.get("/api/jobs").status_code == 200


def test_an_upload_over_the_limit_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.psd"
    big.write_bytes(b"8BPS" + b"\0" * (2 * 1024**2))
    with serve_process(tmp_path / "hot", tmp_path / "log", "--max-upload", "1") as url:
        reply = upload(url, big)
        assert reply.status_code == 413 and "1 MB" in reply.json()["error"]
    assert list((tmp_path / "hot" / "inbox").iterdir()) == []


def test_other_sites_cannot_post_and_other_host_names_are_refused(server) -> None:
    url, _root, base = server
    path = make_psd(base / "csrf.psd", 7)
    reply = upload(url, path, headers={"Origin": "http://evil.example"})
    assert reply.status_code == 403
    assert httpx.get(f"{url}/api/jobs", headers={"Host": "evil.example"}).status_code == 400
