"""The PSD/PSB header: cheap checks before psd-tools reads anything.

No psd-tools here: the hot-folder watcher calls :func:`check_header` on every stable
file, to tell a half-copied file from a complete one, and needs nothing else.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CollageError, IncompleteFile, UnsupportedDocument

#: Bytes in the file header: signature, version, reserved, channels, size, depth, mode.
HEADER_BYTES = 26
#: Largest canvas side the format allows, by version (1 = PSD, 2 = PSB).
MAX_SIDE = {1: 30_000, 2: 300_000}
#: Most channels a document may have (Photoshop's limit).
MAX_CHANNELS = 56
#: Raw rows are padded to whole bytes (1-bit documents pack 8 pixels in one).
BITS_PER_BYTE = 8
#: Row-length table entries read at once while checking a PackBits merged image.
_ROW_TABLE_CHUNK = 1 << 22

_MODE_NAMES = {
    0: "Bitmap",
    1: "GRAYSCALE",
    2: "Indexed Color",
    3: "RGB",
    4: "CMYK",
    7: "Multichannel",
    8: "Duotone",
    9: "Lab Color",
}
#: Colour modes we render, by their header number -> the name the collage uses.
SUPPORTED_MODES = {1: "GRAYSCALE", 3: "RGB", 4: "CMYK"}
_MIN_CHANNELS = {1: 1, 3: 3, 4: 4}
_CONVERT_HINT = {
    0: "Image > Mode > Grayscale, then Image > Mode > RGB Color",
    2: "Image > Mode > RGB Color",
    7: "Image > Mode > RGB Color (or CMYK Color)",
    8: "Image > Mode > RGB Color",
    9: "Image > Mode > RGB Color",
}

#: What a file that is not a PSD starts with, to say what it really is.
_MAGIC = [
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"%PDF", "a PDF or Illustrator file"),
    (b"PK\x03\x04", "a ZIP archive (e.g. a Krita .kra or OpenRaster .ora file)"),
    (b"gimp xcf", "a GIMP .xcf file"),
    (b"BM", "a BMP image"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"8BIM", "a Photoshop resource file, not an image"),
]


@dataclass(frozen=True)
class Header:
    """The 26-byte file header."""

    version: int  # 1 = PSD, 2 = PSB
    channels: int
    height: int
    width: int
    depth: int
    mode: int


def check_header(path: str | Path, *, max_pixels: int | None = None) -> None:
    """Raise :class:`CollageError` unless ``path`` is a complete PSD/PSB we can render.

    Reads the header and the section lengths only (plus the merged
    image's row-length table), so the hot-folder watcher can call it on every
    stable file to tell a half-copied file from a complete one.
    """
    read_header(Path(path), max_pixels)


def document_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of a complete PSD/PSB, from its header (see :func:`check_header`)."""
    header = read_header(Path(path), None)
    return header.width, header.height


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a plain file"


def read_header(path: Path, max_pixels: int | None) -> Header:
    """The header of a complete PSD/PSB we can render; a :class:`CollageError` otherwise."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
            raise CollageError(
                f"is not a regular file (it is {_file_kind(info.st_mode)}); give a saved "
                ".psd or .psb file",
                path=path,
            )
        size = info.st_size
        with path.open("rb") as fh:
            head = fh.read(HEADER_BYTES)
            if not (head[:4] == b"8BPS" or (len(head) < 4 and b"8BPS".startswith(head))):
                raise CollageError(_not_psd_message(head, size, path.suffix), path=path)
            if (
                len(head) < HEADER_BYTES
            ):  # an empty file or a bare start: a copy that has only begun
                state = "is empty (0 bytes)" if size == 0 else f"is incomplete: only {size} bytes"
                raise IncompleteFile(
                    f"{state}; if it is still being copied wait, "
                    "otherwise save it again from Photoshop",
                    path=path,
                )
            header = Header(*struct.unpack(">4xH6xHIIHH", head))
            _check_header_fields(path, header, max_pixels)
            _check_complete(path, fh, header, size)
    except FileNotFoundError:
        raise CollageError("file not found", path=path) from None
    except IsADirectoryError:
        raise CollageError("is a folder, not a PSD file", path=path) from None
    except PermissionError:
        raise CollageError("cannot be read: permission denied", path=path) from None
    except OSError as exc:
        raise CollageError(f"cannot be read: {exc.strerror or exc}", path=path) from None
    return header


def _not_psd_message(head: bytes, size: int, suffix: str) -> str:
    """Why a file is not a PSD: what it is, by its first bytes; "renamed" only when its
    name says .psd or .psb (``pic.png`` is a PNG image, not a renamed one)."""
    if size == 0:
        return "is empty (0 bytes): it is not a Photoshop file; save it again from Photoshop"
    what = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    if what is None and head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        what = "a HEIC/AVIF image"
    if what is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        what = "a WebP image"
    if what is None and head and all(32 <= b < 127 or b in b"\t\r\n" for b in head[:16]):
        what = "a text file"
    if what is None:
        return (
            "is not a Photoshop file (no 8BPS signature); open it in Photoshop and "
            "File > Save As... Photoshop (.psd/.psb)"
        )
    if suffix.lower() in (".psd", ".psb"):
        return (
            f"is not a Photoshop file: it looks like {what} renamed to {suffix}; open it in "
            "Photoshop and File > Save As... Photoshop (.psd/.psb)"
        )
    return (
        f"is {what}, not a Photoshop file: psd-collage reads layered .psd/.psb files; open "
        "it in Photoshop, put its objects on named layers and File > Save As... Photoshop"
    )


def _damaged(path: Path, detail: str) -> CollageError:
    return CollageError(
        f"cannot be read: the file is damaged ({detail}); save it again from Photoshop",
        path=path,
    )


def _check_header_fields(path: Path, h: Header, max_pixels: int | None) -> None:
    if h.version not in (1, 2):
        raise _damaged(path, f"unknown format version {h.version}")
    limit = MAX_SIDE[h.version]
    if not (1 <= h.width <= limit and 1 <= h.height <= limit):
        raise _damaged(path, f"canvas {h.width} x {h.height} px is impossible")
    if not 1 <= h.channels <= MAX_CHANNELS:
        raise _damaged(path, f"{h.channels} channels")
    if h.mode not in SUPPORTED_MODES:
        name = _MODE_NAMES.get(h.mode)
        if name is None:
            raise _damaged(path, f"unknown colour mode {h.mode}")
        article = "an" if name[0] in "AEIOU" else "a"
        raise UnsupportedDocument(
            f"is {article} {name} document, which cannot be harmonized; convert it in Photoshop "
            f"with {_CONVERT_HINT[h.mode]} and save again",
            path=path,
        )
    if h.depth not in (8, 16, 32) or h.channels < _MIN_CHANNELS[h.mode]:
        raise _damaged(path, f"{h.depth}-bit {_MODE_NAMES[h.mode]} with {h.channels} channels")
    if max_pixels is not None and h.width * h.height > max_pixels:
        raise UnsupportedDocument(
            f"canvas {h.width} x {h.height} px ({h.width * h.height / 1e6:.1f} megapixels) "
            f"is over the limit of {max_pixels / 1e6:.3g} megapixels; reduce it with "
            "Image > Image Size, or ask whoever runs the service to raise max_pixels (an "
            "operator's setting: --max-pixels, or max_pixels in collage.toml [policy])",
            path=path,
        )


def _check_complete(path: Path, fh: Any, h: Header, size: int) -> None:
    """Walk the section lengths: a file shorter than they say is incomplete."""

    def incomplete(what: str) -> CollageError:
        return IncompleteFile(
            f"is incomplete: it ends ({size} bytes) inside its {what}; if it is still being "
            "copied wait, otherwise save it again from Photoshop",
            path=path,
        )

    offset = HEADER_BYTES
    sections = (("colour data", 4), ("image resources", 4), ("layers", 4 if h.version == 1 else 8))
    for what, width in sections:
        fh.seek(offset)
        raw = fh.read(width)
        if len(raw) < width:
            raise incomplete(what)
        offset += width + int.from_bytes(raw, "big")
        if offset > size:
            raise incomplete(what)
    fh.seek(offset)
    raw = fh.read(2)
    if len(raw) < 2:
        raise incomplete("merged image")
    compression = int.from_bytes(raw, "big")
    offset += 2
    rows = h.channels * h.height
    if compression == 0:  # raw
        offset += rows * -(-h.width * h.depth // BITS_PER_BYTE)  # rows are whole bytes
    elif compression == 1:  # PackBits: a table of row lengths, then the rows
        entry = 2 if h.version == 1 else 4
        dtype = ">u2" if entry == 2 else ">u4"
        total = 0
        remaining = rows
        while remaining:
            chunk = min(remaining, _ROW_TABLE_CHUNK)
            raw = fh.read(chunk * entry)
            if len(raw) < chunk * entry:
                raise incomplete("merged image")
            total += int(np.frombuffer(raw, dtype).sum(dtype=np.int64))
            remaining -= chunk
        offset += rows * entry + total
    elif compression not in (2, 3):  # ZIP: its length is not recorded
        raise _damaged(path, f"unknown compression {compression}")
    if offset > size:
        raise incomplete("merged image")
