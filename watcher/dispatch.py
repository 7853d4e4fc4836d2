"""The watcher's side of a farm (``watch ROOT --broker URL``): queue, collect, ride out outages.

The watcher keeps each job it queued locked (see :mod:`watcher.jobs`) until a
worker's ``result.json`` appears in the job folder; then it records the outcome
in the stage record and makes the final moves, as in single-process mode.

Redis is the queue and the farm's status, not the record of what exists: the
folders in ``work/`` are. So whenever a job in flight is not known to Redis
(it was never sent because Redis was down, the watcher died between claiming
and sending, or Redis came back without its data) it is sent again. A job sent
twice is harmless: the second delivery finds the job finished, or waits for the
worker that renders it (see :mod:`watcher.farm`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .farm import make_app, prepare_job_folder, read_result, root_id, send_job
from .jobs import Job
from .layout import Layout
from .status import FarmStatus, StatusBoard

log = logging.getLogger("psd_collage.watch")


def broker_errors() -> tuple[type[BaseException], ...]:
    """What a send or a status call raises while Redis is unreachable."""
    from kombu.exceptions import OperationalError
    from redis.exceptions import RedisError

    return (OperationalError, RedisError, ConnectionError, TimeoutError)


def shown_url(url: str) -> str:
    """The broker URL without its password, for logs and status."""
    from kombu.utils.url import maybe_sanitize_url

    return maybe_sanitize_url(url)


class FarmDispatcher:
    """Queues claimed jobs on the broker and hands finished ones back to the service."""

    def __init__(self, layout: Layout, broker: str, *, resync: float = 5.0, retry: float = 2.0):
        self.layout = layout
        self.url = broker
        # The producer's visibility timeout does not matter: the workers' does.
        self.app = make_app(broker, visibility_timeout=3600)
        self.status = FarmStatus(broker)
        self.root_id = root_id(layout.root, create=True)
        self.inflight: dict[str, Job] = {}
        self.resync_every = resync
        self.retry_every = retry
        self.down_since: float | None = None
        self._unsent: set[str] = set()
        self._unrecorded: list[dict[str, Any]] = []  # finished while Redis was down
        self._next_try = 0.0
        self._last_resync = float("-inf")

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def submit(self, job: Job) -> None:
        """Take over a claimed (or already queued) job; it is sent at the next :meth:`sync`."""
        if job.stage == "claimed":
            prepare_job_folder(job.folder)
            job.state.update(stage="queued", queued_at=time.time())
            job.save()
        self.inflight[job.id] = job
        self._unsent.add(job.id)

    def sync(self, now: float) -> None:
        """Send what Redis does not know; record finished jobs; notice an outage and its end."""
        if self.down and now < self._next_try:
            return
        resync = now - self._last_resync >= self.resync_every or self.down
        try:
            self._send(sorted(self.inflight) if resync else sorted(self._unsent))
            while self._unrecorded:
                self.status.job_finished(self._unrecorded[0])
                self._unrecorded.pop(0)
        except broker_errors() as exc:
            if not self.down:
                log.warning(
                    "cannot reach Redis at %s (%s): claimed files wait in work/, new ones stay "
                    "in inbox/; retrying every %g s",
                    shown_url(self.url),
                    " ".join(str(exc).split()) or type(exc).__name__,
                    self.retry_every,
                )
                self.down_since = now
            self._next_try = now + self.retry_every
            return
        if resync:
            self._last_resync = now
        if self.down:
            log.info("Redis is back after %.0f s", now - (self.down_since or now))
            self.down_since = None

    def _send(self, ids: list[str]) -> None:
        if not ids:
            return
        known = self.status.known_jobs(ids)
        for job_id in ids:
            job = self.inflight.get(job_id)
            if job is None or job_id in known or read_result(job.folder) is not None:
                self._unsent.discard(job_id)
                continue
            send_job(self.app, job_id, job.name, self.root_id)
            self.status.job_queued(job_id, job.name, job.state.get("queued_at") or time.time())
            self._unsent.discard(job_id)
            log.info("queued %s (job %s)", job.name, job_id)

    def collect(self) -> list[Job]:
        """Jobs whose worker wrote ``result.json``, with the outcome recorded (stage done/failed)."""
        finished = []
        for job_id, job in list(self.inflight.items()):
            result = read_result(job.folder)
            if result is None:
                continue
            del self.inflight[job_id]
            self._unsent.discard(job_id)
            for key in ("worker", "attempt"):
                if result.get(key) is not None:
                    job.state[key] = result[key]
            if result.get("started"):
                job.state["started_at"] = result["started"]
            if result["outcome"] == "done" and not _inside_job(job, result):
                result = {"outcome": "failed", "report": f"{job.name}: bad result.json\n"}
            if result["outcome"] == "done":
                preview = result.get("preview")
                job.mark_done(
                    job.folder / result["output"],
                    job.folder / preview if preview else None,
                    {**(result.get("summary") or {}), "worker": result.get("worker")},
                )
            else:
                job.mark_failed(str(result.get("report") or "failed\n"), result.get("cause"))
            finished.append(job)
        return finished

    def finished(self, entry: dict[str, Any]) -> None:
        """The files are moved: the job leaves the farm's status for its history."""
        self._unrecorded.append(entry)
        if not self.down:
            try:
                while self._unrecorded:
                    self.status.job_finished(self._unrecorded[0])
                    self._unrecorded.pop(0)
            except broker_errors():
                pass  # recorded at the next sync that reaches Redis

    def close(self) -> None:
        """Let go of the jobs in flight: workers go on; the next watcher collects them."""
        for job in self.inflight.values():
            job.release()
        self.inflight.clear()


def _inside_job(job: Job, result: dict[str, Any]) -> bool:
    """A worker's result names files inside the job folder, nothing else."""
    names = [result.get("output"), result.get("preview")]
    folder = job.folder.resolve()
    return isinstance(names[0], str) and all(
        name is None or (isinstance(name, str) and folder in (folder / name).resolve().parents)
        for name in names
    )


class FarmBoard(StatusBoard):
    """``status.json`` derived from the farm's status in Redis, plus this watcher's view."""

    REFRESH = 0.5  # seconds: read Redis at most this often for status.json

    def __init__(self, path: Path, dispatcher: FarmDispatcher, **kw: Any) -> None:
        super().__init__(path, **kw)
        self.dispatcher = dispatcher
        self._farm: dict[str, Any] = {}
        self._key = f"{self.host}:{self.pid}"
        self._fetched = float("-inf")

    def snapshot(self) -> dict[str, Any]:
        local = super().snapshot()
        mine = {"state": self.state, "waiting": local["waiting"], "message": self.message}
        now = time.monotonic()
        if not self.dispatcher.down and now - self._fetched >= self.REFRESH:
            self._fetched = now
            try:
                self.dispatcher.status.watcher_seen(self._key, mine)
                self._farm = self.dispatcher.status.snapshot()
            except broker_errors():
                pass  # the dispatcher notices and logs it
        message = self.message
        if self.dispatcher.down:
            message = f"Redis at {shown_url(self.dispatcher.url)} is unreachable; files are safe"
        return {
            **local,
            **{k: v for k, v in self._farm.items() if k not in ("state", "message", "updated")},
            "mode": "farm",
            "broker": shown_url(self.dispatcher.url),
            "message": message,
        }

    def close(self) -> None:
        if not self.dispatcher.down:
            try:
                self.dispatcher.status.watcher_gone(self._key)
            except broker_errors():
                pass
