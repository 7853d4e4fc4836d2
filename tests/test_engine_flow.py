"""Flux and SD3 (flow-matching transformers): per-pixel start time, joint-attention steering,
diffusers equivalence, loading, LoRA, refusals, and a render end to end (ControlNet:
test_engine_flow_controlnet.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline
from engine_helpers import (
    DEVICE,
    DTYPE,
    IMAGE_ATOL,
    random_image,
    tiny_engine,
    two_phrase_request,
)
from psd_tools import PSDImage

from psd_collage.engine import GenerationRequest, load_engine, save_single_file
from psd_collage.engine.flow import locate_flow_captions, unpack_latents
from psd_collage.engine.flow_models import build_tiny_flow_components
from psd_collage.engine.lora import LoadedLora, lora_identity, read_lora, save_tiny_lora
from psd_collage.errors import SettingsError
from psd_collage.render import Renderer
from tests.psd_builders import Pixels, build_psd, edit_copy

MODELS = {"flux": "tiny-flux", "sd3": "tiny-sd3"}
IMG2IMG = {"flux": FluxImg2ImgPipeline, "sd3": StableDiffusion3Img2ImgPipeline}
H, W = 64, 256  # latents 8 x 32: four bands of 8 latent columns
#: diffusers keeps img2img latents in the model's dtype between steps, we keep float32:
#: equal in float32, within half-precision rounding on a GPU run (benchmarks/gpu_check.sh).
LATENT_ATOL = 1e-3 if DTYPE in (None, "fp32", "float32") else 5e-2


def _bands(values: list[float]) -> np.ndarray:
    strength = np.zeros((H, W), np.float32)
    band = W // len(values)
    for i, value in enumerate(values):
        strength[:, i * band : (i + 1) * band] = value
    return strength


@pytest.mark.parametrize("kind", MODELS)
def test_tiny_models_are_deterministic_with_a_16_channel_vae(kind):
    a, b = build_tiny_flow_components(kind), build_tiny_flow_components(kind)
    for (name, first), (_, second) in zip(a.modules(), b.modules(), strict=True):
        for x, y in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
            assert torch.equal(x, y), name
    assert a.vae.config.latent_channels == 16 and a.native_resolution == 256
    t5 = a.tokenizers[-1]
    assert len(t5("a red vintage car", add_special_tokens=False).input_ids) == 4
    assert len(a.text_encoders) == (2 if kind == "flux" else 3)


@pytest.mark.parametrize("kind", MODELS)
def test_noise_zero_keeps_latents_exactly_and_change_grows_with_noise(kind):
    engine = tiny_engine(MODELS[kind])
    request = GenerationRequest(
        random_image(H, W), _bands([0.0, 0.25, 0.5, 1.0]), "a red car", seeds=[1, 2], steps=4
    )
    latents, original = engine.sample_latents(request)
    assert latents.shape == (2, 16, H // 8, W // 8)
    assert torch.equal(latents[..., :8], original.expand(2, -1, -1, -1)[..., :8])
    change = (latents - original).abs().mean(dim=(0, 1, 2)).numpy()
    per_band = [change[i * 8 + 1 : i * 8 + 7].mean() for i in range(4)]
    assert per_band[0] == 0.0 < per_band[1] < per_band[2] < per_band[3], per_band


@pytest.mark.parametrize(("kind", "strength"), [("flux", 0.75), ("flux", 1.0), ("sd3", 0.75)])
def test_uniform_noise_without_steering_is_diffusers_img2img(kind, strength):
    """Same model, steps, seed: our latents are FluxImg2ImgPipeline's /
    StableDiffusion3Img2ImgPipeline's. The pipeline gets our (deterministic) VAE latents
    as its image, since it would sample the VAE posterior with the seed's generator."""
    engine = tiny_engine(MODELS[kind])
    parts = engine.components
    guidance = 3.5 if kind == "flux" else 5.0
    request = GenerationRequest(
        random_image(64, 128),
        np.full((64, 128), strength, np.float32),
        "a red car on a street",
        negative_prompt="blurry",
        seeds=[3],
        steps=4,
        guidance=guidance,
    )
    ours, original = engine.sample_latents(request)
    modules = {"transformer": parts.transformer, "vae": parts.vae}
    for i, (encoder, tokenizer) in enumerate(
        zip(parts.text_encoders, parts.tokenizers, strict=True)
    ):
        suffix = "" if i == 0 else f"_{i + 1}"
        modules[f"text_encoder{suffix}"] = encoder
        modules[f"tokenizer{suffix}"] = tokenizer
    scheduler = type(parts.scheduler).from_config(parts.scheduler.config)
    pipe = IMG2IMG[kind](scheduler=scheduler, **modules)
    pipe.set_progress_bar_config(disable=True)
    extra = {"negative_prompt": "blurry"} if kind == "sd3" else {}
    theirs = pipe(
        prompt=request.prompt,
        image=original,
        strength=strength,
        num_inference_steps=4,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="latent",
        max_sequence_length=parts.max_sequence_length,
        height=64,
        width=128,
        **extra,
    ).images
    if kind == "flux":
        theirs = unpack_latents(theirs, (8, 16))
    assert (ours - original).abs().mean() > 0.1  # it did sample
    assert (ours - theirs.float()).abs().max() < LATENT_ATOL


def _attention_shares(engine, request):
    """Mean share of each caption's attention mass (image queries) inside its own mask."""
    _, positions, _ = locate_flow_captions(
        engine.components, request.prompt, [p.text for p in request.phrases]
    )
    shares: list[list[float]] = [[] for _ in request.phrases]
    names: set[str] = set()

    def record(name, probs, grid):
        names.add(name)
        for i, (phrase, where) in enumerate(zip(request.phrases, positions, strict=True)):
            mass = probs[..., where].sum(-1)  # (B, heads, pixels)
            mask = F.adaptive_avg_pool2d(torch.from_numpy(phrase.mask)[None, None], grid).flatten()
            shares[i].append(float((mass * mask).sum() / mass.sum()))

    with engine.record_attention(record):
        engine.generate(request)
    return [float(np.mean(s)) for s in shares], names


@pytest.mark.parametrize("kind", MODELS)
def test_steering_pulls_each_caption_into_its_mask(kind):
    engine = tiny_engine(MODELS[kind])
    plain, names = _attention_shares(engine, two_phrase_request(128, 192, 0.0, 0.0, steps=4))
    steered, _ = _attention_shares(engine, two_phrase_request(128, 192, 0.6, 0.9, steps=4))
    strong, _ = _attention_shares(engine, two_phrase_request(128, 192, 2.0, 2.0, steps=4))
    if kind == "flux":  # double- and single-stream blocks are both steered
        assert any(n.startswith("single_transformer_blocks") for n in names), names
    assert plain[0] == pytest.approx(1 / 3, abs=0.1) and plain[1] == pytest.approx(1 / 4, abs=0.1)
    for before, after, more in zip(plain, steered, strong, strict=True):
        assert before + 0.1 < after < more, (plain, steered, strong)


def test_sd3_captions_are_steered_in_both_the_clip_and_the_t5_tokens():
    components = tiny_engine("tiny-sd3").components
    prompt, positions, warnings = locate_flow_captions(components, "a dog", ["red car", None])
    assert prompt == "a dog, red car" and not warnings
    # "a dog , red car": CLIP counts a BOS first, T5 has none and starts after CLIP's 77
    assert positions == [[4, 5, 77 + 3, 77 + 4], None]


def _image(engine, seed: int = 4) -> np.ndarray:
    request = GenerationRequest(
        random_image(64, 128),
        np.full((64, 128), 0.75, np.float32),
        "a red car",
        seeds=[seed],
        steps=4,
    )
    return engine.generate(request).images[0]


@pytest.mark.parametrize("kind", MODELS)
def test_loads_from_a_diffusers_folder_and_a_single_file(kind, tmp_path):
    reference = _image(tiny_engine(MODELS[kind]))
    build_tiny_flow_components(kind).pipeline().save_pretrained(tmp_path / "model")
    save_single_file(build_tiny_flow_components(kind), tmp_path / "model.safetensors")
    for source in (tmp_path / "model", tmp_path / "model.safetensors"):
        engine = load_engine(str(source), device=DEVICE, dtype=DTYPE)
        assert engine.kind == kind and engine.native_resolution == 256
        assert engine.weights_hash == tiny_engine(MODELS[kind]).weights_hash
        np.testing.assert_allclose(_image(engine), reference, atol=IMAGE_ATOL)


@pytest.mark.parametrize("kind", MODELS)
def test_lora_loads_changes_the_picture_and_comes_off_exactly(kind, tmp_path):
    engine = load_engine(MODELS[kind], device="cpu")
    before = _image(engine)
    path = save_tiny_lora(engine.components, tmp_path / "style.safetensors")
    engine.use_loras([LoadedLora(str(path), lora_identity(path), read_lora(path), 1.0)])
    assert np.abs(_image(engine) - before).mean() > 1e-3
    engine.use_loras([])
    np.testing.assert_array_equal(_image(engine), before)


def test_textual_inversion_is_refused_in_one_line():
    from psd_collage.engine.textual_inversion import InversionTarget, learn_tokens

    engine = tiny_engine("tiny-flux")
    target = InversionTarget("ball", random_image(64, 64), np.ones((64, 64), np.float32), "ball")
    with pytest.raises(SettingsError, match="'ball' asks for textual inversion, which flux"):
        learn_tokens(engine, [target])


@pytest.fixture
def collage_psd(tmp_path):
    return build_psd(
        tmp_path / "street.psd",
        [
            Pixels("a quiet street", (0, 0, 192, 128), (120, 120, 130)),
            Pixels("a red car [lock]", (16, 64, 64, 104), (200, 30, 30)),
            Pixels("a blue ball [noise=0.9]", (120, 40, 168, 88), (20, 40, 220)),
        ],
        size=(192, 128),
        description="a red car and a blue ball on a quiet street",
    )


@pytest.mark.parametrize("kind", MODELS)
def test_render_writes_variants_with_locks_exact_and_redo(kind, collage_psd, tmp_path):
    renderer = Renderer(overrides={"model": MODELS[kind], "variants": 2, "steps": 4, "seed": 7})
    first = renderer.render_file(collage_psd, tmp_path / "first.psd")
    source = np.asarray(PSDImage.open(collage_psd).composite().convert("RGB"))
    group = PSDImage.open(first.output)[-1]
    assert group.name.startswith("[harmonized]") and [x.name for x in group] == ["seed 8", "seed 7"]
    variant = np.asarray(next(x for x in group if x.name == "seed 7").topil().convert("RGB"))
    car, ball = (slice(64, 104), slice(16, 64)), (slice(40, 88), slice(120, 168))
    np.testing.assert_array_equal(variant[car], source[car])  # locked: pixel for pixel
    assert np.abs(variant[ball].astype(int) - source[ball]).mean() > 5  # repainted

    edited = edit_copy(
        first.output,
        tmp_path / "edited.psd",
        rename={"a blue ball [noise=0.9]": "a blue ball [noise=0.9, redo]"},
    )
    second = renderer.render_file(edited, tmp_path / "second.psd")
    groups = [x for x in PSDImage.open(second.output) if x.is_group()]
    base = np.asarray(next(x for x in groups[-2] if x.name == "seed 7").topil().convert("RGB"))
    new = np.asarray(next(x for x in groups[-1] if x.name == "seed 7").topil().convert("RGB"))
    far = np.ones(base.shape[:2], bool)
    far[20:108, 100:188] = False  # away from the ball and its feathered edge
    np.testing.assert_array_equal(new[far], base[far])  # pinned to the chosen variant

    tagged = edit_copy(
        collage_psd, tmp_path / "ti.psd", rename={"a blue ball [noise=0.9]": "a blue ball [ti]"}
    )
    with pytest.raises(SettingsError, match="textual inversion"):
        renderer.render_file(tagged, tmp_path / "ti.out.psd")
    assert not (tmp_path / "ti.out.psd").exists()


def test_cli_renders_with_a_flux_model(collage_psd):
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "psd_collage.cli", "render", str(collage_psd), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=600)

    common = ("--model", "tiny-flux", "--steps", "2", "--variants", "1", "--seed", "1")
    run = cli(*common, "-o", str(collage_psd.with_name("out.psd")))
    assert run.returncode == 0, run.stderr
    assert PSDImage.open(collage_psd.with_name("out.psd"))[-1].name.startswith("[harmonized]")


def _joint_module(layout: str) -> torch.nn.Module:
    from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttention

    if layout == "sd3":
        return Attention(
            query_dim=16,
            added_kv_proj_dim=16,
            dim_head=8,
            heads=2,
            out_dim=16,
            context_pre_only=False,
            bias=True,
            qk_norm="rms_norm",  # SD3.5's; the processors handle SD3.0's none as well
            processor=JointAttnProcessor2_0(),
        )
    joint = layout == "flux-double"
    return FluxAttention(
        query_dim=16,
        heads=2,
        dim_head=8,
        out_dim=16,
        bias=True,
        added_kv_proj_dim=16 if joint else None,
        context_pre_only=False if joint else None,
        pre_only=not joint,
    )


def _reference_probs(attn, x, context, layout, masks, weights, phrase_tokens, factor, cond_start):
    """The collage formula on the joint scores, written out token by token: image queries
    x caption keys of the conditional rows get the bias; returns the image rows' softmax
    over the text keys (B - cond_start, heads, pixels, tokens)."""
    heads, d = attn.heads, 8

    def split(t):
        return t.view(t.shape[0], -1, heads, d)

    if layout == "flux-single":  # one [text, image] sequence
        q, k = attn.norm_q(split(attn.to_q(x))), attn.norm_k(split(attn.to_k(x)))
        tokens = x.shape[1] - masks.shape[1] * masks.shape[2]
    else:
        q, k = attn.norm_q(split(attn.to_q(x))), attn.norm_k(split(attn.to_k(x)))
        tq = attn.norm_added_q(split(attn.add_q_proj(context)))
        tk = attn.norm_added_k(split(attn.add_k_proj(context)))
        first = layout == "flux-double"
        q = torch.cat([tq, q] if first else [q, tq], dim=1)
        k = torch.cat([tk, k] if first else [k, tk], dim=1)
        tokens = context.shape[1]
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    text = slice(0, tokens) if layout != "sd3" else slice(q.shape[2] - tokens, q.shape[2])
    image = slice(tokens, q.shape[2]) if layout != "sd3" else slice(0, q.shape[2] - tokens)
    scores = (q @ k.transpose(-1, -2)) / d**0.5
    for b in range(cond_start, x.shape[0]):
        original = scores[b].clone()
        for i, phrase in enumerate(phrase_tokens):
            columns = [text.start + j for j in phrase]
            peak = original[:, image][:, :, columns].max()
            inside, outside = weights[i]
            m = masks[i].flatten()
            for j in columns:
                for p in range(m.shape[0]):
                    row = image.start + p
                    scores[b, :, row, j] += factor * (inside * m[p] - outside * (1 - m[p])) * peak
    return scores.softmax(-1)[cond_start:, :, image][..., text]


@torch.no_grad()
@pytest.mark.parametrize("layout", ["flux-double", "flux-single", "sd3"])
def test_joint_steering_matches_the_formula_on_conditional_rows_only(layout):
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from psd_collage.engine.attention import sigma_weight
    from psd_collage.engine.joint_attention import (
        FluxSteeredProcessor,
        JointSteeringState,
        SD3SteeredProcessor,
    )

    torch.manual_seed(0)
    attn = _joint_module(layout)
    latent = (4, 6)  # latents; image tokens at patch size 2: a 2 x 3 grid
    masks = torch.zeros(2, 2, 3)
    masks[0, :, :2] = 1.0
    masks[1, 1, 1:] = torch.tensor([0.5, 1.0])
    weights = [(0.6, 0.9), (1.5, 0.2)]
    phrase_tokens = [[1, 2], [4]]
    token_phrase = torch.tensor([-1, 0, 0, -1, 1, -1, -1])
    state = JointSteeringState()
    image_masks = masks.repeat_interleave(16, 1).repeat_interleave(16, 2)  # image size 32 x 48
    state.set_phrases(image_masks, torch.tensor(weights), token_phrase, latent)
    state.cond_start, state.factor, state.text_tokens = 1, sigma_weight(2.0), 7
    image = torch.randn(3, 6, 16) * 3
    context = torch.randn(3, 7, 16) * 3
    if layout == "flux-single":
        x, ctx = torch.cat([context, image], dim=1), None
    else:
        x, ctx = image, context
    steered = SD3SteeredProcessor(state) if layout == "sd3" else FluxSteeredProcessor(state)
    plain = JointAttnProcessor2_0() if layout == "sd3" else FluxAttnProcessor()

    fused = steered(attn, x, ctx)
    recorded = []
    state.recorder = lambda name, probs, grid: recorded.append((probs, grid))
    explicit = steered(attn, x, ctx)
    state.recorder = None
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-4)
    probs, grid = recorded[0]
    assert grid == (2, 3)
    expected = _reference_probs(
        attn, x, context, layout, masks, weights, phrase_tokens, state.factor, 1
    )
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)

    reference = plain(attn, x, ctx)
    first = fused[0] if isinstance(fused, tuple) else fused
    unsteered = reference[0] if isinstance(reference, tuple) else reference
    torch.testing.assert_close(first[:1], unsteered[:1], atol=1e-5, rtol=1e-4)  # uncond row
    assert (first[1:] - unsteered[1:]).abs().max() > 1e-2  # the conditional rows moved
    state.clear()
    again = steered(attn, x, ctx)  # no phrases: diffusers' own processor, bit for bit
    for ours, theirs in zip(
        again if isinstance(again, tuple) else (again,),
        reference if isinstance(reference, tuple) else (reference,),
        strict=True,
    ):
        assert torch.equal(ours, theirs)


def test_hub_ids_are_told_apart_by_their_model_index(tmp_path, monkeypatch):
    """A hub id's dot ("FLUX.1-dev") is no file suffix; the family comes from the
    repository's model_index.json (here a cached one), not from the name."""
    import huggingface_hub

    from psd_collage.engine.flow_models import flow_family

    indexes = {
        "black-forest-labs/FLUX.1-dev": "FluxPipeline",
        "stabilityai/stable-diffusion-3.5-medium": "StableDiffusion3Pipeline",
        "someone/sd-1.5-style": "StableDiffusionPipeline",
    }

    def cached(repo_id, filename, local_files_only=False, **_):
        assert filename == "model_index.json" and local_files_only
        index = tmp_path / f"{repo_id.replace('/', '--')}.json"
        index.write_text(json.dumps({"_class_name": indexes[repo_id]}))
        return str(index)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cached)
    assert [flow_family(repo) for repo in indexes] == ["flux", "sd3", None]
    assert flow_family(str(tmp_path / "missing.safetensors")) is None
