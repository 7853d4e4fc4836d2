"""Per-layer canny ControlNet: edges, the spatial scale map, SD 1.x and SDXL, loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_helpers import DEVICE, DTYPE, box_mask, random_image, tiny_engine

from psd_collage.engine import GenerationRequest, load_engine
from psd_collage.engine.controlnet import ControlInputs, canny_edges, load_controlnet
from psd_collage.errors import ModelError, SettingsError

H, W = 64, 128


def _generate(engine, control: np.ndarray | None, image: np.ndarray | None = None) -> np.ndarray:
    request = GenerationRequest(
        image if image is not None else random_image(H, W),
        np.full((H, W), 0.8, np.float32),
        "a red car on a street",
        seeds=[5],
        steps=4,
        control=control,
    )
    return engine.generate(request).images[0]


@pytest.fixture
def with_controlnet():
    """The tiny engine with the tiny ControlNet attached, detached again afterwards."""

    def attach(model: str = "tiny"):
        engine = tiny_engine(model)
        engine.use_controlnet(load_controlnet("tiny", engine.components.unet), "tiny")
        attached.append(engine)
        return engine

    attached: list = []
    yield attach
    for engine in attached:
        engine.use_controlnet(None)


def test_canny_edges_outline_a_square_and_nothing_else():
    image = np.zeros((64, 64, 3), np.float32)
    image[16:48, 16:48] = 1.0
    edges = canny_edges(image)
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0.0, 1.0}
    ring = box_mask(64, 64, 14, 14, 50, 50) - box_mask(64, 64, 18, 18, 46, 46)
    on = edges[..., 0] > 0
    assert on.sum() > 100  # the four sides
    assert not on[ring == 0].any()  # no edge away from the square's border


def test_control_scale_zero_is_the_plain_model_and_one_changes_the_picture(with_controlnet):
    plain = _generate(tiny_engine(), None)
    engine = with_controlnet()
    assert np.array_equal(_generate(engine, np.zeros((H, W), np.float32)), plain)
    held = _generate(engine, np.ones((H, W), np.float32))
    assert np.abs(held - plain).mean() > 0.02


def test_the_scale_map_multiplies_the_residuals_where_it_is_painted(with_controlnet):
    engine = with_controlnet()
    controlnet = engine.controlnet
    unet = engine.components.unet
    on = {"device": engine.device}
    left = torch.zeros(1, 1, 8, 16, **on)
    left[..., :8] = 1.0
    inputs = ControlInputs(controlnet, torch.rand(1, 3, H, W, **on, dtype=engine.dtype), left)
    latents = torch.randn(2, 4, 8, 16, **on, dtype=engine.dtype)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, **on, dtype=engine.dtype)
    t = torch.tensor(500, **on)
    extra = inputs.residuals(latents, t, hidden, None)
    full = ControlInputs(controlnet, inputs.image, torch.ones(1, 1, 8, 16, **on)).residuals(
        latents, t, hidden, None
    )
    first, first_full = (
        extra["down_block_additional_residuals"][0],
        full["down_block_additional_residuals"][0],
    )
    assert first.shape[-2:] == (8, 16)
    assert torch.equal(first[..., :8], first_full[..., :8])  # scale 1: the ControlNet's own
    assert not first[..., 8:].any() and first_full[..., 8:].abs().sum() > 0  # scale 0: nothing
    # Coarser levels get the map area-averaged: half strength where the halves meet.
    mid, mid_full = extra["mid_block_additional_residual"], full["mid_block_additional_residual"]
    torch.testing.assert_close(mid, mid_full * inputs.scale_at(tuple(mid.shape[-2:]), mid.dtype))

    plain = _generate(engine, None)
    change = np.abs(_generate(engine, box_mask(H, W, 0, 0, H, W // 2)) - plain).mean(axis=2)
    assert change[:, : W // 2].mean() > change[:, W // 2 :].mean()


def test_stronger_canny_changes_more(with_controlnet):
    engine = with_controlnet()
    plain = _generate(engine, None)
    weak = np.abs(_generate(engine, np.full((H, W), 0.3, np.float32)) - plain).mean()
    strong = np.abs(_generate(engine, np.full((H, W), 1.0, np.float32)) - plain).mean()
    assert 0 < weak < strong


def test_sdxl_controlnet_runs_and_changes_the_picture(with_controlnet):
    plain = _generate(tiny_engine("tiny-sdxl"), None)
    engine = with_controlnet("tiny-sdxl")
    assert np.abs(_generate(engine, np.ones((H, W), np.float32)) - plain).mean() > 0.02


def test_canny_without_a_controlnet_is_one_clear_error():
    with pytest.raises(SettingsError, match="--controlnet"):
        _generate(tiny_engine(), np.ones((H, W), np.float32))


def test_a_controlnet_for_another_model_family_is_refused():
    sdxl_controlnet = load_controlnet("tiny", tiny_engine("tiny-sdxl").components.unet)
    with pytest.raises(ModelError, match="another kind of model"):
        tiny_engine().use_controlnet(sdxl_controlnet, "sdxl one")


def test_a_saved_controlnet_folder_loads_back_with_the_same_effect(tmp_path, with_controlnet):
    engine = tiny_engine()
    load_controlnet("tiny", engine.components.unet).save_pretrained(tmp_path / "canny")
    held = _generate(with_controlnet(), np.ones((H, W), np.float32))
    engine.use_controlnet(load_controlnet(str(tmp_path / "canny"), engine.components.unet))
    np.testing.assert_allclose(_generate(engine, np.ones((H, W), np.float32)), held, atol=1e-5)


def test_pickle_and_missing_controlnets_are_refused(tmp_path):
    unet = tiny_engine().components.unet
    pickle = tmp_path / "canny.pth"
    pickle.write_bytes(b"not really")
    with pytest.raises(ModelError, match="pickles"):
        load_controlnet(str(pickle), unet)
    with pytest.raises(ModelError, match="does not exist"):
        load_controlnet(str(tmp_path / "nothing.safetensors"), unet)


def test_cpu_offload_moves_the_controlnet_too():
    engine = load_engine("tiny", device=DEVICE, dtype=DTYPE, cpu_offload=True)
    engine.use_controlnet(load_controlnet("tiny", engine.components.unet), "tiny")
    assert _generate(engine, np.ones((H, W), np.float32)).shape == (H, W, 3)
