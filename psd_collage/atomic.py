"""The one place that writes files: temp file in the same folder, fsync, rename.

A reader of the destination sees either the old file or the complete new one,
never a truncated file; on any failure (a full disk included) the temp file is
removed and the destination is untouched. A file that is replaced keeps its
permission bits and owner; a symbolic link at the destination is replaced by the
new file, never written through (its target stays as it was). Temporary files a
crashed run left behind are removed the next time the same file is written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from .errors import CollageError

# mkstemp creates files readable by their owner only; outputs in a shared hot folder must get
# the usual permissions (0666 minus the umask), like any file the user saves.
_UMASK = os.umask(0)
os.umask(_UMASK)

#: Temporary files older than this are stale whoever wrote them (another machine on a share).
STALE_AFTER_S = 24 * 3600
_HOST = socket.gethostname().replace(".", "_")[:32] or "host"


#: Bytes of the target's name kept in a temporary name: the host, pid, random part and
#: ``.tmp`` must still fit in a 255-byte file name when the target's own name is long.
_TEMP_NAME_BYTES = 160


def temp_prefix(path: Path) -> str:
    """``.NAME.`` : the hidden prefix of every temporary sibling of ``path`` (NAME cut to
    fit, on a character boundary)."""
    name = path.name.encode("utf-8", "surrogateescape")[:_TEMP_NAME_BYTES]
    return f".{name.decode('utf-8', 'ignore')}."


@contextlib.contextmanager
def atomic_open(
    path: str | Path, mode: str = "wb", *, like: str | Path | None = None
) -> Iterator[IO]:
    """Open a temporary sibling of ``path``; on clean exit it replaces ``path``.

    The new file gets the mode bits and owner of ``like`` (default: the file it
    replaces, when there is one), else the usual 0666 minus the umask.
    """
    path = Path(path)
    template = _existing_regular(Path(like) if like is not None else path)
    remove_stale_temps(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f"{temp_prefix(path)}{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent
        )
        _copy_mode_and_owner(fd, template)
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        error = write_error(exc, path)
        if error is None:
            raise
        raise error from exc
    finally:
        if tmp is not None:
            _unlink_quietly(tmp)


def write_error(exc: OSError, path: Path) -> CollageError | None:
    """An OS error while writing ``path`` as one line that says what to do (None: no errno)."""
    number = exc.errno
    if number in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return CollageError(
            "not enough disk space to write the output; free some space and run again", path=path
        )
    if number in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CollageError(
            "cannot write here (permission denied or read-only); choose another output folder",
            path=path,
        )
    if number == errno.EISDIR:
        return CollageError("is a folder; name an output file such as out.psd", path=path)
    if number is not None:
        reason = exc.strerror or os.strerror(number)
        return CollageError(f"cannot write here ({reason}); choose another output", path=path)
    return None


def atomic_write(
    path: str | Path,
    write: Callable[[IO], object],
    mode: str = "wb",
    *,
    like: str | Path | None = None,
) -> Path:
    """Call ``write(fh)`` on a temporary file and move it over ``path`` atomically."""
    with atomic_open(path, mode, like=like) as fh:
        write(fh)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def remove_stale_temps(path: str | Path, *, now: float | None = None) -> list[Path]:
    """Remove temporary siblings of ``path`` that a crashed run left behind.

    One is stale when the process on this machine that made it is gone, or when it
    has not changed for :data:`STALE_AFTER_S` (a writer on another machine).
    """
    path = Path(path)
    now = time.time() if now is None else now
    removed = []
    try:
        candidates = list(path.parent.glob(f"{_glob_escape(temp_prefix(path))}*.tmp"))
    except OSError:
        return removed
    for candidate in candidates:
        writer = candidate.name[len(temp_prefix(path)) :].split(".", 1)[0]
        host, _, pid = writer.rpartition("-")
        try:
            age = now - candidate.lstat().st_mtime
        except OSError:
            continue
        gone = host == _HOST and pid.isdigit() and not _alive(int(pid))
        if gone or age > STALE_AFTER_S:
            with contextlib.suppress(OSError):
                candidate.unlink()
                removed.append(candidate)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _existing_regular(path: Path) -> os.stat_result | None:
    """The stat of the regular file at ``path`` (following a link), or None."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info if stat.S_ISREG(info.st_mode) else None


def _copy_mode_and_owner(fd: int, template: os.stat_result | None) -> None:
    if template is None:
        os.fchmod(fd, 0o666 & ~_UMASK)
        return
    with contextlib.suppress(OSError):  # only root may give a file away: keep ours then
        os.fchown(fd, template.st_uid, template.st_gid)
    os.fchmod(fd, stat.S_IMODE(template.st_mode))


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
