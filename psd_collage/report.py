"""What ``psd-collage inspect`` shows: how we understood a PSD, before any rendering.

Three forms of the same facts: :func:`inspect_data` (the ``--json`` object),
:func:`format_table` (a table a designer can read) and :func:`write_sheet` (a
PNG contact sheet: the flattened collage, each layer's visible mask and the
noise map the sampler will use).
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import masks
from .atomic import atomic_write
from .collage import Collage, to_u8

#: Longest side of a contact-sheet tile, in pixels.
TILE = 256
_LABEL_HEIGHT = 28
_GAP = 8
_COLUMNS = 4
_BACKGROUND = (32, 32, 32)
_TEXT = (235, 235, 235)
_DIM = (150, 150, 150)

#: A perceptual ramp (viridis anchors) for the noise heat map: dark = kept, yellow = repainted.
_RAMP = np.array(
    [
        [68, 1, 84],
        [59, 82, 139],
        [33, 145, 140],
        [94, 201, 98],
        [253, 231, 37],
    ],
    np.float32,
)


def inspect_data(collage: Collage) -> dict[str, Any]:
    """The ``--json`` object: document, layers back to front, warnings."""
    doc = collage.document
    document: dict[str, Any] = {
        "width": doc.width,
        "height": doc.height,
        "color_mode": doc.color_mode,
        "depth": doc.depth,
        "prompt": collage.prompt,
        "negative_prompt": collage.negative_prompt,
        "psb": doc.psb,
        "base": None
        if collage.base is None
        else {"layer": collage.base.layer, "group": collage.base.group},
    }
    layers = [
        {
            "name": layer.name,
            "caption": layer.caption,
            "noise": round(float(layer.noise), 4),
            "visible_area": round(float(layer.visible_area), 6),
            "locked": layer.locked,
            "sources": list(layer.sources),
            "steered": layer.steered,
            "redo": layer.redo,
            "box": list(layer.box),
            "options": layer.options.as_dict(),
        }
        for layer in collage.layers
    ]
    return {"document": document, "layers": layers, "warnings": list(collage.warnings)}


def format_table(collage: Collage) -> str:
    """Readable ``inspect`` output: the document, one row per layer, then warnings."""
    doc = collage.document
    kind = "PSB" if doc.psb else "PSD"
    lines = [
        f"{doc.path.name}: {doc.width} x {doc.height} px, {doc.color_mode} {doc.depth}-bit {kind}",
        f"prompt:   {collage.prompt or '(none)'}",
        f"negative: {collage.negative_prompt or '(none)'}",
    ]
    if collage.base is not None:
        lines.append(f"editing:  {collage.base.group} / {collage.base.layer}")
    lines.append("")
    header = ["#", "layer", "caption", "noise", "area", "lock", "steered"]
    rows = [
        [
            str(index),
            _shorten(layer.name, 32),
            _shorten(layer.caption, 32) or "-",
            f"{layer.noise:.2f}",
            f"{layer.visible_area * 100:.1f}%",
            "yes" if layer.locked else "",
            "yes" if layer.steered else "no",
        ]
        for index, layer in enumerate(collage.layers, start=1)
    ]
    right_aligned = {0, 3, 4}
    widths = [max(_width(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [_pad(cell, widths[i], right=i in right_aligned) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    if not rows:
        lines.append("(no collage layers)")
    lines.append("(layers back to front; area = visible share of the canvas)")
    if collage.warnings:
        lines.append("")
        lines.append(f"warnings ({len(collage.warnings)}):")
        lines.extend(f"  - {warning}" for warning in collage.warnings)
    return "\n".join(lines)


def write_sheet(collage: Collage, path: Path) -> Path:
    """Write the contact sheet PNG (atomically) and return its path."""
    path = Path(path)
    size = collage.document.size
    scale = min(1.0, TILE / max(size))
    tile_size = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))

    tiles: list[tuple[Image.Image, str, str]] = []
    start = Image.fromarray(masks.start_image(collage)).resize(
        tile_size, Image.Resampling.LANCZOS, reducing_gap=3.0
    )
    tiles.append((start, "collage", "editing base" if collage.editing else "flattened"))
    for layer in collage.layers:
        label = layer.caption or f"({layer.name})"
        detail = f"noise {layer.noise:.2f} · {layer.visible_area * 100:.1f}%"
        if not layer.steered:
            detail += " · not steered"
        tiles.append((_mask_tile(layer, scale, tile_size), label, detail))
    noise = masks.strength_map(masks.noise_map(collage), tile_size)
    tiles.append((_heat_tile(noise), "noise map", "0 kept, 1 repainted"))

    sheet = _layout(tiles, tile_size, title=_sheet_title(collage))
    atomic_write(path, lambda fh: sheet.save(fh, format="PNG"))
    return path


# ---------------------------------------------------------------------------
# Sheet pieces
# ---------------------------------------------------------------------------


def _mask_tile(layer: Any, scale: float, tile_size: tuple[int, int]) -> Image.Image:
    """The layer's visible mask, white on black, placed from its box (no full canvas)."""
    canvas = Image.new("L", tile_size, 0)
    if layer.visible is None:
        return canvas.convert("RGB")
    left, top, right, bottom = layer.box
    x0, y0 = round(left * scale), round(top * scale)
    x1, y1 = max(x0 + 1, round(right * scale)), max(y0 + 1, round(bottom * scale))
    crop = Image.fromarray(to_u8(layer.visible))
    canvas.paste(crop.resize((x1 - x0, y1 - y0), Image.Resampling.BOX), (x0, y0))
    return canvas.convert("RGB")


def _heat(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 along :data:`_RAMP`."""
    position = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    frac = (position - low)[..., None]
    rgb = _RAMP[low] * (1.0 - frac) + _RAMP[low + 1] * frac
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def _heat_tile(noise: np.ndarray) -> Image.Image:
    """The noise map as a heat map, with a 0..1 colour bar along its bottom edge."""
    image = Image.fromarray(_heat(noise))
    width, height = image.size
    bar_height = max(6, height // 16)
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :].repeat(bar_height, axis=0)
    image.paste(Image.fromarray(_heat(ramp)), (0, height - bar_height))
    draw = ImageDraw.Draw(image)
    font = _font(10)
    draw.text((2, height - bar_height - 12), "0", fill=_TEXT, font=font)
    draw.text((width - 10, height - bar_height - 12), "1", fill=_TEXT, font=font)
    return image


def _layout(
    tiles: list[tuple[Image.Image, str, str]], tile_size: tuple[int, int], *, title: str
) -> Image.Image:
    columns = min(_COLUMNS, len(tiles))
    rows = -(-len(tiles) // columns)
    cell_w, cell_h = tile_size[0] + _GAP, tile_size[1] + _LABEL_HEIGHT + _GAP
    title_h = 24
    sheet = Image.new("RGB", (columns * cell_w + _GAP, title_h + rows * cell_h + _GAP), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((_GAP, 6), _fit(draw, title, sheet.width - 2 * _GAP, 12), fill=_TEXT, font=_font(12))
    for index, (image, label, detail) in enumerate(tiles):
        x = _GAP + (index % columns) * cell_w
        y = title_h + (index // columns) * cell_h
        sheet.paste(image, (x, y))
        draw.text(
            (x, y + tile_size[1] + 2),
            _fit(draw, label, tile_size[0], 12),
            fill=_TEXT,
            font=_font(12),
        )
        draw.text(
            (x, y + tile_size[1] + 15),
            _fit(draw, detail, tile_size[0], 10),
            fill=_DIM,
            font=_font(10),
        )
    return sheet


def _sheet_title(collage: Collage) -> str:
    doc = collage.document
    prompt = collage.prompt or "(no prompt)"
    return f"{doc.path.name} · {doc.width}x{doc.height} · {prompt}"


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, size: int) -> str:
    """Shorten ``text`` with an ellipsis until it fits ``width`` pixels."""
    font = _font(size)
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


# ---------------------------------------------------------------------------
# Table helpers: terminal width of CJK and emoji names
# ---------------------------------------------------------------------------


def _width(text: str) -> int:
    """Terminal columns: wide (CJK, emoji) characters take two, combining marks none."""
    total = 0
    for char in text:
        if unicodedata.combining(char):
            continue
        total += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return total


def _pad(text: str, width: int, *, right: bool = False) -> str:
    space = " " * (width - _width(text))
    return space + text if right else text + space


def _shorten(text: str, limit: int) -> str:
    if _width(text) <= limit:
        return text
    out = ""
    for char in text:
        if _width(out + char) > limit - 1:
            break
        out += char
    return out + "…"
