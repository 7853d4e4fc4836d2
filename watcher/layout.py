"""The hot folder's layout on disk and its naming rules.

Everything that decides *where* a file goes lives here, so the service, the
crash recovery and the tests agree on one set of names.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from psd_collage.errors import CollageError

#: Documents the watcher takes (compared case-insensitively).
DOCUMENT_SUFFIXES = (".psd", ".psb")
#: A per-file sidecar is the document's full name plus this suffix: ``poster.psd.toml``.
SIDECAR_SUFFIX = ".toml"
FOLDERS = ("inbox", "work", "done", "failed", "originals")
#: Most bytes in one file name on the file systems we run on (ext4, APFS, NTFS: 255).
MAX_NAME_BYTES = 255
#: The longest suffix a job's outputs get (``.preview.png``) plus a clash number `` (9999)``.
_OUTPUT_RESERVE = len(".preview.png") + len(" (9999)")
#: Files the system writes into folders by itself: never a designer's drop.
SYSTEM_FILES = ("thumbs.db", "desktop.ini", "icon\r")
#: Name endings of downloads and copies in progress: they are renamed when complete.
IN_PROGRESS_SUFFIXES = (".part", ".partial", ".crdownload", ".download", ".tmp", ".filepart")


@dataclass(frozen=True)
class Layout:
    """``ROOT/{inbox,work,done,failed,originals}`` plus the files the service keeps in ROOT."""

    root: Path

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def done(self) -> Path:
        return self.root / "done"

    @property
    def failed(self) -> Path:
        return self.root / "failed"

    @property
    def originals(self) -> Path:
        return self.root / "originals"

    @property
    def status_file(self) -> Path:
        return self.root / "status.json"

    @property
    def log_file(self) -> Path:
        return self.root / "watch.log"

    @property
    def defaults_file(self) -> Path:
        return self.root / "collage.toml"

    @classmethod
    def create(cls, root: str | Path) -> Layout:
        """Make ROOT (if its parent exists) and its sub-folders; a bad ROOT is a user error."""
        root = Path(root).expanduser().absolute()
        if root.exists() and not root.is_dir():
            raise CollageError("is a file, not a folder: give the hot folder's path", path=root)
        if not root.exists() and not root.parent.is_dir():
            raise CollageError(
                "the folder above it does not exist: check the path or create it first",
                path=root,
            )
        layout = cls(root)
        try:
            for folder in (root, *(root / name for name in FOLDERS)):
                folder.mkdir(exist_ok=True)
            probe = root / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except FileExistsError as exc:
            raise CollageError(
                f"{Path(exc.filename).name} exists but is not a folder: rename or remove it",
                path=root,
            ) from None
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise CollageError(
                    "cannot write here (permission denied or read-only): choose a folder you can write to",
                    path=root,
                ) from None
            raise CollageError(f"cannot set up the hot folder: {exc.strerror}", path=root) from None
        return layout


def is_document(name: str) -> bool:
    """A PSD/PSB the watcher should take; hidden files (``._x.psd`` from macOS) are not."""
    return not name.startswith(".") and name.lower().endswith(DOCUMENT_SUFFIXES)


def is_sidecar(name: str) -> bool:
    """``poster.psd.toml``: travels with its document, never a job of its own."""
    return name.lower().endswith(SIDECAR_SUFFIX) and is_document(name[: -len(SIDECAR_SUFFIX)])


def sidecar_name(document: str) -> str:
    return document + SIDECAR_SUFFIX


def is_dropped(name: str) -> bool:
    """Any file a designer dropped that the watcher must account for (done/ or failed/):
    documents, and every other non-hidden file but sidecars, system files and copies
    still in progress (see :func:`waiting_reason`)."""
    return is_document(name) or (
        not name.startswith((".", "~$"))
        and not is_sidecar(name)
        and name.lower() not in SYSTEM_FILES
        and not name.lower().endswith(IN_PROGRESS_SUFFIXES)
    )


def waiting_reason(name: str, present: Iterable[str]) -> str | None:
    """Why an inbox file that is not a job of its own stays there, or None (ignored)."""
    lower = name.lower()
    if name.startswith(".") or lower in SYSTEM_FILES:
        return None
    if lower.endswith(IN_PROGRESS_SUFFIXES):
        return "a download or copy still in progress: it is taken once renamed to .psd"
    if is_sidecar(name) and name[: -len(SIDECAR_SUFFIX)] not in set(present):
        return f"a sidecar waiting for its document {name[: -len(SIDECAR_SUFFIX)]}"
    return None


def output_stem(name: str) -> str:
    """The stem a job's outputs are named with, cut (on a character boundary) so that the
    longest output name still fits in :data:`MAX_NAME_BYTES`: a designer's 250-character
    name must not make ``NAME.error.txt`` impossible to create."""
    return shorten(Path(name).stem, MAX_NAME_BYTES - _OUTPUT_RESERVE)


def shorten(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8, on a character boundary."""
    data = text.encode("utf-8", "surrogateescape")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", "ignore").rstrip() or "document"


def upload_name(name: str) -> str:
    """An uploaded document's name, shortened so that it, its sidecar and a clash number
    (``poster (2).psd.toml``) all fit in a file name."""
    suffix = Path(name).suffix
    reserve = len(suffix) + len(SIDECAR_SUFFIX) + len(" (9999)")
    return shorten(Path(name).stem, MAX_NAME_BYTES - reserve) + suffix


def output_name(name: str) -> str:
    """The name a job renders into inside ``work/<id>/out/`` (and its preview beside it)."""
    return output_stem(name) + Path(name).suffix


def sidecar_in(folder: Path, name: str) -> Path | None:
    """``folder/NAME.psd.toml`` when it exists; None too when no such name can exist."""
    if not fits(sidecar_name(name)):
        return None
    path = folder / sidecar_name(name)
    return path if path.is_file() else None


def fits(name: str) -> bool:
    """Whether ``name`` is short enough to be a file name (ENAMETOOLONG otherwise)."""
    return len(name.encode("utf-8", "surrogateescape")) <= MAX_NAME_BYTES


def numbered(stem: str, n: int) -> str:
    """``poster``, 1 -> ``poster``; ``poster``, 2 -> ``poster (2)``."""
    return stem if n <= 1 else f"{stem} ({n})"


def free_stem(stem: str, targets: Iterable[tuple[Path, str]], start: int = 1) -> str:
    """The first of ``stem``, ``stem (2)``, ... for which no ``folder / (s + suffix)`` exists.

    One stem for all of a job's files (PSD, preview, error text, sidecar), so that
    ``poster (2).psd`` and ``poster (2).error.txt`` always belong together.
    """
    targets = list(targets)
    n = start
    while True:
        candidate = numbered(stem, n)
        if not any(os.path.lexists(folder / (candidate + suffix)) for folder, suffix in targets):
            return candidate
        n += 1
