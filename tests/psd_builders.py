"""Tiny synthetic PSDs for tests (keep canvases small).

:func:`build_psd`, :class:`Pixels` and :class:`Group` live in
:mod:`psd_collage.psd.builder`; here is what only tests need: copy a real Photoshop
file with renamed or hidden layers with :func:`edit_copy` (psd-tools cannot create
text layers, so tests about the ``prompt`` text layer edit a fixture that has one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from psd_tools import PSDImage
from psd_tools.constants import Resource
from psd_tools.psd.image_resources import ImageResource

from psd_collage.psd.builder import Group, Pixels, build_psd, xmp_description

__all__ = ["Group", "Pixels", "build_psd", "edit_copy", "xmp_description"]


def edit_copy(
    source: Path,
    dest: Path,
    *,
    rename: Mapping[str, str] | None = None,
    hide: Iterable[str] = (),
    show: Iterable[str] = (),
    description: str | None = None,
) -> Path:
    """Copy a PSD, renaming / hiding / showing layers found by their current name."""
    psd = PSDImage.open(source)
    by_name = {layer.name: layer for layer in psd.descendants()}
    for old, new in (rename or {}).items():
        by_name[old].name = new
    for name in hide:
        by_name[name].visible = False
    for name in show:
        by_name[name].visible = True
    if description is not None:
        psd.image_resources[Resource.XMP_METADATA] = ImageResource(
            key=Resource.XMP_METADATA, data=xmp_description(description)
        )
    psd.save(dest)
    return dest
