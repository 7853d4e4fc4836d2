"""Tags in layer names and sidecars: what a designer types, what we understand."""

from __future__ import annotations

import pytest

from psd_collage.errors import SettingsError, TagError
from psd_collage.settings import (
    LayerOptions,
    Settings,
    bracket_problem,
    parse_tags,
    read_sidecar,
    sidecar_path,
    split_layer_name,
)


@pytest.mark.parametrize(
    ("name", "caption", "block"),
    [
        ("a red vintage car [noise=0.4, ti]", "a red vintage car", "noise=0.4, ti"),
        ("dog", "dog", None),
        ("  dog  [lock] ", "dog", "lock"),
        ("sign [old] on a wall", "sign [old] on a wall", None),  # only a block at the end is tags
        ("🐱 кошка [skip]", "🐱 кошка", "skip"),
    ],
)
def test_split_layer_name(name: str, caption: str, block: str | None) -> None:
    assert split_layer_name(name) == (caption, block)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        (
            "a red circle [noise=0.5",
            ["'[noise=0.5' has no closing ']'", "'a red circle [noise=0.5]'"],
        ),
        ("a red circle noise=0.5]", ["']' without an opening '['"]),
        ("a red [noise=0.5] circle", ["not at the end", "'a red circle [noise=0.5]'"]),
        ("a red circle [noise=0.5] [lock]", ["not at the end", "'a red circle [noise=0.5, lock]'"]),
    ],
)
def test_brackets_that_are_not_tags_are_explained(name: str, words: list[str]) -> None:
    problem = bracket_problem(name)
    assert problem is not None and "caption text, not tags" in problem
    for word in words:
        assert word in problem, problem


@pytest.mark.parametrize("name", ["a red circle [noise=0.5]", "a red circle", "[lock]", "x [ ]"])
def test_names_whose_brackets_are_tags_have_no_problem(name: str) -> None:
    assert bracket_problem(name) is None


def test_parse_tags_values_and_flags() -> None:
    opts = parse_tags("noise=0.4, ti, lock=off, inside=1.2, outside=0", layer="car")
    assert opts == LayerOptions(noise=0.4, ti=True, lock=False, inside=1.2, outside=0.0)
    assert parse_tags("ti=off", layer="car").ti is False
    assert parse_tags("", layer="car") == LayerOptions()


@pytest.mark.parametrize(
    ("block", "words"),
    [
        ("noise=abc", ["'car'", "noise", "'abc'", "not a number"]),
        ("noise=3", ["'car'", "noise", "out of range"]),
        ("noise", ["'car'", "needs a number"]),
        ("colour=red", ["'car'", "unknown tag 'colour'"]),
        ("lock=maybe", ["'car'", "lock", "on/off"]),
    ],
)
def test_bad_tags_name_the_layer_and_the_tag(block: str, words: list[str]) -> None:
    with pytest.raises(TagError) as info:
        parse_tags(block, layer="car")
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_sidecar_is_validated(tmp_path) -> None:
    side = sidecar_path(tmp_path / "poster.psd")
    assert side.name == "poster.psd.toml"
    side.write_text(
        'prompt = "a picnic"\nsteps = 20\nguidance = 6\n[layers."red car"]\nnoise = 0.2\nlock = true\n'
    )
    values = read_sidecar(side)
    settings = Settings().updated(values)
    assert settings.prompt == "a picnic"
    assert settings.steps == 20
    assert settings.guidance == 6.0
    assert settings.layers["red car"] == LayerOptions(noise=0.2, lock=True)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("stepz = 20\n", ["unknown setting 'stepz'", "did you mean 'steps'"]),
        ("steps = 'many'\n", ["'steps' must be a int"]),
        ("noise = 1.5\n", ["noise=1.5", "out of range"]),
        ('[layers."car"]\ncolour = 1\n', ["layer 'car'", "unknown key 'colour'"]),
        ("steps = \n", ["not valid TOML"]),
        ("resolution = 500\n", ["multiple of 64"]),
        ('scheduler = "fast"\n', ["unknown scheduler 'fast'"]),
    ],
)
def test_bad_sidecars_are_errors_naming_the_file(tmp_path, text: str, words: list[str]) -> None:
    side = tmp_path / "poster.psd.toml"
    side.write_text(text)
    with pytest.raises(SettingsError) as info:
        read_sidecar(side)
    message = str(info.value)
    assert str(side) in message and "\n" not in message
    for word in words:
        assert word in message


def test_precedence_later_sources_win_and_layer_tables_merge() -> None:
    folder = {"steps": 10, "variants": 2, "layers": {"car": {"noise": 0.1}}}
    file = {"steps": 20, "layers": {"car": {"ti": True}}}
    cli = {"steps": 30}
    settings = Settings().updated(folder).updated(file).updated(cli)
    assert (settings.steps, settings.variants) == (30, 2)
    assert settings.layers["car"] == LayerOptions(noise=0.1, ti=True)
