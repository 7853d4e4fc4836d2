"""The ``psd-collage`` command: a thin shell over :mod:`psd_collage.render`.

Exit status: 0 success, 2 a problem with the input (one ``error:`` line on
stderr, no traceback), 1 an internal error (a bug: please report it).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .errors import CollageError
from .settings import SCHEDULERS, SETTING_KEYS, Settings, read_sidecar, sidecar_path

PSD_SUFFIXES = (".psd", ".psb")


def _guarded(func: Callable) -> Callable:
    """Turn user errors into one line + exit 2, bugs into one line + exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CollageError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # a bug, not the user's fault
            if os.environ.get("PSD_COLLAGE_DEBUG"):
                raise
            name = type(exc).__name__
            click.echo(
                f"error: internal error ({name}: {exc}); please report it, "
                "with PSD_COLLAGE_DEBUG=1 set for the traceback",
                err=True,
            )
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="psd-collage")
def main() -> None:
    """Harmonize layered Photoshop collages with Collage Diffusion."""


# ---------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------


@main.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option(
    "--sheet",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write a PNG contact sheet: collage, each layer's mask, the noise map.",
)
@_guarded
def inspect(file: Path, as_json: bool, sheet: Path | None) -> None:
    """Show how FILE maps to a collage, before spending GPU time on it."""
    from .psd.reader import read_collage
    from .report import format_table, inspect_data, write_sheet

    _require_file(file)
    settings = Settings()
    side = sidecar_path(file)
    if side.exists():
        settings = settings.updated(read_sidecar(side), where=str(side))
    collage = read_collage(file, settings)
    if sheet is not None:
        write_sheet(collage, sheet, settings)
    if as_json:
        click.echo(json.dumps(inspect_data(collage), ensure_ascii=False))
    else:
        click.echo(format_table(collage))
        if sheet is not None:
            click.echo(f"sheet: {sheet}")


# ---------------------------------------------------------------------------
# render
# ---------------------------------------------------------------------------


def render_options(func: Callable) -> Callable:
    """The render settings as options; shared with ``watch`` (folder defaults there)."""
    options = [
        click.option(
            "--model", help="Hub id, local diffusers folder, single .safetensors, or 'tiny'."
        ),
        click.option("--variants", type=click.IntRange(1, 64), help="How many variants (seeds)."),
        click.option(
            "--seed", type=click.IntRange(0), help="First seed; variants use seed, seed+1, ..."
        ),
        click.option("--steps", type=click.IntRange(1, 1000), help="Sampling steps (paper: 50)."),
        click.option("--guidance", type=float, help="Classifier-free guidance (paper: 7)."),
        click.option("--prompt", help="Global prompt (overrides the 'prompt' text layer)."),
        click.option("--negative", help="Negative prompt."),
        click.option("--resolution", type=int, help="Working resolution (default: the model's)."),
        click.option(
            "--noise", type=click.FloatRange(0, 1), help="Noise for layers without a noise tag."
        ),
        click.option(
            "--scheduler", type=click.Choice(SCHEDULERS), help="Sampler (default euler_ancestral)."
        ),
        click.option(
            "--ti/--no-ti", default=None, help="Textual inversion for every captioned layer."
        ),
        click.option(
            "--ti-steps", type=click.IntRange(1), help="Textual inversion steps per layer."
        ),
        click.option("--device", help="cuda, cuda:1, mps or cpu (default: the best available)."),
        click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"])),
        click.option(
            "--attention-slicing", is_flag=True, default=None, help="Less GPU memory, slower."
        ),
        click.option(
            "--vae-tiling", is_flag=True, default=None, help="Decode large images in tiles."
        ),
        click.option(
            "--cpu-offload",
            is_flag=True,
            default=None,
            help="Keep idle models in RAM (6-8 GB GPUs).",
        ),
        click.option(
            "--allow-pickle",
            is_flag=True,
            default=None,
            help="Allow .ckpt/.bin checkpoints (runs code in them!).",
        ),
        click.option(
            "--max-pixels", type=click.IntRange(1), help="Refuse documents larger than this."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def settings_from_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options the user actually gave, under their Settings names."""
    return {k: v for k, v in options.items() if k in SETTING_KEYS and v is not None}


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), help="Output file (one input only)."
)
@click.option("--in-place", is_flag=True, help="Replace the input (a .bak copy is kept).")
@click.option("--preview/--no-preview", default=None, help="Also write NAME.preview.png.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file on stdout.")
@render_options
@_guarded
def render(
    files: tuple[Path, ...], output: Path | None, in_place: bool, as_json: bool, **options: Any
) -> None:
    """Harmonize FILES (PSD/PSB or folders of them); writes NAME.harmonized.psd beside each."""
    from .render import Renderer

    inputs = _expand_inputs(files)
    if output is not None and len(inputs) != 1:
        raise CollageError(
            "-o/--output works with a single input file; drop it to write beside each input"
        )
    if output is not None and in_place:
        raise CollageError("use either -o/--output or --in-place, not both")
    overrides = settings_from_options(options)
    if str(overrides.get("model", "")).startswith("tiny"):
        click.echo(
            "note: --model tiny has random weights: it runs every step of the pipeline but "
            "the pictures are noise; use a real model for real results",
            err=True,
        )
    renderer = Renderer(overrides=overrides)
    failures = 0
    for path in inputs:
        with _ProgressBar(enabled=not as_json and sys.stderr.isatty(), label=path.name) as bar:
            try:
                result = renderer.render_file(path, output, in_place=in_place, progress=bar.update)
            except CollageError as exc:
                failures += 1
                if as_json:
                    click.echo(
                        json.dumps({"input": str(path), "error": str(exc)}, ensure_ascii=False)
                    )
                click.echo(f"error: {exc}", err=True)
                continue
        if as_json:
            click.echo(json.dumps(result.as_dict(), ensure_ascii=False))
        else:
            for warning in result.warnings:
                click.echo(f"warning: {path.name}: {warning}", err=True)
            seeds = ", ".join(str(v["seed"]) for v in result.variants)
            click.echo(f"{result.output}  ({len(result.variants)} variants, seeds {seeds})")
            if result.preview:
                click.echo(f"{result.preview}")
    if failures:
        sys.exit(2)


def _expand_inputs(files: tuple[Path, ...]) -> list[Path]:
    inputs: list[Path] = []
    for item in files:
        if item.is_dir():
            found = sorted(
                p
                for p in item.iterdir()
                if p.suffix.lower() in PSD_SUFFIXES and ".harmonized." not in p.name
            )
            if not found:
                raise CollageError("no .psd or .psb files in this folder", path=item)
            inputs.extend(found)
        else:
            _require_file(item)
            inputs.append(item)
    return inputs


def _require_file(path: Path) -> None:
    if not path.exists():
        raise CollageError("no such file", path=path)
    if path.is_dir():
        raise CollageError("is a folder, not a PSD file", path=path)


class _ProgressBar:
    """A tqdm bar per phase on a terminal; silent otherwise."""

    LABELS = {
        "load": "loading model",
        "ti": "learning layers",
        "sample": "sampling",
        "write": "writing",
    }

    def __init__(self, enabled: bool, label: str) -> None:
        self.enabled, self.label = enabled, label
        self._bar = None
        self._phase: str | None = None

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def update(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if phase != self._phase:
            if self._bar is not None:
                self._bar.close()
            self._phase = phase
            desc = f"{self.label}: {self.LABELS.get(phase, phase)}"
            self._bar = tqdm(total=total, desc=desc, unit="step", leave=False, file=sys.stderr)
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()


def _register_watch() -> None:
    try:
        from watcher.cli import watch
    except ImportError:  # the hot folder is optional in a library-only install
        return
    main.add_command(watch)


_register_watch()


if __name__ == "__main__":
    main()
