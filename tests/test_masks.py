"""Occlusion-aware visible masks, the noise map and the pinned-pixel weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from psd_collage import masks
from psd_collage.collage import BaseImage, Collage, CollageLayer, DocumentInfo
from psd_collage.settings import LayerOptions


def _layer(name: str, box, color=(255, 0, 0), noise=0.5, alpha=255, **opts) -> CollageLayer:
    left, top, right, bottom = box
    pixels = np.zeros((bottom - top, right - left, 4), np.uint8)
    pixels[..., :3] = color
    pixels[..., 3] = alpha
    return CollageLayer(name, name, LayerOptions(**opts), pixels, box, noise=noise)


def _collage(layers, size=(100, 80), base=None, background_noise=0.7) -> Collage:
    doc = DocumentInfo(Path("x.psd"), size[0], size[1], "RGB", 8)
    masks.assign_visible_masks(layers, size)
    composite = np.full((size[1], size[0], 3), 128, np.uint8)
    return Collage(doc, "p", "", layers, composite, base=base, background_noise=background_noise)


def test_front_layer_hides_what_is_behind_it() -> None:
    back = _layer("back", (0, 0, 100, 80))
    front = _layer("front", (10, 10, 60, 50))
    bg = masks.assign_visible_masks([back, front], (100, 80))
    assert front.visible_area == (50 * 40) / (100 * 80)
    assert back.visible_area == 1 - front.visible_area
    assert back.full_mask((100, 80))[20, 20] == 0.0  # covered by the front layer
    assert bg.sum() == 0.0  # the back layer covers everything


def test_visible_masks_and_background_sum_to_one_with_soft_alpha() -> None:
    a = _layer("a", (0, 0, 50, 80), alpha=128)
    b = _layer("b", (25, 0, 100, 40), alpha=64)
    bg = masks.assign_visible_masks([a, b], (100, 80))
    total = a.full_mask((100, 80)) + b.full_mask((100, 80)) + bg
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_noise_map_paints_each_layer_and_background_default() -> None:
    car = _layer("car", (0, 0, 50, 80), noise=0.2)
    locked = _layer("sign", (60, 0, 80, 20), noise=0.0, lock=True)
    collage = _collage([car, locked])
    noise = masks.noise_map(collage)
    assert noise[40, 10] == np.float32(0.2)
    assert noise[10, 70] == 0.0  # locked
    assert noise[70, 90] == np.float32(0.7)  # uncovered background


def test_edit_pins_everything_but_redo_layers() -> None:
    base = BaseImage("seed 1", "[harmonized] x", np.zeros((80, 100, 3), np.uint8), 3)
    car = _layer("car", (0, 0, 50, 80), noise=0.6, redo=True, color=(0, 255, 0))
    dog = _layer("dog", (60, 0, 100, 80), noise=0.6)
    collage = _collage([car, dog], base=base)
    assert collage.editing
    noise = masks.noise_map(collage)
    assert noise[:, :50].min() == np.float32(0.6) and noise[:, 50:].max() == 0.0
    start = masks.start_image(collage)
    assert (start[:, :50] == (0, 255, 0)).all()  # the redo layer pasted on the base
    assert (start[:, 50:] == 0).all()  # the base everywhere else


def test_strength_map_is_blurred_at_boundaries() -> None:
    noise = np.zeros((80, 100), np.float32)
    noise[:, 50:] = 1.0
    strength = masks.strength_map(noise, (100, 80))
    assert strength[40, 0] < 0.01 and strength[40, 99] > 0.99
    assert 0.3 < strength[40, 50] < 0.7  # a soft edge, not a step


def test_pin_weights_are_exactly_one_on_pinned_pixels_and_fade_outside() -> None:
    noise = np.full((600, 800), 0.5, np.float32)
    noise[:, :300] = 0.0
    weights = masks.pin_weights(noise, work_size=(256, 192))
    assert (weights[:, :300] == 1.0).all()
    assert weights[:, 700:].max() < 0.01  # far from the pinned region: free
    assert 0.0 < weights[300, 310] < 1.0  # feathered just outside
    assert masks.pin_weights(np.ones((10, 10), np.float32), (64, 64)).max() == 0.0


def test_small_layers_get_stronger_steering() -> None:
    small_in, small_out = masks.default_attention_weights(0.02)
    big_in, big_out = masks.default_attention_weights(0.8)
    assert small_in > big_in and small_out > big_out
    assert masks.default_attention_weights(0.0) == (0.6000000000000001, 0.9)


def test_size_measures_area_and_longest_side() -> None:
    strip = _layer("strip", (0, 0, 100, 8))  # a thin full-width strip: 10 % area, full side
    _collage([strip])
    assert masks.layer_size(strip, (100, 80), "area") == pytest.approx(0.1)
    assert masks.layer_size(strip, (100, 80), "side") == pytest.approx(1.0)
    with pytest.raises(ValueError):
        masks.layer_size(strip, (100, 80), "perimeter")
