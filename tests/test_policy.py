"""The operator's policy against a designer's sidecar, and inbox entries that are not files.

The limits are checked before any model is loaded, so most of this runs without
torch; the job timeout is checked on a real render with the tiny model.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from test_watcher import fake_header, make_psd

from psd_collage.errors import CollageError
from psd_collage.policy import Policy, PolicyError, folder_policy, read_folder_config
from psd_collage.render import Renderer
from watcher.execute import render_outcome
from watcher.stability import StabilityTracker


def settings_with(tmp_path: Path, sidecar: str, policy: Policy | None = None, **defaults):
    path = tmp_path / "poster.psd"
    path.write_bytes(b"")
    (tmp_path / "poster.psd.toml").write_text(sidecar)
    renderer = Renderer(defaults=defaults, policy=policy or Policy())
    return renderer.settings_for(path)


@pytest.mark.parametrize(
    ("sidecar", "named"),
    [
        ("steps = 1000\n", "steps=1000 is over the limit max_steps=150"),
        ("variants = 64\n", "variants=64 is over the limit max_variants=16"),
        ("resolution = 4096\n", "resolution=4096 is over the limit max_resolution=2048"),
    ],
)
def test_a_sidecar_cannot_ask_for_more_than_the_limits(
    tmp_path: Path, sidecar: str, named: str
) -> None:
    with pytest.raises(PolicyError, match=named) as info:
        settings_with(tmp_path, sidecar)
    assert "collage.toml [policy]" in str(info.value)  # says who can change it
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "key", ["allow_pickle = true", "max_pixels = 10000000000", 'device = "cpu"']
)
def test_a_sidecar_cannot_set_operator_only_settings(tmp_path: Path, key: str) -> None:
    with pytest.raises(CollageError, match=f"{key.split()[0]}.*operator-only"):
        settings_with(tmp_path, key + "\n")


def test_a_sidecar_cannot_carry_a_policy_of_its_own(tmp_path: Path) -> None:
    with pytest.raises(CollageError, match="unknown setting 'policy'"):
        settings_with(tmp_path, "[policy]\nmax_steps = 1000\nsteps = 500\n")


def test_the_models_allow_list_applies_to_sidecars_and_defaults(tmp_path: Path) -> None:
    policy = Policy(models=("tiny",))
    assert settings_with(tmp_path, "", policy, model="tiny").model == "tiny"
    with pytest.raises(
        PolicyError, match="'/models/x.safetensors' is not on the models allow-list"
    ):
        settings_with(tmp_path, 'model = "/models/x.safetensors"\n', policy, model="tiny")
    with pytest.raises(PolicyError, match="allow-list"):
        settings_with(tmp_path, "", policy)  # the built-in default model is not on it


def test_the_models_allow_list_covers_a_sidecars_lora_and_controlnet(tmp_path: Path) -> None:
    lora = tmp_path / "style.safetensors"
    policy = Policy(models=("tiny", str(lora)))
    settings = settings_with(tmp_path, 'lora = ["style.safetensors:0.5"]\n', policy, model="tiny")
    assert settings.lora  # listed (as a path the sidecar resolves to): allowed
    with pytest.raises(PolicyError, match="LoRA '.*other.safetensors' is not on the models"):
        settings_with(tmp_path, 'lora = ["other.safetensors"]\n', policy, model="tiny")
    with pytest.raises(PolicyError, match="ControlNet 'tiny-cn' is not on the models"):
        settings_with(tmp_path, 'controlnet = "tiny-cn"\n', policy, model="tiny")


def test_collage_toml_policy_and_options_the_tighter_wins(tmp_path: Path) -> None:
    config = tmp_path / "collage.toml"
    config.write_text(
        'steps = 20\n[policy]\nmax_steps = 40\nmax_pixels = 5000\nmodels = ["tiny", "sd"]\n'
    )
    defaults, table = read_folder_config(config)
    assert defaults == {"steps": 20, "max_pixels": 5000} and "max_pixels" not in table
    policy = folder_policy(config, {"max_steps": 60, "models": ("sd", "other"), "job_timeout": 5})
    assert (policy.max_steps, policy.models, policy.job_timeout) == (40, ("sd",), 5.0)
    assert folder_policy(config, {"max_steps": 10}).max_steps == 10
    assert policy.max_variants == Policy().max_variants  # unset: the default limit
    config.write_text("[policy]\nmax_stepz = 4\n")
    with pytest.raises(CollageError, match="unknown policy key 'max_stepz'"):
        folder_policy(config)


def test_a_canvas_over_max_pixels_fails_before_any_model_loads(tmp_path: Path) -> None:
    path = tmp_path / "big.psd"
    make_psd(path, 1)  # 64 x 64
    renderer = Renderer(defaults={"model": "no/such-model", "max_pixels": 4000}, policy=Policy())
    with pytest.raises(PolicyError, match=r"64 x 64 px .* over the limit max_pixels=4000"):
        renderer.render_file(path, tmp_path / "out.psd")


def test_the_job_timeout_ends_a_render_as_failed(tmp_path: Path) -> None:
    path = tmp_path / "slow.psd"
    make_psd(path, 2)
    renderer = Renderer(defaults={"model": "tiny", "variants": 1, "steps": 1, "seed": 1})
    renderer.render_file(path, tmp_path / "warm.psd")  # load the model: not part of the job
    (tmp_path / "slow.psd.toml").write_text("steps = 150\n")  # ~30 s on 2 cores
    started = time.monotonic()
    outcome = render_outcome(
        renderer,
        name="slow.psd",
        job_id="job",
        input=path,
        output=tmp_path / "out.psd",
        sidecar=tmp_path / "slow.psd.toml",
        progress=lambda *a: None,
        stop=lambda: False,
        deadline=Policy(job_timeout=1.0).deadline(),
        root=tmp_path,
    )
    assert time.monotonic() - started < 10
    assert outcome.kind == "failed" and not (tmp_path / "out.psd").exists()
    first = outcome.report.splitlines()[0]
    assert re.search(r"stopped after \d+\.\d s, over the limit job_timeout=1 ", first), first


def test_fifos_folders_and_links_out_of_root_are_left_alone_and_reported_once(
    tmp_path: Path,
) -> None:
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.psd").write_bytes(b"8BPS" + b"\0" * 40)
    (root / "shared.psd").write_bytes(b"8BPS" + b"\0" * 40)
    os.mkfifo(inbox / "pipe.psd")
    (inbox / "folder.psd").mkdir()
    (inbox / "leak.psd").symlink_to(outside / "secret.psd")
    (inbox / "inside.psd").symlink_to(root / "shared.psd")  # a link within ROOT is fine

    def opened(path: Path) -> None:
        assert path.name == "inside.psd", f"{path.name} must never be opened"
        fake_header(path)

    tracker = StabilityTracker(inbox, 0.5, opened, wall_clock=time.time, root=root)
    tracker.scan(0.0)
    tracker.scan(1.0)
    ready, rejected = tracker.settle(1.0)
    assert [c.name for c in ready] == ["inside.psd"] and rejected == []
    reasons = dict(tracker.newly_refused)
    assert sorted(reasons) == ["folder.psd", "leak.psd", "pipe.psd"]  # once each
    assert "a FIFO" in reasons["pipe.psd"] and "a folder" in reasons["folder.psd"]
    assert "outside the hot folder" in reasons["leak.psd"]
