"""``psd-collage serve ROOT``: the click command (registered on the main CLI group)."""

from __future__ import annotations

import signal
import socket
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
from watcher.cli import check_farm_options, watch_options
from watcher.service import WatchOptions

from .app import create_app, is_loopback


@click.command("serve")
@click.argument("root", type=click.Path(path_type=Path))
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; anything but localhost needs --token.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8765,
    show_default=True,
    help="TCP port (0: any free one, printed at start).",
)
@click.option(
    "--token",
    envvar="PSD_COLLAGE_TOKEN",
    metavar="T",
    help="Require 'Authorization: Bearer T' on every request (or set PSD_COLLAGE_TOKEN).",
)
@click.option(
    "--max-upload",
    type=click.IntRange(1),
    default=2048,
    show_default=True,
    metavar="MB",
    help="Largest document accepted by POST /api/jobs.",
)
@click.option(
    "--broker",
    metavar="URL",
    help="Redis URL (redis://HOST:6379/0): queue jobs for psd-collage worker processes "
    "(a farm) instead of rendering here.",
)
@watch_options
@policy_options
@render_options
def serve(
    root: Path,
    host: str,
    port: int,
    token: str | None,
    max_upload: int,
    broker: str | None,
    preview: bool | None,
    poll: float | None,
    stable: float,
    **options: Any,
) -> None:
    """HTTP API and live status page over the hot folder ROOT.

    Uploads (POST /api/jobs) land in ROOT/inbox like dropped files; files dropped
    by hand are rendered and shown too. Open http://HOST:PORT/ for the status page.
    Like watch, it renders in this process (the render and policy options are the
    folder's defaults and limits), or with --broker queues for the farm's workers
    and shows the farm's status. Ctrl-C (or SIGTERM) stops cleanly with exit status 0,
    like watch; a running job is re-run at the next start. A second Ctrl-C stops at once
    (exit status 130).
    """
    from .backend import HotFolderBackend

    try:
        if not is_loopback(host) and not token:
            raise CollageError(
                f"--host {host} lets other machines reach the server: give --token T "
                "(or set PSD_COLLAGE_TOKEN) so that only those who know it can use it"
            )
        settings = settings_from_options({**options, "preview": preview})
        policy = policy_from_options(options)
        if broker:
            check_farm_options(broker, settings, policy, command="serve")
        watching = WatchOptions(stable=stable, poll=poll, broker=broker)
        backend = HotFolderBackend(root, settings, watching, policy=policy)
        sock = _listen(host, port)
        app = create_app(
            backend, token=token, local_only=is_loopback(host), max_upload=max_upload * 1024**2
        )
        _run(app, sock, token)
    except CollageError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def _listen(host: str, port: int) -> socket.socket:
    """Bind before starting, so a taken port is one plain error line."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise CollageError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another --port "
            "or stop the program using it"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _run(app: Any, sock: socket.socket, token: str | None) -> None:
    import uvicorn

    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    login = "?token=..." if token else ""
    click.echo(f"serving http://{shown}:{port}/{login} (status page; API under /api)", err=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.end_streams()  # open /api/events streams would hold the shutdown up
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    server = Server(config)
    # uvicorn raises the signal that stopped it again once it has shut down; these handlers
    # (restored by uvicorn before it does) turn that into the same exit status as `watch`.
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    except _Stopped:
        if server.force_exit:  # a second Ctrl-C: stopped without waiting
            raise KeyboardInterrupt from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Stopped(Exception):
    """Ctrl-C or SIGTERM after a clean shutdown: exit status 0, like `watch`."""


def _stopped(_sig: int, _frame: Any) -> None:
    raise _Stopped()
