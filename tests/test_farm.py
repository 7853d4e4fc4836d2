"""The farm: ``watch ROOT --broker URL`` + ``worker`` processes + a real ``redis-server``.

Everything here runs real processes: a Redis server on a free port (stopped and
started again in one test), the watcher, and Celery workers with the tiny model,
one torch thread each. Crashes are real too: ``kill -9`` on a worker's whole
process group, as when its machine goes down.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_watcher import make_psd, sha, where_is

from watcher.farm import ATTEMPTS_NAME
from watcher.jobs import MAX_ATTEMPTS, claim
from watcher.layout import Layout
from watcher.status import FarmStatus

# Seconds a job of a killed worker waits in Redis before it goes to another worker.
VISIBILITY = 3


class RedisServer:
    """A throw-away ``redis-server`` without persistence: a restart loses every key."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is missing: .ci/run installs it (apt-get redis-server)")
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.binary, self.folder = binary, folder
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        cmd += ["--appendonly", "no", "--dir", str(self.folder)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path):
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def env() -> dict[str, str]:
    # One torch thread per process: two workers and the watcher share two cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "psd_collage.cli", *args]


def start_watch(root: Path, url: str, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            cli("watch", str(root), "--broker", url, "--stable", "0.3"),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env(),
        )


def start_worker(root: Path, url: str, name: str, log: Path, *extra: str) -> subprocess.Popen:
    args = ["worker", "--broker", url, "--root", str(root), "--name", name]
    args += ["--visibility-timeout", str(VISIBILITY), "--model", "tiny", "--steps", "1"]
    args += ["--variants", "1", "--seed", "1", *extra]
    with open(log, "ab") as out:
        # Its own process group: kill -9 of the group is the machine going down.
        return subprocess.Popen(
            cli(*args), stdout=out, stderr=subprocess.STDOUT, env=env(), start_new_session=True
        )


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL) if proc.pid else proc.kill()
            proc.wait(10)


def wait_until(predicate, timeout: float, procs=(), what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for proc in procs:
            assert proc.poll() is None, f"a process exited ({proc.returncode}) waiting for {what}"
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def finished_psds(root: Path) -> list[str]:
    return sorted(p.name for folder in ("done", "failed") for p in (root / folder).glob("*.ps[db]"))


def drop(inbox: Path, tmp: Path, name: str, seed: int) -> str:
    """Save elsewhere, then move in (one rename, as a Finder drop); returns the digest."""
    data = make_psd(tmp / name, seed)
    os.rename(tmp / name, inbox / name)
    return hashlib.sha256(data).hexdigest()


def test_twenty_files_two_workers_one_killed_every_file_ends_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    root, logs = tmp_path / "hot", tmp_path
    layout = Layout.create(root)
    (root / "collage.toml").write_text("[policy]\nmax_steps = 25\n")
    digests = {f"f{i:02d}.psd": drop(layout.inbox, tmp_path, f"f{i:02d}.psd", i) for i in range(20)}
    # f00 is the slow one (20 steps, a few seconds): the worker rendering it is killed.
    (layout.inbox / "f00.psd.toml").write_text("steps = 20\n")
    hostile = {"greedy.psd": "steps = 1000\n", "pickle.psd": "allow_pickle = true\n"}
    for k, (name, sidecar) in enumerate(hostile.items()):
        (layout.inbox / (name + ".toml")).write_text(sidecar)
        digests[name] = drop(layout.inbox, tmp_path, name, 100 + k)
    # A job that already took down MAX_ATTEMPTS workers (left in work/ by them).
    digests["doomed.psd"] = drop(layout.inbox, tmp_path, "doomed.psd", 200)
    doomed = claim(layout, "doomed.psd")
    (doomed.folder / ATTEMPTS_NAME).write_text(json.dumps({"attempts": MAX_ATTEMPTS}))
    doomed.release()
    make_psd(tmp_path / "secret.psd", 999)  # outside ROOT: must never be read
    (layout.inbox / "leak.psd").symlink_to(tmp_path / "secret.psd")

    watch = start_watch(root, redis_server.url, logs / "watch.out")
    workers = {
        name: start_worker(root, redis_server.url, name, logs / f"{name}.out")
        for name in ("alpha", "beta")
    }
    farm = FarmStatus(redis_server.url)
    killed = None
    try:

        def slow_job_running() -> bool:
            running = farm.snapshot()["running"]
            return any(r["name"] == "f00.psd" and r.get("phase") == "sample" for r in running)

        wait_until(slow_job_running, 180, [watch, *workers.values()], "f00.psd rendering")
        [killed] = [r["worker"] for r in farm.snapshot()["running"] if r["name"] == "f00.psd"]
        os.killpg(workers[killed].pid, signal.SIGKILL)  # the machine goes down mid-job
        workers[killed].wait(10)
        survivor = next(p for n, p in workers.items() if n != killed)
        wait_until(
            lambda: len(finished_psds(root)) == 23, 240, [watch, survivor], "every file finished"
        )
        time.sleep(0.5)  # let the watcher write its last status
    finally:
        stop(watch, *workers.values())

    # Every file in exactly one place, byte-identical, none twice.
    for name, digest in digests.items():
        expected = "failed" if name in hostile or name == "doomed.psd" else "originals"
        assert where_is(root, digest) == [f"{expected}/{name}"], name
    assert sorted(p.name for p in layout.done.glob("*.psd")) == sorted(
        n for n in digests if n not in hostile and n != "doomed.psd"
    )
    assert list(layout.work.iterdir()) == []
    # The killed worker's job came back and finished once, on the other worker.
    status = json.loads(layout.status_file.read_text())
    assert status["mode"] == "farm" and status["counts"] == {"done": 20, "failed": 3}
    slow = [r for r in status["recent"] if r["name"] == "f00.psd"]
    assert len(slow) == 1 and slow[0]["attempt"] == 2 and slow[0]["worker"] != killed
    doomed_error = (layout.failed / "doomed.error.txt").read_text().splitlines()[0]
    assert f"started {MAX_ATTEMPTS} times" in doomed_error
    # The operator's policy against designers' sidecars: one line naming the limit.
    greedy = (layout.failed / "greedy.error.txt").read_text().splitlines()[0]
    assert "steps=1000" in greedy and "max_steps=25" in greedy
    pickle = (layout.failed / "pickle.error.txt").read_text().splitlines()[0]
    assert "allow_pickle" in pickle and "sidecar" in pickle
    # The link out of ROOT was left alone, reported once, and its target never read.
    assert (layout.inbox / "leak.psd").is_symlink()
    assert where_is(root, sha(tmp_path / "secret.psd")) == ["inbox/leak.psd"]  # the link itself
    log = (root / "watch.log").read_text()
    assert log.count("leaving leak.psd alone") == 1


def test_a_killed_worker_shows_gone_its_job_waits_for_redelivery_then_it_leaves_the_list(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Heartbeats: a worker silent for ``gone_after`` s is gone, and forgotten later."""
    from watcher.report import format_status
    from watcher.status import REDELIVERY, WORKER_HEARTBEAT

    gone_after, forget_after = 2.5 * WORKER_HEARTBEAT, 4 * WORKER_HEARTBEAT
    root, logs = tmp_path / "hot", tmp_path
    layout = Layout.create(root)
    (root / "collage.toml").write_text("[policy]\nmax_steps = 40\n")
    (layout.inbox / "slow.psd.toml").write_text("steps = 40\n")
    drop(layout.inbox, tmp_path, "slow.psd", 7)
    watch = start_watch(root, redis_server.url, logs / "watch.out")
    worker = start_worker(root, redis_server.url, "alpha", logs / "alpha.out")
    farm = FarmStatus(redis_server.url, gone_after=gone_after, forget_after=forget_after)
    try:

        def sampling() -> bool:
            return any(r.get("phase") == "sample" for r in farm.snapshot()["running"])

        wait_until(sampling, 180, [watch, worker], "slow.psd rendering")
        [alive] = farm.snapshot()["workers"]
        # Alive and heart-beating all along (the model load took longer than gone_after).
        assert alive["state"] == "working" and alive["silent_s"] < gone_after
        os.killpg(worker.pid, signal.SIGKILL)  # the machine goes down mid-job
        worker.wait(10)
        killed_at = time.monotonic()

        def gone() -> bool:
            workers = farm.snapshot()["workers"]
            return bool(workers) and workers[0]["state"] == "gone"

        wait_until(gone, forget_after, [watch], "the worker shown as gone")
        assert time.monotonic() - killed_at >= gone_after - WORKER_HEARTBEAT
        snapshot = farm.snapshot()
        [job] = snapshot["running"]
        assert job["name"] == "slow.psd" and job["worker"] == "alpha"
        assert job["phase"] == REDELIVERY
        text = format_status(snapshot)
        assert "slow.psd: alpha is gone, waiting for another worker" in text
        assert "alpha  gone (silent for" in text
        # The status CLI reads the same snapshot (its thresholds are the defaults).
        assert FarmStatus(redis_server.url).snapshot()["workers"][0]["name"] == "alpha"
        wait_until(lambda: not farm.snapshot()["workers"], 3 * forget_after, [watch], "pruned")
        assert farm.client.hgetall("psd-collage:workers") == {}
        assert farm.client.hgetall("psd-collage:heartbeats") == {}
        # Nothing finished it: the job is still in Redis, unacknowledged, for the next worker.
        assert [r["name"] for r in farm.snapshot()["running"]] == ["slow.psd"]
    finally:
        stop(watch, worker)


def test_redis_stopped_and_restarted_mid_run_loses_nothing(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Redis comes back empty (no persistence): the watcher sends its jobs in flight again."""
    root, logs = tmp_path / "hot", tmp_path
    layout = Layout.create(root)
    digests = {f"a{i}.psd": drop(layout.inbox, tmp_path, f"a{i}.psd", i) for i in range(6)}
    watch = start_watch(root, redis_server.url, logs / "watch.out")
    # A worker given another folder as --root (the share not mounted there) gives its
    # first job back and stops, rather than taking the jobs for finished ones.
    astray = Layout.create(tmp_path / "not-the-share").root
    wait_until(lambda: (root / ".psd-collage-id").exists(), 30, [watch], "the watcher")
    lost = start_worker(astray, redis_server.url, "astray", logs / "astray.out")
    assert lost.wait(120) == 0
    assert "is not the watcher's hot folder" in (logs / "astray.out").read_text()
    worker = start_worker(root, redis_server.url, "solo", logs / "solo.out")
    try:
        wait_until(lambda: len(finished_psds(root)) >= 2, 180, [watch, worker], "two done")
        redis_server.stop()
        late = {f"b{i}.psd": drop(layout.inbox, tmp_path, f"b{i}.psd", 50 + i) for i in range(3)}
        digests.update(late)
        log = root / "watch.log"
        wait_until(lambda: "cannot reach Redis" in log.read_text(), 30, [watch], "the outage")
        time.sleep(1.0)
        # While Redis is down, new files stay in the inbox, where the designer put them.
        assert {n for n in late if (layout.inbox / n).exists()} == set(late)
        redis_server.start()
        wait_until(lambda: len(finished_psds(root)) == 9, 180, [watch, worker], "all nine done")
    finally:
        stop(watch, worker)
    for name, digest in digests.items():
        assert where_is(root, digest) == [f"originals/{name}"], name
    assert sorted(p.name for p in layout.done.glob("*.psd")) == sorted(digests)
    text = (root / "watch.log").read_text()
    assert text.count("cannot reach Redis") == 1 and "Redis is back" in text
    for name in digests:
        assert len([x for x in text.splitlines() if f"INFO done {name} " in x]) == 1, name
    # The farm's status: the jobs finished while Redis was away are in its history too.
    from click.testing import CliRunner

    from psd_collage.cli import main

    shown = CliRunner().invoke(main, ["status", str(root), "--broker", redis_server.url, "--json"])
    assert shown.exit_code == 0, shown.output
    farm = json.loads(shown.stdout)
    assert farm["mode"] == "farm" and farm["queued"] == [] and farm["running"] == []
    # (Redis restarted empty: what it knew before is gone, what came after is all there.)
    recent = [r["name"] for r in farm["recent"]]
    assert set(late) <= set(recent) <= set(digests) and len(set(recent)) == len(recent)
    assert farm["counts"] == {"done": len(recent), "failed": 0}
    text = CliRunner().invoke(main, ["status", str(root), "--broker", redis_server.url]).stdout
    assert "0 queued, 0 running" in text and "done   b0.psd -> done/b0.psd" in text


def test_farm_commands_refuse_bad_use_with_one_error_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from psd_collage.cli import main

    root = tmp_path / "hot"
    Layout.create(root)

    def run(*args: str) -> str:
        result = CliRunner().invoke(main, list(args))
        assert result.exit_code == 2, result.output
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("error: ")
        return line

    assert "give --steps to psd-collage worker" in run(
        "watch", str(root), "--broker", "redis://127.0.0.1:1/0", "--steps", "3"
    )
    assert "not a Redis URL" in run("watch", str(root), "--broker", "http://example.com")
    assert "no status.json" in run("status", str(root))
    assert "cannot reach Redis" in run("status", str(root), "--broker", "redis://127.0.0.1:1/0")
    assert "not a hot folder" in run(
        "worker", "--broker", "redis://127.0.0.1:1/0", "--root", str(tmp_path)
    )


def test_a_render_killed_by_the_hard_time_limit_fails_with_the_job_timeout(tmp_path: Path) -> None:
    """Celery kills a pool process stuck in one step; its main process records the outcome."""
    from celery.exceptions import TimeLimitExceeded

    from psd_collage.policy import Policy
    from watcher.farm import RenderTask, WorkerConfig, configure_worker, read_result

    layout = Layout.create(tmp_path / "hot")
    drop(layout.inbox, tmp_path, "stuck.psd", 1)
    job = claim(layout, "stuck.psd")
    config = WorkerConfig("redis://127.0.0.1:1/0", layout.root, "w", policy=Policy(job_timeout=5))
    configure_worker(config)
    try:
        RenderTask().on_failure(
            TimeLimitExceeded(65), "task", [f"work/{job.id}", "stuck.psd"], {}, None
        )
    finally:
        configure_worker(None)
    result = read_result(job.folder)
    assert result is not None and result["outcome"] == "failed"
    assert "job_timeout=5" in result["report"].splitlines()[0]
    assert result["report"].startswith("stuck.psd: ")


def test_a_sidecar_naming_a_missing_lora_fails_that_job_and_the_worker_stays(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Issue 23: each worker used to stop on it in turn, the 4th start failing it as
    "killed, out of memory"; now it is one failed job with the real reason."""
    root = tmp_path / "hot"
    (root / "inbox").mkdir(parents=True)
    watch = start_watch(root, redis_server.url, tmp_path / "watch.log")
    try:
        wait_until(lambda: (root / "work").is_dir(), 60, [watch], "the hot folder")
    except AssertionError:
        stop(watch)
        raise
    worker = start_worker(root, redis_server.url, "w1", tmp_path / "w1.log")
    try:
        (root / "inbox" / "poison.psd.toml").write_text('lora = ["nope.safetensors"]\n')
        drop(root / "inbox", tmp_path, "poison.psd", 1)
        drop(root / "inbox", tmp_path, "later.psd", 2)
        wait_until(
            lambda: finished_psds(root) == ["later.psd", "poison.psd"],
            240,
            [watch, worker],
            "both files",
        )
        assert worker.poll() is None  # still taking jobs
    finally:
        stop(watch, worker)
    assert (root / "done" / "later.psd").exists()
    reason = (root / "failed" / "poison.error.txt").read_text().splitlines()[0]
    assert "LoRA file does not exist" in reason and "out of memory" not in reason
