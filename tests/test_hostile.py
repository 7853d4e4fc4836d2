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

import numpy as np
import pytest
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
    assert [(r["outcome"], r["cause"]) for r in status["recent"]] == [("failed", "input")]


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
    assert "done (--once): 4 left behind:" in log
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
    long_name = "a" * 250 + ".psd"  # a real render: no ENAMETOOLONG on the way
    make_psd(layout.inbox / long_name, 4)

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
    assert sum(n.startswith("aaaa") and n.endswith(".psd") for n in os.listdir(layout.done)) == 1
    poison = (layout.failed / "poison.error.txt").read_text().splitlines()[0]
    assert "LoRA file does not exist" in poison and str(tmp_path) not in poison
    assert "ControlNet" in (layout.failed / "canny.error.txt").read_text().splitlines()[0]
    assert pending_jobs(layout) == []


# ---------------------------------------------------------------------------
# memory: declared boxes are checked before anything is decoded or allocated
# ---------------------------------------------------------------------------


def zip_layer_psd(path: Path, canvas: int, side: int) -> Path:
    """A ``canvas``-square RGB document with one ``side``-square opaque white ZIP layer.

    Written by hand (psd-tools would need the whole layer in memory to write it): the
    zlib stream is made in 1 MB pieces, so a 13000 px layer is a 700 KB file.
    """
    import struct
    import zlib

    squeeze = zlib.compressobj(9)
    zero_rows = b"\xff" * (1 << 20)
    left = side * side
    pieces = []
    while left:
        n = min(left, len(zero_rows))
        pieces.append(squeeze.compress(zero_rows[:n]))
        left -= n
    channel = b"\x00\x02" + b"".join(pieces) + squeeze.flush()  # compression 2: ZIP
    channels = (-1, 0, 1, 2)
    name = b"\x04bomb" + b"\x00" * 3  # Pascal string padded to 4 bytes
    record = struct.pack(">4iH", 0, 0, side, side, len(channels))
    record += b"".join(struct.pack(">hI", c, len(channel)) for c in channels)
    record += b"8BIMnorm" + bytes([255, 0, 0, 0])
    extra = struct.pack(">II", 0, 0) + name
    record += struct.pack(">I", len(extra)) + extra
    info = struct.pack(">h", 1) + record + channel * len(channels)
    info += b"\x00" * (len(info) % 2)
    layers = struct.pack(">I", len(info)) + info + struct.pack(">I", 0)
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, canvas, canvas, 8, 3)
    merged = b"\x00\x00" + bytes(3 * canvas * canvas)  # raw
    body = header + struct.pack(">I", 0) + struct.pack(">I", 0)
    body += struct.pack(">I", len(layers)) + layers + merged
    path.write_bytes(body)
    return path


def peak_rss_mb(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``psd-collage ARGS``; (its peak resident memory in MB, the finished run).

    The command reports its own VmHWM at exit: a child's ``ru_maxrss`` would include the
    pages it shared with this (large) test process before its exec.
    """
    import tempfile

    if not Path("/proc/self/status").exists():
        pytest.skip("peak memory is read from /proc (Linux)")
    report = (
        "import atexit, sys\n"
        "out = sys.argv[1]\n"
        "def hwm():\n"
        "    with open('/proc/self/status') as fh:\n"
        "        line = next(l for l in fh if l.startswith('VmHWM'))\n"
        "    with open(out, 'w') as fh:\n"
        "        fh.write(line.split()[1])\n"
        "atexit.register(hwm)\n"
        "sys.argv = ['psd-collage', *sys.argv[2:]]\n"
        "from psd_collage.cli import main\n"
        "main()\n"
    )
    with tempfile.TemporaryDirectory() as folder:
        hwm = Path(folder) / "hwm"
        run = subprocess.run(
            [sys.executable, "-c", report, str(hwm), *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        return int(hwm.read_text()) / 1024, run


#: Peak memory (MB) allowed for reading a bomb: it must be refused or clipped before any
#: big allocation, so it costs what reading a 64 px document costs (about 110 MB).
READ_BUDGET_MB = 300


def test_a_huge_zip_layer_on_a_small_canvas_is_refused_before_decoding(tmp_path: Path) -> None:
    bomb = zip_layer_psd(tmp_path / "bomb.psd", 64, 13000)
    assert bomb.stat().st_size < 1024**2  # 670 KB on disk, 169 megapixels declared
    tiny = ("--model", "tiny", "--steps", "2", "--variants", "1")
    rss, run = peak_rss_mb("render", str(bomb), *tiny, "--max-pixels", "10000")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    error = run.stderr.strip().splitlines()[-1]
    assert "the layer 'bomb' is 13000 x 13000 px" in error
    assert "max_pixels=10000 (the operator's setting, --max-pixels)" in error
    assert rss < READ_BUDGET_MB, f"{rss:.0f} MB"
    rss, run = peak_rss_mb("inspect", str(bomb))  # the default limit refuses it too
    assert run.returncode == 2 and rss < READ_BUDGET_MB, f"{rss:.0f} MB"


def redo_with_recorded_box(folder: Path, box: list) -> Path:
    """An edit whose [redo] layer's recorded old box is ``box`` (as a hand-edited XMP says)."""
    from psd_builders import Pixels, build_psd
    from psd_tools import PSDImage

    from psd_collage.psd.reader import read_collage
    from psd_collage.psd.writer import write_variants

    source = build_psd(
        folder / "src.psd",
        [
            Pixels("a green lawn", (0, 0, 64, 64), (60, 160, 60)),
            Pixels("a white cup", (8, 8, 24, 24), (240, 240, 240)),
        ],
        size=(64, 64),
    )
    ids = [layer.layer_id for layer in read_collage(source).layers]
    base = folder / "base.psd"
    variant = [np.zeros((64, 64, 3), np.float32)]
    record = {"layers": [{"id": i, "box": box} for i in ids]}
    write_variants(source, base, variant, ["seed 1"], "[harmonized] g", record=record)
    psd = PSDImage.open(base)
    cup = next(layer for layer in psd.descendants() if layer.name == "a white cup")
    cup.name = "a white cup [redo]"
    psd.save(folder / "edited.psd")
    return folder / "edited.psd"


def test_a_huge_recorded_redo_box_is_clipped_to_the_canvas_before_allocating(
    tmp_path: Path,
) -> None:
    edited = redo_with_recorded_box(tmp_path, [0, 0, 30000, 30000])  # 3.6 GB as float32
    rss, run = peak_rss_mb("inspect", str(edited), "--json")
    assert run.returncode == 0, run.stderr
    assert rss < READ_BUDGET_MB, f"{rss:.0f} MB"
    left = json.loads(run.stdout)["document"]["left_by_redo"]
    assert left["pixels"] == 64 * 64 - 16 * 16  # the whole canvas but where the cup is now

    huge = redo_with_recorded_box(tmp_path, [0, 0, 10**6, 10**6])  # was a MemoryError
    rss, run = peak_rss_mb("inspect", str(huge))
    assert run.returncode == 0 and rss < READ_BUDGET_MB, (run.stderr, rss)
    junk = redo_with_recorded_box(tmp_path, ["a", None, 1e300, {}])  # hand-edited nonsense
    _, run = peak_rss_mb("inspect", str(junk))
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr


def test_the_canvas_limit_message_names_the_operators_setting_not_a_sidecar(
    tmp_path: Path,
) -> None:
    from psd_collage.errors import CollageError
    from psd_collage.psd.header import check_header

    path = zip_layer_psd(tmp_path / "wide.psd", 200, 8)
    with pytest.raises(CollageError) as caught:
        check_header(path, max_pixels=10000)
    message = str(caught.value)
    assert "sidecar" not in message  # sidecars may not set max_pixels
    assert "max_pixels in collage.toml [policy]" in message and "--max-pixels" in message


# ---------------------------------------------------------------------------
# XMP: no DTD in any encoding
# ---------------------------------------------------------------------------

_XMP = (
    '<?xml version="1.0" encoding="{enc}"?>{dtd}'
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
    'xmlns:dc="http://purl.org/dc/elements/1.1/"><rdf:Description rdf:about="">'
    '<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{text}</rdf:li></rdf:Alt>'
    "</dc:description></rdf:Description></rdf:RDF></x:xmpmeta>"
)
_DTD = '<!DOCTYPE x:xmpmeta [<!ENTITY e "INJECTED"><!ENTITY f "&e;&e;&e;&e;&e;">]>'


def xmp_packet(encoding: str, *, dtd: bool, text: str) -> bytes:
    codec = {"UTF-8": "utf-8", "UTF-16BE": "utf-16-be", "UTF-16LE": "utf-16-le"}[encoding]
    bom = {"UTF-8": b"", "UTF-16BE": b"\xfe\xff", "UTF-16LE": b"\xff\xfe"}[encoding]
    enc = encoding.replace("BE", "").replace("LE", "")
    body = _XMP.format(enc=enc, dtd=_DTD if dtd else "", text=text)
    return bom + body.encode(codec)


@pytest.mark.parametrize("encoding", ["UTF-8", "UTF-16BE", "UTF-16LE"])
def test_a_dtd_in_the_xmp_is_refused_in_every_encoding(encoding: str) -> None:
    from psd_collage.psd.history import read_renders
    from psd_collage.psd.xmp import xmp_description

    plain = xmp_packet(encoding, dtd=False, text="a quiet lake")
    if encoding != "UTF-16LE":  # decoded, not searched as bytes
        assert xmp_description(plain) == "a quiet lake"
    hostile = xmp_packet(encoding, dtd=True, text="&f;")
    assert b"<!DOCTYPE" not in hostile or encoding == "UTF-8"  # a byte search misses UTF-16
    assert xmp_description(hostile) == ""
    assert "INJECTED" not in xmp_description(hostile)
    assert read_renders(hostile) == {}


def test_an_entity_in_a_utf16_xmp_never_reaches_the_prompt(tmp_path: Path) -> None:
    from psd_builders import Pixels, build_psd
    from psd_tools import PSDImage
    from psd_tools.constants import Resource
    from psd_tools.psd.image_resources import ImageResource

    from psd_collage.psd.reader import read_collage

    path = build_psd(
        tmp_path / "x.psd", [Pixels("a red box", (0, 0, 32, 32), (200, 0, 0))], size=(32, 32)
    )
    psd = PSDImage.open(path)
    data = xmp_packet("UTF-16BE", dtd=True, text="&f;")
    psd.image_resources[Resource.XMP_METADATA] = ImageResource(key=Resource.XMP_METADATA, data=data)
    psd.save(path)
    collage = read_collage(path)
    assert "INJECTED" not in collage.prompt and collage.prompt == "a red box"


# ---------------------------------------------------------------------------
# --job-timeout covers reading
# ---------------------------------------------------------------------------


def test_the_job_timeout_stops_a_slow_read_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from psd_builders import Pixels, build_psd

    from psd_collage.policy import Policy
    from psd_collage.psd.composite import Compositor
    from psd_collage.render import Renderer
    from watcher.execute import render_outcome

    layers = [Pixels(f"box {i}", (i, i, i + 8, i + 8), (10 * i, 0, 0)) for i in range(12)]
    path = build_psd(tmp_path / "slow.psd", layers, size=(32, 32))
    drawn = Compositor.layer_pixels

    def slow(self, layer):  # noqa: ANN001, ANN202 - a layer that takes 0.3 s to decode
        time.sleep(0.3)
        return drawn(self, layer)

    monkeypatch.setattr(Compositor, "layer_pixels", slow)
    phases: list[str] = []
    started = time.monotonic()
    outcome = render_outcome(
        Renderer(defaults={"model": "tiny", "variants": 1, "steps": 1}),
        name="slow.psd",
        job_id="job",
        input=path,
        output=tmp_path / "out.psd",
        sidecar=None,
        progress=lambda phase, *_: phases.append(phase),
        stop=lambda: False,
        deadline=Policy(job_timeout=0.5).deadline(),
        root=tmp_path,
    )
    took = time.monotonic() - started
    assert outcome.kind == "failed", outcome
    assert took < 2.0, took  # 12 layers x 0.3 s would be 3.6 s of reading alone
    assert "load" not in phases  # stopped while reading, before the model
    first = outcome.report.splitlines()[0]
    assert "over the limit job_timeout=0.5" in first and "stopped after 0." in first


# ---------------------------------------------------------------------------
# serve: retry, names, errors, limits
# ---------------------------------------------------------------------------


def test_retry_is_refused_for_a_job_that_failed_on_its_input_only(tmp_path: Path) -> None:
    from serve.book import ApiError, JobBook

    layout = Layout.create(tmp_path)
    recent = []
    for name, cause in (("bad.psd", "input"), ("oom.psd", "internal")):
        (layout.failed / name).write_bytes(fake_psd(name))
        (layout.failed / name.replace(".psd", ".error.txt")).write_text("why\n")
        recent.append(
            {
                "job": f"job-{name}",
                "name": name,
                "outcome": "failed",
                "failed": f"failed/{name}",
                "error_file": f"failed/{name.replace('.psd', '.error.txt')}",
                "error": f"{name}: why",
                "cause": cause,
                "finished": "2026-01-01T00:00:00+00:00",
            }
        )
    book = JobBook(layout, lambda: {"state": "idle", "recent": recent})
    views = {v["name"]: v for v in book.jobs()}
    assert (
        views["bad.psd"]["retryable"] is False
        and "upload the file again" in views["bad.psd"]["note"]
    )
    assert views["oom.psd"]["retryable"] is True and "note" not in views["oom.psd"]
    with pytest.raises(ApiError) as caught:
        book.retry(views["bad.psd"]["id"])
    assert caught.value.status == 409 and "failed on its input" in caught.value.message
    assert (layout.failed / "bad.psd").exists()
    assert book.retry(views["oom.psd"]["id"])["state"] == "queued"
    assert (layout.inbox / "oom.psd").exists()


@pytest.fixture
def copy_server(tmp_path: Path):
    """An in-process server over a hot folder whose renderer copies (no model)."""
    from serve_helpers import serve_in_thread
    from test_watcher import CopyRenderer

    from serve.app import create_app
    from serve.backend import HotFolderBackend
    from watcher.service import WatchOptions

    backend = HotFolderBackend(
        tmp_path / "hot", {}, WatchOptions(stable=0.1), renderer_factory=CopyRenderer
    )
    app = create_app(backend, max_upload=1024**2)  # 1 MB
    with serve_in_thread(app) as url:
        yield url, tmp_path / "hot"


def test_serve_names_results_answers_errors_in_json_and_has_an_icon(
    copy_server, tmp_path: Path
) -> None:
    import httpx
    from serve_helpers import make_psd as psd_file
    from serve_helpers import wait_for

    url, root = copy_server
    long_name = "é" * 127 + ".psd"  # 258 bytes: no file may have this name
    path = psd_file(tmp_path / "poster.psd", 1)
    with open(path, "rb") as fh:
        reply = httpx.post(f"{url}/api/jobs", files={"file": (long_name, fh)}, timeout=30)
    assert reply.status_code == 201, reply.text
    long_job = reply.json()
    assert long_job["name"].startswith("é" * 100) and len(long_job["name"].encode()) < 255
    with open(path, "rb") as fh:
        job = httpx.post(f"{url}/api/jobs", files={"file": ("poster.psd", fh)}, timeout=30).json()

    for one in (long_job, job):
        wait_for(
            lambda one=one: httpx.get(f"{url}/api/jobs/{one['id']}").json()["state"] == "done",
            60,
            "a job",
        )
    result = httpx.get(f"{url}/api/jobs/{job['id']}/result")
    assert result.status_code == 200
    # saved as the result, not under the original's name
    assert 'filename="poster.harmonized.psd"' in result.headers["content-disposition"]

    other_site = httpx.post(
        f"{url}/api/jobs", headers={"Origin": "http://evil.example"}, files={"file": ("x.psd", b"")}
    )
    assert other_site.status_code == 403
    assert other_site.headers["content-type"] == "application/json"
    assert "another site" in other_site.json()["error"]

    icon = httpx.get(f"{url}/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")


def test_a_chunked_upload_is_cut_off_at_the_limit_while_it_streams(copy_server) -> None:
    import socket
    from urllib.parse import urlsplit

    url, root = copy_server
    where = urlsplit(url)
    boundary = "x" * 16
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.psd"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    sock = socket.create_connection((where.hostname, where.port), timeout=30)
    sock.sendall(
        (
            "POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
        ).encode()
    )
    chunk = b"8BPS" + bytes(64 * 1024 - 4)
    sent = 0

    def send(data: bytes) -> None:
        sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    try:
        send(head)
        for _ in range(16 * 200):  # up to 200 MB; the limit is 1 MB
            send(chunk)
            sent += len(chunk)
            sock.setblocking(False)
            try:
                answered = sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                answered = b""
            finally:
                sock.setblocking(True)
            if answered:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply = b""
    try:
        while b"\r\n\r\n" not in reply:
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    # refused while streaming (what is in flight in socket buffers aside), not after 200 MB
    assert sent < 50 * 1024**2, sent
    leftovers = [p for p in root.rglob("*") if p.is_file() and p.stat().st_size > 1024**2]
    assert leftovers == []


def test_ctrl_c_stops_serve_and_watch_cleanly_with_the_same_exit_status(tmp_path: Path) -> None:
    """Both exit 0 on Ctrl-C: stopping is how a service ends, not a failure (a wrapper
    script or systemd would otherwise report every normal stop as an error)."""
    import signal
    import time

    cmd = [sys.executable, "-m", "psd_collage.cli"]
    codes = {}
    for name, args, ready in (
        ("serve", ["serve", str(tmp_path / "s"), "--port", "0"], "serving http"),
        ("watch", ["watch", str(tmp_path / "w")], "watching"),
    ):
        out = tmp_path / f"{name}.out"
        with open(out, "wb") as sink:
            proc = subprocess.Popen([*cmd, *args], stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while ready not in out.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        codes[name] = proc.wait(60)
        assert "Traceback" not in out.read_text(), out.read_text()
    assert codes == {"serve": 0, "watch": 0}


def test_status_of_a_missing_folder_says_so(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "psd_collage.cli", "status", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == f"error: {tmp_path / 'nope'}: no such folder: give the hot " + (
        "folder's ROOT (the folder holding inbox/ and status.json)"
    )


def test_the_worker_gives_its_own_advice_instead_of_celerys_uid_option() -> None:
    import warnings

    from celery.platforms import check_privileges

    from watcher.farm import replace_root_advice

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        note = replace_root_advice()
        check_privileges({"json"})
    assert not [w for w in caught if "--uid" in str(w.message)]
    if os.geteuid() == 0:
        assert "sudo -u USER psd-collage worker" in note and "--uid" not in note
    else:
        assert note is None


# ---------------------------------------------------------------------------
# the Low items: unlucky folders and names
# ---------------------------------------------------------------------------


def test_an_input_removed_from_work_fails_its_job_with_the_reason(tmp_path: Path) -> None:
    from watcher.jobs import claim

    layout = Layout.create(tmp_path)
    (layout.inbox / "gone.psd").write_bytes(fake_psd("gone"))
    job = claim(layout, "gone.psd")
    job.input.unlink()  # someone cleaned up work/ by hand
    job.release()
    assert make_service(tmp_path).run() == 0
    assert pending_jobs(layout) == []  # not stuck: no error on every restart
    assert sorted(os.listdir(layout.failed)) == ["gone.error.txt"]
    reason = (layout.failed / "gone.error.txt").read_text().splitlines()[0]
    assert "was removed from work/ before it was harmonized" in reason
    [entry] = json.loads(layout.status_file.read_text())["recent"]
    assert entry["outcome"] == "failed" and "removed from work/" in entry["error"]


def test_a_read_only_done_folder_fails_the_job_with_the_reason_in_the_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    layout = Layout.create(tmp_path)
    (layout.inbox / "a.psd").write_bytes(fake_psd("a"))
    link = os.link

    def read_only_done(src, dst, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        if Path(dst).parent == layout.done:  # tests run as root: chmod would not stop it
            raise PermissionError(errno.EACCES, "Permission denied", str(src), None, str(dst))
        return link(src, dst, *args, **kw)

    monkeypatch.setattr(os, "link", read_only_done)
    assert make_service(tmp_path).run() == 0
    assert pending_jobs(layout) == [] and os.listdir(layout.done) == []
    assert (layout.failed / "a.psd").read_bytes() == fake_psd("a")
    [entry] = json.loads(layout.status_file.read_text())["recent"]
    assert entry["outcome"] == "failed" and entry["cause"] == "service"  # Retry is offered
    assert "could not be moved to done/ (Permission denied)" in entry["error"]
    assert "make done/ writable" in entry["error"]


def test_a_full_disk_pauses_the_watcher_instead_of_stopping_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import watcher.jobs
    import watcher.status
    from psd_collage.atomic import atomic_write_text

    layout = Layout.create(tmp_path)
    (layout.inbox / "a.psd").write_bytes(fake_psd("a"))
    failures = {"status": 4, "job": 2}

    def full(kind: str):  # noqa: ANN202
        def write(path, text, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
            if failures[kind] > 0:
                failures[kind] -= 1
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return atomic_write_text(path, text, *args, **kw)

        return write

    monkeypatch.setattr(watcher.status, "atomic_write_text", full("status"))
    monkeypatch.setattr(watcher.jobs, "atomic_write_text", full("job"))
    service = make_service(tmp_path, rescan=0.1)
    assert service.run() == 0  # no exit on ENOSPC
    assert failures == {"status": 0, "job": 0}
    assert sorted(os.listdir(layout.done)) == ["a.preview.png", "a.psd"]
    log = layout.log_file.read_text()
    assert "is full" in log and "paused" in log and "disk space is back" in log
    assert "is stale until it can" in log


def test_a_relative_link_inside_root_still_works_from_work(tmp_path: Path) -> None:
    layout = Layout.create(tmp_path)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "real.psd").write_bytes(fake_psd("linked"))
    os.symlink("../shared/real.psd", layout.inbox / "link.psd")
    assert make_service(tmp_path).run() == 0
    assert (layout.done / "link.psd").read_bytes() == b"RESULT" + fake_psd("linked")
    assert (layout.originals / "link.psd").resolve() == (tmp_path / "shared" / "real.psd")


def test_a_newline_or_escape_in_a_name_cannot_forge_log_lines(tmp_path: Path) -> None:
    layout = Layout.create(tmp_path)
    forged = "x\n2026-01-01 00:00:00.000 [1] INFO done boss.psd\x1b[2J.psd"
    (layout.inbox / forged).write_bytes(fake_psd("forged"))
    assert make_service(tmp_path).run() == 0
    log = layout.log_file.read_text()
    assert "\x1b" not in log and "\\x1b[2J" in log
    assert not any(line.startswith("2026-01-01 00:00:00.000") for line in log.splitlines())
    assert len(os.listdir(layout.done)) == 2  # and the file itself was harmonized
    from click.testing import CliRunner

    from psd_collage.cli import main

    shown = CliRunner().invoke(main, ["status", str(tmp_path)]).stdout
    assert "\x1b" not in shown and "\\x1b[2J" in shown
    assert not any(line.startswith("2026-01-01 00:00:00.000") for line in shown.splitlines())


# ---------------------------------------------------------------------------
# fuzz: a few hundred mutated PSDs and sidecars through the watcher
# ---------------------------------------------------------------------------

FUZZ_FILES = 240
FUZZ_SIDECARS = [
    'lora = ["nope.safetensors"]',
    'controlnet = "nowhere"',
    "steps = 1e308",
    "variants = -1",
    "noise = nan",
    'model = "../../../../etc/passwd"',
    "max_pixels = 1",  # operator-only
    '[layers."a red box"]\nnoise = 2',
    'prompt = "' + "x" * 100_000 + '"',
    "seed = 99999999999999999999999",
    "= = =",
    "\x00\x01\x02",
    "[layers]\n" + "\n".join(f'"l{i}" = {{noise = 0.5}}' for i in range(200)),
    'resolution = "big"',
    "preview = 3",
]


class ReadingRenderer:
    """The real settings, policy and reader (and the edit masks), then a copy for output:
    everything a designer's file and sidecar reach before diffusion, at fuzzing speed."""

    def __init__(self, defaults: dict) -> None:
        from psd_collage.render import Renderer

        self.renderer = Renderer(defaults={**defaults, "model": "tiny"})

    def render_file(
        self, path, output=None, *, sidecar=None, preview=None, progress=None, cancel=None
    ):  # noqa: ANN001, ANN201
        from types import SimpleNamespace

        from psd_collage import masks
        from psd_collage.psd.reader import read_collage

        settings = self.renderer.settings_for(path, sidecar)
        collage = read_collage(path, settings, cancel=cancel)
        masks.start_image(collage)
        masks.noise_map(collage)
        output.write_bytes(path.read_bytes())
        return SimpleNamespace(
            output=output,
            preview=None,
            timings={},
            variants=[],
            warnings=collage.warnings,
            settings={"model": "tiny"},
        )


def fuzz_base(folder: Path) -> bytes:
    """A small document with what the reader looks at: layers, tags, a group, a mask-like
    alpha, XMP with a description and a render record, an earlier [harmonized] result."""
    from psd_builders import Group, Pixels, build_psd

    from psd_collage.psd.reader import read_collage
    from psd_collage.psd.writer import write_variants

    rgba = np.zeros((12, 12, 4), np.uint8)
    rgba[2:10, 2:10] = (200, 30, 30, 255)
    source = build_psd(
        folder / "base-src.psd",
        [
            Pixels("a green lawn", (0, 0, 32, 32), (60, 160, 60)),
            Group("things [split]", [Pixels("a red box [noise=0.6]", (4, 4, 16, 16), rgba=rgba)]),
            Pixels("a white cup [lock]", (18, 18, 30, 30), (240, 240, 240)),
        ],
        size=(32, 32),
        description="a red box and a cup on a lawn",
    )
    ids = [layer.layer_id for layer in read_collage(source).layers]
    record = {"layers": [{"id": i, "box": [0, 0, 8, 8]} for i in ids]}
    variant = [np.full((32, 32, 3), 0.5, np.float32)]
    base = folder / "base.psd"
    write_variants(source, base, variant, ["seed 1"], "[harmonized] g", record=record)
    return base.read_bytes()


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    kind = rng.integers(0, 6)
    if kind == 0:  # a few random bytes anywhere
        for pos in rng.integers(0, len(out), rng.integers(1, 17)):
            out[pos] = rng.integers(0, 256)
    elif kind == 1:  # the headers and section lengths
        for pos in rng.integers(0, min(len(out), 2048), rng.integers(1, 9)):
            out[pos] = rng.integers(0, 256)
    elif kind == 2:  # a 4-byte field set to an extreme
        pos = int(rng.integers(0, len(out) - 4))
        out[pos : pos + 4] = [b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff"][
            rng.integers(0, 3)
        ]
    elif kind == 3:  # cut short
        out = out[: rng.integers(1, len(out))]
    elif kind == 4:  # garbage appended
        out += rng.integers(0, 256, rng.integers(1, 4096), dtype=np.uint8).tobytes()
    else:  # a block copied over another place
        size = int(rng.integers(4, 256))
        a, b = rng.integers(0, len(out) - size, 2)
        out[b : b + size] = out[a : a + size]
    return bytes(out)


def test_fuzz_the_watcher_stays_up_and_accounts_for_every_file(tmp_path: Path) -> None:
    import threading

    from psd_collage.psd.header import check_header
    from watcher.service import WatchOptions, WatchService

    rng = np.random.default_rng(23)
    base = fuzz_base(tmp_path)
    root = tmp_path / "hot"
    layout = Layout.create(root)
    names = []
    for i in range(FUZZ_FILES):
        name = f"f{i:03d}.psd"
        (layout.inbox / name).write_bytes(mutate(base, rng) if i % 8 else base)
        if i % 5 == 0:
            (layout.inbox / f"{name}.toml").write_text(
                FUZZ_SIDECARS[int(rng.integers(0, len(FUZZ_SIDECARS)))]
            )
        names.append(name)
    service = WatchService(
        root,
        {},
        WatchOptions(stable=0.05, once=True, grace=0.05, rescan=1.0),
        renderer_factory=ReadingRenderer,
        header_check=check_header,
    )
    finished = threading.Event()
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(service.run())
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            outcome.append(exc)
        finally:
            finished.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not finished.wait(300):
        service.stop()
        pytest.fail("the watcher did not get through the fuzzed files in 300 s")
    assert outcome == [0]

    left = dict(service.leftovers())
    where = {}
    for name in names:
        stem = name[:-4]
        if (layout.done / name).exists():
            where[name] = "done"
        elif (layout.failed / name).exists():
            assert (layout.failed / f"{stem}.error.txt").exists(), name
            where[name] = "failed"
        else:  # only a cut-short copy may wait, and the report says why
            assert (layout.inbox / name).exists() and "incomplete" in left.get(name, ""), name
            where[name] = "waiting"
    assert pending_jobs(layout) == []
    counts = {k: list(where.values()).count(k) for k in ("done", "failed", "waiting")}
    assert counts["done"] >= FUZZ_FILES // 8 and counts["failed"] > FUZZ_FILES // 4, counts
    internal = [
        p.name
        for p in layout.failed.glob("*.error.txt")
        if "internal error" in p.read_text().splitlines()[0]
    ]
    assert internal == [], [(n, (layout.failed / n).read_text()[-600:]) for n in internal[:3]]


def test_an_unwritable_root_stops_the_watcher_with_one_line_for_the_operator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import watcher.service
    from psd_collage.errors import CollageError

    layout = Layout.create(tmp_path)
    (layout.inbox / "a.psd").write_bytes(fake_psd("a"))

    def refused(*args, **kw):  # noqa: ANN002, ANN003, ANN202 - as root, chmod would not
        raise PermissionError(errno.EACCES, "Permission denied", str(layout.work / "x"))

    monkeypatch.setattr(watcher.service, "claim", refused)
    with pytest.raises(CollageError) as caught:
        make_service(tmp_path).run()
    assert "whoever runs it must make ROOT and its folders writable" in str(caught.value)
    assert (layout.inbox / "a.psd").exists()  # the designer's file is untouched
