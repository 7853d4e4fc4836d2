"""The sampling loop: per-pixel strength, determinism per seed, progress and cancel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_helpers import IMAGE_ATOL, random_image, tiny_engine

from psd_collage.engine import GenerationRequest
from psd_collage.errors import Cancelled
from psd_collage.masks import strength_map
from psd_collage.settings import SCHEDULERS

H, W = 64, 256  # latents 8 x 32: four bands of 8 latent columns


def _bands(values: list[float]) -> np.ndarray:
    strength = np.zeros((H, W), np.float32)
    band = W // len(values)
    for i, value in enumerate(values):
        strength[:, i * band : (i + 1) * band] = value
    return strength


def _change(latents: torch.Tensor, original: torch.Tensor) -> np.ndarray:
    """Mean absolute latent change per latent column, (columns,)."""
    return (latents - original).abs().mean(dim=(0, 1, 2)).numpy()


def test_change_grows_with_strength_and_zero_strength_keeps_the_latents_exactly():
    engine = tiny_engine("tiny")
    request = GenerationRequest(
        random_image(H, W), _bands([0.0, 0.3, 0.6, 1.0]), "a red car", seeds=[1, 2], steps=10
    )
    latents, original = engine.sample_latents(request)
    assert latents.shape == (2, 4, H // 8, W // 8)
    assert torch.equal(latents[..., :8], original.expand(2, -1, -1, -1)[..., :8])
    change = _change(latents, original)
    per_band = [change[i * 8 + 1 : i * 8 + 7].mean() for i in range(4)]
    assert per_band[0] == 0.0
    assert per_band[0] < per_band[1] < per_band[2] < per_band[3], per_band
    assert per_band[1] > 0.02


def test_a_blurred_boundary_changes_in_between():
    engine = tiny_engine("tiny")
    hard = np.zeros((H, W), np.float32)
    hard[:, W // 2 :] = 1.0
    soft = strength_map(hard, (W, H))  # blurred like the render does
    request = GenerationRequest(random_image(H, W), soft, "a red car", seeds=[3], steps=10)
    latents, original = engine.sample_latents(request)
    change = _change(latents, original)
    untouched = soft.reshape(H, W // 8, 8).max(axis=(0, 2)) == 0  # latent columns the blur missed
    full = change[-4:].mean()
    edge = change[15:17].mean()  # latent columns at the boundary (pixel 128)
    assert untouched.sum() >= 8 and change[untouched].max() == 0.0
    assert 0.05 * full < edge < 0.95 * full, (edge, full)


def test_same_seed_same_image_also_in_a_batch_and_different_seeds_differ():
    engine = tiny_engine("tiny")
    image, strength = random_image(128, 128), np.full((128, 128), 0.8, np.float32)
    alone = engine.generate(GenerationRequest(image, strength, "a dog", seeds=[3], steps=5))
    batch = engine.generate(GenerationRequest(image, strength, "a dog", seeds=[7, 3], steps=5))
    np.testing.assert_allclose(alone.images[0], batch.images[1], atol=IMAGE_ATOL)
    assert np.abs(batch.images[0] - batch.images[1]).mean() > 1e-3
    engine.max_batch = 1  # one variant at a time: same images
    try:
        single = engine.generate(GenerationRequest(image, strength, "a dog", seeds=[7, 3], steps=5))
    finally:
        engine.max_batch = 4
    for a, b in zip(single.images, batch.images, strict=True):
        np.testing.assert_allclose(a, b, atol=IMAGE_ATOL)
    assert all(img.shape == (128, 128, 3) and img.dtype == np.float32 for img in alone.images)
    assert batch.images[0].min() >= 0.0 and batch.images[0].max() <= 1.0
    assert set(alone.timings) == {"encode", "sample", "decode"}


def test_progress_counts_every_step_and_cancel_stops():
    engine = tiny_engine("tiny")
    image = random_image(64, 64)
    seen: list[tuple[int, int]] = []
    request = GenerationRequest(
        image, np.full((64, 64), 0.5, np.float32), "a cat", seeds=[1, 2, 3], steps=8
    )
    engine.max_batch = 2
    try:
        engine.generate(request, progress=lambda done, total: seen.append((done, total)))
    finally:
        engine.max_batch = 4
    # strength 0.5 of 8 steps -> 4 steps, run for 2 batches of variants
    assert seen == [(i, 8) for i in range(1, 9)]
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        engine.generate(request, cancel=cancel)
    assert len(calls) == 3
    # A cancelled run leaves no steering behind for the next one.
    assert not engine.steering.steering


def test_zero_strength_returns_the_input_untouched():
    engine = tiny_engine("tiny")
    image = random_image(64, 128)
    result = engine.generate(
        GenerationRequest(image, np.zeros((64, 128), np.float32), "x", seeds=[1, 2], steps=4)
    )
    assert len(result.images) == 2
    assert all(np.array_equal(img, image) for img in result.images)


def test_noise_too_low_for_the_step_count_comes_back_unchanged_with_a_warning():
    engine = tiny_engine("tiny")
    image = random_image(64, 128)
    low = np.full((64, 128), 0.3, np.float32)
    result = engine.generate(GenerationRequest(image, low, "x", seeds=[1], steps=2))
    assert np.array_equal(result.images[0], image)
    assert any("at least 4 steps" in warning for warning in result.warnings), result.warnings
    enough = engine.generate(GenerationRequest(image, low, "x", seeds=[1], steps=4))
    assert not np.array_equal(enough.images[0], image)
    assert not any("steps" in warning for warning in enough.warnings)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_runs_and_keeps_zero_strength_exact(scheduler):
    engine = tiny_engine("tiny", scheduler)
    strength = np.zeros((64, 128), np.float32)
    strength[:, 64:] = 1.0
    request = GenerationRequest(random_image(64, 128), strength, "a boat", seeds=[5], steps=4)
    seen: list[tuple[int, int]] = []
    latents, original = engine.sample_latents(request, progress=lambda *p: seen.append(p))
    assert seen and seen[-1][0] == seen[-1][1] == len(seen) >= 4
    assert torch.isfinite(latents).all()
    assert torch.equal(latents[..., :8], original[..., :8])
    assert (latents[..., 9:] - original[..., 9:]).abs().mean() > 0.05


def test_sdxl_runs_with_an_empty_negative_prompt_and_without_guidance():
    engine = tiny_engine("tiny-sdxl")
    image, strength = random_image(64, 128), np.full((64, 128), 0.7, np.float32)
    guided = engine.generate(GenerationRequest(image, strength, "a house", seeds=[2], steps=4))
    free = engine.generate(
        GenerationRequest(image, strength, "a house", seeds=[2], steps=4, guidance=1.0)
    )
    assert guided.images[0].shape == (64, 128, 3)
    assert np.abs(guided.images[0] - free.images[0]).mean() > 1e-4


@pytest.mark.parametrize(
    ("size", "resolution"), [((6000, 4000), 512), ((1000, 1000), None), ((300, 1200), 1024)]
)
def test_working_size_keeps_aspect_and_area(size, resolution):
    engine = tiny_engine("tiny")
    width, height = engine.working_size(size, resolution)
    target = resolution or engine.native_resolution
    assert width % 64 == 0 and height % 64 == 0
    assert abs(width * height / target**2 - 1) < 0.3
    assert abs((width / height) / (size[0] / size[1]) - 1) < 0.15


def test_pinned_area_dilation_grows_with_the_timestep():
    from psd_collage.engine.sampler import dilate_pinned

    pinned = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    pinned[..., :, :8] = True
    assert torch.equal(dilate_pinned(pinned, torch.tensor(200)), pinned)  # int(0.8) = 0
    grown = dilate_pinned(pinned, torch.tensor(999))  # int(3.996) = 3 latent px
    assert grown[0, 0, 0].sum() == 11 and grown[..., :8].all()


def test_authors_schedule_steers_harder_below_full_noise():
    engine = tiny_engine("tiny")
    factors = {}
    for schedule in ("sigma", "authors"):
        seen = []
        engine.steering.recorder = lambda *_, seen=seen: seen.append(engine.steering.factor)
        request = GenerationRequest(
            random_image(H, W),
            np.full((H, W), 0.6, np.float32),
            "a red car",
            seeds=[1],
            steps=10,
            steering_schedule=schedule,
        )
        try:
            engine.sample_latents(request)
        finally:
            engine.steering.recorder = None
        factors[schedule] = seen
    assert factors["authors"][0] > factors["sigma"][0] > factors["sigma"][-1]
