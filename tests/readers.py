"""Read PSD files with readers that share no code with psd-tools (for tests).

ImageMagick (``identify`` / ``convert``) and the npm package ag-psd each parse the
layer records, names, offsets and pixels on their own, so a file they agree on is
not just "what psd-tools can read back". Every helper returns None when its tool is
missing, and the tests skip.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np

JS_DIR = Path(__file__).resolve().parent / "js"

#: Skip reasons pytest's summary shows: what is missing and how to get it.
IMAGEMAGICK_MISSING = "ImageMagick is not installed (apt-get install imagemagick; .ci/run does)"
AG_PSD_MISSING = (
    "ag-psd cannot run: needs node and npm (apt-get install nodejs npm; .ci/run does), "
    "then the tests install it into tests/js themselves"
)


def independent_readers_missing() -> str | None:
    """Why ImageMagick and ag-psd cannot both check a file, or None when they can."""
    if not imagemagick():
        return IMAGEMAGICK_MISSING
    if not ag_psd():
        return AG_PSD_MISSING
    return None


def imagemagick() -> bool:
    """True when ImageMagick's ``identify`` and ``convert`` are on PATH (not a stand-in)."""
    identify = shutil.which("identify")
    if identify is None or shutil.which("convert") is None:
        return False
    result = subprocess.run([identify, "-version"], capture_output=True, text=True)
    return "ImageMagick" in result.stdout


def identify_layers(path: Path) -> list[dict]:
    """ImageMagick's view of a PSD: one entry per image, [0] the merged image, then layers.

    ``label`` is the legacy (MacRoman Pascal) layer name, which is what ImageMagick 6
    reads; ``depth`` is the bits per channel.
    """
    result = subprocess.run(
        ["identify", "-format", "%p\t%l\t%w\t%h\t%X\t%Y\t%z\t%[colorspace]\n", str(path)],
        capture_output=True,
        check=True,
    )
    layers = []
    for line in result.stdout.decode("utf-8", "replace").splitlines():
        index, label, width, height, x, y, depth, space = line.split("\t")
        layers.append(
            {
                "index": int(index),
                "label": label,
                "width": int(width),
                "height": int(height),
                "x": int(x),
                "y": int(y),
                "depth": int(depth),
                "colorspace": space,
            }
        )
    return layers


def magick_pixels(path: Path, index: int, channels: str, depth: int) -> np.ndarray:
    """Pixels of image ``index`` as ImageMagick decodes them, (H, W, C) at ``depth``.

    ``channels`` is the raw format: "rgb", "gray" or "cmyk" (ImageMagick's CMYK is ink:
    0 = no ink, the inverse of what PSD stores).
    """
    info = identify_layers(path)[index]
    result = subprocess.run(
        [
            "convert",
            f"{path}[{index}]",
            "-alpha",
            "off",
            "-depth",
            str(depth),
            "-endian",
            "MSB",
            f"{channels}:-",
        ],
        capture_output=True,
        check=True,
    )
    dtype = {8: np.dtype("u1"), 16: np.dtype(">u2")}[depth]
    return np.frombuffer(result.stdout, dtype).reshape(info["height"], info["width"], -1)


@lru_cache(maxsize=1)
def ag_psd() -> bool:
    """True when node can run tests/js/read_psd.mjs; installs ag-psd there once if needed.

    The install needs the npm registry; where it is unreachable the tests skip.
    """
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None:
        return False
    if not (JS_DIR / "node_modules" / "ag-psd").is_dir():
        if npm is None:
            return False
        try:
            subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--silent"],
                cwd=JS_DIR,
                capture_output=True,
                timeout=180,
                check=True,
            )
        except (subprocess.SubprocessError, OSError):
            return False
    return (JS_DIR / "node_modules" / "ag-psd").is_dir()


def ag_psd_read(path: Path) -> dict:
    """The document as ag-psd reads it: header, layer tree (top-level list bottom first)."""
    result = subprocess.run(
        ["node", str(JS_DIR / "read_psd.mjs"), str(path)],
        capture_output=True,
        check=True,
        timeout=120,
    )
    return json.loads(result.stdout)


def ag_psd_pixels(pixels: dict, width: int, height: int) -> np.ndarray:
    """Decode an RGBA buffer from :func:`ag_psd_read` into (H, W, 4) of its own depth.

    ag-psd gives layers of a 16-bit document 8 bits (the high byte) and keeps the
    composite at 16; ``result.dtype`` says which.
    """
    dtype = {8: np.uint8, 16: np.uint16, 32: np.float32}[pixels["bits"]]
    return np.frombuffer(base64.b64decode(pixels["data"]), dtype).reshape(height, width, 4)
