"""Compositing with psd-tools: a layer's own pixels, and the flattened document.

Compositing is psd-tools' (masks, clipping, blend modes, adjustments); colour
conversion to sRGB is :mod:`psd_collage.psd.color`'s. What is drawn is decided by the
reader: the :class:`Compositor` draws only layers its ``excluded`` set does not name.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from psd_tools import PSDImage
from psd_tools.api.layers import Layer
from psd_tools.api.utils import has_transparency
from psd_tools.composite import composite as psd_composite

from ..collage import Box, to_u8
from . import color
from .boundary import document_structure, layer_channels

#: Canvas pixels psd-tools composites in one go. Its compositor keeps about ten
#: float32 canvases of the viewport alive (measured: 4.6 GB RSS for one 8000 x
#: 6000 layer, 5.4 GB for the document), so larger viewports go in horizontal
#: bands of at most this many pixels (2 GB for the same document).
BAND_PIXELS = 8_000_000


class Compositor:
    """Draws one document's layers as uint8 sRGB, leaving out the ``excluded`` ones.

    ``excluded`` holds ``id()`` of layers left out of every composite (prompt text,
    [harmonized] groups, [skip]); the reader may add to it until it draws.
    """

    def __init__(self, psd: PSDImage, mode: str, icc: bytes | None, excluded: set[int]) -> None:
        self.psd = psd
        self.mode = mode
        self.icc = icc
        self.excluded = excluded
        self.size = (psd.width, psd.height)

    def accept(self, layer: Layer) -> bool:
        """psd-tools' layer filter: visible, and not left out by us."""
        return layer.is_visible() and id(layer) not in self.excluded

    def layer_pixels(self, layer: Layer) -> tuple[np.ndarray, Box] | None:
        """The layer's own composite cropped to its pixels (RGBA, box), or None if empty."""
        viewport = intersect(paint_box(layer), (0, 0, *self.size))
        if viewport is None:
            return None
        if self.is_plain(layer):
            rendered = self.render_plain(layer, viewport)
        else:
            rendered = self.render(layer, viewport, opaque=False)
        if not rendered[..., 3].any():
            return None
        return trim(rendered, viewport)

    def render(
        self, target: Any, viewport: Box, *, opaque: bool, only: set[int] | None = None
    ) -> np.ndarray:
        """psd-tools' composite of ``target`` over ``viewport`` as uint8 sRGB.

        Returns (h, w, 4) RGBA, or (h, w, 3) RGB flattened over white when
        ``opaque``. Large viewports go in bands (see :data:`BAND_PIXELS`). ``only``:
        composite just these layers (``id()``s) instead of what :meth:`accept` takes.
        """
        accept = self.accept if only is None else (lambda layer: id(layer) in only)
        left, top, right, bottom = viewport
        width = right - left
        out = np.empty((bottom - top, width, 3 if opaque else 4), np.uint8)
        rows = max(1, BAND_PIXELS // max(width, 1))
        as_layer = target is not self.psd
        for y in range(top, bottom, rows):
            band = (left, y, right, min(bottom, y + rows))
            # Over a transparent backdrop, as Photoshop composites; flattening over
            # white comes after (an opaque backdrop would change non-normal blend modes).
            native, _, alpha = psd_composite(
                target,
                color=1.0,
                alpha=0.0,
                viewport=band,
                layer_filter=accept,
                as_layer=as_layer,
            )
            rows_out = out[y - top : band[3] - top]
            if opaque:
                rows_out[...] = self.to_srgb8(native * alpha + (1.0 - alpha))
            else:
                rows_out[..., :3] = self.to_srgb8(native)
                rows_out[..., 3] = to_u8(alpha[..., 0])
        return out

    def is_plain(self, layer: Layer) -> bool:
        """A pixel layer with nothing on it but opacity: no mask, effect or clipping."""
        return (
            layer.kind == "pixel"
            and layer.has_pixels()
            and not layer.has_mask()
            and not layer.has_vector_mask()
            and not layer.has_effects()
            and not any(self.accept(clip) for clip in layer.clip_layers)
        )

    def render_plain(self, layer: Layer, viewport: Box) -> np.ndarray:
        """A plain layer's own composite: its stored pixels, alpha times its opacities.

        The same result as :meth:`render` (tests compare them on the Photoshop
        fixtures; blend modes do not act on a transparent backdrop), but one
        decode of the layer instead of one per band: for a full-canvas 8000 x
        6000 photo layer, 4 s instead of 30 s. The stored samples are read raw and
        turned into floats a band at a time (see :func:`layer_samples`).
        """
        color_planes, shape = layer_samples(layer, self.psd)
        scale = _FULL_SCALE[self.psd.depth]
        factor = (layer.opacity / 255.0) * (layer.fill_opacity / 255.0)
        left, top, right, bottom = viewport
        x, y = left - layer.left, top - layer.top
        width, height = right - left, bottom - top
        out = np.empty((height, width, 4), np.uint8)
        rows = max(1, BAND_PIXELS // width)
        for start in range(0, height, rows):
            stop = min(height, start + rows)
            band = (slice(y + start, y + stop), slice(x, x + width))
            native = np.stack([plane[band] for plane in color_planes], -1)
            out[start:stop, :, :3] = self.to_srgb8(native.astype(np.float32) / scale)
            del native
            alpha = shape[band].astype(np.float32) / scale if shape is not None else np.ones(1)
            out[start:stop, :, 3] = to_u8(alpha * np.float32(factor))
        return out

    def to_srgb8(self, native: np.ndarray) -> np.ndarray:
        """Document channels (float, psd-tools' convention) -> uint8 sRGB, via color.py."""
        return color.native_to_srgb8(native, self.mode, self.icc)

    def flatten(self) -> np.ndarray:
        """The flattened collage, (H, W, 3) uint8 sRGB over white."""
        merged = self.stored_composite()
        if merged is not None:
            return merged
        return self.render(self.psd, (0, 0, *self.size), opaque=True)

    def stored_composite(self) -> np.ndarray | None:
        """Photoshop's own merged image, when it shows exactly the collage.

        It is exact (effects psd-tools does not draw included) and costs one
        decode instead of a composite. Not usable when we leave out something
        visible ([skip], [harmonized], a visible prompt text layer), when the
        file says it has none ("Maximize Compatibility" off), or when it is
        blank, as some non-Adobe writers leave it.
        """
        psd = self.psd
        if not psd.has_preview() or psd.is_updated():
            return None
        if any(layer.is_visible() and id(layer) in self.excluded for layer in psd.descendants()):
            return None
        planes = merged_samples(psd)
        if planes is None:  # a merged transparency: psd-tools' own un-matting applies
            return self._stored_composite_float()
        colour = planes[: _COLOR_CHANNELS[self.mode]]
        if colour.min() == colour.max():
            return None
        scale = _FULL_SCALE[psd.depth]
        out = np.empty((*colour.shape[1:], 3), np.uint8)
        rows = max(1, BAND_PIXELS // self.size[0])
        for y in range(0, self.size[1], rows):
            part = colour[:, y : y + rows].transpose(1, 2, 0).astype(np.float32) / scale
            out[y : y + rows] = self.to_srgb8(part)
        return out

    def _stored_composite_float(self) -> np.ndarray | None:
        """:meth:`stored_composite` through psd-tools' float arrays (merged transparency)."""
        psd = self.psd
        native = psd.numpy("color")
        if float(native.min()) == float(native.max()):
            return None
        shape = psd.numpy("shape")
        transparent = float(shape.min()) < 1.0
        out = np.empty((*native.shape[:2], 3), np.uint8)
        rows = max(1, BAND_PIXELS // self.size[0])
        for y in range(0, self.size[1], rows):
            part = native[y : y + rows]
            if transparent:  # over white
                cover = shape[y : y + rows]
                part = part * cover + (1.0 - cover)
            out[y : y + rows] = self.to_srgb8(part)
        return out


# psd-tools pitfall: ``numpy()`` of a layer or of the merged image parses every
# channel to float32 at once (plus a float "shape" of ones when there is no
# transparency): 1.1 GB for an 8000 x 6000 RGB merged image and as much for a
# full-canvas layer, the peak of a big render's read. These two read the stored
# samples raw from psd-tools' records instead (the bytes it decoded anyway) and let
# the callers convert a band at a time, the same arithmetic as psd-tools' parse.
_SAMPLE_TYPES = {8: np.dtype("u1"), 16: np.dtype(">u2"), 32: np.dtype(">f4")}
_FULL_SCALE = {8: 255.0, 16: 65535.0, 32: 1.0}
_COLOR_CHANNELS = {"RGB": 3, "GRAYSCALE": 1, "CMYK": 4}


def layer_samples(layer: Layer, psd: PSDImage) -> tuple[list[np.ndarray], np.ndarray | None]:
    """A pixel layer's stored colour planes and transparency, (h, w) raw samples each.

    As ``layer.numpy("color")`` / ``("shape")`` pick them: channels with data, colour
    ids in record order up to the mode's count, the transparency (-1) if any.
    """
    width, height = layer.width, layer.height
    dtype = _SAMPLE_TYPES[psd.depth]
    colour, shape = [], None
    for info, data in layer_channels(layer):
        if not len(data.data) or not (info.id >= 0 or info.id == -1):
            continue
        raw = data.get_data(width, height, psd.depth, psd.version)
        plane = np.frombuffer(raw, dtype).reshape(height, width)
        if info.id == -1:
            shape = plane
        elif len(colour) < _COLOR_CHANNELS[psd.color_mode.name.upper()]:
            colour.append(plane)
    return colour, shape


def merged_samples(psd: PSDImage) -> np.ndarray | None:
    """The merged image's raw samples (channels, H, W); None when it has a transparency.

    With one, psd-tools un-mattes the colour from white first: that stays its job.
    """
    if has_transparency(psd):
        return None
    record = document_structure(psd)
    raw = record.image_data.get_data(record.header, False)
    return np.frombuffer(raw, _SAMPLE_TYPES[psd.depth]).reshape(-1, psd.height, psd.width)


def paint_box(layer: Layer) -> Box:
    """The layer's box grown by its stroke effects, the one effect drawn outside it."""
    left, top, right, bottom = layer.bbox
    if right <= left or bottom <= top:
        return (0, 0, 0, 0)
    reach = 0.0
    nodes = [layer, *layer.descendants()] if layer.is_group() else [layer]
    for node in nodes:
        if node.has_effects():
            for stroke in node.effects.find("stroke"):
                reach = max(reach, float(stroke.size))
    pad = int(np.ceil(reach))
    return (left - pad, top - pad, right + pad, bottom + pad)


def intersect(a: Box, b: Box) -> Box | None:
    box = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    return box if box[0] < box[2] and box[1] < box[3] else None


def trim(rgba: np.ndarray, viewport: Box) -> tuple[np.ndarray, Box]:
    """Crop to the pixels with any alpha, so a layer costs the size of its object."""
    alpha = rgba[..., 3]
    rows = np.flatnonzero(alpha.any(axis=1))
    cols = np.flatnonzero(alpha.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    pixels = np.ascontiguousarray(rgba[top:bottom, left:right])
    x, y = viewport[0], viewport[1]
    return pixels, (int(x + left), int(y + top), int(x + right), int(y + bottom))
