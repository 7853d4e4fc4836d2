"""The command line derived from the settings registry: --help, rules, what the user gave."""

from __future__ import annotations

import dataclasses
import importlib
import sys
from typing import Any

import click
import pytest
from click.testing import CliRunner

from psd_collage import settings as settings_module
from psd_collage.cli import main
from psd_collage.errors import SettingsError
from psd_collage.options import render_options, settings_from_options
from psd_collage.settings import SETTINGS, Settings, validate_settings


def _help(*command: str) -> str:
    result = CliRunner().invoke(main, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


@pytest.mark.parametrize("command", ["render", "watch"])
def test_help_shows_every_option_with_its_default(command: str) -> None:
    text = _help(command)
    for entry in SETTINGS.values():
        if entry.spec.option:
            assert "--" + entry.name.replace("_", "-") in text, entry.name
    assert "[default: 50; 1<=x<=1000]" in text  # --steps
    assert "--resolution PIXELS" in text and "multiple of 64" in text
    assert "--max-pixels PIXELS" in text
    assert text.count("[default:") >= sum(e.spec.option for e in SETTINGS.values())


def test_resolution_must_be_a_multiple_of_64() -> None:
    result = CliRunner().invoke(main, ["render", "x.psd", "--resolution", "500"])
    assert result.exit_code == 2
    assert "multiple of 64" in result.output and "Traceback" not in result.output


def _given(*args: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    @click.command()
    @render_options
    def command(**options: Any) -> None:
        seen.update(settings_from_options(options))

    result = CliRunner().invoke(command, list(args))
    assert result.exit_code == 0, result.output
    return seen


def test_only_options_the_user_gave_override_sidecars() -> None:
    assert _given() == {}  # click's shown defaults must not beat a sidecar's values
    assert _given("--steps", "7", "--no-ti", "--scheduler", "ddim") == {
        "steps": 7,
        "ti": False,
        "scheduler": "ddim",
    }


def test_watch_is_registered_and_an_import_error_in_it_surfaces(monkeypatch) -> None:
    assert "watch" in main.commands
    monkeypatch.setitem(sys.modules, "watcher.cli", None)  # importing it now fails
    monkeypatch.delitem(sys.modules, "psd_collage.cli")
    with pytest.raises(ImportError):
        importlib.import_module("psd_collage.cli")


def test_operator_only_settings_are_refused_in_a_designers_sidecar(monkeypatch) -> None:
    entry = SETTINGS["allow_pickle"]
    operator_only = dataclasses.replace(entry.spec, sidecar=False)
    monkeypatch.setitem(
        settings_module.SETTINGS, "allow_pickle", dataclasses.replace(entry, spec=operator_only)
    )
    with pytest.raises(SettingsError, match="operator-only"):
        validate_settings({"allow_pickle": True}, where="poster.psd.toml", designer=True)
    assert validate_settings({"allow_pickle": True}, where="collage.toml") == {"allow_pickle": True}


def test_engine_options_follow_the_settings() -> None:
    options = Settings().updated({"scheduler": "ddim", "cpu_offload": True}).engine_options()
    assert (options.scheduler, options.cpu_offload, options.model) == (
        "ddim",
        True,
        Settings().model,
    )
