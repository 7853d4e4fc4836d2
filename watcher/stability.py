"""When is a dropped file really dropped? Stable on disk for a window, and a readable PSD.

Copies over a network arrive in chunks, sometimes with pauses; saving from
Photoshop rewrites the file. So a file is only *ready* after its size and
mtime (and those of its sidecar) have not changed for ``window`` seconds and
its header checks out (``psd_collage.psd.header.check_header`` also checks that every
section the header announces is there). A file that is not a PSD at all (a JPEG
renamed .psd) is *rejected* (it goes to failed/) once stable. A file that is an
incomplete PSD is never rejected: a copy over Wi-Fi or VPN can stall for as long
as it likes and then resume, and a file failed meanwhile would go on growing in
failed/. It waits in the inbox; after a ``grace`` period it is reported once as
stalled (the log and the status say so), then it waits on.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from psd_collage.errors import CollageError, IncompleteFile

from .layout import fits, is_document, is_dropped, sidecar_name, waiting_reason

#: (size, mtime_ns, inode) of the document and of its sidecar (None when absent).
Signature = tuple[tuple[int, int, int], tuple[int, int, int] | None]


@dataclass
class Candidate:
    """A document seen in the inbox and what is known about it."""

    name: str
    signature: Signature
    changed_at: float  # monotonic time the signature last changed (or first seen)
    mtime: float  # the document's mtime (wall clock) at the last change
    header_error: CollageError | None = None
    header_checked: Signature | None = None
    failing_since: float | None = None  # monotonic, first failed header check while stable
    stalled: bool = False  # incomplete for longer than the grace: reported once
    ready_at: float | None = None  # wall clock, when found ready


class StabilityTracker:
    """Tracks the inbox's documents between scans; the service asks what is ready.

    Only regular files are candidates. A FIFO, a device or a folder named ``.psd``,
    and a symbolic link that leads out of ``root``, are refused: reported once (in
    ``newly_refused``) and left where they are; they are never opened, so a FIFO
    cannot block the watcher and a link cannot bring a file from elsewhere in.
    """

    def __init__(
        self,
        inbox: Path,
        window: float,
        header_check: Callable[[Path], object],
        *,
        wall_clock: Callable[[], float],
        grace: float | None = None,
        root: Path | None = None,
    ) -> None:
        self.inbox = inbox
        self.root = (root or inbox).resolve()
        self.window = window
        self.grace = window if grace is None else grace
        self._check = header_check
        self._wall = wall_clock
        self.candidates: dict[str, Candidate] = {}
        self.ignored: set[str] = set()  # names logged once as waiting (see layout.waiting_reason)
        self.newly_ignored: list[str] = []
        self.waiting: dict[str, str] = {}  # name -> why it stays in the inbox (not a job)
        self.refused: dict[str, str] = {}  # name -> why it is left alone (logged once)
        self.newly_refused: list[tuple[str, str]] = []
        self.newly_seen: list[Candidate] = []  # for the log: "found X"
        self.newly_failing: list[Candidate] = []  # for the log: "X does not read as a PSD yet"
        self.newly_stalled: list[Candidate] = []  # for the log: "X is still incomplete"

    def scan(self, now: float) -> None:
        """Look at the inbox once (``now``: monotonic seconds)."""
        try:
            entries = {e.name: e for e in os.scandir(self.inbox)}
        except FileNotFoundError:
            entries = {}
        seen = set()
        self.waiting = {}
        for name, entry in entries.items():
            if not is_dropped(name):
                why = waiting_reason(name, entries)
                if why is not None:
                    self.waiting[name] = why
                if why is not None and name not in self.ignored:
                    self.ignored.add(name)
                    self.newly_ignored.append(name)
                continue
            try:
                refusal = self._refusal(entry)
                if refusal is not None:
                    if self.refused.get(name) != refusal:
                        self.refused[name] = refusal
                        self.newly_refused.append((name, refusal))
                    continue
                signature = (_sig(entry.stat()), _sidecar_sig(self.inbox / sidecar_name(name)))
            except FileNotFoundError:
                continue  # claimed by someone else between listing and stat
            seen.add(name)
            known = self.candidates.get(name)
            if known is None:
                cand = Candidate(name, signature, now, signature[0][1] / 1e9)
                self.candidates[name] = cand
                self.newly_seen.append(cand)
            elif known.signature != signature:
                known.signature = signature
                known.changed_at = now
                known.mtime = signature[0][1] / 1e9
                known.failing_since = None
                known.stalled = False
                known.ready_at = None
        for name in list(self.candidates):
            if name not in seen:
                del self.candidates[name]
        self.ignored &= set(entries)  # a name that comes back is logged again
        for name in set(self.refused) - set(entries):
            del self.refused[name]

    def _refusal(self, entry: os.DirEntry) -> str | None:
        """Why this inbox entry is not a candidate (None: a regular file we may take)."""
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if not _inside(Path(target), self.root):
                return "it is a link to a file outside the hot folder; copy the file itself in"
        mode = os.stat(entry.path).st_mode  # follows a link that stays inside ROOT
        if stat.S_ISREG(mode):
            return None
        kind = (
            "a folder"
            if stat.S_ISDIR(mode)
            else "a FIFO"
            if stat.S_ISFIFO(mode)
            else "not a regular file (a device or socket)"
        )
        return f"it is {kind}, not a file"

    def settle(self, now: float) -> tuple[list[Candidate], list[Candidate]]:
        """Return (ready, rejected) documents, oldest first; run header checks as needed."""
        ready, rejected = [], []
        for cand in sorted(self.candidates.values(), key=lambda c: (c.changed_at, c.name)):
            if now - cand.changed_at < self.window:
                continue
            if cand.header_checked != cand.signature or cand.header_error is not None:
                cand.header_error = self._header(cand.name)
                cand.header_checked = cand.signature
            if cand.header_error is None:
                if cand.ready_at is None:
                    cand.ready_at = self._wall()
                ready.append(cand)
            elif not isinstance(cand.header_error, IncompleteFile):
                rejected.append(cand)  # stable and not a PSD we can render: no use waiting
            elif cand.failing_since is None:
                cand.failing_since = now
                self.newly_failing.append(cand)
            elif now - cand.failing_since >= self.grace and not cand.stalled:
                cand.stalled = True  # it may resume: never failed, only reported
                self.newly_stalled.append(cand)
        return ready, rejected

    def next_deadline(self, now: float) -> float | None:
        """Seconds until a candidate may change state (for the main loop's sleep)."""
        waits = []
        for c in self.candidates.values():
            if c.ready_at is not None or c.stalled:
                continue
            if c.failing_since is not None:
                waits.append(max(0.0, c.failing_since + self.grace - now))
            else:
                waits.append(max(0.0, c.changed_at + self.window - now))
        return min(waits) if waits else None

    def forget(self, names: Iterable[str]) -> None:
        for name in names:
            self.candidates.pop(name, None)

    def _header(self, name: str) -> CollageError | None:
        if not is_document(name):
            return not_a_document(name)
        try:
            self._check(self.inbox / name)
        except CollageError as exc:
            return exc
        except OSError as exc:
            return CollageError(f"cannot read the file: {exc.strerror}", path=name)
        return None


def not_a_document(name: str) -> CollageError:
    """The error of a dropped file that is not a .psd/.psb: it goes to failed/ like any bad
    file, so that every drop is accounted for."""
    suffix = Path(name).suffix.lower()
    what = f"a {suffix} file" if suffix else "a file without a name ending"
    return CollageError(
        f"is {what}, not a Photoshop document (only .psd and .psb files are harmonized); "
        "open it in Photoshop and File > Save As... Photoshop (.psd), then drop that file",
        path=name,
    )


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def is_outside(path: Path, root: Path) -> bool:
    """True when ``path`` (following links) leads out of ``root``: never read it."""
    return not _inside(Path(os.path.realpath(path)), Path(os.path.realpath(root)))


def _sig(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _sidecar_sig(path: Path) -> tuple[int, int, int] | None:
    if not fits(path.name):
        return None  # ENAMETOOLONG: a document with a name this long has no sidecar
    try:
        return _sig(path.stat())
    except (FileNotFoundError, NotADirectoryError):
        return None
