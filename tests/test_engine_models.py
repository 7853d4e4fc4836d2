"""Model loading: folders, single files, pickles, hub ids offline, kind detection, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_helpers import random_image, tiny_engine
from safetensors.torch import save_file

from psd_collage.engine import (
    GenerationRequest,
    build_tiny_components,
    build_tiny_pipeline,
    load_engine,
    save_single_file,
)
from psd_collage.engine.models import detect_kind, resolve_device, resolve_dtype
from psd_collage.errors import ModelError, SettingsError


def _image_for(engine, seed: int = 4) -> np.ndarray:
    request = GenerationRequest(
        random_image(64, 128),
        np.full((64, 128), 0.7, np.float32),
        "a red car",
        seeds=[seed],
        steps=3,
    )
    return engine.generate(request).images[0]


def test_tiny_builds_deterministically():
    a, b = build_tiny_components("sd1"), build_tiny_components("sd1")
    for (name, first), (_, second) in zip(a.modules(), b.modules(), strict=True):
        for (key, x), y in zip(
            first.state_dict().items(), second.state_dict().values(), strict=True
        ):
            assert torch.equal(x, y), (name, key)
    assert a.vae_scale_factor == 8 and a.native_resolution == 256
    assert len(a.tokenizers[0]("a red vintage car", add_special_tokens=False).input_ids) == 4


def test_saved_folder_loads_back_with_same_kind_and_outputs(tmp_path):
    build_tiny_pipeline("sd1").save_pretrained(tmp_path / "model")
    engine = load_engine(str(tmp_path / "model"), device="cpu")
    assert engine.kind == "sd1" and engine.native_resolution == 256
    np.testing.assert_allclose(_image_for(engine), _image_for(tiny_engine("tiny")), atol=1e-4)


@pytest.mark.parametrize(("kind", "model"), [("sd1", "tiny"), ("sdxl", "tiny-sdxl")])
def test_single_safetensors_file_loads_back_with_same_kind_and_outputs(tmp_path, kind, model):
    path = tmp_path / f"{kind}.safetensors"
    save_single_file(build_tiny_components(kind), path)
    engine = load_engine(str(path), device="cpu")
    assert engine.kind == kind
    assert len(engine.components.text_encoders) == (2 if kind == "sdxl" else 1)
    np.testing.assert_allclose(_image_for(engine), _image_for(tiny_engine(model)), atol=1e-4)


def test_pickle_checkpoints_are_refused_unless_allowed(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not really a checkpoint")
    with pytest.raises(ModelError, match="allow-pickle") as refused:
        load_engine(str(path), device="cpu")
    assert "\n" not in str(refused.value)
    with pytest.raises(ModelError) as allowed:  # opted in: now it is read, and found broken
        load_engine(str(path), device="cpu", allow_pickle=True)
    assert "allow-pickle" not in str(allowed.value) and "cannot read" in str(allowed.value)


def test_folder_with_only_pickle_weights_is_refused(tmp_path):
    build_tiny_pipeline("sd1").save_pretrained(tmp_path / "m", safe_serialization=False)
    with pytest.raises(ModelError, match="pickle"):
        load_engine(str(tmp_path / "m"), device="cpu")
    assert load_engine(str(tmp_path / "m"), device="cpu", allow_pickle=True).kind == "sd1"


def test_uncached_hub_id_offline_gives_one_line_advice(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as error:
        load_engine("psd-collage-tests/no-such-model", device="cpu")
    message = str(error.value)
    assert "\n" not in message
    assert "hf download psd-collage-tests/no-such-model" in message
    assert "--model tiny" in message


def test_uncached_hub_id_without_network_fails_fast_with_advice(monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # never resolves
    start = time.monotonic()
    with pytest.raises(ModelError) as error:
        load_engine("psd-collage-tests/no-such-model", device="cpu")
    assert time.monotonic() - start < 10  # no half-minute of retries
    message = str(error.value)
    assert "\n" not in message and "cannot be reached" in message
    assert "hf download psd-collage-tests/no-such-model" in message


def test_foreign_single_file_offline_says_which_configs_are_missing(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    path = tmp_path / "some-sd15-finetune.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, path)
    with pytest.raises(ModelError) as error:
        load_engine(str(path), device="cpu")
    message = str(error.value)
    assert "\n" not in message
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in message


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ("./no/such/folder", "does not exist"),
        ("missing.safetensors", "does not exist"),
        ("what is this", "neither"),
    ],
)
def test_bad_model_names_are_one_line_errors(model, needle):
    with pytest.raises(ModelError, match=needle):
        load_engine(model, device="cpu")


def test_folder_without_model_index_is_explained(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelError, match="model_index.json"):
        load_engine(str(tmp_path / "weights"), device="cpu")


def test_kind_comes_from_the_model_configs():
    assert detect_kind({"cross_attention_dim": 768}, False) == "sd1"
    assert detect_kind({"cross_attention_dim": 1024}, False) == "sd2"
    assert (
        detect_kind({"cross_attention_dim": 2048, "addition_embed_type": "text_time"}, True)
        == "sdxl"
    )
    assert (
        detect_kind({"cross_attention_dim": 64, "addition_embed_type": "text_time"}, True) == "sdxl"
    )
    assert tiny_engine("tiny-sdxl").kind == "sdxl"


def test_devices_and_dtypes():
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(SettingsError, match="dtype"):
        resolve_dtype("int8", cpu)
    with pytest.raises(SettingsError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SettingsError, match="CUDA"):
            resolve_device("cuda")
    with pytest.raises(SettingsError, match="scheduler"):
        load_engine("tiny", device="cpu", scheduler="heun")


def test_low_memory_options_give_the_same_picture():
    plain = _image_for(tiny_engine("tiny"))
    engine = load_engine(
        "tiny", device="cpu", attention_slicing=True, vae_tiling=True, cpu_offload=True
    )
    np.testing.assert_allclose(_image_for(engine), plain, atol=1e-4)


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("shape", "shapes"), ("Shapes", "shapes"), ("tiny-sdx", "tiny-sdxl"), ("tiyn", "tiny")],
)
def test_a_typo_of_a_known_model_name_suggests_it(typo, meant, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file or folder of that name here
    with pytest.raises(ModelError) as error:
        load_engine(typo, device="cpu")
    message = str(error.value)
    assert f"did you mean --model {meant}?" in message and "\n" not in message
    assert "hf download" not in message  # not advice to download a model that is no model


def test_the_cli_suggests_the_closest_model_name(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    sample = Path(__file__).resolve().parents[1] / "samples" / "picnic.psd"
    run = subprocess.run(
        [sys.executable, "-m", "psd_collage.cli", "render", str(sample), "--model", "shape",
         "-o", str(tmp_path / "out.psd")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "did you mean --model shapes?" in errors[0], run.stderr
