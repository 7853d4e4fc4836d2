"""ControlNet (canny tags) and LoRA through the render, the CLI and sidecars."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from psd_tools import PSDImage

from psd_collage.engine.lora import save_tiny_lora
from psd_collage.engine.models import build_tiny_components
from psd_collage.errors import CollageError, SettingsError
from psd_collage.render import Renderer
from psd_collage.settings import Settings
from tests.psd_builders import Pixels, build_psd

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model": "tiny", "variants": 1, "steps": 3, "seed": 3}


def _psd(tmp_path: Path, name: str, ball_tag: str = "") -> Path:
    return build_psd(
        tmp_path / name,
        [
            Pixels("a quiet street", (0, 0, 128, 96), (120, 120, 130)),
            Pixels(f"a blue ball{ball_tag}", (40, 24, 88, 72), (20, 40, 220)),
        ],
        size=(128, 96),
        description="a blue ball on a quiet street",
    )


def _pixels(path: Path) -> np.ndarray:
    group = next(layer for layer in PSDImage.open(path) if layer.is_group())
    return np.asarray(group[0].topil().convert("RGB"), np.float32)


def test_a_canny_tag_without_a_controlnet_is_one_error_naming_the_layer(tmp_path):
    psd = _psd(tmp_path, "street.psd", " [canny=0.8]")
    with pytest.raises(CollageError, match="a blue ball.*canny=0.8.*--controlnet"):
        Renderer(overrides=TINY).render_file(psd)
    run = subprocess.run(
        [sys.executable, "-m", "psd_collage.cli", "render", str(psd), "--model", "tiny"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if not line.startswith("note:")]
    assert len(errors) == 1 and errors[0].startswith("error:") and "a blue ball" in errors[0]
    assert not (tmp_path / "street.harmonized.psd").exists()
    with pytest.raises(SettingsError, match="canny=0.5 needs a ControlNet"):
        Renderer(overrides={**TINY, "canny": 0.5}).render_file(_psd(tmp_path, "plain.psd"))


def test_a_canny_layer_with_the_tiny_controlnet_changes_the_result(tmp_path):
    renderer = Renderer(overrides={**TINY, "controlnet": "tiny"})
    free = renderer.render_file(_psd(tmp_path, "free.psd"))
    held = renderer.render_file(_psd(tmp_path, "held.psd", " [canny=1]"))
    assert held.settings["controlnet"] == "tiny"
    assert np.abs(_pixels(free.output) - _pixels(held.output)).mean() > 1.0
    # The tag in a sidecar's layer table works the same.
    side = _psd(tmp_path, "side.psd")
    side.with_name("side.psd.toml").write_text('[layers."a blue ball"]\ncanny = 1.0\n')
    np.testing.assert_array_equal(_pixels(renderer.render_file(side).output), _pixels(held.output))


def test_a_sidecar_lora_applies_and_the_next_file_without_it_matches_a_fresh_renderer(tmp_path):
    save_tiny_lora(build_tiny_components("sd1"), tmp_path / "loras" / "style.safetensors")
    styled = _psd(tmp_path, "styled.psd")
    # Relative to the sidecar's folder, not to where the renderer runs.
    styled.with_name("styled.psd.toml").write_text('lora = ["loras/style.safetensors:0.7"]\n')
    plain = _psd(tmp_path, "plain.psd")
    warm = Renderer(overrides=TINY)
    with_lora = warm.render_file(styled)
    assert with_lora.settings["lora"] == (str(tmp_path / "loras" / "style.safetensors") + ":0.7",)
    after = _pixels(warm.render_file(plain, tmp_path / "after.psd").output)
    fresh = _pixels(Renderer(overrides=TINY).render_file(plain, tmp_path / "fresh.psd").output)
    assert np.abs(_pixels(with_lora.output) - fresh).mean() > 1.0
    np.testing.assert_array_equal(after, fresh)  # taken off exactly


def test_lora_settings_are_checked_where_they_are_given(tmp_path):
    assert Settings().updated({"lora": ["a.safetensors"]}).lora == ("a.safetensors:1",)
    assert Settings().updated({"lora": "a.safetensors:0.5"}).lora == ("a.safetensors:0.5",)
    with pytest.raises(SettingsError, match="outside -4..4"):
        Settings().updated({"lora": ["a.safetensors:9"]}, where="x.toml")
    psd = _psd(tmp_path, "street.psd")
    run = subprocess.run(
        [sys.executable, "-m", "psd_collage.cli", "render", str(psd), "--model", "tiny"]
        + ["--lora", str(tmp_path / "missing.safetensors")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    errors = [line for line in run.stderr.splitlines() if not line.startswith("note:")]
    assert run.returncode == 2 and len(errors) == 1 and "missing.safetensors" in errors[0]
    pickle = tmp_path / "style.pt"
    pickle.write_bytes(b"x")
    with pytest.raises(CollageError, match="pickles"):
        Renderer(overrides={**TINY, "lora": [str(pickle)]}).render_file(psd)


def test_help_lists_the_new_options():
    run = subprocess.run(
        [sys.executable, "-m", "psd_collage.cli", "render", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    for option in ("--controlnet", "--canny", "--lora PATH[:SCALE]"):
        assert option in run.stdout
