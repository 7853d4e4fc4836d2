"""Who does the work behind ``serve``, and how the server learns what is happening.

A backend starts and stops the workers (if it has its own) and returns the hot
folder's status as a dict shaped like ``ROOT/status.json``: ``state``,
``message``, ``queued``, ``waiting``, ``running``, ``recent`` and, on a farm,
``workers``. Uploads, retries and cancels are files moved in the shared ROOT
(see :mod:`serve.book`), the same whoever renders.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from watcher.layout import Layout
from watcher.service import RendererLike, WatchOptions, WatchService

log = logging.getLogger("psd_collage.serve")


class Backend(Protocol):
    """What the HTTP server needs from whoever renders."""

    layout: Layout

    def start(self) -> None: ...

    def close(self) -> None: ...

    def snapshot(self) -> dict[str, Any]: ...

    def check_upload(self, path: Path, settings: Mapping[str, Any]) -> None:
        """Raise a CollageError when an upload cannot be a job (not a PSD, over the policy)."""


class StatusFile:
    """``ROOT/status.json``, re-read only when it was replaced (it is written atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: tuple[int, int, int] | None = None
        self._data: dict[str, Any] = {}

    def read(self) -> dict[str, Any]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return {}
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if key != self._key:
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return self._data
            self._data = data if isinstance(data, dict) else {}
            self._key = key
        return self._data


class HotFolderBackend:
    """The hot folder's watcher, in a thread of this process.

    Without a broker it renders here, like ``psd-collage watch ROOT``, and the status is
    ``ROOT/status.json``. With ``options.broker`` it claims and queues for the farm's
    workers, like ``watch --broker``, and the status is the farm's, read from Redis.
    """

    def __init__(
        self,
        root: str | Path,
        settings: Mapping[str, Any] | None = None,
        options: WatchOptions | None = None,
        *,
        policy: Mapping[str, Any] | None = None,
        renderer_factory: Callable[[dict[str, Any]], RendererLike] | None = None,
    ) -> None:
        self.service = WatchService(
            root, settings, options, policy=policy, renderer_factory=renderer_factory
        )
        self.layout = self.service.layout
        self.broker = self.service.options.broker
        self._status = StatusFile(self.layout.status_file)
        self._farm = None
        if self.broker:
            from watcher.status import FarmStatus

            self._farm = FarmStatus(self.broker)
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="psd-collage-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.service.run()
        except Exception as exc:  # the watcher stopped (a broken model): the page says why
            log.error("the hot folder stopped: %s", exc)
            self._error = str(exc)

    def close(self) -> None:
        """Stop taking jobs; a running one is cancelled at its next step and re-run next start."""
        self.service.stop()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def snapshot(self) -> dict[str, Any]:
        data = self._farm_snapshot() if self._farm is not None else dict(self._status.read())
        if self._error is not None:
            data.update(state="stopped", message=self._error)
        return data

    def _farm_snapshot(self) -> dict[str, Any]:
        from watcher.dispatch import broker_errors, shown_url

        assert self._farm is not None
        try:
            return self._farm.snapshot()
        except broker_errors() as exc:
            # The last status.json the watcher derived from Redis, marked as not current.
            data = dict(self._status.read())
            data.update(
                state="offline",
                message=f"cannot read the farm's status from {shown_url(self.broker or '')} "
                f"({exc}): is Redis running?",
            )
            return data

    def check_upload(self, path: Path, settings: Mapping[str, Any]) -> None:
        """The policy and the document's header, before the upload joins the queue."""
        from psd_collage.psd.header import check_header
        from psd_collage.settings import Settings

        merged = Settings().updated(self.service.defaults, where="folder defaults")
        merged = merged.updated(settings, where="the upload's settings")
        self.service.policy.check_settings(merged)
        check_header(path, max_pixels=merged.max_pixels)
