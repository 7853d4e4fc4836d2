"""The one place that writes files: temp file in the same folder, fsync, rename.

A reader of the destination sees either the old file or the complete new one,
never a truncated file; on any failure (a full disk included) the temp file is
removed and the destination is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from .errors import CollageError

# mkstemp creates files readable by their owner only; outputs in a shared hot folder must get
# the usual permissions (0666 minus the umask), like any file the user saves.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path``; on clean exit it replaces ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        _unlink_quietly(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise CollageError(
                "not enough disk space to write the output; free some space and run again",
                path=path,
            ) from exc
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise CollageError(
                "cannot write here (permission denied or read-only); choose another output folder",
                path=path,
            ) from exc
        raise
    except BaseException:
        _unlink_quietly(tmp)
        raise


def atomic_write(path: str | Path, write: Callable[[IO], object], mode: str = "wb") -> Path:
    """Call ``write(fh)`` on a temporary file and move it over ``path`` atomically."""
    with atomic_open(path, mode) as fh:
        write(fh)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def _fsync_dir(folder: Path) -> None:
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
