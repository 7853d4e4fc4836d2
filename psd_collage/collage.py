"""The collage: what a PSD means to the engine, in plain numpy (no Photoshop, no torch).

A collage is a global prompt plus collage layers, back to front. Each layer
keeps its pixels cropped to its bounding box (``box``), so a 10-layer poster of
8000 x 6000 px costs the size of its objects, not 10 full canvases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .settings import SETTINGS, LayerOptions

Box = tuple[int, int, int, int]  # left, top, right, bottom in document pixels


def to_u8(values: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> rounded uint8 (the collage's pixel format), clipping what is outside.

    Works in float32 on one temporary: this runs on full 8000 x 6000 canvases.
    """
    scaled = np.multiply(values, np.float32(255.0), dtype=np.float32)
    scaled += np.float32(0.5)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return scaled.astype(np.uint8)


@dataclass(frozen=True)
class DocumentInfo:
    path: Path
    width: int
    height: int
    color_mode: str  # "RGB", "CMYK" or "GRAYSCALE"
    depth: int  # 8, 16 or 32 bits per channel
    psb: bool = False

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


@dataclass
class CollageLayer:
    """One collage layer: an object with a caption and options, as the designer made it."""

    name: str  # the Photoshop layer or group name, tags included
    caption: str  # the name without its tag block; "" for Photoshop defaults like "Layer 1"
    options: LayerOptions  # tags, then the sidecar's [layers."name"] table on top
    pixels: np.ndarray  # (h, w, 4) uint8 RGBA in sRGB: the layer's own composite inside ``box``
    box: Box
    sources: list[str] = field(default_factory=list)  # PSD layer names it came from
    noise: float = 0.0  # effective noise level (0 when locked)
    visible: np.ndarray | None = None  # (h, w) float32 visible mask inside ``box``
    visible_area: float = 0.0  # fraction of the canvas
    steered: bool = False  # gets cross-attention steering (has a caption, not tiny)

    @property
    def alpha(self) -> np.ndarray:
        return self.pixels[..., 3].astype(np.float32) / 255.0

    @property
    def locked(self) -> bool:
        return bool(self.options.lock) or self.noise == 0.0

    @property
    def redo(self) -> bool:
        return bool(self.options.redo)

    def full_mask(self, size: tuple[int, int]) -> np.ndarray:
        """The visible mask placed on a (height, width) canvas of document ``size``."""
        width, height = size
        out = np.zeros((height, width), np.float32)
        if self.visible is not None:
            left, top, right, bottom = self.box
            out[top:bottom, left:right] = self.visible
        return out


@dataclass
class BaseImage:
    """An earlier harmonized variant chosen as the starting point of an edit (``[redo]``)."""

    layer: str  # its name inside the [harmonized] group, e.g. "seed 1234"
    group: str  # the [harmonized] group's name
    pixels: np.ndarray  # (H, W, 3) uint8 sRGB at document size
    record_index: int  # its place in the file's layer records: how the writer finds it again


@dataclass
class Collage:
    document: DocumentInfo
    prompt: str
    negative_prompt: str
    layers: list[CollageLayer]  # back to front
    composite: np.ndarray  # (H, W, 3) uint8 sRGB: the flattened collage, adjustments applied
    base: BaseImage | None = None
    warnings: list[str] = field(default_factory=list)
    background_noise: float = SETTINGS["noise"].default  # where no layer covers the canvas

    @property
    def editing(self) -> bool:
        """An edit: an earlier variant is the base and some layers are tagged redo."""
        return self.base is not None and any(layer.redo for layer in self.layers)
