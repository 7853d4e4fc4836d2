"""Any latent channel count the VAE declares: 4 in Stable Diffusion, 16 in SD3 and Flux.

A tiny SD-1.x-shaped model whose VAE makes 16 latent channels (and whose UNet denoises
16) is saved as a diffusers folder and renders a PSD end to end through the plain
``--model FOLDER`` path: nothing in the engine may assume 4.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from engine_helpers import random_image
from psd_tools import PSDImage

from psd_collage.engine import GenerationRequest, load_engine
from psd_collage.engine.controlnet import build_tiny_controlnet
from psd_collage.engine.models import build_tiny_components, build_tiny_pipeline, to_pipeline
from psd_collage.errors import ModelError
from psd_collage.psd.variants import read_variants
from psd_collage.render import Renderer
from tests.psd_builders import Pixels, build_psd

CHANNELS = 16


@pytest.fixture(scope="module")
def model16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model16") / "tiny16"
    build_tiny_pipeline("sd1", latent_channels=CHANNELS).save_pretrained(folder)
    return folder


def test_a_16_channel_model_renders_a_psd_end_to_end(model16, tmp_path):
    psd = build_psd(
        tmp_path / "street.psd",
        [
            Pixels("a quiet street", (0, 0, 128, 64), (120, 120, 130)),
            Pixels("a red car [lock]", (8, 16, 40, 56), (200, 30, 30)),
            Pixels("a blue ball [noise=0.9, ti]", (72, 8, 120, 56), (20, 40, 220)),
        ],
        size=(128, 64),
        description="a red car and a blue ball on a quiet street",
    )
    renderer = Renderer(
        overrides={"model": str(model16), "variants": 2, "steps": 4, "seed": 7, "ti_steps": 2}
    )
    result = renderer.render_file(psd)
    source = np.asarray(PSDImage.open(psd).composite().convert("RGB"), np.float32) / 255
    variants = [v.astype(np.float32) / 255 for v in read_variants(result.output)]
    assert len(variants) == 2 and variants[0].shape == source.shape
    car, ball = (slice(16, 56), slice(8, 40)), (slice(8, 56), slice(72, 120))
    for variant in variants:
        np.testing.assert_allclose(variant[car], source[car], atol=1 / 255)  # locked
        assert np.abs(variant[ball] - source[ball]).mean() > 0.04  # noise 0.9: repainted
    assert np.abs(variants[0] - variants[1]).mean() > 1e-3


def test_16_channel_latents_keep_noise_0_and_follow_the_seed(model16):
    engine = load_engine(str(model16), device="cpu", dtype="fp32")
    strength = np.zeros((64, 128), np.float32)
    strength[:, 64:] = 0.8
    request = GenerationRequest(random_image(64, 128), strength, "a red car", seeds=[1, 2], steps=5)
    latents, original = engine.sample_latents(request)
    assert original.shape == (1, CHANNELS, 8, 16) and latents.shape == (2, CHANNELS, 8, 16)
    kept = original.expand(2, -1, -1, -1)[..., :7]
    assert (latents[..., :7] == kept).all()  # noise 0, blur-free columns: the input's latents
    assert (latents[..., 9:] - original[..., 9:]).abs().mean() > 0.1
    images = engine.generate(request).images
    assert len(images) == 2 and images[0].shape == (64, 128, 3)


def test_a_unet_that_does_not_fit_its_vae_is_one_clear_error(tmp_path):
    mixed = build_tiny_components("sd1", latent_channels=CHANNELS)
    mixed.vae = build_tiny_components("sd1").vae  # a 4-channel VAE
    to_pipeline(mixed).save_pretrained(tmp_path / "mixed")
    with pytest.raises(ModelError, match="UNet for 16 latent channels but a VAE that makes 4"):
        load_engine(str(tmp_path / "mixed"), device="cpu")


def test_a_controlnet_for_4_channel_latents_is_refused_on_a_16_channel_model(model16):
    engine = load_engine(str(model16), device="cpu", dtype="fp32")
    four = build_tiny_controlnet(build_tiny_components("sd1").unet)
    with pytest.raises(ModelError, match="latent channels 4, the model's 16"):
        engine.use_controlnet(four, "sd15-canny")
    engine.use_controlnet(build_tiny_controlnet(engine.components.unet), "tiny")  # fits
