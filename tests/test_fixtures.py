"""Every real Photoshop file in ../shared/psd-fixtures reads into a sensible collage or fails cleanly.

Expected layer counts were checked by hand against INDEX.md (top-level items
minus hidden, adjustment, clipping and empty ones; groups count once).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from psd_tools import PSDImage

from psd_collage import masks
from psd_collage.errors import CollageError, UnsupportedDocument
from psd_collage.psd.header import check_header
from psd_collage.psd.names import HARMONIZED_PREFIX
from psd_collage.psd.reader import read_collage

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "psd-fixtures"

#: file -> number of collage layers
LAYERS = {
    "16bit5x5.psd": 3,
    "2layers.psb": 2,
    "adjustments/adjustment_nested_composition_1.psd": 4,
    "adjustments/curves_cmyk.psd": 2,
    "adjustments/curves_grayscale.psd": 2,
    "adjustments/posterize_16bits_cmyk.psd": 2,
    "adjustments/posterize_16bits_rgb.psd": 2,
    "artboard.psd": 1,
    "background-red-opacity-80.psd": 2,
    "blend-and-clipping.psd": 5,
    "clipping-mask.psd": 2,
    "clipping-mask2.psd": 3,
    "empty-group.psd": 1,
    "empty-layer.psd": 2,
    "fill_adjustments.psd": 4,
    "gray1.psd": 3,
    "group.psd": 2,
    "hidden-groups.psd": 2,
    "layer-name-emoji.psd": 1,
    "layer_comps.psb": 5,
    "layer_comps.psd": 5,
    "layer_effects.psd": 1,  # 11 type layers above the photo stay live
    "layer_mask_data.psd": 5,
    "layer_params.psd": 3,
    "mask-index.psd": 1,
    "mask.psd": 3,
    "masks.psb": 8,
    "masks.psd": 8,
    "masks2.psd": 2,  # its type layer on top stays live
    "passthrough_blendmodes2.psd": 4,
    "pen-text.psd": 5,
    "placedLayer.psd": 4,
    "semi-transparent-layers.psd": 2,
    "smart-object-slice.psd": 3,
    "text.psd": 1,  # its type layer on top stays live
    "transparentbg-gimp.psd": 1,
}

#: The reference below is psd-tools' unmanaged composite; we convert Adobe RGB and the
#: linear profile of the 32-bit document to sRGB with their ICC profiles, so these differ.
PROFILE_GAP = {
    "layer_params.psd": 8.0,
    "layer_comps.psd": 8.0,
    "layer_comps.psb": 8.0,
    "pen-text.psd": 8.0,
    # Its 11 live type layers carry strokes and shadows, which psd-tools does not draw
    # into the overlay laid over the picture (Photoshop redraws them on open).
    "layer_effects.psd": 8.0,
}

#: file -> (error class, words the message must contain)
FAILS = {
    "0layers.psb": (UnsupportedDocument, "has no layers"),
    "cmyk-alpha-spot.psd": (UnsupportedDocument, "has no layers"),
    "colormodes/4x4_8bit_lab.psd": (UnsupportedDocument, "Image > Mode > RGB Color"),
    "colormodes/4x4_8bit_index_color.psd": (UnsupportedDocument, "Image > Mode > RGB Color"),
}


def _all_fixtures() -> list[str]:
    if not FIXTURES.is_dir():
        return ["(fixtures absent)"]
    found = sorted(
        str(p.relative_to(FIXTURES)) for p in FIXTURES.rglob("*") if p.suffix in (".psd", ".psb")
    )
    return found


@pytest.mark.parametrize("name", _all_fixtures())
def test_fixture(fixtures_dir: Path, name: str) -> None:
    path = fixtures_dir / name
    assert name in LAYERS or name in FAILS, f"new fixture {name}: add its expected outcome"
    if name in FAILS:
        error, words = FAILS[name]
        with pytest.raises(error, match=words) as info:
            read_collage(path)
        message = str(info.value)
        assert message.startswith(str(path)) and "\n" not in message
        return

    check_header(path)
    collage = read_collage(path)
    doc = collage.document
    size = doc.size
    assert len(collage.layers) == LAYERS[name]
    assert doc.psb == (path.suffix == ".psb")
    assert collage.composite.shape == (doc.height, doc.width, 3)
    assert collage.composite.dtype == np.uint8
    assert isinstance(collage.prompt, str) and isinstance(collage.negative_prompt, str)
    assert all(isinstance(w, str) and "\n" not in w for w in collage.warnings)

    total = masks.background_mask(collage.layers, size)
    for layer in collage.layers:
        left, top, right, bottom = layer.box
        assert 0 <= left < right <= doc.width and 0 <= top < bottom <= doc.height
        assert layer.pixels.shape == (bottom - top, right - left, 4)
        assert layer.pixels.dtype == np.uint8 and layer.pixels[..., 3].any()
        assert layer.visible.min() >= 0.0 and layer.visible.max() <= 1.0
        assert not layer.name.startswith(HARMONIZED_PREFIX)
        assert 0.0 <= layer.noise <= 1.0
        total = total + layer.full_mask(size)
    np.testing.assert_allclose(total, 1.0, atol=1e-4)

    if doc.color_mode in ("RGB", "CMYK") and name not in {"layer-name-emoji.psd"}:
        # Photoshop's own merged image through psd-tools + PIL ICC, flattened over white.
        rgba = np.asarray(PSDImage.open(path).composite().convert("RGBA"), np.float32)
        a = rgba[..., 3:] / 255.0
        reference = rgba[..., :3] * a + 255.0 * (1.0 - a)
        tolerance = PROFILE_GAP.get(name, 3.0)
        picture = collage.composite.astype(np.float32)
        if collage.overlay is not None:  # type layers that stay live above the output
            over = collage.overlay.astype(np.float32)
            cover = over[..., 3:] / 255.0
            picture = picture * (1.0 - cover) + over[..., :3] * cover
        assert np.abs(picture - reference).mean() < tolerance


def test_every_fixture_has_an_expected_outcome(fixtures_dir: Path) -> None:
    names = set(_all_fixtures())
    assert names == set(LAYERS) | set(FAILS)


def test_truncated_copy_of_every_fixture_is_refused(fixtures_dir: Path, tmp_path: Path) -> None:
    """A half-copied file is never taken for a complete one (the hot folder relies on it)."""
    for name in _all_fixtures():
        data = (fixtures_dir / name).read_bytes()
        part = tmp_path / Path(name).name
        part.write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(CollageError):
            check_header(part)
