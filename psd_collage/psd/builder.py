"""Build layered RGB PSDs from pixel layers and groups (psd-tools), for generated documents.

The ``shapes`` world writes its scenes with it and the tests build their small documents
with it. Describe a document as a list of :class:`Pixels` and :class:`Group` (back to
front) and call :func:`build_psd`::

    build_psd(path, [
        Pixels("sky", (0, 0, 64, 64), (90, 140, 220)),
        Pixels("red car [noise=0.4]", (10, 30, 40, 50), (200, 0, 0)),
    ], description="a red car under a blue sky")
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
from psd_tools import PSDImage
from psd_tools.constants import ProtectedFlags, Resource, Tag
from psd_tools.psd.image_resources import ImageResource

from ..atomic import atomic_write

Box = tuple[int, int, int, int]


@dataclass
class Pixels:
    """A pixel layer: a flat colour (RGB or RGBA) over ``box``, or an explicit RGBA array."""

    name: str
    box: Box
    color: Sequence[int] = (255, 0, 0)
    rgba: np.ndarray | None = None  # (h, w, 4) uint8; overrides ``color``
    visible: bool = True
    opacity: int = 255
    lock_all: bool = False  # Photoshop's "Lock all"
    clipping: bool = False  # clipped to the layer below


@dataclass
class Group:
    name: str
    children: list[Pixels | Group] = field(default_factory=list)
    visible: bool = True
    lock_all: bool = False


def build_psd(
    path: Path,
    layers: Iterable[Pixels | Group],
    *,
    size: tuple[int, int] = (64, 64),
    description: str | None = None,
    depth: int = 8,
) -> Path:
    """Write an RGB document with ``layers`` (back to front) to ``path``."""
    psd = PSDImage.new("RGB", size, color=(255, 255, 255), depth=depth)
    for item in layers:
        _add(psd, item)
    if description is not None:
        psd.image_resources[Resource.XMP_METADATA] = ImageResource(
            key=Resource.XMP_METADATA, data=xmp_description(description)
        )
    atomic_write(path, psd.save)
    return Path(path)


def _add(parent: Any, item: Pixels | Group) -> None:
    """Add ``item`` with a layer id, as Photoshop gives every layer (psd-tools gives none)."""
    if isinstance(item, Group):
        group = parent.create_group(name="group")
        for child in item.children:
            _add(group, child)
        layer = group
    else:
        left, top, right, bottom = item.box
        rgba = item.rgba
        if rgba is None:
            rgba = np.zeros((bottom - top, right - left, 4), np.uint8)
            rgba[...] = tuple(item.color) + (255,) * (4 - len(item.color))
        # Four channels through the array path: frompil would turn alpha into a layer mask.
        layer = parent.create_pixel_layer_from_array(
            rgba, name="layer", left=left, top=top, opacity=item.opacity
        )
        layer.clipping = item.clipping
    # psd-tools' save() raises on names outside MacRoman: create with ASCII, then rename.
    layer.name = item.name
    layer.visible = item.visible
    root = layer
    while root.parent is not None:
        root = root.parent
    ids = [other.layer_id for other in root.descendants()]
    layer.tagged_blocks.set_data(Tag.LAYER_ID, max([0, *ids]) + 1)
    if item.lock_all:
        # Layer.lock() loses the flags on a layer without locks (set_data copies the
        # value it was given), so set the 'lspf' block directly.
        layer.tagged_blocks.set_data(Tag.PROTECTED_SETTING, int(ProtectedFlags.COMPLETE))


def xmp_description(text: str) -> bytes:
    """An XMP packet with File Info > Description set to ``text``."""
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/">'
        '<dc:description><rdf:Alt><rdf:li xml:lang="x-default">'
        f"{escape(text)}</rdf:li></rdf:Alt></dc:description>"
        '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()
