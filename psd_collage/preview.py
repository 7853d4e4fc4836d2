"""The preview PNG: source and variants side by side, each named underneath ("input",
"seed 7"), to browse results without Photoshop and know which layer to keep."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import masks
from .atomic import atomic_write
from .collage import to_u8
from .geometry import resize_rgb

#: Height of the preview's tiles in pixels.
PREVIEW_HEIGHT = 384
#: White pixels between two tiles.
TILE_GAP = 8
#: The white strip under the tiles that holds their names.
LABEL_HEIGHT = 28
#: Name of the first tile, the picture the render started from.
INPUT_LABEL = "input"


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
    *,
    names: Sequence[str],
) -> Path:
    """Source and variants side by side, so results can be browsed without Photoshop.

    The variants show what the PSD layers hold: pinned pixels pasted back from the source.
    ``names`` label the variants as their layers are named (``seed 7``).
    """
    doc_h, doc_w = source.shape[:2]
    size = (max(1, round(doc_w * height / doc_h)), height)
    base = resize_rgb(source, size)
    weight = masks.resize_map(pin, size)[..., None] if pin is not None else 0.0
    tiles = [base] + [resize_rgb(to_u8(v), size) * (1 - weight) + base * weight for v in variants]
    sheet = contact_sheet([to_u8(tile) for tile in tiles], [INPUT_LABEL, *names])
    return atomic_write(path, lambda fh: sheet.save(fh, format="PNG"))


def contact_sheet(tiles: Sequence[np.ndarray], labels: Sequence[str]) -> Image.Image:
    """Equal-height uint8 RGB ``tiles`` in a row on white, each with its label centred
    in a strip underneath (the preview and the shapes demo's figure)."""
    if len(tiles) != len(labels):
        raise ValueError(f"{len(tiles)} tiles but {len(labels)} labels")
    height = tiles[0].shape[0]
    width = sum(tile.shape[1] for tile in tiles) + TILE_GAP * (len(tiles) - 1)
    sheet = Image.new("RGB", (width, height + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(sheet)
    font = _label_font(LABEL_HEIGHT * 2 // 3)
    left = 0
    for tile, label in zip(tiles, labels, strict=True):
        sheet.paste(Image.fromarray(tile, "RGB"), (left, 0))
        x0, y0, x1, y1 = draw.textbbox((0, 0), label, font=font)  # centred by hand: the
        x = left + (tile.shape[1] - (x1 - x0)) / 2 - x0  # bitmap fallback font has no anchors
        y = height + (LABEL_HEIGHT - (y1 - y0)) / 2 - y0
        draw.text((x, y), label, fill=(40, 40, 40), font=font)
        left += tile.shape[1] + TILE_GAP
    return sheet


def _label_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size`` px; its small bitmap font without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except ImportError:
        return ImageFont.load_default()
