"""``ROOT/status.json``: what the watcher is doing, for people and for monitoring.

Rewritten atomically (a reader never sees half a file) when something changes,
at most a few times a second while a job reports progress, and at least every
``heartbeat`` seconds so a stale ``updated`` means the watcher is gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Any

from psd_collage.atomic import atomic_write_text


def iso(ts: float | None) -> str | None:
    """Wall-clock seconds -> local ISO 8601 with milliseconds (what status and logs show)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="milliseconds")


class StatusBoard:
    """The in-memory status; :meth:`write` puts it on disk."""

    def __init__(
        self,
        path: Path,
        *,
        settings: dict[str, Any],
        keep: int = 50,
        min_interval: float = 0.5,
        heartbeat: float = 10.0,
    ) -> None:
        self.path = path
        self.settings = settings
        self.state = "starting"
        self.started = time.time()
        self.queued: list[dict[str, Any]] = []
        self.waiting: list[dict[str, Any]] = []
        self.running: dict[str, Any] | None = None
        self.recent: deque[dict[str, Any]] = deque(self._previous_recent(keep), maxlen=keep)
        self.counts = {"done": 0, "failed": 0}
        self.message: str | None = None
        self._min_interval = min_interval
        self._heartbeat = heartbeat
        self._last_body: str | None = None
        self._last_write = 0.0

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "message": self.message,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": iso(self.started),
            "settings": self.settings,
            "queued": self.queued,
            "waiting": self.waiting,
            "running": self.running,
            "counts": self.counts,
            "recent": list(self.recent),
        }

    def write(self, *, force: bool = False) -> bool:
        """Write when the content changed (throttled unless ``force``) or the heartbeat is due."""
        body = json.dumps(self.snapshot(), indent=2, ensure_ascii=False, default=str)
        now = time.monotonic()
        changed = body != self._last_body
        due = now - self._last_write >= self._heartbeat
        if not (due or (changed and (force or now - self._last_write >= self._min_interval))):
            return False
        data = json.loads(body)
        data["updated"] = iso(time.time())
        atomic_write_text(self.path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        self._last_body, self._last_write = body, now
        return True

    def job_started(self, entry: dict[str, Any]) -> None:
        self.state = "working"
        self.running = entry
        self.write(force=True)

    def job_progress(self, phase: str, done: int, total: int) -> None:
        if self.running is None:
            return
        self.running.update(
            phase=phase, done=done, total=total, elapsed=round(time.time() - self._run_start(), 2)
        )
        self.write()

    def job_finished(self, entry: dict[str, Any]) -> None:
        self.running = None
        self.state = "idle"
        if entry.get("outcome") in self.counts:
            self.counts[entry["outcome"]] += 1
        self.recent.appendleft(entry)
        self.write(force=True)

    def _run_start(self) -> float:
        started = (self.running or {}).get("started_ts")
        return float(started) if started else time.time()

    def _previous_recent(self, keep: int) -> list[dict[str, Any]]:
        """Keep the history across restarts: it is what tells you what happened last night."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            recent = data.get("recent", [])
            return [r for r in recent if isinstance(r, dict)][:keep]
        except (OSError, ValueError, AttributeError):
            return []
