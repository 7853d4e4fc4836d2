"""The preview PNG: source and variants side by side, to browse results without Photoshop."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from . import masks
from .atomic import atomic_write
from .collage import to_u8
from .geometry import resize_rgb

#: Height of the preview's tiles in pixels.
PREVIEW_HEIGHT = 384
#: White pixels between two tiles.
TILE_GAP = 8


def preview_path(output: Path) -> Path:
    """``poster.harmonized.psd`` -> ``poster.harmonized.preview.png``."""
    return output.with_suffix(".preview.png")


def preview_source(image: np.ndarray, height: int = PREVIEW_HEIGHT) -> np.ndarray:
    """The source picture shrunk to preview height now, so the full-size one can be freed."""
    pil = Image.fromarray(image, "RGB")
    width = max(1, round(pil.width * height / pil.height))
    return np.asarray(pil.resize((width, height), Image.Resampling.LANCZOS))


def write_preview(
    path: Path,
    source: np.ndarray,
    variants: Sequence[np.ndarray],
    pin: np.ndarray | None = None,
    height: int = PREVIEW_HEIGHT,
) -> Path:
    """Source and variants side by side, so results can be browsed without Photoshop.

    The variants show what the PSD layers hold: pinned pixels pasted back from the source.
    """
    doc_h, doc_w = source.shape[:2]
    size = (max(1, round(doc_w * height / doc_h)), height)
    base = resize_rgb(source, size)
    weight = masks.resize_map(pin, size)[..., None] if pin is not None else 0.0
    tiles = [base] + [resize_rgb(to_u8(v), size) * (1 - weight) + base * weight for v in variants]
    sheet = Image.new("RGB", (len(tiles) * (size[0] + TILE_GAP) - TILE_GAP, height), "white")
    for k, tile in enumerate(tiles):
        sheet.paste(Image.fromarray(to_u8(tile), "RGB"), (k * (size[0] + TILE_GAP), 0))
    return atomic_write(path, lambda fh: sheet.save(fh, format="PNG"))
