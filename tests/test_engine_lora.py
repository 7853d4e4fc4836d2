"""LoRA: kohya and diffusers files, fused and taken off again, pickles refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_helpers import random_image, tiny_engine
from safetensors.torch import save_file

from psd_collage.engine import GenerationRequest
from psd_collage.engine.lora import LoadedLora, lora_identity, read_lora, save_tiny_lora
from psd_collage.errors import ModelError
from psd_collage.settings import LoraSpec


def _generate(engine) -> np.ndarray:
    request = GenerationRequest(
        random_image(64, 64), np.full((64, 64), 0.8, np.float32), "a red car", seeds=[2], steps=4
    )
    return engine.generate(request).images[0]


def _lora(path, scale: float = 1.0) -> LoadedLora:
    return LoadedLora(str(path), lora_identity(path), read_lora(path), scale)


@pytest.fixture
def tiny_lora(tmp_path):
    return save_tiny_lora(tiny_engine().components, tmp_path / "style.safetensors", seed=1)


@pytest.fixture
def engine():
    engine = tiny_engine()
    yield engine
    engine.use_loras([])


def _kohya(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers/peft keys -> kohya's (``lora_unet_..._to_q.lora_down.weight`` + ``.alpha``)."""
    out = {}
    for key, value in tensors.items():
        module, _, rest = key.removeprefix("unet.").rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.lora_{'down' if rest.startswith('A') else 'up'}.weight"] = value
        if rest.startswith("A"):
            out[f"{name}.alpha"] = torch.tensor(float(value.shape[0]))
    return out


def test_applying_changes_the_picture_and_taking_it_off_restores_it_exactly(engine, tiny_lora):
    before = _generate(engine)
    weights = {k: v.clone() for k, v in engine.components.unet.state_dict().items()}
    engine.use_loras([_lora(tiny_lora)])
    styled = _generate(engine)
    assert np.abs(styled - before).mean() > 0.02
    # Fused: the UNet is plain again (no peft wrappers), so sampling runs at full speed.
    assert not any("lora" in name for name, _ in engine.components.unet.named_modules())
    engine.use_loras([])
    # Exactly: the original weights were kept aside, not recomputed as W + BA - BA.
    assert all(torch.equal(weights[k], v) for k, v in engine.components.unet.state_dict().items())
    assert np.array_equal(_generate(engine), before)


def test_the_same_set_again_is_not_refused_and_a_new_set_replaces_the_old(
    engine, tiny_lora, tmp_path
):
    other = save_tiny_lora(engine.components, tmp_path / "other.safetensors", seed=2)
    engine.use_loras([_lora(other)])
    only_other = _generate(engine)
    engine.use_loras([_lora(tiny_lora)])
    engine.use_loras([_lora(tiny_lora)])  # no change: nothing is fused twice
    first = _generate(engine)
    engine.use_loras([_lora(other)])
    assert np.array_equal(_generate(engine), only_other)
    assert not np.array_equal(first, only_other)


def test_scale_and_two_loras_at_once(engine, tiny_lora, tmp_path):
    base = _generate(engine)
    engine.use_loras([_lora(tiny_lora, 0.3)])
    weak = np.abs(_generate(engine) - base).mean()
    engine.use_loras([_lora(tiny_lora, 1.0)])
    strong = np.abs(_generate(engine) - base).mean()
    assert 0 < weak < strong
    other = save_tiny_lora(engine.components, tmp_path / "other.safetensors", seed=2)
    engine.use_loras([_lora(tiny_lora), _lora(other, 0.5)])
    assert "style.safetensors" in engine.model_identity and "@0.5" in engine.model_identity
    engine.use_loras([])
    assert np.array_equal(_generate(engine), base)


def test_a_kohya_file_gives_the_same_picture_as_the_diffusers_file(engine, tiny_lora, tmp_path):
    engine.use_loras([_lora(tiny_lora)])
    diffusers_format = _generate(engine)
    kohya = tmp_path / "kohya.safetensors"
    save_file(_kohya(read_lora(tiny_lora)), str(kohya))
    engine.use_loras([_lora(kohya)])
    np.testing.assert_allclose(_generate(engine), diffusers_format, atol=1e-5)


def test_pickle_loras_are_refused_and_bad_files_are_one_error(tmp_path, engine):
    for name in ("style.bin", "style.pt", "style.ckpt"):
        (tmp_path / name).write_bytes(b"x")
        with pytest.raises(ModelError, match="pickles"):
            read_lora(tmp_path / name)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="not a readable"):
        read_lora(tmp_path / "broken.safetensors")
    with pytest.raises(ModelError, match="does not exist"):
        read_lora(tmp_path / "missing.safetensors")


def test_a_lora_for_another_model_is_one_error_and_leaves_the_model_alone(tmp_path, engine):
    before = _generate(engine)
    sdxl = save_tiny_lora(tiny_engine("tiny-sdxl").components, tmp_path / "xl.safetensors")
    with pytest.raises(ModelError, match="xl.safetensors"):
        engine.use_loras([_lora(sdxl)])
    assert np.array_equal(_generate(engine), before)


@pytest.mark.parametrize(
    ("text", "path", "scale"),
    [
        ("style.safetensors", "style.safetensors", 1.0),
        ("style.safetensors:0.8", "style.safetensors", 0.8),
        ("C:\\loras\\style.safetensors", "C:\\loras\\style.safetensors", 1.0),
        ("C:\\loras\\style.safetensors:-0.5", "C:\\loras\\style.safetensors", -0.5),
    ],
)
def test_lora_spec_parses_path_and_scale(text, path, scale):
    assert LoraSpec.parse(text) == LoraSpec(path, scale)


def test_lora_spec_refuses_absurd_scales():
    with pytest.raises(ValueError, match="scale"):
        LoraSpec.parse("style.safetensors:40")
