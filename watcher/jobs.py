"""Jobs on disk: claiming a dropped file, the per-job state file, and the final moves.

A job is a folder ``work/<id>/`` holding the claimed document, its sidecar, a
``.lock`` (flock'ed while a watcher works on the job) and ``job.json`` (the
stage, written atomically). Every step is safe to repeat, so a watcher killed
at any moment leaves a folder that the next start (or another watcher on the
same ROOT) can carry on from:

- claimed (no result yet)  -> render again;
- done / failed            -> the destinations are recorded in ``job.json``;
  finish the moves that have not happened yet, then remove the folder.

Moves never replace an existing file: a hard link creates the destination
(failing if it exists), then the source is unlinked. After a crash between
the two, source and destination are the same inode and the unlink is simply
repeated.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psd_collage.atomic import atomic_write_text
from psd_collage.errors import CollageError

from .layout import (
    Layout,
    fits,
    free_stem,
    is_dropped,
    numbered,
    output_name,
    output_stem,
    sidecar_in,
    sidecar_name,
)

log = logging.getLogger("psd_collage.watch")

LOCK_NAME = ".lock"
STATE_NAME = "job.json"
ERROR_NAME = "error.txt"
OUT_DIR = "out"
#: A job that took the watcher down this many times is failed instead of re-run forever.
MAX_ATTEMPTS = 3
#: An empty job folder without a lock is only removed when older than this (seconds):
#: a younger one may be a claim in progress by another watcher.
STALE_EMPTY_FOLDER_S = 60.0


class ClaimError(Exception):
    """The file could not be claimed for a reason other than another watcher taking it."""


@dataclass
class Move:
    """One final move, recorded before it happens so that it can be finished after a crash."""

    src: str  # relative to the job folder
    folder: str  # destination folder, relative to ROOT: "done", "originals" or "failed"
    suffix: str  # ".psd", ".preview.png", ".error.txt", ".psd.toml"
    number: int  # 1: "poster.psd", 2: "poster (2).psd", ...
    optional: bool = False

    def dst(self, root: Path, stem: str) -> Path:
        return root / self.folder / (numbered(stem, self.number) + self.suffix)


def new_job_id() -> str:
    """Sortable by claim time, unique across watchers and hosts."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"


class Job:
    """A claimed document, locked by this process until :meth:`release`."""

    def __init__(self, layout: Layout, folder: Path, lock_fd: int, state: dict[str, Any]):
        self.layout = layout
        self.folder = folder
        self._lock_fd: int | None = lock_fd
        self.state = state

    # -- paths ---------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.folder.name

    @property
    def name(self) -> str:
        return self.state["name"]

    @property
    def input(self) -> Path:
        return self.folder / self.name

    @property
    def sidecar(self) -> Path | None:
        return sidecar_in(self.folder, self.name)

    @property
    def output(self) -> Path:
        """Where the renderer writes (inside the job folder: nothing partial reaches done/)."""
        return self.folder / OUT_DIR / output_name(self.name)

    @property
    def stage(self) -> str:
        return self.state["stage"]

    # -- state ---------------------------------------------------------------
    def save(self) -> None:
        atomic_write_text(self.folder / STATE_NAME, json.dumps(self.state, indent=2))

    def release(self) -> None:
        """Drop the lock: the job (if still in work/) is free for the next start to re-run."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def start_attempt(self) -> int:
        self.state["attempts"] = self.state.get("attempts", 0) + 1
        self.state["started_at"] = time.time()
        self.save()
        return self.state["attempts"]

    def requeue(self) -> None:
        """An interrupted (cancelled) run does not count as an attempt."""
        self.state["attempts"] = max(0, self.state.get("attempts", 1) - 1)
        with contextlib.suppress(OSError):
            shutil.rmtree(self.folder / OUT_DIR)
        self.save()

    def prepare_output(self) -> Path:
        """A clean ``out/`` (a crashed run may have left temporary files there)."""
        out = self.folder / OUT_DIR
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        return self.output

    # -- outcomes ------------------------------------------------------------
    def mark_done(self, output: Path, preview: Path | None, summary: dict[str, Any]) -> None:
        """Record the render's result and where each file will go; the moves come next."""
        suffix = Path(self.name).suffix
        done, originals = self.layout.done, self.layout.originals
        plan: list[tuple[Path, Path, str, bool]] = []  # (src, folder, suffix, optional)
        if preview is not None:
            plan.append((preview, done, ".preview.png", True))
        plan.append((output, done, suffix, False))
        plan.append((self.input, originals, suffix, not os.path.lexists(self.input)))
        if self.sidecar is not None:
            plan.append((self.sidecar, originals, suffix + ".toml", False))
        self._plan(plan)
        self.state.update(stage="done", result=summary, finished_at=time.time())
        self.save()

    def mark_failed(self, report: str, cause: str | None = None) -> None:
        """Write the error report and record where it and the untouched input will go.

        ``cause``: ``input`` when the same file would fail the same way again (see
        :attr:`watcher.execute.Outcome.cause`); the status passes it on, so Retry is only
        offered where it can succeed."""
        atomic_write_text(self.folder / ERROR_NAME, report)
        suffix = Path(self.name).suffix
        failed = self.layout.failed
        plan = [
            (self.folder / ERROR_NAME, failed, ".error.txt", False),
            # removed from work/ by someone else: the report says so, the job still ends
            (self.input, failed, suffix, not os.path.lexists(self.input)),
        ]
        if self.sidecar is not None:
            plan.append((self.sidecar, failed, suffix + ".toml", False))
        self._plan(plan)
        self.state.update(
            stage="failed",
            error=report.splitlines()[0] if report else "",
            cause=cause,
            finished_at=time.time(),
        )
        self.save()

    def _plan(self, plan: list[tuple[Path, Path, str, bool]]) -> None:
        stem = output_stem(self.name)
        chosen = free_stem(stem, [(folder, sfx) for _, folder, sfx, _ in plan])
        number = _number_of(chosen, stem)
        self.state["moves"] = [
            Move(
                src=str(src.relative_to(self.folder)),
                folder=folder.name,
                suffix=sfx,
                number=number,
                optional=optional,
            ).__dict__
            for src, folder, sfx, optional in plan
        ]

    def finalize(self) -> dict[str, Path]:
        """Carry out the recorded moves (idempotent), then remove the job folder.

        Returns where the files went, keyed ``done``, ``preview``, ``original``,
        ``failed``, ``error_file`` or ``sidecar``.
        """
        if self.stage not in ("done", "failed"):
            raise RuntimeError(f"job {self.id} has no outcome yet")
        root, stem = self.layout.root, output_stem(self.name)
        index = 0
        while index < len(self.state["moves"]):
            move = Move(**self.state["moves"][index])
            try:
                _place(self.folder / move.src, move.dst(root, stem))
            except FileExistsError:
                # Another watcher took that name after we planned: move the remaining files
                # to the next free number, so that they still share one name.
                self._replan_from(index)
                self.save()
                continue
            except FileNotFoundError:
                if not move.optional:
                    raise
            index += 1
        placed = {}
        for data in self.state["moves"]:
            move = Move(**data)
            if move.dst(root, stem).exists():
                placed[_kind(move)] = move.dst(root, stem)
        self._remove_folder()
        return placed

    def _replan_from(self, index: int) -> None:
        moves = [Move(**m) for m in self.state["moves"]]
        rest = moves[index:]
        stem = output_stem(self.name)
        targets = [(self.layout.root / m.folder, m.suffix) for m in rest]
        number = _number_of(free_stem(stem, targets, start=rest[0].number + 1), stem)
        for m in rest:
            m.number = number
        self.state["moves"] = [m.__dict__ for m in moves]

    def _remove_folder(self) -> None:
        """Everything but the lock first, the lock last: a folder with a lock and nothing
        else is recognisably finished (see :func:`open_job`)."""
        for entry in list(_listdir(self.folder)):
            if entry == LOCK_NAME:
                continue
            path = self.folder / entry
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
        with contextlib.suppress(OSError):
            (self.folder / LOCK_NAME).unlink()
        with contextlib.suppress(OSError):
            self.folder.rmdir()
        self.release()


def claim(layout: Layout, name: str, **facts: Any) -> Job | None:
    """Take ``inbox/name`` (and its sidecar) into a new job folder by an atomic rename.

    Returns ``None`` when the file is gone: another watcher on the same ROOT won the
    rename (or the user took the file back). ``facts`` are stored in the job's state.
    """
    folder = layout.work / new_job_id()
    folder.mkdir()
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    link = _relative_link(layout.inbox / name)
    try:
        os.rename(layout.inbox / name, folder / name)
    except FileNotFoundError:
        _abandon(folder, fd)
        return None
    except OSError as exc:
        _abandon(folder, fd)
        raise ClaimError(f"cannot move {name} from inbox/ to work/: {exc.strerror}") from exc
    if link is not None:  # it pointed from inbox/: make it point from anywhere
        _relink(folder / name, os.path.normpath(os.path.join(layout.inbox, link)))
    _claim_sidecar(layout, folder, name)
    state = {"name": name, "stage": "claimed", "attempts": 0, "claimed_at": time.time(), **facts}
    job = Job(layout, folder, fd, state)
    try:
        job.save()
    except BaseException:
        job.release()  # the folder is a claim without a state: open_job carries it on
        raise
    return job


def pending_jobs(layout: Layout) -> list[Path]:
    """Job folders in work/, oldest claim first."""
    try:
        return sorted(p for p in layout.work.iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []


def open_job(layout: Layout, folder: Path) -> Job | None:
    """Lock a job left in work/ (by a crash, a requeue or a dead watcher) to carry it on.

    ``None`` when another live watcher holds it, or when there is nothing left to do
    (a finished folder is removed on the way).
    """
    lock = folder / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        entries = _listdir(folder)
        if entries is None:
            return None
        if not entries:
            # A claim by another watcher may be between its mkdir and its lock: wait a while.
            if time.time() - _mtime(folder) > STALE_EMPTY_FOLDER_S:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            return None
        if not (STATE_NAME in entries or any(_is_input(e) for e in entries)):
            return None
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    entries = _listdir(folder)
    if entries is None:  # finalized and removed by its owner meanwhile
        os.close(fd)
        return None
    state = _read_state(folder / STATE_NAME)
    documents = [e for e in entries if _is_input(e)]
    if state is None:
        if not documents:
            # Nothing to carry on: a finished job whose clean-up was interrupted.
            Job(layout, folder, fd, {"name": "", "stage": "gone"})._remove_folder()
            return None
        # Killed between the claim's rename and writing job.json.
        name = documents[0]
        _claim_sidecar(layout, folder, name)
        state = {"name": name, "stage": "claimed", "attempts": 0, "claimed_at": _mtime(folder)}
        job = Job(layout, folder, fd, state)
        try:
            job.save()
        except BaseException:
            job.release()  # e.g. a full disk: the next try must be able to lock it again
            raise
        return job
    return Job(layout, folder, fd, state)  # its file may be gone: the service fails it


def failure_report(name: str, exc: BaseException, *, job_id: str, internal: bool) -> str:
    """``error.txt``: first line for the designer, then the technical detail for support."""
    if internal:
        headline = (
            f"{name} could not be harmonized because of an internal error in psd-collage "
            f"({type(exc).__name__}: {' '.join(str(exc).split())}). "
            "Please send this file and this text to whoever runs the hot folder."
        )
    else:
        headline = str(exc)
    lines = [
        headline,
        "",
        f"file: {name}",
        f"job: {job_id}",
        f"time: {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
        f"error type: {type(exc).__module__}.{type(exc).__qualname__}",
    ]
    if internal or not isinstance(exc, CollageError):
        lines += ["", "traceback:", "".join(traceback.format_exception(exc)).rstrip()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _place(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, never replacing an existing ``dst``; repeatable after a crash."""
    if not os.path.lexists(src):
        if os.path.lexists(dst):
            return  # moved by an earlier run of the same finalize
        raise FileNotFoundError(errno.ENOENT, "missing", str(src))
    try:
        os.link(src, dst)
    except FileExistsError:
        if os.path.samefile(src, dst):  # crashed between link and unlink
            os.unlink(src)
            return
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # No hard links on this share (some SMB/FAT mounts): check, then rename. Not
        # race-free against a second watcher choosing the same name in the same instant.
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def _kind(move: Move) -> str:
    if move.suffix == ".preview.png":
        return "preview"
    if move.suffix == ".error.txt":
        return "error_file"
    if move.suffix.endswith(".toml"):
        return "sidecar"
    return {"done": "done", "originals": "original", "failed": "failed"}[move.folder]


def _number_of(chosen: str, stem: str) -> int:
    """``poster (2)`` with stem ``poster`` -> 2 (see :func:`layout.numbered`)."""
    rest = chosen[len(stem) :]
    if rest.startswith(" (") and rest.endswith(")"):
        with contextlib.suppress(ValueError):
            return int(rest[2:-1])
    return 1


def _claim_sidecar(layout: Layout, folder: Path, name: str) -> None:
    if not fits(sidecar_name(name)):
        return  # no sidecar can have this name
    with contextlib.suppress(FileNotFoundError):
        os.rename(layout.inbox / sidecar_name(name), folder / sidecar_name(name))


#: What a job folder holds besides the dropped file itself.
_JOB_FILES = (LOCK_NAME, STATE_NAME, ERROR_NAME, OUT_DIR, "result.json", "render.json")


def _is_input(entry: str) -> bool:
    """The dropped file in a job folder (a PSD, or any other file that is to fail)."""
    return entry not in _JOB_FILES and is_dropped(entry)


def _relative_link(path: Path) -> str | None:
    """The target of a relative symbolic link (None: not a link, or an absolute one)."""
    try:
        target = os.readlink(path)
    except OSError:
        return None
    return None if os.path.isabs(target) else target


def _relink(path: Path, target: str) -> None:
    """Replace the link ``path`` by one to the absolute ``target``, atomically."""
    temp = path.with_name(f".{secrets.token_hex(4)}.link")
    os.symlink(target, temp)
    os.replace(temp, path)


def _abandon(folder: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        (folder / LOCK_NAME).unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()
    os.close(fd)


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    return state if isinstance(state, dict) and "name" in state and "stage" in state else None


def _listdir(folder: Path) -> list[str] | None:
    try:
        return os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()
