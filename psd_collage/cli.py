"""The ``psd-collage`` command: a thin shell over :mod:`psd_collage.render`.

Commands: ``inspect`` and ``render`` here, ``watch`` from ``watcher/cli.py``, ``serve``
from ``serve/cli.py``; each new
command is registered at the bottom of this file with ``main.add_command``.

Exit status: 0 success, 2 a problem with the input (one ``error:`` line on
stderr, no traceback), 1 an internal error (a bug: please report it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from serve.cli import serve
from watcher.cli import status, watch, worker

from .errors import CollageError, plural, terminal_safe
from .options import guarded, render_options, setting_option, settings_from_options
from .settings import SETTINGS, Settings, has_sidecar, read_sidecar, sidecar_path

PSD_SUFFIXES = (".psd", ".psb")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="psd-collage")
def main() -> None:
    """Harmonize layered Photoshop collages with Collage Diffusion."""


# ---------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option(
    "--sheet",
    type=click.Path(path_type=Path),
    help="Write a PNG contact sheet: collage, each layer's mask, the noise map.",
)
@setting_option(SETTINGS["model"])
@setting_option(SETTINGS["lenient"])
@guarded
def inspect(file: Path, as_json: bool, sheet: Path | None, **options: Any) -> None:
    """Show how FILE maps to a collage, before spending GPU time on it.

    With the model's tokenizer (no weights are loaded) it also tells which captions the
    model will not steer and what of the prompt it will not read, as render will.
    """
    from .prompt_check import check_prompt_for_model
    from .psd.reader import read_collage
    from .report import format_table, inspect_data, write_sheet

    _require_file(file)
    settings = Settings()
    side = sidecar_path(file)
    if has_sidecar(side):
        settings = settings.updated(read_sidecar(side), where=str(side))
    settings = settings.updated(settings_from_options(options), where="command line")
    collage = read_collage(file, settings)
    check = check_prompt_for_model(collage, settings.model)
    if sheet is not None:
        write_sheet(collage, sheet)
    if as_json:
        click.echo(json.dumps(inspect_data(collage, settings, check), ensure_ascii=False))
    else:
        click.echo(format_table(collage, settings, check))
        if sheet is not None:
            click.echo(f"sheet: {sheet}")


# ---------------------------------------------------------------------------
# render
# ---------------------------------------------------------------------------


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    metavar="PATH",
    help="Output file (one input only; default NAME.harmonized.psd beside the input).",
)
@click.option(
    "--in-place",
    is_flag=True,
    help="Add the new group to the input file itself (NAME.psd.bak keeps the first original).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing output file (without it, an existing output is an error).",
)
@click.option(
    "--like",
    metavar="GROUP/seed N",
    help="Reproduce one earlier variant: its group's recorded settings and that seed.",
)
@setting_option(SETTINGS["preview"])
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file on stdout.")
@render_options
@guarded
def render(
    files: tuple[Path, ...],
    output: str | None,
    in_place: bool,
    overwrite: bool,
    like: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Harmonize FILES (PSD/PSB or folders of them); writes NAME.harmonized.psd beside each.

    An existing output is never replaced unless --overwrite is given.
    """
    from .render import Renderer

    inputs = _expand_inputs(files)
    if output is not None and len(inputs) != 1:
        raise CollageError(
            "-o/--output works with a single input file; drop it to write beside each input"
        )
    if output is not None and in_place:
        raise CollageError("use either -o/--output or --in-place, not both")
    if like is not None and len(inputs) != 1:
        raise CollageError("--like works with a single input file (the one that holds GROUP)")
    overrides = settings_from_options(options)
    if str(overrides.get("model", "")).startswith("tiny"):
        click.echo(
            f"note: --model {overrides['model']} has random weights: it runs every step of the pipeline but "
            "the pictures are noise; use a real model for real results",
            err=True,
        )
    renderer = Renderer(overrides=overrides)
    failures = 0
    for path in inputs:
        with _ProgressBar(enabled=not as_json and sys.stderr.isatty(), label=path.name) as bar:

            def warn(text: str, name: str = path.name, bar: _ProgressBar = bar) -> None:
                if not as_json:  # --json: in the object only
                    bar.write(terminal_safe(f"warning: {name}: {text}"))

            try:
                result = renderer.render_file(
                    path,
                    output,
                    in_place=in_place,
                    overwrite=overwrite,
                    like=like,
                    progress=bar.update,
                    warn=warn,
                )
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
            count = len(result.variants)
            seeds = ", ".join(str(v["seed"]) for v in result.variants)
            label = "seed" if count == 1 else "seeds"
            click.echo(f"{result.output}  ({plural(count, 'variant')}, {label} {seeds})")
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

    def write(self, line: str) -> None:
        """One line on stderr, above the bar while there is one."""
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)
        else:
            click.echo(line, err=True)

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


# ---------------------------------------------------------------------------
# Commands from other packages: one explicit line each, so an import error surfaces
# (their shared options come from psd_collage.options, which imports no command).
# ---------------------------------------------------------------------------

main.add_command(watch)
main.add_command(worker)
main.add_command(status)
main.add_command(serve)


if __name__ == "__main__":
    main()
