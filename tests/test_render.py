"""End to end: a PSD in, harmonized variants back in the PSD, as a designer sees it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from psd_tools import PSDImage

from psd_collage.errors import CollageError
from psd_collage.preview import LABEL_HEIGHT, PREVIEW_HEIGHT
from psd_collage.render import Renderer
from tests.psd_builders import Pixels, build_psd, edit_copy

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model": "tiny", "variants": 2, "steps": 4, "seed": 7, "preview": True}


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    """One warm tiny model for the whole module, like the CLI with several files."""
    return Renderer(overrides=TINY)


@pytest.fixture
def collage_psd(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    texture = np.concatenate(
        [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), np.full((40, 48, 1), 255, np.uint8)],
        axis=2,
    )
    return build_psd(
        tmp_path / "street.psd",
        [
            Pixels("a quiet street", (0, 0, 192, 128), (120, 120, 130)),
            Pixels("a red car [lock]", (16, 64, 64, 104), rgba=texture),
            Pixels("a blue ball [noise=0.9]", (120, 40, 168, 88), (20, 40, 220)),
        ],
        size=(192, 128),
        description="a red car and a blue ball on a quiet street",
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _harmonized_groups(psd: PSDImage) -> list:
    return [layer for layer in psd if layer.is_group() and layer.name.startswith("[harmonized]")]


def test_render_adds_one_group_of_variants_and_keeps_everything_else(renderer, collage_psd):
    before = _sha(collage_psd)
    result = renderer.render_file(collage_psd)
    assert _sha(collage_psd) == before  # the input is never modified
    assert result.output == collage_psd.with_name("street.harmonized.psd")
    assert result.preview is not None and result.preview.exists()
    with Image.open(result.preview) as preview:  # tiles, then their names underneath
        assert preview.height == PREVIEW_HEIGHT + LABEL_HEIGHT
    assert [v["seed"] for v in result.variants] == [7, 8]
    assert {"read", "load", "sample", "decode", "write"} <= set(result.timings)

    src, out = PSDImage.open(collage_psd), PSDImage.open(result.output)
    assert [layer.name for layer in out][:-1] == [layer.name for layer in src]
    group = out[-1]  # the top of the stack
    assert group.is_group() and group.name.startswith("[harmonized]") and "tiny" in group.name
    # psd-tools lists bottom to top: in Photoshop's panel the first variant is on top, visible.
    assert [layer.name for layer in group] == ["seed 8", "seed 7"]
    visible = {layer.name: layer.visible for layer in group}
    assert visible == {"seed 7": True, "seed 8": False}
    for old, new in zip(src, out, strict=False):
        np.testing.assert_array_equal(old.numpy(), new.numpy())


def test_locked_layer_is_identical_and_the_rest_changes(renderer, collage_psd):
    result = renderer.render_file(collage_psd)
    source = PSDImage.open(collage_psd).composite().convert("RGB")
    src = np.asarray(source)
    group = _harmonized_groups(PSDImage.open(result.output))[0]
    variant = {layer.name: np.asarray(layer.topil().convert("RGB")) for layer in group}["seed 7"]
    assert variant.shape == src.shape  # full document size
    car = (slice(64, 104), slice(16, 64))
    np.testing.assert_array_equal(variant[car], src[car])  # locked: pixel for pixel
    ball = (slice(40, 88), slice(120, 168))
    assert np.abs(variant[ball].astype(int) - src[ball]).mean() > 10  # noise 0.9: repainted


def test_variants_read_back_in_one_go_match_reading_each_by_name(renderer, collage_psd, tmp_path):
    from psd_collage.psd.variants import read_variant, read_variants

    result = renderer.render_file(collage_psd, tmp_path / "out.psd")
    every = read_variants(result.output)
    assert len(every) == 2 and every[0].shape == (128, 192, 3)
    for pixels, name in zip(every, ("seed 7", "seed 8"), strict=True):
        np.testing.assert_array_equal(pixels, read_variant(result.output, name))
    car = (slice(64, 104), slice(16, 64))  # locked: the source's pixels in every variant
    source = np.asarray(PSDImage.open(collage_psd).composite().convert("RGB"))
    np.testing.assert_array_equal(every[1][car], source[car])
    with pytest.raises(CollageError, match="no \\[harmonized\\] group"):
        read_variants(collage_psd)


def test_same_seed_same_pixels_different_seeds_differ(renderer, collage_psd, tmp_path):
    first = renderer.render_file(collage_psd, tmp_path / "a.psd")
    second = renderer.render_file(collage_psd, tmp_path / "b.psd")
    a = [layer.numpy() for layer in _harmonized_groups(PSDImage.open(first.output))[0]]
    b = [layer.numpy() for layer in _harmonized_groups(PSDImage.open(second.output))[0]]
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert np.abs(a[0] - a[1]).mean() > 0.01


def test_redo_edits_one_layer_and_pins_the_chosen_variant(renderer, collage_psd, tmp_path):
    first = renderer.render_file(collage_psd, tmp_path / "first.psd")
    edited = edit_copy(
        first.output,
        tmp_path / "edited.psd",
        rename={"a blue ball [noise=0.9]": "a blue ball [noise=0.9, redo]"},
    )
    second = renderer.render_file(edited, tmp_path / "second.psd")
    groups = _harmonized_groups(PSDImage.open(second.output))
    assert len(groups) == 2  # the earlier result is kept; the new group is on top
    base = np.asarray(_variant(groups[0], "seed 7"))  # the visible variant: the base
    new = np.asarray(_variant(groups[1], "seed 7"))
    ball = np.zeros(base.shape[:2], bool)
    ball[40:88, 120:168] = True
    far = np.ones_like(ball)
    far[20:108, 100:188] = False  # away from the ball and its feathered edge
    np.testing.assert_array_equal(new[far], base[far])  # pinned to the chosen variant
    assert np.abs(new[ball].astype(int) - base[ball]).mean() > 10  # the redo layer changed


def test_everything_locked_is_a_clear_error(renderer, tmp_path):
    path = build_psd(
        tmp_path / "locked.psd",
        [Pixels("a wall [lock]", (0, 0, 64, 64), (200, 200, 200))],
        size=(64, 64),
    )
    with pytest.raises(CollageError, match="every layer is locked"):
        renderer.render_file(path)
    assert not (tmp_path / "locked.harmonized.psd").exists()


def _variant(group, name: str):
    return next(layer for layer in group if layer.name == name).topil().convert("RGB")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "psd_collage.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_renders_several_files_one_failing_does_not_stop_the_rest(collage_psd, tmp_path):
    bad = tmp_path / "holiday.psd"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 200)  # a JPEG renamed to .psd
    run = _cli(
        "render", str(bad), str(collage_psd), "--json", "--model", "tiny",
        "--variants", "1", "--steps", "2", "--seed", "3", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 2
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert lines[0]["input"] == str(bad) and "JPEG" in lines[0]["error"]
    assert lines[1]["output"] == str(collage_psd.with_name("street.harmonized.psd"))
    assert [v["seed"] for v in lines[1]["variants"]] == [3]
    assert lines[1]["settings"]["steps"] == 2
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0]


def test_output_onto_the_input_needs_in_place(renderer, collage_psd):
    before = _sha(collage_psd)
    with pytest.raises(CollageError, match="--in-place"):
        renderer.render_file(collage_psd, collage_psd)
    assert _sha(collage_psd) == before and not Path(f"{collage_psd}.bak").exists()


def test_cli_in_place_keeps_a_backup(collage_psd, tmp_path):
    original = collage_psd.read_bytes()
    run = _cli(
        "render", str(collage_psd), "--in-place", "--model", "tiny",
        "--variants", "1", "--steps", "2", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert Path(str(collage_psd) + ".bak").read_bytes() == original
    assert len(_harmonized_groups(PSDImage.open(collage_psd))) == 1


def test_cli_inspect_json_describes_the_sample(tmp_path):
    run = _cli("inspect", str(ROOT / "samples" / "picnic.psd"), "--json", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert set(data["document"]) >= {"width", "height", "color_mode", "depth", "prompt"}
    captions = [layer["caption"] for layer in data["layers"]]
    assert "a tabby cat" in captions
    locked = [layer for layer in data["layers"] if layer["locked"]]
    assert locked and all(layer["noise"] == 0 for layer in locked)


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    missing = tmp_path / "nope.psd"
    run = _cli("render", str(missing), "--model", "tiny", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error:")
    assert str(missing) in run.stderr and "Traceback" not in run.stderr


def test_ti_layer_learns_once_then_comes_from_the_cache(collage_psd, tmp_path, monkeypatch):
    monkeypatch.setenv("PSD_COLLAGE_CACHE", str(tmp_path / "cache"))
    tagged = edit_copy(
        collage_psd,
        tmp_path / "ti.psd",
        rename={"a blue ball [noise=0.9]": "a blue ball [noise=0.9, ti]"},
    )
    options = {**TINY, "variants": 1, "ti_steps": 3, "ti_batch": 1, "export_ti": True}
    events: list[tuple[str, int, int]] = []

    def record(phase: str, done: int, total: int) -> None:
        events.append((phase, done, total))

    first = Renderer(overrides=options).render_file(tagged, tmp_path / "one.psd", progress=record)
    assert max(total for phase, _, total in events if phase == "ti") == 3  # trained
    token = first.settings["prompt"].split("> a blue ball")[0].rsplit("<", 1)[1]
    assert first.settings["prompt"].count(f"<{token}> a blue ball") == 1  # placed before it
    exported = list(first.embeddings.glob("*.safetensors"))
    assert [p.stem for p in exported] == [token]

    events.clear()  # a restart: a new renderer and model, the same cache folder
    second = Renderer(overrides=options).render_file(tagged, tmp_path / "two.psd", progress=record)
    assert all(total == 0 for phase, _, total in events if phase == "ti")  # no training step
    one = _harmonized_groups(PSDImage.open(first.output))[0][0].numpy()
    two = _harmonized_groups(PSDImage.open(second.output))[0][0].numpy()
    np.testing.assert_array_equal(one, two)


def _fixture_names() -> list[str]:
    from conftest import FIXTURES

    if not FIXTURES.is_dir():
        return ["(fixtures absent)"]
    return sorted(str(p.relative_to(FIXTURES)) for p in FIXTURES.rglob("*.ps[db]"))


@pytest.fixture(scope="module")
def quick_renderer() -> Renderer:
    return Renderer(overrides={"model": "tiny", "variants": 1, "steps": 1, "seed": 7})


@pytest.mark.parametrize("name", _fixture_names())
def test_every_photoshop_fixture_renders_or_fails_clearly(
    quick_renderer, fixtures_dir, name, tmp_path
):
    from test_fixtures import FAILS

    path = fixtures_dir / name
    output = tmp_path / f"out{path.suffix}"
    if name in FAILS:
        error, words = FAILS[name]
        with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
            quick_renderer.render_file(path, output)
        assert not output.exists()
        return
    quick_renderer.render_file(path, output)
    src, out = PSDImage.open(path), PSDImage.open(output)
    assert (out.color_mode, out.depth, out.size, out.version) == (
        src.color_mode, src.depth, src.size, src.version,
    )  # fmt: skip
    names = [layer.name for layer in out]
    at = next(i for i, layer in enumerate(out) if layer.name.startswith("[harmonized]"))
    assert names[:at] + names[at + 1 :] == [layer.name for layer in src]
    group = out[at]
    assert [v.name for v in group] == ["seed 7"]
    assert group[0].size == src.size and group[0].visible
    # Above the output only type layers that stay live, or layers out of the picture.
    assert all(layer.kind == "type" or not layer.visible for layer in list(out)[at + 1 :])


@pytest.mark.parametrize(("budget", "loads"), [(None, 2), (1, 4)])
def test_a_warm_renderer_switches_between_models_without_reloading(
    collage_psd, tmp_path, budget, loads
):
    """Files alternating between two models load each once while both fit in the budget;
    with room for one only, each switch reloads (and frees the other first)."""
    from psd_collage.engine.cache import ModelCache

    cache = ModelCache(max_bytes=budget)
    options = {**TINY, "variants": 1, "steps": 1, "preview": False}
    del options["model"]  # the sidecar names it: the command line would win over it
    renderer = Renderer(overrides=options, cache=cache)
    sidecar = collage_psd.with_name(collage_psd.name + ".toml")
    for i, model in enumerate(["tiny", "tiny-sdxl", "tiny", "tiny-sdxl"]):
        sidecar.write_text(f'model = "{model}"\n')
        result = renderer.render_file(collage_psd, tmp_path / f"out{i}.psd")
        assert result.settings["model"] == model
    assert cache.loads == {"model": loads}
    assert cache.hits.get("model", 0) == 4 - loads
