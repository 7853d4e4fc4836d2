"""What the hot folder is doing: ``ROOT/status.json`` and, on a farm, the status in Redis.

This module's public API (used by ``psd-collage status`` and ``psd-collage serve``):

- :func:`read_status` ``(root, broker=None)``: the status as one dict;
- :class:`FarmStatus` ``(broker_url)``: the farm's one status, kept in Redis, written by
  the watcher (queued, finished) and the workers (running, progress); ``.snapshot()``;
- :class:`StatusBoard`: the watcher's side, which writes ``ROOT/status.json``
  (in farm mode derived from :class:`FarmStatus`).

Every snapshot has the same shape, in single-process and farm mode::

    {"mode": "single" | "farm", "state": "idle" | "working" | "stopped" | ...,
     "message": str | None, "updated": ISO time,
     "queued":  [{"job", "name", "queued_at"}],          # claimed, waiting for a worker
     "waiting": [{"name", "size", "reason"}],            # in the inbox, not ready yet
     "running": [{"job", "name", "worker", "phase", "done", "total", "attempt", "started"}],
     "counts":  {"done": int, "failed": int},
     "recent":  [{"job", "name", "outcome": "done" | "failed", "done" | "failed": path,
                  "error", "worker", "started", "finished", "seconds", ...}],  # newest first
     "workers": [{"name", "state", "job", "updated", "silent_s"}]}  # farm ([] single)

``running[].done``/``total`` are the steps of the current ``phase`` ("read", "load",
"ti", "sample", "write"; "redelivery" when its farm worker is gone). A farm worker
heart-beats every :data:`WORKER_HEARTBEAT` s; silent for :data:`WORKER_GONE_AFTER` s its
``state`` is "gone" (``silent_s`` says for how long), and after
:data:`WORKER_FORGET_AFTER` s it leaves the list. ``status.json`` is rewritten atomically (a reader never
sees half a file) when something changes, at most a few times a second while a job
reports progress, and at least every ``heartbeat`` seconds so a stale ``updated``
means the watcher is gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Any

from psd_collage.atomic import atomic_write_text
from psd_collage.errors import CollageError

log = logging.getLogger("psd_collage.watch")


def is_disk_full(exc: BaseException) -> bool:
    """An error (or the OSError behind a CollageError) saying the disk or quota is full."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__
    return False


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
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.settings = settings
        self.state = "starting"
        self.started = time.time()
        self.queued: list[dict[str, Any]] = []
        self.waiting: list[dict[str, Any]] = []
        self.running: dict[str, Any] | None = None
        self.recent: deque[dict[str, Any]] = deque(self._previous_recent(keep), maxlen=keep)
        self.counts = {"done": 0, "failed": 0}
        self.message: str | None = None
        self.stale = False  # the last write failed (see write)
        self._min_interval = min_interval
        self._heartbeat = heartbeat
        self._last_body: str | None = None
        self._last_write = 0.0

    def snapshot(self) -> dict[str, Any]:
        return {
            "mode": "single",
            "state": self.state,
            "message": self.message,
            "host": self.host,
            "pid": self.pid,
            "started": iso(self.started),
            "settings": self.settings,
            "queued": self.queued,
            "waiting": self.waiting,
            "running": [self.running] if self.running else [],
            "counts": self.counts,
            "recent": list(self.recent),
            "workers": [],
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
        try:
            atomic_write_text(self.path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        except (OSError, CollageError) as exc:
            # A full disk (or a read-only ROOT) must not stop the service: the status is
            # written again once it can be; the log says why it is stale meanwhile.
            if not self.stale:
                log.warning("cannot write %s (%s): it is stale until it can", self.path.name, exc)
            self.stale = True
            return False
        if self.stale:
            log.info("%s is written again", self.path.name)
        self.stale = False
        self._last_body, self._last_write = body, now
        return True

    def job_started(self, entry: dict[str, Any]) -> None:
        self.state = "working"
        self.running = entry
        self.write(force=True)

    def job_progress(self, phase: str, done: int, total: int) -> None:
        if self.running is None:
            return
        # A new phase and a phase's last step are always written: the throttle must not
        # hide a short phase, nor leave a job held mid-step showing the phase before it.
        milestone = self.running.get("phase") != phase or done >= total
        self.running.update(
            phase=phase, done=done, total=total, elapsed=round(time.time() - self._run_start(), 2)
        )
        self.write(force=milestone)

    def job_finished(self, entry: dict[str, Any]) -> None:
        self.running = None
        self.state = "idle"
        if entry.get("outcome") in self.counts:
            self.counts[entry["outcome"]] += 1
        self.recent.appendleft(entry)
        self.write(force=True)

    def close(self) -> None:
        """Nothing to let go of for a status file (the farm's board leaves Redis)."""

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


# ---------------------------------------------------------------------------
# The farm's status, in Redis
# ---------------------------------------------------------------------------

#: Keys in Redis (one farm per Redis database): a hash of jobs in flight, a hash of
#: workers, a hash of watchers, the counts and a capped list of finished jobs.
PREFIX = "psd-collage:"


class FarmStatus:
    """The one status of a farm, in the broker's Redis.

    Job records are JSON in the hash ``psd-collage:jobs``: the watcher adds one when it
    queues a job (only if absent: a fast worker may already have marked it running),
    the worker that takes the job rewrites it while rendering, and the watcher removes
    it when it has moved the files, adding the job to ``history`` and ``counts`` in one
    transaction. Methods raise ``redis.exceptions.RedisError`` when Redis is down; the
    callers decide what that means.
    """

    def __init__(
        self,
        url: str,
        *,
        keep: int = 50,
        gone_after: float | None = None,
        forget_after: float | None = None,
    ) -> None:
        import redis

        self.url = url
        self.keep = keep
        self.gone_after = WORKER_GONE_AFTER if gone_after is None else gone_after
        self.forget_after = WORKER_FORGET_AFTER if forget_after is None else forget_after
        # redis-py's pool reconnects in a forked child (a Celery pool process) by itself.
        self.client = redis.Redis.from_url(
            url, socket_connect_timeout=2, socket_timeout=5, decode_responses=True
        )

    # -- the watcher's side ----------------------------------------------------
    def job_queued(self, job: str, name: str, queued_at: float) -> None:
        record = {"job": job, "name": name, "state": "queued", "queued_at": iso(queued_at)}
        self.client.hsetnx(PREFIX + "jobs", job, json.dumps(record))

    def known_jobs(self, jobs: list[str]) -> set[str]:
        """Which of these jobs Redis knows (a Redis that lost its data knows none)."""
        if not jobs:
            return set()
        found = self.client.hmget(PREFIX + "jobs", jobs)
        return {job for job, record in zip(jobs, found, strict=True) if record is not None}

    def job_finished(self, entry: dict[str, Any]) -> None:
        """The watcher moved the files: out of the jobs, into history and counts."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(PREFIX + "jobs", entry["job"])
        pipe.lpush(PREFIX + "history", json.dumps(entry, ensure_ascii=False, default=str))
        pipe.ltrim(PREFIX + "history", 0, self.keep - 1)
        if entry.get("outcome") in ("done", "failed"):
            pipe.hincrby(PREFIX + "counts", entry["outcome"], 1)
        pipe.execute()

    def forget_jobs(self, jobs: list[str]) -> None:
        if jobs:
            self.client.hdel(PREFIX + "jobs", *jobs)

    def watcher_seen(self, key: str, info: dict[str, Any]) -> None:
        """The watcher's own view (inbox files not ready yet, its state) for the snapshot."""
        self.client.hset(
            PREFIX + "watchers", key, json.dumps({**info, "updated": iso(time.time())})
        )

    def watcher_gone(self, key: str) -> None:
        self.client.hdel(PREFIX + "watchers", key)

    # -- the worker's side -----------------------------------------------------
    def job_running(self, record: dict[str, Any]) -> None:
        """A worker's record of its job: worker, attempt, phase, steps done of total."""
        data = {**record, "state": record.get("state", "running"), "updated": iso(time.time())}
        self.client.hset(PREFIX + "jobs", record["job"], json.dumps(data, default=str))

    def worker_seen(self, name: str, info: dict[str, Any]) -> None:
        now = time.time()
        data = {"name": name, **info, "updated": iso(now)}
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(PREFIX + "workers", name, json.dumps(data, default=str))
        pipe.hset(PREFIX + "heartbeats", name, repr(now))
        pipe.execute()

    def worker_heartbeat(self, name: str) -> None:
        """The worker is alive (sent every :data:`WORKER_HEARTBEAT` s, busy or not)."""
        self.client.hset(PREFIX + "heartbeats", name, repr(time.time()))

    def worker_gone(self, name: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(PREFIX + "workers", name)
        pipe.hdel(PREFIX + "heartbeats", name)
        pipe.execute()

    # -- readers ---------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The farm's status, shaped like ``status.json`` (see the module docstring)."""
        pipe = self.client.pipeline(transaction=False)
        for key in ("jobs", "workers", "watchers", "counts", "heartbeats"):
            pipe.hgetall(PREFIX + key)
        pipe.lrange(PREFIX + "history", 0, self.keep - 1)
        jobs, workers, watchers, counts, heartbeats, history = pipe.execute()
        records = sorted(_loads(jobs.values()), key=lambda r: (r.get("queued_at") or "", r["job"]))
        watcher_views = [w for w in _loads(watchers.values()) if _age(w) < WATCHER_GONE_AFTER]
        rendering = {r["job"]: r.get("worker") for r in records if r.get("state") != "queued"}
        workers_seen = self._workers(_loads(workers.values()), heartbeats)
        gone = {w["name"] for w in workers_seen if w["state"] == "gone"}
        for w in workers_seen:
            if w.get("state") == "working" and rendering.get(w.get("job")) != w.get("name"):
                w["state"] = "lost"  # killed mid-job: its job is queued again or elsewhere
        for r in records:
            if r.get("state") != "queued" and r.get("worker") in gone:
                # Unacknowledged in Redis: another worker gets it after the visibility timeout.
                r["phase"] = REDELIVERY
        busy = [w for w in watcher_views if w.get("state") == "working"]
        state = "working" if records else ("idle" if watcher_views else "stopped")
        return {
            "mode": "farm",
            "state": state if not busy else "working",
            "message": next((w["message"] for w in watcher_views if w.get("message")), None),
            "updated": iso(time.time()),
            "queued": [r for r in records if r.get("state") == "queued"],
            "waiting": [item for w in watcher_views for item in w.get("waiting", [])],
            "running": [r for r in records if r.get("state") != "queued"],
            "counts": {"done": int(counts.get("done", 0)), "failed": int(counts.get("failed", 0))},
            "recent": _loads(history),
            "workers": workers_seen,
        }

    def _workers(
        self, workers: list[dict[str, Any]], heartbeats: dict[str, str]
    ) -> list[dict[str, Any]]:
        """Workers by name, ``gone`` when silent for :attr:`gone_after` s; those silent for
        :attr:`forget_after` s are removed from Redis (a machine taken out of the farm)."""
        now, shown, forget = time.time(), [], []
        for worker in sorted(workers, key=lambda w: str(w.get("name", ""))):
            name = str(worker.get("name", ""))
            try:
                silent = now - float(heartbeats[name])
            except (KeyError, TypeError, ValueError):
                silent = _age(worker)  # a worker of an older version: its last state change
            if silent >= self.forget_after:
                forget.append(name)
                continue
            if silent >= self.gone_after:
                worker["state"] = "gone"
            worker["silent_s"] = round(max(silent, 0.0), 1)
            shown.append(worker)
        if forget:
            with contextlib.suppress(Exception):  # a reader; the next one tries again
                self.worker_gone_all(forget)
        return shown

    def worker_gone_all(self, names: list[str]) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(PREFIX + "workers", *names)
        pipe.hdel(PREFIX + "heartbeats", *names)
        pipe.execute()


def read_status(root: str | Path, broker: str | None = None) -> dict[str, Any]:
    """The hot folder's status: from Redis with a broker, else ``ROOT/status.json``.

    Raises ``redis.exceptions.RedisError`` when the broker cannot be read, and
    ``FileNotFoundError`` when no watcher ever wrote ``status.json`` in ROOT.
    """
    if broker:
        return FarmStatus(broker).snapshot()
    data = json.loads((Path(root) / "status.json").read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


#: A watcher that has not written its view for this long (seconds) is gone (killed).
WATCHER_GONE_AFTER = 60.0
#: Seconds between a farm worker's heartbeats (a thread of its pool process, busy or not).
WORKER_HEARTBEAT = 5.0
#: A worker silent this long (seconds: six missed heartbeats) shows as ``gone``, and a job
#: it was rendering as waiting for redelivery to another worker.
WORKER_GONE_AFTER = 30.0
#: A worker silent this long (seconds) is removed from the status.
WORKER_FORGET_AFTER = 600.0
#: The ``phase`` of a job whose worker is gone: Redis hands it out again after the
#: visibility timeout (see :mod:`watcher.farm`).
REDELIVERY = "redelivery"


def _age(record: dict[str, Any]) -> float:
    try:
        return time.time() - datetime.fromisoformat(record["updated"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return float("inf")


def _loads(values: Any) -> list[dict[str, Any]]:
    out = []
    for value in values:
        try:
            item = json.loads(value)
        except (TypeError, ValueError):
            continue
        if isinstance(item, dict):
            out.append(item)
    return out
