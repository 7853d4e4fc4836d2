"""``psd-collage watch``, ``worker`` and ``status``: the hot folder's commands.

Registered on the main CLI group; the render options come from the shared home.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from psd_collage.errors import CollageError
from psd_collage.options import (
    policy_from_options,
    policy_options,
    render_options,
    settings_from_options,
)

from .service import STABLE_SECONDS, WatchOptions, WatchService


def watch_options(func: Callable) -> Callable:
    """How the hot folder takes files; shared with ``serve``, which runs the same watcher."""
    options = [
        click.option(
            "--preview/--no-preview",
            default=None,
            help="Write NAME.preview.png next to each result (default: on).",
        ),
        click.option(
            "--poll",
            type=click.FloatRange(min=0, min_open=True),
            metavar="SECONDS",
            help="Poll the inbox every SECONDS instead of using file events (network shares).",
        ),
        click.option(
            "--stable",
            type=click.FloatRange(min=0),
            default=STABLE_SECONDS,
            show_default=True,
            metavar="SECONDS",
            help="How long a file must stay unchanged before it is taken.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.command("watch")
@click.argument("root", type=click.Path(path_type=Path))
@watch_options
@click.option("--once", is_flag=True, help="Process what is in the inbox (and work/), then exit.")
@click.option(
    "--broker",
    metavar="URL",
    help="Redis URL (redis://HOST:6379/0): queue jobs for psd-collage worker processes "
    "instead of rendering here.",
)
@policy_options
@render_options
def watch(
    root: Path,
    preview: bool | None,
    poll: float | None,
    stable: float,
    once: bool,
    broker: str | None,
    **options: Any,
) -> None:
    """Hot folder: harmonize every PSD/PSB dropped into ROOT/inbox.

    Results go to ROOT/done (with the original in ROOT/originals), problems to
    ROOT/failed with NAME.error.txt. ROOT/collage.toml holds folder defaults and
    inbox/NAME.psd.toml per-file settings; the render options here are folder
    defaults too (a file's own sidecar wins over them). Progress is in
    ROOT/status.json and ROOT/watch.log. Ctrl-C (or SIGTERM) stops cleanly with exit
    status 0 (a second Ctrl-C: at once, 130); the running job is re-run
    at the next start. With --broker, farm workers render (psd-collage worker) and
    take the render and policy options; this process claims, queues and moves.
    """
    try:
        settings = settings_from_options({**options, "preview": preview})
        policy = policy_from_options(options)
        if broker:
            check_farm_options(broker, settings, policy, command="watch")
        if str(settings.get("model", "")).startswith("tiny"):
            click.echo(
                "note: --model tiny has random weights: every step runs but the pictures "
                "are noise; use a real model for real results",
                err=True,
            )
        watch_options = WatchOptions(stable=stable, poll=poll, once=once, broker=broker)
        service = WatchService(root, settings, watch_options, policy=policy)
        service.run()
    except CollageError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def check_farm_options(
    broker: str, settings: Mapping[str, Any], policy: Mapping[str, Any], *, command: str
) -> None:
    """With --broker the workers render: render and policy options belong to them."""
    _check_broker(broker)
    given = sorted({*settings, *policy} - {"preview"})
    if given:
        raise CollageError(
            f"with --broker the workers render: give --{given[0].replace('_', '-')} to "
            f"psd-collage worker (or put it in ROOT/collage.toml), not to {command}"
        )


def _check_broker(url: str) -> None:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise CollageError(
            f"--broker {url!r} is not a Redis URL: give redis://HOST:6379/0 (the Redis on the "
            "farm's broker machine)"
        )


@click.command("worker")
@click.option("--broker", required=True, metavar="URL", help="Redis URL: redis://HOST:6379/0.")
@click.option(
    "--root",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Where the shared hot folder ROOT is mounted on this machine.",
)
@click.option("--name", help="This worker's name in the status and Flower (default: PID@host).")
@click.option(
    "--visibility-timeout",
    type=click.FloatRange(min=1),
    metavar="SECONDS",
    help="How long Redis waits before a silent worker's job goes to another worker "
    "(default: the job timeout plus 2 minutes).",
)
@policy_options
@render_options
def worker(
    broker: str, root: Path, name: str | None, visibility_timeout: float | None, **options: Any
) -> None:
    """Render the farm's jobs on this machine: one warm model, one job at a time.

    Run one per GPU (--device cuda:N). Render options here are this machine's
    folder defaults (a file's sidecar wins over them); ROOT/collage.toml is read
    too, and its [policy] applies, tightened by the policy options given here.
    SIGTERM (systemctl stop) finishes the running job first; a killed worker's
    job goes to another worker after the visibility timeout.
    """
    from psd_collage.policy import folder_policy, read_folder_config

    from .farm import WorkerConfig, default_worker_name, run_worker
    from .layout import Layout

    try:
        _check_broker(broker)
        root = root.expanduser().absolute()
        layout = Layout(root)
        if not layout.work.is_dir():
            raise CollageError(
                "is not a hot folder (no work/ in it): give --root where the shared ROOT is "
                "mounted on this machine, after psd-collage watch has created it",
                path=root,
            )
        folder_defaults, _ = read_folder_config(layout.defaults_file)
        defaults = {**folder_defaults, **settings_from_options(options)}
        defaults.setdefault("preview", True)
        policy = folder_policy(layout.defaults_file, policy_from_options(options))
        config = WorkerConfig(
            broker=broker,
            root=root,
            name=name or default_worker_name(),
            defaults=defaults,
            policy=policy,
        )
    except CollageError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    raise SystemExit(run_worker(config, visibility_timeout=visibility_timeout))


@click.command("status")
@click.argument("root", type=click.Path(path_type=Path, file_okay=False))
@click.option("--broker", metavar="URL", help="Read the farm's status from this Redis.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
def status(root: Path, broker: str | None, as_json: bool) -> None:
    """What the hot folder (or the farm) is doing: queued, running, done, failed, recent."""
    import json

    from .dispatch import broker_errors, shown_url
    from .report import format_status
    from .status import read_status

    try:
        if broker:
            _check_broker(broker)
        if not broker and not root.is_dir():
            raise CollageError(
                "no such folder: give the hot folder's ROOT (the folder holding inbox/ and "
                "status.json)",
                path=root,
            )
        try:
            data = read_status(root, broker)
        except FileNotFoundError:
            raise CollageError(
                "no status.json: no watcher has run on this folder yet (psd-collage watch ROOT)",
                path=root,
            ) from None
        except ValueError:
            raise CollageError("status.json is not readable JSON", path=root) from None
        except broker_errors() as exc:
            raise CollageError(
                f"cannot reach Redis at {shown_url(broker or '')} ({' '.join(str(exc).split())}): "
                "check that it runs, or leave out --broker to read ROOT/status.json"
            ) from None
    except CollageError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False, indent=2))
    else:
        click.echo(format_status(data))
