"""What ``psd-collage inspect`` shows: how we understood a PSD, before any rendering.

Three forms of the same facts: :func:`inspect_data` (the ``--json`` object),
:func:`format_table` (a table a designer can read) and :func:`write_sheet` (a
PNG contact sheet: the flattened collage, each layer's visible mask and the
noise map the sampler will use).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import masks
from .atomic import atomic_write
from .collage import Collage, CollageLayer, to_u8
from .errors import plural, terminal_safe
from .prompt_check import PromptCheck
from .settings import Settings

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


def layer_noise(collage: Collage, layer: CollageLayer) -> tuple[float, str]:
    """The noise a render gives ``layer`` and where it comes from, as ``inspect`` shows it."""
    if collage.editing and not layer.redo:
        return 0.0, "kept: editing, not [redo]"
    if layer.locked and layer.noise_source == "default":
        return 0.0, "lock"
    return float(layer.noise), layer.noise_source


def inspect_data(
    collage: Collage, settings: Settings | None = None, check: PromptCheck | None = None
) -> dict[str, Any]:
    """The ``--json`` object: document, layers back to front, earlier renders, warnings.

    ``check`` (the model's tokenizers' view, :mod:`psd_collage.prompt_check`) adds the
    prompt's tokens, the captions past the model's window and their warnings.
    """
    settings = settings or Settings()
    check = check or PromptCheck(sampled=collage.final_prompt)
    doc = collage.document
    document: dict[str, Any] = {
        "width": doc.width,
        "height": doc.height,
        "color_mode": doc.color_mode,
        "depth": doc.depth,
        "prompt": collage.prompt,
        "final_prompt": check.sampled,
        "tokens": check.as_dict(),
        "negative_prompt": collage.negative_prompt,
        "psb": doc.psb,
        "base": None
        if collage.base is None
        else {"layer": collage.base.layer, "group": collage.base.group},
        "left_by_redo": left_by_redo(collage),
    }
    layers = []
    for layer in collage.layers:
        noise, source = layer_noise(collage, layer)
        layers.append(
            {
                "name": layer.name,
                "caption": layer.caption,
                "noise": round(noise, 4),
                "noise_source": source,
                "visible_area": round(float(layer.visible_area), 6),
                "locked": layer.locked,
                "sources": list(layer.sources),
                "steered": layer.steered and check.steered(layer.caption),
                "redo": layer.redo,
                "ti": layer.uses_ti(settings.ti),
                "box": list(layer.box),
                "options": layer.options.as_dict(),
            }
        )
    renders = [
        {"group": group, "settings": collage.renders.get(group)} for group in collage.earlier_groups
    ]
    return {
        "document": document,
        "layers": layers,
        "renders": renders,
        "warnings": [*collage.warnings, *check.warnings],
    }


#: Widest a name or caption cell gets before it wraps onto more lines (never cut).
NAME_COLUMNS = 32


def format_table(
    collage: Collage, settings: Settings | None = None, check: PromptCheck | None = None
) -> str:
    """Readable ``inspect`` output: document, prompts, layers, earlier renders, warnings.

    Long names wrap inside their column; nothing is cut, so no tag is ever hidden.
    Control characters in names are escaped. ``check`` as in :func:`inspect_data`.
    """
    settings = settings or Settings()
    check = check or PromptCheck(sampled=collage.final_prompt)
    doc = collage.document
    kind = "PSB" if doc.psb else "PSD"
    appended = "  (captions it lacks appended)" if check.sampled != collage.prompt else ""
    lines = [
        f"{doc.path.name}: {doc.width} x {doc.height} px, {doc.color_mode} {doc.depth}-bit {kind}",
        f"prompt:   {collage.prompt or '(none)'}",
        f"sampled:  {check.sampled or '(none)'}{appended}",
        *_token_lines(check, settings.model),
        f"negative: {collage.negative_prompt or '(none)'}",
    ]
    if collage.base is not None:
        lines.append(f"editing:  {collage.base.group} / {collage.base.layer}")
    lines.extend(_moved_lines(collage))
    lines.append("")
    header = ["#", "layer", "caption", "noise", "from", "area", "redo", "ti", "steered"]
    rows = []
    for index, layer in enumerate(collage.layers, start=1):
        noise, source = layer_noise(collage, layer)
        rows.append(
            [
                str(index),
                terminal_safe(layer.name),
                terminal_safe(layer.caption) or "-",
                f"{noise:.2f}",
                source,
                f"{layer.visible_area * 100:.1f}%",
                "yes" if layer.redo else "",
                "yes" if layer.uses_ti(settings.ti) else "",
                _steered_cell(layer, check),
            ]
        )
    lines.extend(
        _table(header, rows, right_aligned={0, 3, 5}, wrap={1: NAME_COLUMNS, 2: NAME_COLUMNS})
    )
    if not rows:
        lines.append("(no collage layers)")
    lines.append("(layers back to front; area = visible share of the canvas)")
    if collage.earlier_groups:
        lines.append("")
        lines.append(f"earlier renders ({len(collage.earlier_groups)}, oldest first):")
        lines.extend(
            _render_lines(group, collage.renders.get(group)) for group in collage.earlier_groups
        )
    warnings = [*collage.warnings, *check.warnings]
    if warnings:
        lines.append("")
        lines.append(f"warnings ({len(warnings)}):")
        lines.extend(f"  - {warning}" for warning in warnings)
    return "\n".join(terminal_safe(line) for line in lines)


def _token_lines(check: PromptCheck, model: str) -> list[str]:
    if check.tokens is None and check.unchecked is None:
        return []
    if check.tokens is None:
        return [f"tokens:   not checked: {check.unchecked}"]
    if check.limit is not None and check.tokens > check.limit:
        return [f"tokens:   {check.tokens}, of which --model {model} reads the first {check.limit}"]
    return [f"tokens:   {check.tokens} (--model {model} reads up to {check.limit})"]


def _steered_cell(layer: CollageLayer, check: PromptCheck) -> str:
    if not layer.steered:
        return "no"
    return "yes" if check.steered(layer.caption) else "no (tokens)"


def left_by_redo(collage: Collage) -> dict[str, int] | None:
    """Pixels moved ``redo`` layers left: regenerated, and of those kept (locked layers)."""
    vacated = masks.vacated_mask(collage)
    if vacated is None:
        return None
    area = vacated > 0
    kept = area & (masks.noise_map(collage) <= 0.0)
    return {"pixels": int(area.sum()), "locked_pixels": int(kept.sum())}


def _moved_lines(collage: Collage) -> list[str]:
    moves = masks.moved_redo_layers(collage)
    left = left_by_redo(collage)
    if not moves or left is None:
        return []
    lines = [
        f"moved:    {layer.name!r} from box {list(old)} to {list(layer.box)}"
        for layer, old in moves
    ]
    lines.append(
        f"          the [redo] layers left {left['pixels']} px: regenerated from the document, "
        f"{left['locked_pixels']} px of them under locked layers come back exactly"
    )
    return lines


def _render_lines(group: str, record: dict[str, Any] | None) -> str:
    if record is None:
        return f"  - {group}: no recorded settings (an older psd-collage, or the XMP was removed)"
    seeds = ", ".join(f"{v.get('layer')}" for v in record.get("variants", []))
    size = "x".join(str(v) for v in record.get("working_size") or []) or "?"
    weights = str(record.get("weights") or "?")[:20]
    return (
        f"  - {group}: {record.get('model')} ({weights}); {seeds}; {_steps(record.get('steps'))}, "
        f"guidance {record.get('guidance')}, {record.get('scheduler')}, {size} px, noise "
        f"{record.get('noise')}; prompt {record.get('final_prompt', record.get('prompt'))!r}"
    )


def _steps(steps: Any) -> str:
    return plural(steps, "step") if isinstance(steps, int) else f"{steps} steps"


def _table(
    header: list[str], rows: list[list[str]], *, right_aligned: set[int], wrap: dict[int, int]
) -> list[str]:
    """Aligned columns; cells in ``wrap`` columns continue on extra lines past their width."""
    split_rows = [
        [_wrap(cell, wrap[i]) if i in wrap else [cell] for i, cell in enumerate(row)]
        for row in [header, *rows]
    ]
    widths = [
        max(_width(part) for row in split_rows for part in row[i]) for i in range(len(header))
    ]
    out = []
    for row in split_rows:
        for line in range(max(len(cell) for cell in row)):
            cells = [
                _pad(cell[line] if line < len(cell) else "", widths[i], right=i in right_aligned)
                for i, cell in enumerate(row)
            ]
            out.append("  ".join(cells).rstrip())
    return out


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
    vacated = masks.vacated_mask(collage)
    if vacated is not None:
        left = Image.fromarray(to_u8(vacated)).resize(tile_size, Image.Resampling.BOX)
        tiles.append((left.convert("RGB"), "left by [redo]", "regenerated; locked parts kept"))
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
    _label(draw, (_GAP, 6), title, sheet.width - 2 * _GAP, 12, _TEXT)
    for index, (image, label, detail) in enumerate(tiles):
        x = _GAP + (index % columns) * cell_w
        y = title_h + (index // columns) * cell_h
        sheet.paste(image, (x, y))
        _label(draw, (x, y + tile_size[1] + 2), label, tile_size[0], 12, _TEXT)
        _label(draw, (x, y + tile_size[1] + 15), detail, tile_size[0], 10, _DIM)
    return sheet


def _sheet_title(collage: Collage) -> str:
    doc = collage.document
    prompt = collage.prompt or "(no prompt)"
    return f"{doc.path.name} · {doc.width}x{doc.height} · {prompt}"


#: System fonts tried for labels, in order: the first that has every character of a label
#: draws it. DejaVu Sans covers Latin, Greek and Cyrillic; Droid Sans Fallback and the
#: others CJK. Debian: fonts-dejavu-core, fonts-droid-fallback. Then :data:`PACKAGE_FONTS`;
#: Pillow's own font is the last resort.
FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/System/Library/Fonts/Supplemental/Arial Unicode.ttf",
    "/Library/Fonts/Arial Unicode.ttf",
    "C:/Windows/Fonts/arialuni.ttf",
    "C:/Windows/Fonts/msyh.ttc",
    "C:/Windows/Fonts/segoeui.ttf",
)

#: Fonts that Python packages ship, used where installed (no system font needed): DejaVu
#: Sans in matplotlib, IPAex Gothic (CJK, Cyrillic, Greek) in matplotlib-fontja; both come
#: with the dev extra, so the contact sheet draws CJK on a machine with no fonts installed.
PACKAGE_FONTS = (
    ("matplotlib", "mpl-data/fonts/ttf/DejaVuSans.ttf"),
    ("matplotlib_fontja", "fonts/ipaexg.ttf"),
)


@functools.cache
def package_fonts() -> tuple[str, ...]:
    """The :data:`PACKAGE_FONTS` files that are installed, found without importing their
    packages (matplotlib_fontja reconfigures matplotlib on import)."""
    found = []
    for package, relative in PACKAGE_FONTS:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = Path(folder) / relative
            if path.is_file():
                found.append(str(path))
                break
    return tuple(found)


def font_files() -> list[str]:
    """Every font file a label may be drawn with, in the order they are tried."""
    return [*FONT_CANDIDATES, *package_fonts()]


@functools.cache
def _coverage(path: str) -> frozenset[int]:
    """The code points a font file has glyphs for (empty when it is absent or unreadable)."""
    from fontTools.ttLib import TTFont

    try:
        with TTFont(path, fontNumber=0, lazy=True) as font:
            return frozenset(font.getBestCmap() or {})
    except (OSError, ValueError, KeyError, AssertionError):
        return frozenset()


def _wanted(text: str) -> set[int]:
    return {ord(c) for c in text if not c.isspace() and unicodedata.category(c)[0] != "C"}


def font_covering(text: str) -> str | None:
    """The first font file with a glyph for every character of ``text``; None if none has."""
    wanted = _wanted(text)
    for path in font_files():
        covered = _coverage(path)
        if covered and wanted <= covered:
            return path
    return None


def font_for(text: str) -> str | None:
    """:func:`font_covering`, else the font with glyphs for most of ``text``'s characters."""
    full = font_covering(text)
    if full is not None:
        return full
    wanted = _wanted(text)
    best, best_count = None, -1
    for path in font_files():
        covered = _coverage(path)
        if covered and len(wanted & covered) > best_count:
            best, best_count = path, len(wanted & covered)
    return best


@functools.lru_cache(maxsize=64)
def _font_file(path: str | None, size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    if path is not None:
        with contextlib.suppress(OSError):
            return ImageFont.truetype(path, size)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
        return ImageFont.load_default()


def _font(size: int, text: str = "") -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """A font of ``size`` px that can draw ``text`` (Cyrillic, CJK, ä, ß...)."""
    return _font_file(font_for(text), size)


def _label(
    draw: ImageDraw.ImageDraw,
    at: tuple[int, int],
    text: str,
    width: int,
    size: int,
    fill: tuple[int, int, int],
) -> None:
    """Draw ``text`` shortened to ``width`` in a font that has its characters."""
    text = terminal_safe(text)
    draw.text(at, _fit(draw, text, width, size), fill=fill, font=_font(size, text))


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, size: int) -> str:
    """Shorten ``text`` with an ellipsis until it fits ``width`` pixels."""
    font = _font(size, text)
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


def _wrap(text: str, limit: int) -> list[str]:
    """``text`` in pieces of at most ``limit`` terminal columns, broken at spaces if possible."""
    pieces: list[str] = []
    while _width(text) > limit:
        cut = ""
        for char in text:
            if _width(cut + char) > limit:
                break
            cut += char
        space = cut.rfind(" ")
        if space > 0:
            cut = cut[: space + 1]
        pieces.append(cut.rstrip())
        text = text[len(cut) :]
    pieces.append(text)
    return pieces
