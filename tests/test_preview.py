"""The preview sheet: the input and each variant side by side, each named underneath."""

from __future__ import annotations

import numpy as np
from PIL import Image

from psd_collage.preview import LABEL_HEIGHT, TILE_GAP, write_preview

H, W = 96, 144  # a 3:2 document


def _ink(strip: np.ndarray) -> np.ndarray:
    """Where the label text is: pixels clearly darker than the white strip."""
    return strip.min(axis=-1) < 128


def test_each_tile_is_named_underneath_input_then_its_seed(tmp_path):
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    variants = [np.full((H, W, 3), value, np.float32) for value in (0.2, 0.8)]
    path = write_preview(
        tmp_path / "p.png", source, variants, height=60, names=["seed 7", "seed 8"]
    )
    sheet = np.asarray(Image.open(path).convert("RGB"))
    tile_w = 90  # 144 x 60 / 96
    assert sheet.shape == (60 + LABEL_HEIGHT, 3 * tile_w + 2 * TILE_GAP, 3)
    strips = [
        sheet[60:, k * (tile_w + TILE_GAP) : k * (tile_w + TILE_GAP) + tile_w] for k in range(3)
    ]
    ink = [_ink(strip) for strip in strips]
    for k, mask in enumerate(ink):
        assert 20 < mask.sum() < 0.5 * mask.size, k  # some text, not a filled box
        columns = np.nonzero(mask.any(axis=0))[0]
        middle = (columns[0] + columns[-1]) / 2
        assert abs(middle - tile_w / 2) < 6, (k, middle)  # centred under its tile
    assert not (ink[0] == ink[1]).all()  # "input" is not "seed 7"
    assert not (ink[1] == ink[2]).all()  # "seed 7" is not "seed 8"
    gaps = sheet[:, tile_w : tile_w + TILE_GAP]
    assert (gaps == 255).all()  # labels stay under their own tile
    # The tiles themselves are the pictures: the variants' flat colours, untouched by text.
    np.testing.assert_array_equal(sheet[:60, tile_w + TILE_GAP : 2 * tile_w + TILE_GAP], 51)
    np.testing.assert_array_equal(sheet[:60, 2 * (tile_w + TILE_GAP) :], 204)
