"""With steering off, our sampler produces what diffusers' own pipelines produce.

Uniform noise ``s`` on every layer, no steering, no textual inversion, ControlNet or LoRA:
the engine's latents equal ``StableDiffusion(XL)Img2ImgPipeline`` at strength ``s`` with
the same scheduler, steps, guidance and seeds (one generator per seed, as our batches
draw them), and noise 1 everywhere equals the text-to-image pipeline. This is what tells
a user that SD 1.5 or SDXL weights behave in psd-collage as in diffusers.

The one deliberate difference is the VAE encoding: diffusers' img2img draws a posterior
*sample* from each seed's generator before the noise, while we start every seed from the
posterior *mean* (deterministic: pixels of noise 0 decode identically in every variant,
and textual inversion trains on the same encoding). So the img2img pipelines get our
encoded latents as their ``image`` (a path diffusers documents: 4-channel input is not
encoded again), and a separate test shows our encoding is diffusers' own preprocessing and
VAE mean. The pipelines run on freshly built components with diffusers' attention
processors, not on the engine's modules (which carry ours).

A second, smaller difference is left out by the strengths chosen: where ``strength x
steps`` falls a rounding error below a whole number (0.29 x 100 = 28.999...), diffusers
truncates it (28 steps) and we count the step the user meant (29).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from engine_helpers import random_image

from psd_collage.engine import Engine, GenerationRequest, load_engine
from psd_collage.engine.models import (
    PACKAGED_MODELS,
    build_tiny_components,
    make_scheduler,
    to_pipeline,
)
from psd_collage.engine.sampler import encode_image
from psd_collage.shapes.world import SIZE, draw, random_scenes

#: Latents may differ by float rounding only (we see 0.0 on the CPU in fp32).
LATENT_ATOL = 1e-3
SEEDS = [11, 12]
STEPS = 10
GUIDANCE = 5.0
TINY = {"sd1": "tiny", "sdxl": "tiny-sdxl"}
#: The default sampler, two deterministic ones and a multistep one.
SCHEDULERS = ["euler_ancestral", "euler", "ddim", "dpm++"]


@cache
def _engine(model: str, scheduler: str) -> Engine:
    """CPU fp32: equivalence is a property of the arithmetic, not of a device's rounding."""
    return load_engine(model, device="cpu", dtype="fp32", scheduler=scheduler)


def _pipeline(kind: str, scheduler: str, img2img: bool):
    """diffusers' pipeline over the same tiny weights, freshly built (its own processors)."""
    components = build_tiny_components(kind)
    components.scheduler = make_scheduler(scheduler, components.scheduler.config)
    pipe = to_pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    if not img2img:
        return pipe
    parts = {k: v for k, v in pipe.components.items() if k in _IMG2IMG_PARTS[kind]}
    cls = StableDiffusionXLImg2ImgPipeline if kind == "sdxl" else StableDiffusionImg2ImgPipeline
    img2img_pipe = cls(**parts, **({"requires_safety_checker": False} if kind == "sd1" else {}))
    img2img_pipe.set_progress_bar_config(disable=True)
    return img2img_pipe


_IMG2IMG_PARTS = {
    "sd1": {"vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker"}
    | {"feature_extractor"},
    "sdxl": {"vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet"}
    | {"scheduler"},
}


def _generators() -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in SEEDS]


def _ours(engine: Engine, image: np.ndarray, noise: float, prompt: str, negative: str):
    height, width = image.shape[:2]
    request = GenerationRequest(
        image=image,
        strength=np.full((height, width), noise, np.float32),
        prompt=prompt,
        negative_prompt=negative,
        seeds=SEEDS,
        steps=STEPS,
        guidance=GUIDANCE,
    )
    return engine.sample_latents(request)


def _negative(kind: str, negative: str) -> str | None:
    # SDXL's pipeline zeroes the unconditional embedding only for negative_prompt=None;
    # our engine does so for an empty negative prompt (force_zeros_for_empty_prompt).
    return None if kind == "sdxl" and not negative else negative


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize(("noise", "negative"), [(0.3, ""), (0.6, "blurry")])
def test_uniform_noise_equals_the_img2img_pipeline(kind, scheduler, noise, negative):
    prompt = "a red car by an old tree"
    ours, original = _ours(
        _engine(TINY[kind], scheduler), random_image(64, 128), noise, prompt, negative
    )
    pipe = _pipeline(kind, scheduler, img2img=True)
    theirs = pipe(
        prompt=prompt,
        negative_prompt=_negative(kind, negative),
        image=original.expand(len(SEEDS), -1, -1, -1),
        strength=noise,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        num_images_per_prompt=len(SEEDS),
        generator=_generators(),
        output_type="latent",
    ).images
    assert ours.shape == theirs.shape == (2, 4, 8, 16)
    assert (ours - original).abs().mean() > 0.1  # it really sampled
    torch.testing.assert_close(ours, theirs, atol=LATENT_ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_noise_one_everywhere_equals_the_text_to_image_pipeline(kind, scheduler):
    """Noise 1 starts from pure noise, as text-to-image does (img2img at strength 1 keeps
    a trace of the input; the test fails if we start from the re-noised input)."""
    prompt = "a red car by an old tree"
    ours, _ = _ours(_engine(TINY[kind], scheduler), random_image(64, 128), 1.0, prompt, "")
    pipe = _pipeline(kind, scheduler, img2img=False)
    assert isinstance(
        pipe, StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    )
    theirs = pipe(
        prompt=prompt,
        height=64,
        width=128,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        num_images_per_prompt=len(SEEDS),
        generator=_generators(),
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, theirs, atol=LATENT_ATOL, rtol=0)
    # The input image plays no part any more: another picture gives the same latents.
    other, _ = _ours(_engine(TINY[kind], scheduler), random_image(64, 128, seed=5), 1.0, prompt, "")
    torch.testing.assert_close(other, ours, atol=LATENT_ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_our_encoding_is_diffusers_preprocessing_and_posterior_mean(kind):
    """What the img2img pipelines would encode from the pixels, taking the posterior mean
    instead of a sample: the only step the tests above feed around."""
    engine = _engine(TINY[kind], "euler_ancestral")
    image = random_image(64, 128, seed=3)
    pipe = _pipeline(kind, "euler_ancestral", img2img=True)
    pixels = pipe.image_processor.preprocess(image[None])  # (1, 3, h, w) in [-1, 1]
    with torch.no_grad():
        posterior = pipe.vae.encode(pixels).latent_dist
    expected = posterior.mode() * pipe.vae.config.scaling_factor
    ours = encode_image(engine.components.vae, image, torch.device("cpu"))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    # A sample (what diffusers draws) differs from it: the choice is real, and stated.
    sampled = posterior.sample(torch.Generator("cpu").manual_seed(SEEDS[0]))
    assert (sampled * pipe.vae.config.scaling_factor - expected).abs().max() > 1e-4


# -- the shipped ``shapes`` model against diffusers' pipeline loaded from its folder ----------


@pytest.mark.parametrize("scheduler", ["euler_ancestral", "ddim"])
@pytest.mark.parametrize("noise", [0.6, 1.0])
def test_shapes_model_equals_diffusers_loading_the_packaged_folder(scheduler, noise):
    folder = PACKAGED_MODELS["shapes"]
    engine = _engine("shapes", scheduler)
    prompt = "a red circle and a blue square on grass at sunset"
    image = draw(random_scenes(1, seed=4)).images[0]
    ours, original = _ours(engine, image, noise, prompt, "")
    common = {"dtype": torch.float32, "local_files_only": True}
    if noise < 1.0:
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(folder, **common)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(folder, **common)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if noise < 1.0:
        options = {"image": original.expand(len(SEEDS), -1, -1, -1), "strength": noise}
    else:
        options = {"height": SIZE, "width": SIZE}
    theirs = pipe(
        prompt=prompt,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        num_images_per_prompt=len(SEEDS),
        generator=_generators(),
        output_type="latent",
        **options,
    ).images
    assert ours.shape == (2, 4, SIZE // 8, SIZE // 8)
    torch.testing.assert_close(ours, theirs, atol=LATENT_ATOL, rtol=0)
