"""Hostile and unlucky inputs (issue 23): each ends as one failed job, the service goes on.

What a designer controls (the file's name and bytes, its sidecar or upload settings, its
XMP) may fail that job and nothing else: never a service stop, a traceback or a job
stuck in work/. The watcher is driven in-process with the stand-in renderer of
test_watcher where the renderer does not matter, and as the real command with
``--model tiny`` where it does. Every file is small and made here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_watcher import fake_psd, make_psd, make_service

from watcher.jobs import pending_jobs
from watcher.layout import MAX_NAME_BYTES, Layout

PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00"
    b"\x90wS\xde\x00\x00\x00\x0cIDATx\x9cc\xf8\xff\xff?\x00\x05\xfe\x02\xfe\r\xefF\xb8\x00\x00"
    b"\x00\x00IEND\xaeB`\x82"
)


def everything_in(root: Path) -> dict[str, list[str]]:
    return {
        folder: sorted(os.listdir(root / folder))
        for folder in ("inbox", "done", "failed", "originals")
    }


# ---------------------------------------------------------------------------
# every drop is accounted for (issue 20, item 4)
# ---------------------------------------------------------------------------


def test_a_real_png_goes_to_failed_with_its_reason(tmp_path: Path) -> None:
    layout = Layout.create(tmp_path)
    (layout.inbox / "pic.png").write_bytes(PNG)
    (layout.inbox / "Thumbs.db").write_bytes(b"\0" * 8)  # written by Windows, not dropped
    assert make_service(tmp_path).run() == 0
    assert (layout.failed / "pic.png").read_bytes() == PNG  # byte-identical
    first = (layout.failed / "pic.error.txt").read_text().splitlines()[0]
    assert first.startswith("pic.png: is a .png file, not a Photoshop document")
    assert "Save As" in first
    assert os.listdir(layout.inbox) == ["Thumbs.db"]
    status = json.loads(layout.status_file.read_text())
    assert [r["outcome"] for r in status["recent"]] == ["failed"]


def test_watch_once_says_what_it_left_in_the_inbox_and_why(tmp_path: Path) -> None:
    layout = Layout.create(tmp_path)
    (layout.inbox / "half.psd").write_bytes(b"8BPS\0\1")  # a copy that broke off
    (layout.inbox / "big.psd.part").write_bytes(b"8BPS")  # a download in progress
    (layout.inbox / "lonely.psd.toml").write_text("steps = 3\n")  # its PSD not there yet
    os.mkfifo(layout.inbox / "pipe.psd")
    (layout.inbox / "good.psd").write_bytes(fake_psd("good"))

    assert make_service(tmp_path).run() == 0

    assert os.listdir(layout.done) == ["good.preview.png", "good.psd"] or sorted(
        os.listdir(layout.done)
    ) == ["good.preview.png", "good.psd"]
    log = layout.log_file.read_text()
    assert "inbox is empty" not in log and "inbox/ is empty" not in log
    assert "done (--once): 4 left in inbox/:" in log
    assert "half.psd: incomplete (is incomplete); it is taken once the copy completes" in log
    assert "big.psd.part: a download or copy still in progress" in log
    assert "lonely.psd.toml: a sidecar waiting for its document lonely.psd" in log
    assert "pipe.psd: it is a FIFO, not a file" in log
    waiting = {
        w["name"]: w["reason"] for w in json.loads(layout.status_file.read_text())["waiting"]
    }
    assert set(waiting) == {"half.psd", "big.psd.part", "lonely.psd.toml", "pipe.psd"}


# ---------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------


def test_a_250_character_name_is_one_job_not_a_dead_watcher(tmp_path: Path) -> None:
    layout = Layout.create(tmp_path)
    good = "a" * 250 + ".psd"
    bad = "é" * 122 + ".psd"  # 248 bytes: NAME.error.txt would be 254 + 6
    assert len(good.encode()) <= MAX_NAME_BYTES and len(bad.encode()) <= MAX_NAME_BYTES
    (layout.inbox / good).write_bytes(fake_psd("good"))
    (layout.inbox / bad).write_bytes(fake_psd("BROKEN"))
    (layout.inbox / "next.psd").write_bytes(fake_psd("next"))

    assert make_service(tmp_path).run() == 0

    found = everything_in(tmp_path)
    assert found["inbox"] == [] and pending_jobs(layout) == []
    assert "next.psd" in found["done"]
    done = [n for n in found["done"] if n.startswith("aaa") and n.endswith(".psd")]
    assert len(done) == 1 and len(done[0].encode()) <= MAX_NAME_BYTES
    errors = [n for n in found["failed"] if n.endswith(".error.txt")]
    assert len(errors) == 1 and errors[0].startswith("é" * 50)
    assert "Image > Mode" in (layout.failed / errors[0]).read_text()
    # the dropped file and its report share one (shortened) name
    stem = errors[0].removesuffix(".error.txt")
    assert found["failed"] == sorted([errors[0], stem + ".psd"])
    assert found["originals"] == sorted([done[0], "next.psd"])


# ---------------------------------------------------------------------------
# the designer's weights: a missing LoRA or ControlNet fails that job only
# ---------------------------------------------------------------------------

TINY = ["--model", "tiny", "--variants", "1", "--seed", "1", "--steps", "2"]


def watch_once(root: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "psd_collage.cli", "watch", str(root), "--once"]
    return subprocess.run(
        [*cmd, "--stable", "0.2", *TINY, *extra], capture_output=True, text=True, timeout=timeout
    )


def test_a_sidecar_naming_a_missing_lora_or_controlnet_fails_only_that_job(
    tmp_path: Path,
) -> None:
    layout = Layout.create(tmp_path)
    make_psd(layout.inbox / "poison.psd", 1)
    (layout.inbox / "poison.psd.toml").write_text('lora = ["nope.safetensors"]\n')
    make_psd(layout.inbox / "canny.psd", 2)
    (layout.inbox / "canny.psd.toml").write_text('controlnet = "no/such/controlnet"\n')
    make_psd(layout.inbox / "later.psd", 3)

    run = watch_once(tmp_path)

    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert sorted(os.listdir(layout.failed)) == [
        "canny.error.txt",
        "canny.psd",
        "canny.psd.toml",
        "poison.error.txt",
        "poison.psd",
        "poison.psd.toml",
    ]
    assert "later.psd" in os.listdir(layout.done)
    poison = (layout.failed / "poison.error.txt").read_text().splitlines()[0]
    assert "LoRA file does not exist" in poison and str(tmp_path) not in poison
    assert "ControlNet" in (layout.failed / "canny.error.txt").read_text().splitlines()[0]
    assert pending_jobs(layout) == []
