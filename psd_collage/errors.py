"""Errors a user can act on.

Every problem caused by the input (a bad file, a bad tag, a bad sidecar, a full
disk) is a :class:`CollageError`: the CLI prints its one-line message after
``error:`` and exits with status 2. Anything else is a bug and exits 1.
"""

from __future__ import annotations

import re
from pathlib import Path

# C0/C1 control characters (ESC starts terminal escape sequences) and the bidirectional
# overrides that make text read differently from what it is.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def terminal_safe(text: str) -> str:
    """``text`` with control characters escaped (``\\x1b``), safe to print on a terminal.

    Layer names come from the file: a name holding an escape sequence must not be able
    to rewrite the user's screen. Line breaks and tabs become spaces.
    """

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        if char in "\t\n\r":
            return " "
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _UNSAFE.sub(escape, text)


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 variant``, ``2 variants`` (``nouns`` where adding an s is wrong)."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


class CollageError(Exception):
    """A problem with the user's input, with a one-line message that says what to do."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.detail = message
        text = f"{self.path}: {message}" if self.path is not None else message
        super().__init__(" ".join(terminal_safe(text).split()))  # always one line, printable


class IncompleteFile(CollageError):
    """A PSD that ends before its sections say it should: still being copied, or truncated."""


class TagError(CollageError):
    """A bad tag in a layer name or a bad per-layer sidecar entry."""


class SettingsError(CollageError):
    """A bad sidecar / folder default / CLI setting."""


class UnsupportedDocument(CollageError):
    """A PSD we can read but cannot render (colour mode, size, no layers)."""


class ModelError(CollageError):
    """A model that cannot be found or loaded."""


class Cancelled(Exception):
    """Raised inside a render when the caller's cancel callback returned True."""
