"""The one place that builds masks and maps: visible masks, noise map, pin weights.

numpy/scipy only, so the reader, the sheet and the render all share it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from .collage import Collage, CollageLayer
from .settings import split_layer_name

#: The authors blurred the noise map with radius 10 px at 512 x 512; we scale it with the image.
BLUR_PX_AT_512 = 10.0


def assign_visible_masks(layers: Sequence[CollageLayer], size: tuple[int, int]) -> np.ndarray:
    """Occlusion, back to front: visible_i = alpha_i * prod_{j above i} (1 - alpha_j).

    Sets ``layer.visible`` and ``layer.visible_area`` and returns the background
    mask (the part no layer covers). The visible masks and the background sum to 1.
    """
    width, height = size
    uncovered = np.ones((height, width), np.float32)  # prod of (1 - alpha) of layers above
    for layer in reversed(layers):
        left, top, right, bottom = layer.box
        alpha = layer.alpha
        region = uncovered[top:bottom, left:right]
        layer.visible = alpha * region
        layer.visible_area = float(layer.visible.sum()) / (width * height)
        region *= 1.0 - alpha
    return uncovered


def background_mask(layers: Sequence[CollageLayer], size: tuple[int, int]) -> np.ndarray:
    width, height = size
    uncovered = np.ones((height, width), np.float32)
    for layer in layers:
        left, top, right, bottom = layer.box
        cover = layer.alpha
        np.subtract(1.0, cover, out=cover)  # in place: one box-sized float, not two
        uncovered[top:bottom, left:right] *= cover
    return uncovered


#: How a layer's size r for :func:`default_attention_weights` is measured. "area": its
#: visible area as a fraction of the canvas (ours); "side": its longest side as a fraction
#: of the canvas side (the authors' CollageEditor).
SIZE_MEASURES = ("area", "side")
DEFAULT_SIZE_MEASURE = "area"


def layer_size(layer: CollageLayer, size: tuple[int, int], measure: str) -> float:
    """The layer's size r in [0, 1] by ``measure`` (see :data:`SIZE_MEASURES`)."""
    if measure == "area":
        return layer.visible_area
    if measure != "side":
        raise ValueError(f"size measure must be one of {SIZE_MEASURES}")
    rows, cols = np.nonzero(layer.alpha > 0)
    if len(rows) == 0:
        return 0.0
    width, height = size
    return max((cols.max() - cols.min() + 1) / width, (rows.max() - rows.min() + 1) / height)


def default_attention_weights(r: float) -> tuple[float, float]:
    """The authors' rule: small layers get stronger steering. Returns (inside, outside).

    ``r`` is the layer's size from :func:`layer_size`: the authors measured the longest
    side, we use the measure :data:`DEFAULT_SIZE_MEASURE` (chosen by measurement on the
    ``shapes`` model, see the README).
    """
    r = min(max(r, 0.0), 1.0)
    return 0.2 + 0.4 * (1.0 - r), 0.9 - 0.5 * r


def vacated_mask(collage: Collage) -> np.ndarray | None:
    """Where ``redo`` layers were in the base variant and are no more, (H, W) float32, or None.

    The base variant's record (the XMP of the render that made it) says where each
    layer was, by Photoshop layer id. A layer moved since then left its old footprint:
    its shape at the old place when only moved, else its old box. The place it covers
    now is not part of it: it is regenerated with the layer anyway.
    """
    moves = moved_redo_layers(collage)
    if not moves:
        return None
    width, height = collage.document.size
    out = np.zeros((height, width), np.float32)
    for layer, (left, top, right, bottom) in moves:
        # Clip the recorded box to the canvas first: the record comes from the file's XMP
        # and may claim any size; nothing is allocated beyond the canvas.
        x0, y0, x1, y1 = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
        if x1 <= x0 or y1 <= y0:
            continue
        crop: np.ndarray | float = 1.0  # its old box, when its shape has changed
        if layer.pixels.shape[1::-1] == (right - left, bottom - top):
            crop = layer.alpha[y0 - top : y1 - top, x0 - left : x1 - left]
        np.maximum(out[y0:y1, x0:x1], crop, out=out[y0:y1, x0:x1])
    for layer in collage.layers:
        if layer.redo:
            left, top, right, bottom = layer.box
            out[top:bottom, left:right] *= 1.0 - layer.visible
    return out if out.any() else None


def moved_redo_layers(collage: Collage) -> list[tuple[CollageLayer, tuple[int, int, int, int]]]:
    """The ``redo`` layers whose box differs from the base variant's record, with the old box.

    Layers are found in the record by Photoshop layer id; a record made from a file
    without ids (psd-tools, ag-psd and other scripts write none; our write-back adds
    them) is matched by name, tags left out, and order (:func:`_recorded_entries`).
    """
    if not collage.editing or collage.base is None:
        return []
    record = collage.renders.get(collage.base.group) or {}
    entries = [e for e in record.get("layers", []) if isinstance(e, dict)]
    moves = []
    for layer, entry in zip(
        collage.layers, _recorded_entries(collage.layers, entries), strict=True
    ):
        box = _recorded_box(entry.get("box")) if entry and layer.redo else ()
        if len(box) == 4 and box != tuple(layer.box):
            moves.append((layer, box))
    return moves


def _recorded_entries(layers: Sequence[CollageLayer], entries: list[dict]) -> list[dict | None]:
    """Each layer's entry in a render record: by id, else the k-th entry of the same name
    without id for the k-th layer of that name not found by id (None: not recorded)."""
    by_id = {e["id"]: e for e in entries if e.get("id")}
    found: list[dict | None] = [by_id.get(layer.layer_id) for layer in layers]
    unnamed: dict[str, list[dict]] = {}
    for entry in entries:
        if not entry.get("id"):
            unnamed.setdefault(_base_name(str(entry.get("name", ""))), []).append(entry)
    for index, layer in enumerate(layers):
        if found[index] is None:
            queue = unnamed.get(_base_name(layer.name))
            found[index] = queue.pop(0) if queue else None
    return found


def _base_name(name: str) -> str:
    """A layer name without its tag block: adding ``[redo]`` keeps the layer's identity."""
    return split_layer_name(name)[0]


def _recorded_box(value: object) -> tuple[int, ...]:
    """A record's ``box`` as 4 ints, or () when the XMP holds anything else (hand-edited)."""
    if not isinstance(value, list | tuple) or len(value) != 4:
        return ()
    if not all(isinstance(v, int | float) and abs(v) < 2**31 for v in value):
        return ()
    return tuple(int(v) for v in value)


def start_image(collage: Collage) -> np.ndarray:
    """The picture sampling starts from, (H, W, 3) uint8.

    Normally the flattened collage; in an edit, the chosen earlier variant, with the
    document's own pixels where a ``redo`` layer was (:func:`vacated_mask`) and the
    ``redo`` layers pasted on top where they are visible.
    """
    if not collage.editing:
        return collage.composite
    out = collage.base.pixels.astype(np.float32)
    vacated = vacated_mask(collage)
    if vacated is not None:
        v = vacated[..., None]
        out = out * (1.0 - v) + collage.composite.astype(np.float32) * v
    for layer in collage.layers:
        if not layer.redo:
            continue
        left, top, right, bottom = layer.box
        v = layer.visible[..., None]
        rgb = layer.pixels[..., :3].astype(np.float32)
        out[top:bottom, left:right] = out[top:bottom, left:right] * (1 - v) + rgb * v
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def noise_map(collage: Collage) -> np.ndarray:
    """Each layer's noise painted through its visible mask, (H, W) float32, unblurred.

    The uncovered background gets ``collage.background_noise``. In an edit only ``redo``
    layers may change: everything else is 0 (pinned to the base).
    """
    editing = collage.editing
    vacated = vacated_mask(collage) if editing else None
    values = [0.0 if editing and not layer.redo else layer.noise for layer in collage.layers]
    out = paint_layers(collage, values, 0.0 if editing else collage.background_noise)
    if vacated is not None:
        # The place moved redo layers left, at the noise of what lies there now.
        everything = [layer.noise for layer in collage.layers]
        out += paint_layers(collage, everything, collage.background_noise) * vacated
        np.clip(out, 0.0, 1.0, out=out)
    return out


def control_map(collage: Collage, default_canny: float) -> np.ndarray:
    """The ControlNet's spatial conditioning scale, (H, W) float32: each layer's ``canny``
    painted through its visible mask (the authors' ``generate_control_mask``); layers
    without a ``canny`` tag and the uncovered background get ``default_canny``."""
    values = [
        layer.options.canny if layer.options.canny is not None else default_canny
        for layer in collage.layers
    ]
    return paint_layers(collage, values, default_canny)


def paint_layers(collage: Collage, values: Sequence[float], background: float) -> np.ndarray:
    """``values[i]`` painted through layer i's visible mask over ``background``, (H, W) float32.

    The visible masks and the background mask sum to 1, so a pixel shared by a
    half-transparent layer and what shows through it gets the blend of both.
    """
    size = collage.document.size
    if background:
        out = background_mask(collage.layers, size)
        out *= np.float32(background)  # in place: a canvas-sized float less at 8000 x 6000
    else:
        out = np.zeros((size[1], size[0]), np.float32)
    for layer, value in zip(collage.layers, values, strict=True):
        if value == 0.0:
            continue
        left, top, right, bottom = layer.box
        out[top:bottom, left:right] += layer.visible * np.float32(value)
    return np.clip(out, 0.0, 1.0, out=out)


def blur_sigma(size: tuple[int, int]) -> float:
    """Gaussian sigma for a map of ``size`` (width, height): 10 px at 512 x 512, scaled."""
    width, height = size
    return BLUR_PX_AT_512 * math.sqrt(width * height) / 512.0


def resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float map to ``size`` (width, height) with area averaging / bilinear."""
    if values.shape[::-1] == tuple(size):
        return values.astype(np.float32, copy=False)
    # copy=False: Pillow copies it anyway, and a second canvas-sized float (192 MB
    # at 8000 x 6000) would set the render's peak.
    image = Image.fromarray(values.astype(np.float32, copy=False), mode="F")
    shrinking = size[0] < values.shape[1]
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return np.array(image.resize(size, resample), np.float32)


def strength_map(noise: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The per-pixel strength the sampler uses: the noise map at ``size``, blurred."""
    small = resize_map(noise, size)
    return np.clip(gaussian_filter(small, blur_sigma(size), mode="nearest"), 0.0, 1.0)


def pin_weights(noise: np.ndarray, work_size: tuple[int, int]) -> np.ndarray:
    """How much of the source to paste back over the result, (H, W) float32 at document size.

    Exactly 1 on every pixel whose noise is 0 (so pinned pixels come out identical
    to the source), fading to 0 over the blur radius outside them. The fade is
    computed at about twice the working resolution and upsampled: blurring an
    8000 x 6000 map directly costs minutes.
    """
    pinned = noise <= 0.0
    if not pinned.any():
        return np.zeros(noise.shape, np.float32)
    height, width = noise.shape
    scale = min(1.0, 2.0 * max(work_size) / max(width, height))
    small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = resize_map(pinned.astype(np.float32), small_size)
    sigma = blur_sigma(work_size) * small_size[0] / work_size[0]
    fade = np.clip(2.0 * gaussian_filter(small, sigma, mode="nearest"), 0.0, 1.0)
    weights = resize_map(fade, (width, height))
    weights[pinned] = 1.0
    return weights
