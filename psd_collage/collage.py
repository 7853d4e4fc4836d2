"""The collage: what a PSD means to the engine, in plain numpy (no Photoshop, no torch).

A collage is a global prompt plus collage layers, back to front. Each layer
keeps its pixels cropped to its bounding box (``box``), so a 10-layer poster of
8000 x 6000 px costs the size of its objects, not 10 full canvases.
"""

from __future__ import annotations

import re
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


def caption_pattern(caption: str) -> re.Pattern[str]:
    """``caption``'s words, in order, as whole words in any case and spacing.

    CLIP's tokenizer lower-cases and encodes each word on its own, so this finds the
    caption wherever the engine's token-level search does (``a red carpet`` holds no
    ``car``; ``A Red Car`` holds ``red car``).
    """
    words = [re.escape(word) for word in caption.split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", re.IGNORECASE)


def prompt_with_captions(prompt: str, captions: list[str]) -> str:
    """Append to ``prompt`` each caption it does not contain, so every caption can be steered."""
    out = prompt.strip()
    for caption in captions:
        caption = caption.strip()
        if caption and not caption_pattern(caption).search(out):
            out = (
                f"{out} {caption}" if out.endswith(",") else f"{out}, {caption}" if out else caption
            )
    return out


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
    noise_source: str = "default"  # tag, sidecar, Photoshop lock, [split] group or default
    visible: np.ndarray | None = None  # (h, w) float32 visible mask inside ``box``
    visible_area: float = 0.0  # fraction of the canvas
    steered: bool = False  # gets cross-attention steering (has a caption, not tiny)
    layer_id: int | None = None  # Photoshop's layer id: stable across saves and moves

    @property
    def alpha(self) -> np.ndarray:
        """(h, w) float32 in [0, 1], a new array (one allocation: it is canvas-sized
        for a background layer)."""
        alpha = self.pixels[..., 3].astype(np.float32)
        alpha /= 255.0
        return alpha

    @property
    def locked(self) -> bool:
        return bool(self.options.lock) or self.noise == 0.0

    @property
    def redo(self) -> bool:
        return bool(self.options.redo)

    def uses_ti(self, default: bool) -> bool:
        """Textual inversion for this layer: its ``ti`` tag, else the ``ti`` setting."""
        return bool(self.options.ti if self.options.ti is not None else default)

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
    earlier_groups: list[str] = field(default_factory=list)  # top-level [harmonized] groups
    renders: dict[str, dict] = field(default_factory=dict)  # group -> its render's settings
    output_at: int | None = None  # top-level layers below the output group; None: on top
    live_above: list[str] = field(default_factory=list)  # layers that stay live above it
    overlay: np.ndarray | None = None  # (H, W, 4) uint8 sRGB: those layers, for the merged image

    @property
    def final_prompt(self) -> str:
        """The prompt sampling uses: ``prompt`` with each steered caption it lacks appended."""
        captions = [layer.caption for layer in self.layers if layer.steered]
        return prompt_with_captions(self.prompt, captions)

    @property
    def editing(self) -> bool:
        """An edit: an earlier variant is the base and some layers are tagged redo."""
        return self.base is not None and any(layer.redo for layer in self.layers)
