"""The hot folder (``psd-collage watch``): layout, stability, claims, crash recovery, service.

Two halves. The first drives the service's machinery in-process with a stand-in
renderer (copies the input) so every crash point can be reproduced exactly.
The second runs the real command as subprocesses with ``--model tiny`` on real
PSD files, real filesystem events and real signals, and checks the folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from psd_collage.errors import (
    Cancelled,
    CollageError,
    IncompleteFile,
    ModelError,
    UnsupportedDocument,
)
from psd_collage.settings import read_sidecar
from watcher.jobs import MAX_ATTEMPTS, claim, open_job, pending_jobs
from watcher.layout import Layout, free_stem, is_document, is_sidecar
from watcher.service import WatchOptions, WatchService
from watcher.stability import StabilityTracker

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fake_header(path: Path) -> None:
    """Stand-in for the reader's check_header: the PSD signature and a full 26-byte header."""
    with open(path, "rb") as fh:
        head = fh.read(26)
    if head[:4] != b"8BPS"[: len(head[:4])]:
        raise CollageError("not a Photoshop file", path=path)
    if len(head) < 26:
        raise IncompleteFile("is incomplete", path=path)


def fake_psd(tag: str, size: int = 200) -> bytes:
    return b"8BPS" + b"\0" * 22 + tag.encode() + b"." * size


def make_psd(path: Path, seed: int, size: int = 64) -> bytes:
    """A small two-layer collage as Photoshop users make them: a background and a caption."""
    import numpy as np
    from PIL import Image
    from psd_tools import PSDImage
    from psd_tools.api.layers import PixelLayer

    rng = np.random.default_rng(seed)
    psd = PSDImage.new("RGB", (size, size))
    back = np.full((size, size, 3), rng.integers(0, 255, 3), np.uint8)
    psd.append(PixelLayer.frompil(Image.fromarray(back, "RGB"), psd, "green grass", 0, 0))
    box = np.full((size // 2, size // 2, 3), rng.integers(0, 255, 3), np.uint8)
    psd.append(PixelLayer.frompil(Image.fromarray(box, "RGB"), psd, "a red box", 16, 16))
    psd.save(path)
    return path.read_bytes()


class CopyRenderer:
    """Stands in for psd_collage.render.Renderer: "renders" by copying, so the service's
    moves can be checked byte for byte. Inputs containing BROKEN fail like a bad PSD;
    a sidecar is validated like the real renderer does."""

    def __init__(self, defaults: dict) -> None:
        self.defaults = defaults
        self.calls: list[str] = []
        self.on_progress = None

    def render_file(
        self, path, output=None, *, sidecar=None, preview=None, progress=None, cancel=None
    ):
        self.calls.append(path.name)
        data = path.read_bytes()
        if sidecar is not None:
            read_sidecar(sidecar)
        if b"BROKEN" in data:
            raise UnsupportedDocument(
                "Indexed colour is not supported: use Image > Mode > RGB Color", path=path
            )
        if b"BUG" in data:
            raise ZeroDivisionError("division by zero")
        if b"NOMODEL" in data:
            raise ModelError("model 'nope' not found")
        progress("sample", 0, 1)
        if self.on_progress:
            self.on_progress()
        if cancel():
            raise Cancelled()
        output.write_bytes(b"RESULT" + data)
        shown = output.with_suffix(".preview.png")
        shown.write_bytes(b"PNG" + data[:8])
        progress("sample", 1, 1)
        return SimpleNamespace(
            output=output,
            preview=shown,
            timings={"sample": 0.001},
            variants=[{"seed": 1, "layer": "seed 1"}],
            warnings=[],
            settings={"model": "copy"},
        )


def make_service(root: Path, *, stable: float = 0.05, once: bool = True, **kw) -> WatchService:
    return WatchService(
        root,
        kw.pop("settings", {}),
        WatchOptions(stable=stable, once=once, rescan=kw.pop("rescan", 10.0), grace=stable),
        renderer_factory=CopyRenderer,
        header_check=fake_header,
    )


def where_is(root: Path, digest: str) -> list[str]:
    """Every file under ROOT (except work/) with these exact bytes."""
    found = []
    for folder in ("inbox", "done", "failed", "originals", "work"):
        for path in (root / folder).rglob("*"):
            if path.is_file() and sha(path) == digest:
                found.append(str(path.relative_to(root)))
    return found


# ---------------------------------------------------------------------------
# layout and names
# ---------------------------------------------------------------------------


def test_layout_creates_the_folders_and_refuses_a_file_as_root(tmp_path: Path) -> None:
    layout = Layout.create(tmp_path / "hot")
    assert all(
        (tmp_path / "hot" / d).is_dir() for d in ("inbox", "work", "done", "failed", "originals")
    )
    (tmp_path / "plain").write_text("x")
    with pytest.raises(CollageError, match="not a folder"):
        Layout.create(tmp_path / "plain")
    with pytest.raises(CollageError, match="does not exist"):
        Layout.create(tmp_path / "missing" / "deeper")
    assert layout.inbox == tmp_path / "hot" / "inbox"


def test_documents_and_sidecars_are_recognised_case_insensitively() -> None:
    assert is_document("Poster.PSD") and is_document("big.psb")
    assert not is_document("._Poster.psd")  # macOS resource fork
    assert not is_document("photo.jpg")
    assert is_sidecar("Poster.PSD.toml") and not is_sidecar("collage.toml")


def test_free_stem_keeps_psd_preview_and_error_under_one_number(tmp_path: Path) -> None:
    (tmp_path / "poster.psd").write_bytes(b"")
    (tmp_path / "poster (2).preview.png").write_bytes(b"")
    targets = [(tmp_path, ".psd"), (tmp_path, ".preview.png")]
    assert free_stem("poster", targets) == "poster (3)"
    assert free_stem("other", targets) == "other"


# ---------------------------------------------------------------------------
# stability: never early, never failed while still arriving
# ---------------------------------------------------------------------------


def test_a_copy_that_stalls_midway_is_neither_taken_early_nor_failed(tmp_path: Path) -> None:
    """With the reader's real header check, which finds any truncation of a real PSD."""
    from psd_collage.psd.header import check_header

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    tracker = StabilityTracker(inbox, 2.0, check_header, wall_clock=time.time, grace=5.0)
    data = make_psd(tmp_path / "source.psd", 7)
    path = inbox / "a.psd"
    step = len(data) // 10 + 1
    chunks = [data[i : i + step] for i in range(0, len(data), step)]
    # One chunk a second, with a 4 s stall (longer than the window) after the fifth.
    times = [*range(5), *range(9, 9 + len(chunks) - 5)]
    timeline = dict(zip(times, chunks, strict=True))
    path.write_bytes(b"")
    t = 0.0
    while t < 40:
        if int(t) == t and int(t) in timeline:
            with open(path, "ab") as fh:
                fh.write(timeline[int(t)])
        tracker.scan(t)
        ready, rejected = tracker.settle(t)
        assert rejected == [], f"failed at t={t} while still arriving"
        complete = path.read_bytes() == data
        assert not ready or complete, f"taken early at t={t}"
        if ready:
            break
        t += 0.5
    assert ready and t == max(timeline) + 2.0  # one window after the last chunk


def test_a_stable_file_that_is_not_a_psd_fails_after_the_window(tmp_path: Path) -> None:
    tracker = StabilityTracker(tmp_path, 2.0, fake_header, wall_clock=time.time, grace=5.0)
    (tmp_path / "a.psd").write_bytes(b"JUNK" * 100)
    tracker.scan(0.0)
    assert tracker.settle(1.0) == ([], [])  # still inside the window
    ready, rejected = tracker.settle(2.0)
    assert ready == [] and [c.name for c in rejected] == ["a.psd"]
    assert "not a Photoshop file" in str(rejected[0].header_error)


def test_an_incomplete_file_is_never_failed_only_reported_once_as_stalled(tmp_path: Path) -> None:
    tracker = StabilityTracker(tmp_path, 2.0, fake_header, wall_clock=time.time, grace=5.0)
    path = tmp_path / "a.psd"
    path.write_bytes(b"8BPS\0\1")  # the copy stalled after 6 bytes
    tracker.scan(0.0)
    for t in (1.0, 2.0, 4.0, 6.5, 60.0):
        assert tracker.settle(t) == ([], []), t
    assert [c.name for c in tracker.newly_stalled] == ["a.psd"]  # once, after the grace
    assert tracker.next_deadline(60.0) is None
    # ... and the copy resumes a minute later: the file is taken once complete.
    path.write_bytes(fake_psd("a"))
    tracker.scan(61.0)
    assert tracker.settle(62.0) == ([], [])
    ready, rejected = tracker.settle(63.0)
    assert [c.name for c in ready] == ["a.psd"] and rejected == []
    assert [c.name for c in tracker.newly_stalled] == ["a.psd"]


def test_a_complete_file_becomes_ready_after_one_window(tmp_path: Path) -> None:
    tracker = StabilityTracker(tmp_path, 2.0, fake_header, wall_clock=time.time)
    (tmp_path / "b.psd").write_bytes(fake_psd("b"))
    (tmp_path / "c.psd.crdownload").write_text("half a download")
    (tmp_path / "b.psd.toml").write_text("steps = 3\n")
    tracker.scan(0.0)
    assert tracker.settle(1.9) == ([], [])
    # logged once; the sidecar of a present document is not "waiting"
    assert tracker.newly_ignored == ["c.psd.crdownload"]
    assert "download or copy still in progress" in tracker.waiting["c.psd.crdownload"]
    # Editing the sidecar counts as a change of the job.
    (tmp_path / "b.psd.toml").write_text("steps = 30\n")
    tracker.scan(1.95)
    assert tracker.settle(3.0) == ([], [])
    ready, _ = tracker.settle(3.95)
    assert [c.name for c in ready] == ["b.psd"]
    tracker.scan(4.0)
    assert tracker.newly_ignored == ["c.psd.crdownload"]  # not reported a second time


# ---------------------------------------------------------------------------
# claims and crash recovery at every step
# ---------------------------------------------------------------------------


def test_only_one_claim_wins(tmp_path: Path) -> None:
    layout = Layout.create(tmp_path)
    (layout.inbox / "a.psd").write_bytes(fake_psd("a"))
    (layout.inbox / "a.psd.toml").write_text("steps = 3\n")
    first = claim(layout, "a.psd")
    second = claim(layout, "a.psd")
    assert first is not None and second is None
    assert first.sidecar is not None and first.sidecar.read_text() == "steps = 3\n"
    assert os.listdir(layout.inbox) == []
    # The folder is locked: another watcher (here: another open) cannot take it over.
    assert open_job(layout, first.folder) is None
    first.release()
    resumed = open_job(layout, first.folder)
    assert resumed is not None and resumed.stage == "claimed"
    resumed.release()
    assert len(pending_jobs(layout)) == 1  # the loser left no empty folder behind


@pytest.mark.parametrize("crash_after", range(0, 5))
def test_finishing_a_job_is_idempotent_at_every_crash_point(
    tmp_path: Path, crash_after: int
) -> None:
    """Kill after `crash_after` steps of the final moves, resume: one place, same bytes."""
    layout = Layout.create(tmp_path)
    data = fake_psd("crash")
    (layout.inbox / "a.psd").write_bytes(data)
    (layout.inbox / "a.psd.toml").write_text("steps = 3\n")
    job = claim(layout, "a.psd")
    out = job.prepare_output()
    out.write_bytes(b"RESULT")
    preview = out.with_suffix(".preview.png")
    preview.write_bytes(b"PNG")
    job.mark_done(out, preview, {})
    moves = job.state["moves"]
    # Replay the first moves by hand, the last one only half (link without unlink).
    for i, move in enumerate(moves[:crash_after]):
        src, dst = job.folder / move["src"], layout.root / move["folder"] / ("a" + move["suffix"])
        os.link(src, dst)
        if i < crash_after - 1:
            os.unlink(src)
    job.release()  # the process dies: its lock goes with it

    again = open_job(layout, job.folder)
    assert again is not None and again.stage == "done"
    placed = again.finalize()
    assert placed["done"].read_bytes() == b"RESULT"
    assert placed["original"].read_bytes() == data
    assert placed["preview"].name == "a.preview.png"
    assert placed["sidecar"].read_text() == "steps = 3\n"
    assert where_is(layout.root, sha(layout.originals / "a.psd")) == ["originals/a.psd"]
    assert pending_jobs(layout) == []


def test_a_crash_during_clean_up_leaves_nothing_to_redo(tmp_path: Path) -> None:
    layout = Layout.create(tmp_path)
    (layout.inbox / "a.psd").write_bytes(fake_psd("a"))
    job = claim(layout, "a.psd")
    job.prepare_output().write_bytes(b"RESULT")
    job.mark_done(job.output, None, {})
    for move in job.state["moves"]:
        os.rename(job.folder / move["src"], layout.root / move["folder"] / ("a" + move["suffix"]))
    (job.folder / "job.json").unlink()  # clean-up had begun: the state file went first
    job.release()
    assert open_job(layout, job.folder) is None  # nothing to redo...
    assert pending_jobs(layout) == []  # ...and the leftovers are gone
    assert sorted(os.listdir(layout.done)) == ["a.psd"]


def test_a_crash_between_claim_and_state_file_is_recovered(tmp_path: Path) -> None:
    layout = Layout.create(tmp_path)
    (layout.inbox / "a.psd.toml").write_text("steps = 3\n")
    folder = layout.work / "20240101-000000-1-abcdef"
    folder.mkdir()
    (folder / ".lock").write_bytes(b"")
    (folder / "a.psd").write_bytes(fake_psd("a"))  # renamed in, then killed
    job = open_job(layout, folder)
    assert job is not None and job.name == "a.psd" and job.stage == "claimed"
    assert job.sidecar is not None  # the sidecar still in the inbox travels with it
    job.release()


def test_name_clashes_never_overwrite(tmp_path: Path) -> None:
    root = tmp_path
    for round_ in range(3):
        (root / "inbox").mkdir(parents=True, exist_ok=True)
        (root / "inbox" / "poster.psd").write_bytes(fake_psd(f"round {round_}"))
        assert make_service(root).run() == 0
    assert sorted(os.listdir(root / "done")) == [
        "poster (2).preview.png",
        "poster (2).psd",
        "poster (3).preview.png",
        "poster (3).psd",
        "poster.preview.png",
        "poster.psd",
    ]
    assert [
        (root / "originals" / n).read_bytes()[26:33] for n in sorted(os.listdir(root / "originals"))
    ] == [
        b"round 1",
        b"round 2",
        b"round 0",
    ]


# ---------------------------------------------------------------------------
# the service, in-process
# ---------------------------------------------------------------------------


def test_once_sorts_good_and_bad_files_and_reports_them(tmp_path: Path) -> None:
    layout = Layout.create(tmp_path)
    files = {
        "good.psd": fake_psd("good"),
        "Upper.PSB": fake_psd("upper"),
        "indexed.psd": fake_psd("BROKEN"),
        "bug.psd": fake_psd("BUG"),
        "photo.psd": b"\xff\xd8\xff\xe0 a renamed JPEG" + b"." * 100,
        "sided.psd": fake_psd("sided"),
    }
    for name, data in files.items():
        (layout.inbox / name).write_bytes(data)
    (layout.inbox / "sided.psd.toml").write_text("stepz = 3\n")
    (layout.inbox / "readme.txt").write_text("not for us")  # every drop is accounted for
    (layout.inbox / ".DS_Store").write_bytes(b"\0")  # written by the system: left alone
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}

    assert make_service(tmp_path).run() == 0

    assert sorted(os.listdir(layout.done)) == [
        "Upper.PSB",
        "Upper.preview.png",
        "good.preview.png",
        "good.psd",
    ]
    assert os.listdir(layout.inbox) == [".DS_Store"]
    assert pending_jobs(layout) == []
    for name, digest in digests.items():
        expected = "originals" if name in ("good.psd", "Upper.PSB") else "failed"
        assert where_is(tmp_path, digest) == [f"{expected}/{name}"]
    first = {
        n: (layout.failed / n).read_text().splitlines()[0]
        for n in os.listdir(layout.failed)
        if n.endswith(".error.txt")
    }
    assert "Image > Mode > RGB Color" in first["indexed.error.txt"]
    assert first["indexed.error.txt"].startswith("indexed.psd: ")  # no work/<id>/ path
    assert "not a Photoshop file" in first["photo.error.txt"]
    assert "unknown setting 'stepz'" in first["sided.error.txt"]
    assert first["readme.error.txt"].startswith("readme.txt: is a .txt file, not a Photoshop")
    assert (layout.failed / "readme.txt").read_text() == "not for us"
    assert "internal error" in first["bug.error.txt"]
    assert "ZeroDivisionError" in (layout.failed / "bug.error.txt").read_text()  # traceback
    assert (layout.failed / "sided.psd.toml").read_text() == "stepz = 3\n"

    status = json.loads(layout.status_file.read_text())
    assert status["state"] == "stopped" and status["counts"] == {"done": 2, "failed": 5}
    assert status["mode"] == "single" and status["queued"] == [] and status["running"] == []
    from click.testing import CliRunner

    from psd_collage.cli import main

    shown = CliRunner().invoke(main, ["status", str(tmp_path)]).stdout
    assert shown.startswith("hot folder: stopped - 0 queued, 0 running, 2 done, 5 failed")
    assert "failed photo.psd -> failed/photo.psd: photo.psd: " in shown
    outcomes = {r["name"]: r["outcome"] for r in status["recent"]}
    assert outcomes["good.psd"] == "done" and outcomes["photo.psd"] == "failed"
    good = next(r for r in status["recent"] if r["name"] == "good.psd")
    assert good["done"] == "done/good.psd" and good["seconds"] >= 0 and good["wait_s"] >= 0
    photo = next(r for r in status["recent"] if r["name"] == "photo.psd")
    assert photo["error_file"] == "failed/photo.error.txt" and "Photoshop" in photo["error"]
    log = layout.log_file.read_text()
    assert "done (--once): inbox/ is empty" in log
    assert "done good.psd -> done/good.psd" in log


def test_stop_cancels_the_running_job_and_the_next_start_finishes_it(tmp_path: Path) -> None:
    layout = Layout.create(tmp_path)
    data = fake_psd("cancel me")
    (layout.inbox / "a.psd").write_bytes(data)
    service = make_service(tmp_path)
    service.renderer.on_progress = service.stop  # "SIGTERM" arrives mid-render
    assert service.run() == 0
    assert os.listdir(layout.done) == []
    [folder] = pending_jobs(layout)
    state = json.loads((folder / "job.json").read_text())
    assert state["stage"] == "claimed" and state["attempts"] == 0  # requeued, not a crash
    assert "runs again at the next start" in layout.log_file.read_text()

    assert make_service(tmp_path).run() == 0
    assert where_is(tmp_path, hashlib.sha256(data).hexdigest()) == ["originals/a.psd"]
    assert (layout.done / "a.psd").read_bytes() == b"RESULT" + data


def test_a_file_that_keeps_killing_the_watcher_is_failed_not_retried_forever(
    tmp_path: Path,
) -> None:
    layout = Layout.create(tmp_path)
    (layout.inbox / "huge.psd").write_bytes(fake_psd("huge"))
    job = claim(layout, "huge.psd")
    for _ in range(MAX_ATTEMPTS):
        job.start_attempt()  # ...and the process was killed each time
    job.release()
    assert make_service(tmp_path).run() == 0
    report = (layout.failed / "huge.error.txt").read_text()
    assert f"stopped {MAX_ATTEMPTS} times" in report.splitlines()[0]


def test_a_broken_folder_model_stops_the_service_and_keeps_the_file(tmp_path: Path) -> None:
    layout = Layout.create(tmp_path)
    data = fake_psd("NOMODEL")
    (layout.inbox / "a.psd").write_bytes(data)
    with pytest.raises(ModelError):
        make_service(tmp_path).run()
    assert os.listdir(layout.failed) == []  # not the file's fault
    [folder] = pending_jobs(layout)
    assert (folder / "a.psd").read_bytes() == data


def test_files_dropped_while_watching_are_picked_up_by_events(tmp_path: Path) -> None:
    layout = Layout.create(tmp_path)
    service = make_service(tmp_path, once=False, stable=0.2, rescan=60.0)
    thread = threading.Thread(target=service.run)
    thread.start()
    try:
        time.sleep(0.3)
        (layout.inbox / "late.psd").write_bytes(fake_psd("late"))
        deadline = time.monotonic() + 10
        while not (layout.done / "late.psd").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        service.stop()
        thread.join(10)
    assert (layout.done / "late.psd").exists()  # well before the 60 s rescan


# ---------------------------------------------------------------------------
# the real command: subprocesses, the tiny model, real PSDs, events and signals
# ---------------------------------------------------------------------------

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "psd-fixtures"
INDEXED = FIXTURES / "colormodes" / "4x4_8bit_index_color.psd"


def start_watch(root: Path, log: Path, *extra: str, stable: float = 0.5) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "psd_collage.cli", "watch", str(root), "--stable", str(stable)]
    cmd += ["--model", "tiny", "--steps", "1", "--variants", "1", "--seed", "1", *extra]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def wait_until(predicate, timeout: float, *procs: subprocess.Popen, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for proc in procs:
            assert proc.poll() is None, (
                f"watcher exited early ({proc.returncode}) waiting for {what}"
            )
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def status_of(root: Path) -> dict:
    try:
        return json.loads((root / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def harmonized(path: Path) -> bool:
    from psd_tools import PSDImage

    return any(layer.name.startswith("[harmonized]") for layer in PSDImage.open(path))


def exactly_one_place(root: Path, digests: dict[str, str], expected: dict[str, str]) -> None:
    """Each input's bytes exist in exactly one place: originals/NAME or failed/NAME."""
    for name, digest in digests.items():
        assert where_is(root, digest) == [f"{expected[name]}/{name}"], name


def test_watch_takes_drops_and_slow_copies_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    root, log = tmp_path / "hot", tmp_path / "watch.out"
    proc = start_watch(root, log)
    try:
        wait_until(lambda: status_of(root).get("state") == "idle", 60, proc, what="start-up")
        # A drop: saved elsewhere, moved in (one rename, as Finder does on one volume).
        dropped = make_psd(tmp_path / "drop.psd", 1)
        os.rename(tmp_path / "drop.psd", root / "inbox" / "drop.psd")
        # A slow copy: 12 chunks over ~3 s, much longer than the 0.5 s window in total.
        slow = make_psd(tmp_path / "slow.psd", 2)
        chunks = [
            slow[i : i + len(slow) // 12 + 1] for i in range(0, len(slow), len(slow) // 12 + 1)
        ]
        with open(root / "inbox" / "slow.psd", "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                fh.flush()
                time.sleep(0.25)
        copied_at = time.time()
        wait_until(
            lambda: (root / "done" / "slow.psd").exists() and (root / "done" / "drop.psd").exists(),
            180,
            proc,
            what="both files in done/",
        )
        # SIGTERM while a job runs: it is cancelled (stays in work/) or finishes; exit 0.
        third = make_psd(tmp_path / "third.psd", 3)
        os.rename(tmp_path / "third.psd", root / "inbox" / "third.psd")
        # With 1 step the job may already be over between two polls: either state is fine.
        wait_until(
            lambda: status_of(root).get("running") or (root / "done" / "third.psd").exists(),
            60,
            proc,
            what="the third job",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    places = where_is(root, hashlib.sha256(third).hexdigest())
    if places != ["originals/third.psd"]:
        [left] = pending_jobs(Layout(root))
        assert places == [f"work/{left.name}/third.psd"]
        assert json.loads((left / "job.json").read_text())["attempts"] == 0  # requeued
    exactly_one_place(
        root,
        {
            "drop.psd": hashlib.sha256(dropped).hexdigest(),
            "slow.psd": hashlib.sha256(slow).hexdigest(),
        },
        {"drop.psd": "originals", "slow.psd": "originals"},
    )
    assert os.listdir(root / "failed") == []
    assert harmonized(root / "done" / "slow.psd") and harmonized(root / "done" / "drop.psd")
    assert (root / "done" / "slow.preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    status = status_of(root)
    assert status["state"] == "stopped" and status["counts"]["failed"] == 0
    slow_entry = next(r for r in status["recent"] if r["name"] == "slow.psd")
    started = datetime.fromisoformat(slow_entry["started"]).timestamp()
    assert started >= copied_at + 0.5 - 0.05  # not before the copy ended plus the window
    text = (root / "watch.log").read_text()
    assert "done slow.psd -> done/slow.psd" in text and "SIGTERM" in text


def test_kill_9_mid_job_then_two_watchers_finish_every_file_exactly_once(tmp_path: Path) -> None:
    root, log = tmp_path / "hot", tmp_path / "watch.out"
    (root / "inbox").mkdir(parents=True)
    inbox = root / "inbox"
    digests, expected = {}, {}
    for i in range(20):  # twenty files dropped at once
        data = make_psd(inbox / f"f{i:02d}.psd", i)
        digests[f"f{i:02d}.psd"], expected[f"f{i:02d}.psd"] = (
            hashlib.sha256(data).hexdigest(),
            "originals",
        )
    bad = {
        "holiday.psd": _jpeg_bytes(),
        "sidecar.psd": make_psd(tmp_path / "s.psd", 98),
        "notes.txt": b"not a document: failed like any bad file",
    }
    if INDEXED.exists():
        bad["indexed.psd"] = INDEXED.read_bytes()
    for name, data in bad.items():
        (inbox / name).write_bytes(data)
        digests[name], expected[name] = hashlib.sha256(data).hexdigest(), "failed"
    (inbox / "sidecar.psd.toml").write_text('prompt = "a picnic"\nstepz = 4\n')
    # A copy that stopped after 300 bytes: it may resume, so it waits in the inbox.
    truncated = make_psd(tmp_path / "t.psd", 99)[:300]
    (inbox / "truncated.psd").write_bytes(truncated)
    digests["truncated.psd"] = hashlib.sha256(truncated).hexdigest()
    expected["truncated.psd"] = "inbox"

    killed = start_watch(root, log, "--poll", "0.3")
    try:
        wait_until(lambda: status_of(root).get("running"), 120, killed, what="a running job")
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
    [left] = pending_jobs(Layout(root))  # the job it was working on stays in work/
    assert json.loads((left / "job.json").read_text())["stage"] == "claimed"

    first = start_watch(root, log, "--once", "--poll", "0.3")
    second = start_watch(root, log, "--once")
    try:
        assert first.wait(240) == 0 and second.wait(240) == 0
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()

    exactly_one_place(root, digests, expected)
    done = sorted(p.name for p in (root / "done").iterdir() if p.suffix == ".psd")
    assert done == sorted(n for n, e in expected.items() if e == "originals")  # none twice
    assert sorted(os.listdir(root / "inbox")) == ["truncated.psd"]
    assert pending_jobs(Layout(root)) == []
    assert harmonized(root / "done" / "f00.psd")
    errors = {p.name: p.read_text().splitlines()[0] for p in (root / "failed").glob("*.error.txt")}
    assert set(errors) == {Path(n).stem + ".error.txt" for n in bad}
    assert "JPEG" in errors["holiday.error.txt"]
    assert "stepz" in errors["sidecar.error.txt"]
    assert (
        "sidecar.psd" in errors["sidecar.error.txt"] and "work/" not in errors["sidecar.error.txt"]
    )
    if INDEXED.exists():
        assert "Indexed" in errors["indexed.error.txt"]
    assert (root / "failed" / "sidecar.psd.toml").exists()
    text = (root / "watch.log").read_text()
    assert "truncated.psd is still incomplete" in text
    for name in set(digests) - {"truncated.psd"}:  # finished once, by one of the watchers
        assert (
            len(
                [
                    line
                    for line in text.splitlines()
                    if f"] INFO done {name} " in line or f"] WARNING failed {name} " in line
                ]
            )
            == 1
        ), name
    assert "a .txt file, not a Photoshop document" in errors["notes.error.txt"]
    assert "resuming job" in text


def _jpeg_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def test_a_bad_root_or_collage_toml_stops_at_start_with_one_error_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "psd_collage.cli", "watch", "--once"]
    missing = subprocess.run([*cmd, str(tmp_path / "no" / "such")], capture_output=True, text=True)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'no' / 'such'}: the folder above it does not exist: check the path or create it first"
    ]
    (tmp_path / "collage.toml").write_text("variants = 0\n")
    bad = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2
    [line] = bad.stderr.strip().splitlines()
    assert line.startswith("error: ") and "collage.toml" in line and "variants" in line
