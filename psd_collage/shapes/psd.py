"""Write ``shapes`` scenes as layered PSDs: the backdrop plus one layer per object.

Each object layer is named by its caption (``a red circle``), optionally followed by a
tag block; the scene prompt goes into File Info > Description. Objects may be drawn
under another light than the backdrop: that is the collage the engine harmonizes
(objects cut from a daylight scene pasted onto a night scene).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..collage import to_u8
from ..psd import variants
from ..psd.builder import Pixels, build_psd
from .world import COLOURS, SIZE, Scene, Shape, apply_light, draw, layer_rgba

#: The colour of placeholder blobs: neutral grey, so only the caption says what goes there.
PLACEHOLDER_GREY = 0.5


def backdrop_name(scene: Scene) -> str:
    """The backdrop layer's caption, e.g. ``grass at night``."""
    return scene.prompt.split(" on ", 1)[1]


def write_scene_psd(
    path: str | Path,
    scene: Scene,
    *,
    object_light: str | None = None,
    object_tags: str = "",
    backdrop_tags: str = "",
    size: int | None = None,
    placeholders: bool = False,
    two_tone: str | None = None,
) -> Path:
    """Write ``scene`` to ``path``; objects lit by ``object_light`` (default: the scene's).

    Tags are appended to layer names as written, e.g. ``object_tags="[noise=0.6]"``.
    ``placeholders``: each object is a grey disc of its size instead (still named by its
    caption), for measuring whether the model draws the caption there. ``two_tone``: the
    lower half of each object gets this colour (a look the captions cannot name).
    """
    kwargs = {} if size is None else {"size": size}
    drawn = draw([scene], **kwargs)
    shown = scene.lit(object_light or scene.light)
    if placeholders:
        shown = Scene(
            shown.backdrop,
            shown.light,
            shown.horizon,
            tuple(Shape("circle", o.colour, o.cx, o.cy, o.r) for o in shown.objects),
        )
    objects = draw([shown], **kwargs)
    height, width = drawn.images.shape[1:3]
    layers = [
        Pixels(
            _named(backdrop_name(scene), backdrop_tags),
            (0, 0, width, height),
            rgba=_rgba(drawn.backdrops[0]),
        )
    ]
    for slot, shape in enumerate(scene.objects):
        rgba = layer_rgba(objects, 0, slot)
        if placeholders:
            rgba[..., :3] = PLACEHOLDER_GREY
        if two_tone is not None:
            rows = np.arange(height, dtype=np.float32)[:, None] + 0.5
            lower = rows * (SIZE / height) > shape.cy
            second = apply_light(COLOURS[two_tone], shown.light)
            rgba[..., :3] = np.where(lower[..., None], second, rgba[..., :3])
        layers.append(
            Pixels(_named(shape.caption, object_tags), (0, 0, width, height), rgba=_rgba(rgba))
        )
    return build_psd(Path(path), layers, size=(width, height), description=scene.prompt)


def _named(caption: str, tags: str) -> str:
    return f"{caption} {tags}".strip()


def _rgba(values: np.ndarray) -> np.ndarray:
    if values.shape[-1] == 3:
        values = np.concatenate([values, np.ones_like(values[..., :1])], axis=-1)
    return to_u8(values)


def read_variants(path: str | Path) -> list[np.ndarray]:
    """The variants of a rendered PSD's newest output group as (h, w, 3) float32 in
    [0, 1], the scale the world's ground truth uses."""
    return [pixels / np.float32(255) for pixels in variants.read_variants(path)]
