"""Collage geometry at the working size: layers placed on a canvas, resizing (numpy + PIL).

The render works at the model's working size while the collage lives at document
size; these helpers move pictures between the two. No Photoshop, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from .collage import Collage, CollageLayer, to_u8

#: What the textual-inversion image shows where no layer is yet: neutral grey.
EMPTY_CANVAS_GREY = 0.5
#: Planes of :func:`layer_at`: R, G, B, alpha, visible mask.
LAYER_PLANES = 5
VISIBLE_PLANE = 4


def layer_at(
    layer: CollageLayer,
    doc_size: tuple[int, int],
    work_size: tuple[int, int],
    planes: Sequence[int] = range(LAYER_PLANES),
) -> np.ndarray:
    """The layer on a working-size canvas: (h, w, len(planes)) float32 of the chosen
    planes (all: RGB, alpha, visible mask), one document-size plane at a time."""
    (doc_w, doc_h), (work_w, work_h) = doc_size, work_size
    sx, sy = work_w / doc_w, work_h / doc_h
    left, top, right, bottom = layer.box
    x0, y0 = int(np.floor(left * sx)), int(np.floor(top * sy))
    x1, y1 = max(x0 + 1, int(np.ceil(right * sx))), max(y0 + 1, int(np.ceil(bottom * sy)))
    x1, y1 = min(x1, work_w), min(y1, work_h)
    # Crop-resize the layer's box onto the cells [x0, x1) x [y0, y1) it touches; the cells
    # reach up to one cell past the box, so pad with transparency (PIL wants the box inside).
    pad = int(np.ceil(max(1 / sx, 1 / sy))) + 1
    box = (x0 / sx - left + pad, y0 / sy - top + pad, x1 / sx - left + pad, y1 / sy - top + pad)
    out = np.zeros((work_h, work_w, len(planes)), np.float32)
    for index, c in enumerate(planes):
        if c == VISIBLE_PLANE:
            source = layer.visible.astype(np.float32, copy=False)
        else:
            source = layer.pixels[..., c].astype(np.float32) / 255.0
        plane = Image.fromarray(np.pad(source, pad), mode="F")
        del source
        out[y0:y1, x0:x1, index] = np.asarray(
            plane.resize((x1 - x0, y1 - y0), Image.Resampling.BOX, box=box), np.float32
        )
    return out


def visible_mask_at(
    layer: CollageLayer, doc_size: tuple[int, int], work_size: tuple[int, int]
) -> np.ndarray:
    """The layer's visible mask at the working size, (h, w) float32."""
    return layer_at(layer, doc_size, work_size, planes=(VISIBLE_PLANE,))[..., 0]


def composite_up_to(collage: Collage, index: int, work_size: tuple[int, int]) -> np.ndarray:
    """The collage composited from the back up to layer ``index`` (the textual-inversion image)."""
    work_w, work_h = work_size
    out = np.full((work_h, work_w, 3), EMPTY_CANVAS_GREY, np.float32)
    for layer in collage.layers[: index + 1]:
        planes = layer_at(layer, collage.document.size, work_size)
        alpha = planes[..., 3:4]
        out = out * (1 - alpha) + planes[..., :3] * alpha
    return out


def resize_rgb(image_u8: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (h, w, 3) in [0, 1] at ``size`` (width, height)."""
    return resize_rgb_u8(image_u8, size).astype(np.float32) / 255.0


def resize_rgb_u8(image_u8: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (h, w, 3) at ``size`` (width, height), Lanczos."""
    pil = Image.fromarray(image_u8, "RGB")
    if pil.size != tuple(size):
        pil = pil.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(pil)


class DocumentSized(Sequence):
    """The variants upscaled to document size one at a time, as the writer asks for them.

    Holding four 8000 x 6000 float variants at once would cost 2.3 GB.
    """

    def __init__(self, images: Sequence[np.ndarray], size: tuple[int, int]) -> None:
        self._images, self._size = images, size

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        image = self._images[index]
        if image.shape[1::-1] == tuple(self._size):
            return image.astype(np.float32, copy=False)
        # uint8, as Pillow resamples it: a quarter of a float copy (144 MB, not 576,
        # at 8000 x 6000); the writer takes either.
        return resize_rgb_u8(to_u8(image), self._size)
