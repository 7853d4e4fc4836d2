"""Per-layer canny ControlNet on Flux and SD3: the scale map on the token grid, loading,
the wrong family refused, and a render from the CLI."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import FluxControlNetPipeline, StableDiffusion3ControlNetPipeline
from engine_helpers import DTYPE, IMAGE_ATOL, box_mask, random_image, tiny_engine
from psd_tools import PSDImage
from safetensors.torch import save_file

from psd_collage.engine import GenerationRequest
from psd_collage.engine.controlnet import canny_edges, load_controlnet
from psd_collage.engine.flow import image_ids, pack_latents, unpack_latents
from psd_collage.engine.flow_controlnet import flow_control_inputs
from psd_collage.errors import ModelError
from tests.psd_builders import Pixels, build_psd

MODELS = {"flux": "tiny-flux", "sd3": "tiny-sd3"}
PIPELINES = {"flux": FluxControlNetPipeline, "sd3": StableDiffusion3ControlNetPipeline}
H, W = 64, 128  # latents 8 x 16
#: diffusers keeps latents in the model's dtype between steps, we keep float32 (as in
#: test_engine_flow.py's img2img equivalence)
LATENT_ATOL = 1e-3 if DTYPE in (None, "fp32", "float32") else 5e-2


def _generate(engine, control: np.ndarray | None) -> np.ndarray:
    request = GenerationRequest(
        random_image(H, W),
        np.full((H, W), 0.8, np.float32),
        "a red car on a street",
        seeds=[5],
        steps=3,
        control=control,
    )
    return engine.generate(request).images[0]


@pytest.fixture
def with_controlnet():
    """A tiny flow engine with a ControlNet attached, detached again afterwards."""
    attached: list = []

    def attach(kind: str, source: str = "tiny"):
        engine = tiny_engine(MODELS[kind])
        engine.use_controlnet(load_controlnet(source, engine.components.unet), source)
        attached.append(engine)
        return engine

    yield attach
    for engine in attached:
        engine.use_controlnet(None)


@pytest.mark.parametrize("kind", MODELS)
def test_canny_one_changes_its_own_region_and_canny_zero_gets_nothing(kind, with_controlnet):
    plain = _generate(tiny_engine(MODELS[kind]), None)
    engine = with_controlnet(kind)
    assert np.array_equal(_generate(engine, np.zeros((H, W), np.float32)), plain)
    change = np.abs(_generate(engine, box_mask(H, W, 0, 0, H, W // 2)) - plain).mean(axis=2)
    held, free = change[:, : W // 2].mean(), change[:, W // 2 + 16 :].mean()
    # attention and the VAE carry a little of the left half's change across the picture
    assert held > 0.02 and held > 3 * free, (held, free)


@pytest.mark.parametrize("kind", MODELS)
def test_canny_one_everywhere_at_full_noise_is_diffusers_controlnet_pipeline(kind, monkeypatch):
    """Same model, ControlNet, edges, steps and seed: our latents are FluxControlNetPipeline's
    / StableDiffusion3ControlNetPipeline's. Their VAE hands out its posterior mean, as ours
    does (they would sample it with the seed's generator and so draw other noise)."""
    engine = tiny_engine(MODELS[kind])
    parts = engine.components
    controlnet = load_controlnet("tiny", parts.transformer)
    engine.use_controlnet(controlnet, "tiny")
    guidance = 3.5 if kind == "flux" else 5.0
    image, ones = random_image(H, W), np.ones((H, W), np.float32)
    request = GenerationRequest(
        image, ones, "a red car on a street", seeds=[3], steps=4, guidance=guidance, control=ones
    )
    try:
        ours, _ = engine.sample_latents(request)
    finally:
        engine.use_controlnet(None)
    plain, _ = engine.sample_latents(replace(request, control=None))
    encode = parts.vae.encode

    def encode_to_the_mean(pixels, return_dict=True):
        output = encode(pixels)
        output.latent_dist.sample = lambda generator=None: output.latent_dist.mode()
        return output

    monkeypatch.setattr(parts.vae, "encode", encode_to_the_mean)
    pipeline = parts.pipeline()
    pipe = PIPELINES[kind](**pipeline.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    edges = torch.from_numpy(canny_edges(image)).permute(2, 0, 1)[None] * 2.0 - 1.0
    theirs = pipe(
        prompt=request.prompt,
        control_image=edges.to(engine.device),
        num_inference_steps=4,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="latent",
        max_sequence_length=parts.max_sequence_length,
        height=H,
        width=W,
    ).images
    if kind == "flux":
        theirs = unpack_latents(theirs, (H // 8, W // 8))
    assert (ours - plain).abs().mean() > 0.05  # the ControlNet took part
    assert (ours - theirs.float()).abs().max() < LATENT_ATOL, (ours - theirs.float()).abs().max()


def _controlnet_arguments(kind: str, transformer) -> tuple:
    """Random transformer inputs of the right shapes for latents 8 x 16 (one row)."""
    config, on = transformer.config, {"device": transformer.device, "dtype": transformer.dtype}
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(**on)

    hidden = randn(1, 8, config.joint_attention_dim)
    pooled = randn(1, config.pooled_projection_dim)
    if kind == "flux":
        extra = {
            "txt_ids": torch.zeros(8, 3, **on),
            "img_ids": image_ids((8, 16), **on),
            "guidance": torch.tensor([3.5], **on),
        }
        tokens = pack_latents(randn(1, 16, 8, 16))
        return tokens, torch.tensor([0.5], **on), hidden, pooled, extra
    return randn(1, 16, 8, 16), torch.tensor([500.0], device=on["device"]), hidden, pooled, {}


@pytest.mark.parametrize("kind", MODELS)
def test_every_block_residual_is_the_controlnets_where_canny_is_one_and_zero_elsewhere(kind):
    engine = tiny_engine(MODELS[kind])
    transformer, vae = engine.components.transformer, engine.components.vae
    controlnet = load_controlnet("tiny", transformer)
    controlnet.to(engine.device)
    image, left_half = random_image(H, W), box_mask(H, W, 0, 0, H, W // 2)
    left = flow_control_inputs(controlnet, transformer, vae, image, left_half, engine.device)
    ones = np.ones((H, W), np.float32)
    full = flow_control_inputs(controlnet, transformer, vae, image, ones, engine.device)
    assert left.scale.shape == (1, 4 * 8, 1)  # the 4 x 8 token grid of 2 x 2 latent patches
    arguments = _controlnet_arguments(kind, transformer)
    with torch.no_grad():
        scaled, whole = left.residuals(*arguments), full.residuals(*arguments)
    on = torch.arange(32) % 8 < 4  # tokens of the left half
    samples = [value for value in scaled.values() if isinstance(value, list)]
    assert sum(len(group) for group in samples) == (2 if kind == "flux" else 1)
    for key, group in scaled.items():
        if not isinstance(group, list):
            continue
        for mine, theirs in zip(group, whole[key], strict=True):
            assert torch.equal(mine[:, on], theirs[:, on])
            assert not mine[:, ~on].any() and theirs[:, ~on].abs().sum() > 0


@pytest.mark.parametrize("kind", MODELS)
def test_a_saved_controlnet_folder_loads_back_with_the_same_effect(kind, tmp_path, with_controlnet):
    transformer = tiny_engine(MODELS[kind]).components.transformer
    load_controlnet("tiny", transformer).save_pretrained(tmp_path / "canny")
    control = box_mask(H, W, 0, 0, H, W // 2)
    held = _generate(with_controlnet(kind), control)
    loaded = _generate(with_controlnet(kind, str(tmp_path / "canny")), control)
    np.testing.assert_allclose(loaded, held, atol=IMAGE_ATOL)


@pytest.mark.parametrize("kind", MODELS)
def test_a_single_file_controlnet_is_one_clear_error_asking_for_the_folder(kind, tmp_path):
    transformer = tiny_engine(MODELS[kind]).components.transformer
    path = tmp_path / "canny.safetensors"
    save_file(load_controlnet("tiny", transformer).state_dict(), str(path))
    with pytest.raises(ModelError, match="only as a folder: point --controlnet at its") as refused:
        load_controlnet(str(path), transformer)
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)


def test_a_controlnet_for_another_family_is_one_clear_error(tmp_path):
    flux = tiny_engine("tiny-flux")
    unet_controlnet = load_controlnet("tiny", tiny_engine("tiny").components.unet)
    with pytest.raises(ModelError, match="another kind of model.*ControlNetModel") as refused:
        flux.use_controlnet(unet_controlnet, "sd15 canny")
    assert "\n" not in str(refused.value)
    unet_controlnet.save_pretrained(tmp_path / "sd15-canny")
    with pytest.raises(ModelError, match="another kind of model.*FluxControlNetModel"):
        load_controlnet(str(tmp_path / "sd15-canny"), flux.components.unet)
    sd3_controlnet = load_controlnet("tiny", tiny_engine("tiny-sd3").components.unet)
    with pytest.raises(ModelError, match="SD3ControlNetModel, the model a flux transformer"):
        flux.use_controlnet(sd3_controlnet, "sd3 canny")
    flux_controlnet = load_controlnet("tiny", flux.components.unet)
    with pytest.raises(ModelError, match="another kind of model"):
        tiny_engine().use_controlnet(flux_controlnet, "flux canny")  # and the other way round
    assert flux.controlnet is None


def test_cli_renders_a_flux_collage_with_a_canny_layer(tmp_path):
    psd = build_psd(
        tmp_path / "street.psd",
        [
            Pixels("a quiet street", (0, 0, 128, 64), (120, 120, 130)),
            Pixels("a blue ball [noise=0.9, canny=1]", (64, 16, 112, 56), (20, 40, 220)),
        ],
        size=(128, 64),
        description="a blue ball on a quiet street",
    )
    command = [sys.executable, "-m", "psd_collage.cli", "render", str(psd), "--model", "tiny-flux"]
    command += ["--controlnet", "tiny", "--steps", "2", "--variants", "1", "--seed", "1"]
    run = subprocess.run(
        [*command, "-o", str(tmp_path / "out.psd")], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr
    assert PSDImage.open(tmp_path / "out.psd")[-1].name.startswith("[harmonized]")
