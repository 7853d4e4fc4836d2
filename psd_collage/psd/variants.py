"""Reading one harmonized variant back out of a written PSD, as sRGB pixels.

The HTTP service hands out each variant as a PNG; the variants live only as the
pixel layers of the document's top-most ``[harmonized]`` group (see writer.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from psd_tools import PSDImage

from ..errors import CollageError
from .color import native_to_srgb8

#: Groups written by :func:`psd_collage.psd.writer.write_variants` start with this.
GROUP_PREFIX = "[harmonized]"


def read_variant(path: str | Path, layer_name: str) -> np.ndarray:
    """The pixel layer ``layer_name`` of the top-most ``[harmonized]`` group holding one.

    Returns (H, W, 3) uint8 sRGB at document size, the layer over white.
    """
    path, psd = _open(path)
    for group in _groups(psd):
        for layer in group:
            if layer.name == layer_name and _is_variant(layer):
                return _on_canvas(psd, layer)
    raise CollageError(f"no variant {layer_name!r} in a [harmonized] group", path=path)


def read_variants(path: str | Path) -> list[np.ndarray]:
    """Every variant of the top-most ``[harmonized]`` group, first seed first (the
    writer puts it at the top of the group), each as :func:`read_variant` returns it;
    one read of the file."""
    return [pixels for _, pixels in read_named_variants(path)]


def read_named_variants(path: str | Path) -> list[tuple[str, np.ndarray]]:
    """:func:`read_variants` with each variant's layer name (``seed 7``), to label them."""
    path, psd = _open(path)
    groups = _groups(psd)
    if not groups:
        raise CollageError("no [harmonized] group", path=path)
    return [
        (layer.name, _on_canvas(psd, layer))
        for layer in reversed(list(groups[0]))
        if _is_variant(layer)
    ]


def _open(path: str | Path) -> tuple[Path, PSDImage]:
    path = Path(path)
    try:
        return path, PSDImage.open(path)
    except (OSError, ValueError) as exc:
        raise CollageError(f"cannot read the result: {exc}", path=path) from None


def _groups(psd: PSDImage) -> list:
    """The ``[harmonized]`` groups, top-most first."""
    return [
        group
        for group in reversed(list(psd))
        if group.is_group() and group.name.startswith(GROUP_PREFIX)
    ]


def _is_variant(layer) -> bool:  # noqa: ANN001
    return layer.kind == "pixel" and layer.has_pixels()


def _on_canvas(psd: PSDImage, layer) -> np.ndarray:  # noqa: ANN001
    mode = psd.color_mode.name
    icc = psd.image_resources.get_data(1039) or None  # Resource.ICC_PROFILE
    width, height = psd.size
    canvas = np.full((height, width, 3), 255, np.uint8)
    color = layer.numpy("color")
    shape = layer.numpy("shape")
    rgb = native_to_srgb8(color, mode, icc)
    if shape is not None:
        alpha = shape[..., :1]
        rgb = (rgb * alpha + 255 * (1.0 - alpha) + 0.5).astype(np.uint8)
    left, top = layer.left, layer.top
    x0, y0 = max(0, left), max(0, top)
    x1, y1 = min(width, left + rgb.shape[1]), min(height, top + rgb.shape[0])
    if x1 > x0 and y1 > y0:
        canvas[y0:y1, x0:x1] = rgb[y0 - top : y1 - top, x0 - left : x1 - left]
    return canvas
