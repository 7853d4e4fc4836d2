"""``psd-collage watch ROOT``: the click command (registered on the main CLI group)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from psd_collage.errors import CollageError
from psd_collage.options import render_options, settings_from_options

from .service import WatchOptions, WatchService


@click.command("watch")
@click.argument("root", type=click.Path(path_type=Path))
@click.option(
    "--preview/--no-preview",
    default=None,
    help="Write NAME.preview.png next to each result (default: on).",
)
@click.option(
    "--poll",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Poll the inbox every SECONDS instead of using file events (network shares).",
)
@click.option(
    "--stable",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="How long a file must stay unchanged before it is taken.",
)
@click.option("--once", is_flag=True, help="Process what is in the inbox (and work/), then exit.")
@render_options
def watch(
    root: Path,
    preview: bool | None,
    poll: float | None,
    stable: float,
    once: bool,
    **options: Any,
) -> None:
    """Hot folder: harmonize every PSD/PSB dropped into ROOT/inbox.

    Results go to ROOT/done (with the original in ROOT/originals), problems to
    ROOT/failed with NAME.error.txt. ROOT/collage.toml holds folder defaults and
    inbox/NAME.psd.toml per-file settings; the render options here are folder
    defaults too (a file's own sidecar wins over them). Progress is in
    ROOT/status.json and ROOT/watch.log. Ctrl-C stops; the running job is re-run
    at the next start.
    """
    try:
        settings = settings_from_options({**options, "preview": preview})
        if str(settings.get("model", "")).startswith("tiny"):
            click.echo(
                "note: --model tiny has random weights: every step runs but the pictures "
                "are noise; use a real model for real results",
                err=True,
            )
        service = WatchService(root, settings, WatchOptions(stable=stable, poll=poll, once=once))
        service.run()
    except CollageError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
