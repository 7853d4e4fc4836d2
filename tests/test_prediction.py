"""``inspect`` predicts ``render`` for the chosen model: the prompt past the text encoder's
window, captions that will not be steered, brackets that are not tags. The same warnings
reach a render before it samples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from psd_collage.render import Renderer
from tests.psd_builders import Pixels, build_psd

# 33 tokens for the `shapes` model (it reads 30): the circle and the square fit,
# the yellow triangle (appended: the prompt lacks it) does not.
LONG_PROMPT = (
    "a red circle and a blue square on grass at night, on grass at night, "
    "on grass at night, on grass at night, on grass at night"
)
UNCLOSED = "a green circle [noise=0.5"


@pytest.fixture
def long_prompt_psd(tmp_path: Path) -> Path:
    return build_psd(
        tmp_path / "night.psd",
        [
            Pixels("grass at night [noise=0.3]", (0, 0, 64, 64), (20, 60, 30)),
            Pixels("a red circle", (4, 4, 24, 24), (220, 20, 20)),
            Pixels("a blue square", (36, 4, 60, 28), (20, 20, 220)),
            Pixels("a yellow triangle", (8, 36, 30, 60), (230, 220, 20)),
            Pixels(UNCLOSED, (38, 38, 60, 60), (20, 200, 20)),
        ],
        size=(64, 64),
        description=LONG_PROMPT,
    )


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "psd_collage.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_inspect_names_the_captions_the_model_will_not_steer(long_prompt_psd, tmp_path):
    run = cli("inspect", str(long_prompt_psd), "--model", "shapes", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    rows = {line.split("  ")[1]: line for line in run.stdout.splitlines() if line[:1].isdigit()}
    assert rows["a yellow triangle"].endswith("no (tokens)")
    assert rows["a red circle"].endswith("yes") and rows["a blue square"].endswith("yes")
    assert "tokens:   " in run.stdout and "--model shapes reads the first 30" in run.stdout
    assert "caption 'a yellow triangle' is past the 30 tokens" in run.stdout
    assert f"layer {UNCLOSED!r}: '[noise=0.5' has no closing ']'" in run.stdout

    data = json.loads(cli("inspect", str(long_prompt_psd), "--json", "--model", "shapes", cwd=tmp_path).stdout)  # fmt: skip
    steered = {layer["caption"]: layer["steered"] for layer in data["layers"]}
    assert steered["a yellow triangle"] is False and steered["a red circle"] is True
    tokens = data["document"]["tokens"]
    assert tokens["limit"] == 30 and tokens["count"] > 30
    assert (
        "a yellow triangle" in tokens["not_steered"] and "a red circle" not in tokens["not_steered"]
    )
    assert "a yellow triangle" in data["document"]["final_prompt"]


def test_the_same_warnings_reach_a_render_before_it_samples(long_prompt_psd, tmp_path):
    inspected = json.loads(
        cli("inspect", str(long_prompt_psd), "--json", "--model", "shapes", cwd=tmp_path).stdout
    )["warnings"]
    events: list[tuple[str, str]] = []
    renderer = Renderer(overrides={"model": "shapes", "steps": 2, "variants": 1, "seed": 1})
    result = renderer.render_file(
        long_prompt_psd,
        tmp_path / "out.psd",
        progress=lambda phase, done, total: events.append(("progress", phase)),
        warn=lambda text: events.append(("warning", text)),
    )
    warned = [text for kind, text in events if kind == "warning"]
    first_sample = events.index(("progress", "sample"))
    assert set(inspected) <= set(warned[:first_sample])  # every predicted one, before sampling
    assert [kind for kind, _ in events[:first_sample]].count("warning") >= len(inspected)
    assert result.warnings == warned and len(set(warned)) == len(warned)  # each once


def test_render_prints_each_warning_once(long_prompt_psd, tmp_path):
    run = cli(
        "render", str(long_prompt_psd), "--model", "shapes", "--steps", "1", "--variants", "1",
        "-o", str(tmp_path / "out.psd"), cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
    assert len(lines) == len(set(lines))
    assert any("caption 'a yellow triangle' is past the 30 tokens" in line for line in lines)
    assert any(f"layer {UNCLOSED!r}" in line for line in lines)


def test_inspect_reads_the_tokenizer_without_torch(long_prompt_psd):
    code = (
        "import sys; from click.testing import CliRunner; from psd_collage.cli import main; "
        f"r = CliRunner().invoke(main, ['inspect', {str(long_prompt_psd)!r}, '--model', 'shapes']); "
        "assert r.exit_code == 0, r.output; assert 'no (tokens)' in r.output; "
        "print('torch' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


def test_inspect_without_the_models_tokenizer_says_it_did_not_check(long_prompt_psd, tmp_path):
    run = cli("inspect", str(long_prompt_psd), "--model", "shape", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    line = next(line for line in run.stdout.splitlines() if line.startswith("tokens:"))
    assert "not checked" in line and "did you mean --model shapes?" in line


@pytest.mark.parametrize("source", ["tiny", "tiny-sdxl", "shapes", "folder", "folder-sdxl", "file", "file-sdxl"])  # fmt: skip
def test_inspect_reads_the_tokenizers_the_engine_loads(source, tmp_path):
    """One source of truth: the tokenizers read without weights tokenize exactly as the
    loaded model's do, for every kind of --model."""
    from psd_collage.engine.captions import load_tokenizers
    from psd_collage.engine.models import (
        build_tiny_components,
        build_tiny_pipeline,
        load_components,
        save_single_file,
    )

    kind = "sdxl" if source.endswith("sdxl") else "sd1"
    model = source
    if source.startswith("folder"):
        model = str(tmp_path / "model")
        build_tiny_pipeline(kind).save_pretrained(model)
    elif source.startswith("file"):
        model = str(tmp_path / "model.safetensors")
        save_single_file(build_tiny_components(kind), model)
    predicted, loaded = load_tokenizers(model), load_components(model).tokenizers
    assert len(predicted) == len(loaded)
    text = "a red circle and a blue square on grass at night, a vintage car"
    for ours, theirs in zip(predicted, loaded, strict=True):
        assert ours.model_max_length == theirs.model_max_length
        assert ours(text).input_ids == theirs(text).input_ids
        assert ours.pad_token == theirs.pad_token


def test_flux_warnings_come_from_its_t5_window_before_sampling(tmp_path):
    """Flux steers its T5 tokens: the render's early check reads the prompt as the flow
    engine does (32 T5 tokens for tiny-flux), not with a CLIP window; inspect, which has no
    T5 tokenizer without the model, says it did not check instead of guessing."""
    words = ", ".join(["a red circle on grass at night"] * 8)
    psd = build_psd(
        tmp_path / "flux.psd",
        [
            Pixels("grass at night [noise=0.3]", (0, 0, 64, 64), (20, 60, 30)),
            Pixels("a red circle", (4, 4, 24, 24), (220, 20, 20)),
            Pixels("a yellow triangle", (8, 36, 30, 60), (230, 220, 20)),
        ],
        size=(64, 64),
        description=words,
    )
    events: list[tuple[str, str]] = []
    renderer = Renderer(overrides={"model": "tiny-flux", "steps": 2, "variants": 1, "seed": 1})
    renderer.render_file(
        psd,
        tmp_path / "out.psd",
        progress=lambda phase, done, total: events.append(("progress", phase)),
        warn=lambda text: events.append(("warning", text)),
    )
    early = events[: events.index(("progress", "sample"))]
    assert any(
        kind == "warning" and "'a yellow triangle'" in text and "32-token T5 window" in text
        for kind, text in early
    )
    line = next(
        line
        for line in cli(
            "inspect", str(psd), "--model", "tiny-flux", cwd=tmp_path
        ).stdout.splitlines()
        if line.startswith("tokens:")
    )
    assert "not checked" in line and "Flux or SD3" in line
