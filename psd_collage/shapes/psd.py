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
from ..psd.builder import Pixels, build_psd
from .world import Scene, draw, layer_rgba


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
) -> Path:
    """Write ``scene`` to ``path``; objects lit by ``object_light`` (default: the scene's).

    Tags are appended to layer names as written, e.g. ``object_tags="[noise=0.6]"``.
    """
    kwargs = {} if size is None else {"size": size}
    drawn = draw([scene], **kwargs)
    objects = draw([scene.lit(object_light or scene.light)], **kwargs)
    height, width = drawn.images.shape[1:3]
    layers = [
        Pixels(
            _named(backdrop_name(scene), backdrop_tags),
            (0, 0, width, height),
            rgba=_rgba(drawn.backdrops[0]),
        )
    ]
    for slot, shape in enumerate(scene.objects):
        layers.append(
            Pixels(
                _named(shape.caption, object_tags),
                (0, 0, width, height),
                rgba=_rgba(layer_rgba(objects, 0, slot)),
            )
        )
    return build_psd(Path(path), layers, size=(width, height), description=scene.prompt)


def _named(caption: str, tags: str) -> str:
    return f"{caption} {tags}".strip()


def _rgba(values: np.ndarray) -> np.ndarray:
    if values.shape[-1] == 3:
        values = np.concatenate([values, np.ones_like(values[..., :1])], axis=-1)
    return to_u8(values)
