"""What the commands print, word for word where a newcomer reads it: --help shows every
setting with its default, counts agree with their nouns, notes appear only when true."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from psd_collage import report
from psd_collage.cli import main
from psd_collage.engine.sampler import too_few_steps
from psd_collage.errors import plural
from psd_collage.psd.reader import read_collage
from psd_collage.settings import SETTINGS
from tests.psd_builders import Pixels, build_psd


def _help(*command: str) -> str:
    result = CliRunner().invoke(main, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def test_render_help_lists_every_setting_with_its_default() -> None:
    import click

    command = main.commands["render"]
    ctx = click.Context(command, info_name="render")
    records = {
        p.name: p.get_help_record(ctx) for p in command.params if isinstance(p, click.Option)
    }
    for name in SETTINGS:
        assert name in records, f"render --help lacks --{name.replace('_', '-')}"
        flags, help_text = records[name]
        assert "[default:" in help_text, f"{flags} shows no default"
    text = _help("render")
    assert "--prompt-suffix TEXT" in text and "--min-area FLOAT RANGE" in text
    assert "[default: no-preview]" in text


def test_counts_agree_with_their_nouns() -> None:
    assert plural(1, "variant") == "1 variant" and plural(2, "variant") == "2 variants"
    assert plural(0, "layer") == "0 layers"
    assert "at 1 step runs no sampling step" in too_few_steps(1, 0.6)
    assert "at 3 steps runs" in too_few_steps(3, 0.2)


def test_render_reports_one_variant_in_the_singular(tmp_path: Path) -> None:
    source = build_psd(
        tmp_path / "one.psd",
        [Pixels("a lawn", (0, 0, 64, 64), (20, 200, 20)), Pixels("a red ball", (8, 8, 40, 40), (220, 20, 20))],
        description="a red ball on a lawn",
    )  # fmt: skip
    args = ["render", str(source), "--model", "tiny", "--steps", "2", "--variants", "1", "--seed", "3"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'one.harmonized.psd'}  (1 variant, seed 3)" in result.output


def test_one_unnamed_layer_is_one_layer(tmp_path: Path) -> None:
    path = build_psd(
        tmp_path / "unnamed.psd",
        [Pixels("a lawn", (0, 0, 64, 64), (20, 200, 20)), Pixels("Layer 2", (8, 8, 40, 40), (220, 20, 20))],
        description="a lawn",
    )  # fmt: skip
    warnings = read_collage(path).warnings
    assert "layer 'Layer 2' has a default Photoshop name: it stays in the picture but is not steered; rename it to say what it shows" in warnings  # fmt: skip
    assert not any("layer(s)" in warning for warning in warnings)


@pytest.mark.parametrize(
    ("description", "appended"),
    [("a red ball on a lawn", False), ("a sunny afternoon", True)],
)
def test_inspect_says_captions_were_appended_only_when_they_were(
    tmp_path: Path, description: str, appended: bool
) -> None:
    path = build_psd(
        tmp_path / "ball.psd",
        [Pixels("a lawn", (0, 0, 64, 64), (20, 200, 20)), Pixels("a red ball", (8, 8, 40, 40), (220, 20, 20))],
        description=description,
    )  # fmt: skip
    collage = read_collage(path)
    sampled = next(line for line in report.format_table(collage).splitlines() if line.startswith("sampled:"))  # fmt: skip
    assert ("(captions it lacks appended)" in sampled) is appended
    if appended:
        assert sampled.startswith("sampled:  a sunny afternoon, a lawn, a red ball")
