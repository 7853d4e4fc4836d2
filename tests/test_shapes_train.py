"""Training the ``shapes`` model: the default sizes are the shipped model's, and the
proposed stronger configuration (16 latent channels, wider VAE and UNet) trains,
exports and renders through the engine (two steps per stage: a smoke run, not a model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from psd_collage.engine import GenerationRequest, load_engine
from psd_collage.render import render_file
from psd_collage.shapes import model, train
from psd_collage.shapes.psd import read_variants, write_scene_psd
from psd_collage.shapes.world import SIZE, draw, draw_collages, random_scenes
from tests.engine_helpers import DEVICE


def _config(folder: str) -> dict:
    return json.loads((model.WEIGHTS_DIR / folder / "config.json").read_text())


@pytest.mark.parametrize(
    ("folder", "build"),
    [
        ("vae", lambda: model.build_vae()),
        ("unet", lambda: model.build_unet()),
        ("text_encoder", lambda: model.build_text_encoder(model.build_tokenizer())),
    ],
)
def test_the_default_sizes_are_the_shipped_models(folder, build):
    shipped = _config(folder)
    built = build().config
    built = built.to_dict() if hasattr(built, "to_dict") else dict(built)
    ignored = {"scaling_factor", "dtype", "torch_dtype", "_diffusers_version", "_class_name"}
    ignored |= {"transformers_version", "architectures", "_name_or_path", "_use_default_values"}
    for key, value in shipped.items():
        if key in ignored or key.startswith("_"):
            continue
        mine = built.get(key)
        mine = list(mine) if isinstance(mine, tuple) else mine
        assert mine == value, (folder, key, mine, value)


def test_collages_are_scenes_whose_objects_come_from_another_light():
    scenes = random_scenes(3, seed=5)
    same = draw_collages(scenes, [s.light for s in scenes])
    np.testing.assert_array_equal(same, draw(scenes).images)  # one light: the plain scene
    other = draw_collages(scenes, ["night" if s.light != "night" else "day" for s in scenes])
    objects = draw(scenes).alphas.max(axis=1) > 0
    changed = np.abs(other - same).max(axis=-1) > 1e-6
    assert changed[objects].mean() > 0.9 and not changed[~objects].any()


def _latents(engine) -> torch.Tensor:
    """A world scene's latents at noise 0.5, two steps: their shape is the model's."""
    request = GenerationRequest(
        image=draw(random_scenes(1, seed=2)).images[0],
        strength=np.full((SIZE, SIZE), 0.5, np.float32),
        prompt="a red circle on grass in daylight",
        steps=2,
    )
    return engine.sample_latents(request)[0]


def test_the_strong_configuration_trains_exports_and_renders(tmp_path):
    out = tmp_path / "weights"
    flags = ["--arch", "strong", "--work", str(tmp_path / "work"), "--out", str(out)]
    sizes = ["--vae-steps", "2", "--vae-batch", "2", "--scenes", "8", "--unet-steps", "2"]
    recipe = ["--batch", "4", "--threads", "1", "--edge-weight", "0.5", "--mixed-light", "0.5"]
    recipe += ["--unet-mixed-light", "0.5"]
    # On the device the engine tests use (PSD_COLLAGE_TEST_DEVICE: gpu_check.sh sets cuda).
    train.main([*flags, *sizes, *recipe, "--device", DEVICE])
    stats = json.loads((out / "training.json").read_text())
    assert stats["device"] == DEVICE
    assert stats["arch"]["name"] == "strong" and stats["arch"]["latent_channels"] == 16
    assert stats["vae_loss"] == {"kl_weight": 1e-6, "edge_weight": 0.5, "mixed_light": 0.5}
    assert stats["unet_mixed_light"] == 0.5
    engine = load_engine(str(out), device="cpu", dtype="fp32")
    assert engine.components.vae.config.latent_channels == 16
    latents = _latents(engine)
    assert latents.shape == (1, 16, SIZE // 8, SIZE // 8)
    # Latents cached for one recipe are not reused for another.
    with pytest.raises(SystemExit, match="another --unet-mixed-light"):
        train.main([*flags, *sizes, "--batch", "4", "--threads", "1"])
    # Resuming with other sizes is refused instead of loading mismatched weights.
    with pytest.raises(SystemExit, match="other model sizes"):
        train.main([*flags[2:], *sizes, "--batch", "4", "--threads", "1"])


def test_a_4x_autoencoder_trains_exports_and_renders_a_psd_at_32_latent_pixels(tmp_path):
    """Three VAE blocks (a 4x factor, as a 128 px world needs for objects of a few latent
    pixels) and a fourth UNet block at the full latent size: the engine takes both from
    the configs, so the exported folder renders a PSD at the model's native 128 px."""
    out = tmp_path / "weights"
    flags = ["--work", str(tmp_path / "work"), "--out", str(out), "--threads", "1"]
    sizes = ["--vae-steps", "2", "--vae-batch", "2", "--scenes", "8", "--unet-steps", "2"]
    blocks = ["--vae-blocks", "16,32,64", "--unet-blocks", "16,32,64,64", "--batch", "4"]
    train.main([*flags, *sizes, *blocks, "--device", DEVICE])
    assert json.loads((out / "training.json").read_text())["arch"]["vae_blocks"] == [16, 32, 64]
    engine = load_engine(str(out), device="cpu", dtype="fp32")
    assert engine.components.native_resolution == SIZE
    latents = _latents(engine)
    assert latents.shape == (1, 4, SIZE // 4, SIZE // 4)
    psd = write_scene_psd(tmp_path / "scene.psd", random_scenes(1, seed=3)[0])
    result = render_file(psd, tmp_path / "out.psd", model=str(out), steps=2, variants=1)
    (variant,) = read_variants(result.output)
    assert variant.shape == (SIZE, SIZE, 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_a_device_that_is_not_there_is_refused_before_any_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        train.main(["--device", "cuda", "--work", str(tmp_path / "work")])
    assert refused.value.code == 2
    assert "CUDA is not available: use --device cpu" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_a_noise_shift_divides_the_signal_to_noise_ratio_and_ships_with_the_weights(tmp_path):
    """``--noise-shift 2``: every step's SNR is a quarter of Stable Diffusion's, and the
    exported folder samples on that schedule (its scheduler config carries the betas)."""
    plain = model.build_scheduler().alphas_cumprod.double()
    shifted = model.build_scheduler(2.0).alphas_cumprod.double()
    ratio = (shifted / (1 - shifted)) / (plain / (1 - plain))
    assert torch.allclose(ratio, torch.full_like(ratio, 0.25), rtol=1e-4)
    out, work = tmp_path / "weights", tmp_path / "work"
    sizes = ["--vae-steps", "2", "--vae-batch", "2", "--scenes", "8", "--unet-steps", "2"]
    common = [*sizes, "--batch", "4", "--threads", "1", "--work", str(work)]
    train.main([*common, "--out", str(out), "--noise-shift", "2"])
    assert json.loads((out / "training.json").read_text())["noise_shift"] == 2.0
    engine = load_engine(str(out), device="cpu", dtype="fp32")
    loaded = engine.components.scheduler.alphas_cumprod.double()
    assert torch.allclose(loaded, shifted, rtol=1e-5)
    # The UNet checkpoint of one shift is not resumed under another.
    with pytest.raises(SystemExit, match="noise-shift"):
        train.main([*common, "--out", str(out), "--unet-steps", "3"])
    # A shift that is no shift at all is refused before any training.
    with pytest.raises(SystemExit) as refused:
        train.main([*common, "--out", str(out), "--noise-shift", "0"])
    assert refused.value.code == 2


def test_init_fine_tunes_an_exported_model_keeping_its_autoencoder(tmp_path):
    """``--init FOLDER`` (a recipe tried in minutes): the folder's VAE and latent scale ship
    unchanged, its UNet trains on from its weights, and a folder of other sizes is refused."""
    sizes = ["--vae-steps", "2", "--vae-batch", "2", "--scenes", "8", "--batch", "4"]
    first, tuned = tmp_path / "first", tmp_path / "tuned"
    made = ["--unet-steps", "2", "--threads", "1", "--out", str(first)]
    train.main([*sizes, *made, "--work", str(tmp_path / "w1")])
    fine = ["--init", str(first), "--unet-steps", "3", "--unet-mixed-light", "0.5"]
    train.main(
        [*sizes, *fine, "--threads", "1", "--work", str(tmp_path / "w2"), "--out", str(tuned)]
    )
    stats = json.loads((tuned / "training.json").read_text())
    assert stats["init"] == str(first) and stats["vae_steps"] == 0
    assert "vae" not in stats["final_loss"]
    before = load_engine(str(first), device="cpu", dtype="fp32").components
    after = load_engine(str(tuned), device="cpu", dtype="fp32").components
    assert after.vae.config.scaling_factor == before.vae.config.scaling_factor
    for name, weight in before.vae.state_dict().items():
        assert torch.equal(after.vae.state_dict()[name], weight), name
    changed = [
        name
        for name, weight in before.unet.state_dict().items()
        if not torch.equal(after.unet.state_dict()[name], weight)
    ]
    assert changed  # it trained on from the folder's weights
    never = tmp_path / "never"
    other_sizes = ["--arch", "strong", "--init", str(first), "--out", str(never)]
    with pytest.raises(SystemExit, match="does not load as --arch strong"):
        train.main([*sizes, *other_sizes, "--work", str(tmp_path / "w3")])
    assert not never.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--init", "no-such-folder"], "is not an exported model folder"),
        (["--unet-mixed-light", "1.5"], "is not a share from 0 to 1"),
        (["--mixed-light", "half"], "is not a share from 0 to 1"),
        (["--vae-blocks", "16,32"], "four blocks (8x factor) or three (4x)"),
        (["--unet-blocks", "32,32,64,64,64"], "three blocks, or four"),
    ],
)
def test_a_bad_recipe_is_refused_before_any_training(tmp_path, capsys, flags, message):
    work, out = tmp_path / "work", tmp_path / "out"
    with pytest.raises(SystemExit) as refused:
        train.main([*flags, "--work", str(work), "--out", str(out)])
    assert refused.value.code == 2
    assert message in capsys.readouterr().err
    assert not work.exists() and not out.exists()
