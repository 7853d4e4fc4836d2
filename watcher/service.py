"""The hot folder service behind ``psd-collage watch ROOT [--broker URL]``.

One process, one warm :class:`~psd_collage.render.Renderer`, one job at a
time; with a broker, the renders happen on farm workers instead (see
:mod:`watcher.dispatch`) and this process claims, queues and moves. Filesystem events (watchdog) only wake the loop up; what is ready is
decided by scanning the inbox (see :mod:`watcher.stability`), and a periodic
rescan of inbox/ and work/ catches whatever events were missed, including jobs
left behind by a watcher that died. Claims are atomic renames and job folders
are flock'ed (see :mod:`watcher.jobs`), so several watchers may share a ROOT.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from psd_collage.errors import CollageError, SettingsError, terminal_safe
from psd_collage.policy import folder_policy, read_folder_config
from psd_collage.settings import validate_settings

from .execute import clean_report, render_outcome
from .jobs import MAX_ATTEMPTS, ClaimError, Job, claim, failure_report, open_job, pending_jobs
from .layout import Layout
from .stability import Candidate, StabilityTracker
from .status import StatusBoard, is_disk_full, iso

log = logging.getLogger("psd_collage.watch")


class RendererLike(Protocol):
    def render_file(
        self,
        path: Path,
        output: Path | None = None,
        *,
        sidecar: Path | None = None,
        preview: bool | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> Any: ...


#: Default seconds a dropped file must stay unchanged (size, mtime) before it is taken.
STABLE_SECONDS = 2.0
#: Polling interval when the system gives no file events (e.g. the inotify watch limit).
FALLBACK_POLL_SECONDS = 2.0


@dataclass(frozen=True)
class WatchOptions:
    """How the service watches (render settings are separate: see ``WatchService``)."""

    stable: float = STABLE_SECONDS  # how long a file must stay unchanged before it is taken
    poll: float | None = None  # seconds between polls; None: native events (inotify, FSEvents)
    once: bool = False  # process what is there, then exit
    rescan: float = 10.0  # safety-net rescan of inbox/ and work/ (events can be missed)
    grace: float | None = (
        None  # unchanged and incomplete this long -> reported as stalled; None: max(stable, 10)
    )
    broker: str | None = None  # Redis URL: farm workers render (see watcher.dispatch)
    resync: float = 5.0  # farm: how often to check that Redis knows every job in flight

    @property
    def unreadable_grace(self) -> float:
        return max(self.stable, 10.0) if self.grace is None else self.grace


class WatchService:
    """Watches ``ROOT/inbox`` and renders each stable PSD/PSB into ``ROOT/done``.

    ``settings`` are the watch command's render options: folder-level defaults that
    win over ``ROOT/collage.toml`` and lose to a file's own sidecar. ``policy`` are
    the operator's limits given as options, tightening ``[policy]`` in collage.toml.
    """

    def __init__(
        self,
        root: str | Path,
        settings: Mapping[str, Any] | None = None,
        options: WatchOptions | None = None,
        *,
        policy: Mapping[str, Any] | None = None,
        renderer_factory: Callable[[dict[str, Any]], RendererLike] | None = None,
        header_check: Callable[[Path], object] | None = None,
    ) -> None:
        self.options = options or WatchOptions()
        opts = self.options
        if (
            opts.stable < 0
            or (opts.poll is not None and opts.poll <= 0)
            or opts.unreadable_grace < 0
        ):
            raise SettingsError("--stable and --grace must be >= 0 and --poll > 0 seconds")
        self.layout = Layout.create(root)
        cli = validate_settings(
            {k: v for k, v in (settings or {}).items() if v is not None}, where="command line"
        )
        folder_defaults, _ = read_folder_config(self.layout.defaults_file)
        self.defaults = {**folder_defaults, **cli}
        self.defaults.setdefault("preview", True)
        self.policy = folder_policy(self.layout.defaults_file, policy)
        if renderer_factory is None:
            from psd_collage.render import Renderer

            def renderer_factory(defaults: dict[str, Any]) -> RendererLike:
                return Renderer(defaults=defaults, policy=self.policy)

        if header_check is None:
            from psd_collage.psd.header import check_header as header_check
        self.farm = None
        if opts.broker:
            from .dispatch import FarmDispatcher

            self.farm = FarmDispatcher(self.layout, opts.broker, resync=opts.resync)
        self.renderer = None if self.farm else renderer_factory(dict(self.defaults))
        self.tracker = StabilityTracker(
            self.layout.inbox,
            self.options.stable,
            header_check,
            wall_clock=time.time,
            grace=self.options.unreadable_grace,
            root=self.layout.root,
        )
        shown = {k: v for k, v in self.defaults.items() if k != "layers"}
        shown.update(stable=self.options.stable, poll=self.options.poll)
        shown["policy"] = self.policy.as_dict()
        if self.farm:
            from .dispatch import FarmBoard

            self.board: StatusBoard = FarmBoard(
                self.layout.status_file, self.farm, settings={"policy": shown["policy"]}
            )
        else:
            self.board = StatusBoard(self.layout.status_file, settings=shown)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._last_inbox_scan = float("-inf")
        self._last_work_scan = float("-inf")
        self._work_found = True  # look at work/ first thing
        self._skip_folders: set[str] = set()  # job folders we could not make sense of
        self._unclaimable: dict[str, object] = {}  # name -> signature whose claim failed
        self._signals: dict[int, Any] = {}
        self._paused = False  # waiting for disk space (see _pause_for_disk)

    # -- control ---------------------------------------------------------------
    def stop(self) -> None:
        """Stop taking jobs and cancel the running one (thread- and signal-safe)."""
        self._stop.set()
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> int:
        """Run until stopped (or, with ``once``, until the inbox is done). Returns 0."""
        handlers = self._start_logging()
        self._install_signals()
        observer = None
        try:
            observer = self._start_observer()
            log.info(
                "watching %s (stable %.1f s, %s, %s)%s",
                self.layout.inbox,
                self.options.stable,
                f"polling every {self.options.poll:g} s" if self.options.poll else "native events",
                self._who_renders(),
                ", once" if self.options.once else "",
            )
            self.board.state = "idle"
            self.board.write(force=True)
            while not self._stop.is_set():
                try:
                    worked = self._step()
                except (OSError, CollageError) as exc:
                    if is_disk_full(exc):
                        self._pause_for_disk(exc)
                        continue
                    if isinstance(exc, CollageError):
                        raise
                    # ROOT itself is unusable (permissions, a vanished share): the
                    # operator's to fix; one line, not a traceback.
                    raise CollageError(
                        f"cannot use the hot folder ({exc}): whoever runs it must make ROOT "
                        "and its folders writable, then start the watcher again",
                        path=self.layout.root,
                    ) from exc
                if self._paused:
                    log.info("disk space is back: carrying on")
                    self._paused = False
                    if self.board.state == "paused":
                        self.board.state = "idle"
                    self.board.message = None
                    self.board.write(force=True)
                if worked:
                    continue
                if self.options.once and self._nothing_left():
                    self._report_leftovers()
                    break
                self._sleep()
            return 0
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
            if self.farm:
                self.farm.close()
            self.board.state = "stopped"
            self.board.running = None
            self.board.write(force=True)
            self.board.close()
            log.info("stopped")
            self._restore_signals()
            for handler in handlers:
                log.removeHandler(handler)
                handler.close()

    def _who_renders(self) -> str:
        if self.farm:
            from .dispatch import shown_url

            return f"farm workers via {shown_url(self.farm.url)}"
        return f"model {self.defaults.get('model', 'default')}"

    # -- the loop ---------------------------------------------------------------
    def _step(self) -> bool:
        """Scan if due, then run (or queue) at most one job. True when something happened."""
        now = time.monotonic()
        if self.farm and self._collect():
            return True
        if (
            self._wake.is_set()
            or self.tracker.candidates
            or now - self._last_inbox_scan >= self.options.rescan
        ):
            self._wake.clear()
            self.tracker.scan(now)
            self._last_inbox_scan = now
            for name in self.tracker.newly_ignored:
                log.info("leaving %s in inbox/: %s", name, self.tracker.waiting.get(name, ""))
            for name, why in self.tracker.newly_refused:
                log.warning("leaving %s alone in inbox/: %s", name, why)
            self.tracker.newly_refused.clear()
            for cand in self.tracker.newly_seen:
                log.info("found %s (%d bytes)", cand.name, cand.signature[0][0])
            self.tracker.newly_ignored.clear()
            self.tracker.newly_seen.clear()
        ready, rejected = self.tracker.settle(now)
        for cand in self.tracker.newly_failing:
            log.info(
                "%s does not read as a whole PSD yet (%s); waiting for the rest of the copy",
                cand.name,
                cand.header_error,
            )
        self.tracker.newly_failing.clear()
        for cand in self.tracker.newly_stalled:
            log.warning(
                "%s is still incomplete after %g s: it stays in inbox/ while the copy may "
                "resume; if the copy broke off, copy the file again",
                cand.name,
                self.options.unreadable_grace,
            )
        self.tracker.newly_stalled.clear()
        if self.farm and self.farm.down:
            ready = []  # files are safest in the inbox until Redis is back
        ready = [c for c in ready if self._unclaimable.get(c.name) != c.signature]
        rejected = [c for c in rejected if self._unclaimable.get(c.name) != c.signature]
        self._show_queue(ready)

        if self._work_found or now - self._last_work_scan >= self.options.rescan:
            self._last_work_scan = now
            self._work_found = self._resume_one()
            if self._work_found:
                return True
        for cand in rejected:
            if self._stop.is_set():
                return False
            if self._take(cand, cand.header_error):
                return True
        for cand in ready:
            if self._stop.is_set():
                return False
            if self._take(cand, None):
                return True
        return False

    def _collect(self) -> bool:
        """Farm: queue what Redis does not know, finish what the workers finished."""
        self.farm.sync(time.monotonic())
        finished = self.farm.collect()
        for job in finished:
            try:
                self._finish(job)
            finally:
                job.release()
        return bool(finished)

    def _nothing_left(self) -> bool:
        if self.farm and self.farm.inflight:
            return False
        return not self._work_found and all(
            self._unclaimable.get(c.name) == c.signature or c.stalled
            for c in self.tracker.candidates.values()
        )

    def _pause_for_disk(self, exc: BaseException) -> None:
        """A full disk is the operator's to fix: wait and try again, never exit."""
        message = (
            f"the disk holding the hot folder is full ({exc}): paused; jobs carry on "
            f"once space is freed (retried every {self.options.rescan:g} s)"
        )
        if self.board.message != message:
            log.error("%s", message)
        self._paused = True
        self.board.state, self.board.message = "paused", message
        self.board.write(force=True)
        self._work_found = True  # a claim may have been cut short: look at work/ again
        self._wake.wait(timeout=self.options.rescan)
        self._wake.clear()

    def leftovers(self) -> list[tuple[str, str]]:
        """What stays in inbox/ (and work/) and why: the answer of ``watch --once``."""
        left = [
            (
                c.name,
                f"incomplete ({c.header_error.detail if c.header_error else 'still changing'})"
                "; it is taken once the copy completes, or copy it again",
            )
            for c in self.tracker.candidates.values()
        ]
        left += [
            (name, "its claim failed; see the error above")
            for name in self._unclaimable
            if name in self.tracker.candidates
        ]
        left += list(self.tracker.refused.items()) + list(self.tracker.waiting.items())
        left += [
            (f"work/{name}", "a job that could not be carried on") for name in self._skip_folders
        ]
        return sorted(dict(left).items())

    def _report_leftovers(self) -> None:
        left = self.leftovers()
        if not left:
            log.info("done (--once): inbox/ is empty")
            return
        log.warning("done (--once): %d left behind:", len(left))
        for name, why in left:
            log.warning("  %s: %s", name, why)

    def _sleep(self) -> None:
        now = time.monotonic()
        waits = [
            self._last_inbox_scan + self.options.rescan - now,
            self._last_work_scan + self.options.rescan - now,
        ]
        deadline = self.tracker.next_deadline(now)
        if deadline is not None:
            waits.append(deadline + 0.01)
        if self.tracker.candidates:
            # Re-stat changing files at least a few times per window, even without events.
            waits.append(max(self.options.stable / 4, 0.05))
        if self.farm and self.farm.inflight:
            waits.append(0.2)  # look for the workers' results
        self._wake.wait(timeout=min(max(0.02, w) for w in waits))

    def _show_queue(self, ready: list[Candidate]) -> None:
        ready_names = {c.name for c in ready}
        before = [q["name"] for q in self.board.queued], [w["name"] for w in self.board.waiting]
        self.board.queued = [
            {"name": c.name, "size": c.signature[0][0], "ready_at": iso(c.ready_at)} for c in ready
        ]
        self.board.waiting = [
            {
                "name": c.name,
                "size": c.signature[0][0],
                "reason": (
                    "incomplete for a while: if the copy broke off, copy the file again"
                    if c.stalled
                    else "incomplete: waiting for the rest of the copy"
                    if c.failing_since
                    else "still changing"
                ),
            }
            for c in self.tracker.candidates.values()
            if c.name not in ready_names
        ]
        self.board.waiting += [
            {"name": name, "reason": why}
            for name, why in sorted({**self.tracker.refused, **self.tracker.waiting}.items())
        ]
        after = [q["name"] for q in self.board.queued], [w["name"] for w in self.board.waiting]
        self.board.write(force=after != before)

    # -- jobs ------------------------------------------------------------------
    def _take(self, cand: Candidate, header_error: CollageError | None) -> bool:
        """Claim a ready (or rejected) inbox file; False when another watcher got it first."""
        facts = {"mtime": cand.mtime, "ready_at": cand.ready_at or time.time()}
        try:
            job = claim(self.layout, cand.name, **facts)
        except ClaimError as exc:
            log.error("%s", exc)
            self._unclaimable[cand.name] = cand.signature
            return False
        self.tracker.forget([cand.name])
        self.board.queued = [q for q in self.board.queued if q["name"] != cand.name]
        if job is None:
            log.info("%s was taken by another watcher", cand.name)
            return False
        log.info("claimed %s as job %s", cand.name, job.id)
        self._run_job(job, header_error)
        return True

    def _resume_one(self) -> bool:
        """Carry on one job left in work/; True when there was one."""
        for folder in pending_jobs(self.layout):
            if folder.name in self._skip_folders or self._stop.is_set():
                continue
            try:
                job = open_job(self.layout, folder)
            except OSError as exc:
                if is_disk_full(exc):
                    raise  # paused, not given up on
                log.error("cannot open job %s: %s", folder.name, exc)
                self._skip_folders.add(folder.name)
                continue
            if job is None:
                continue
            log.info("resuming job %s (%s, %s)", job.id, job.name, job.stage)
            self._run_job(job, None)
            return True
        return False

    def _run_job(self, job: Job, header_error: CollageError | None) -> None:
        keep = False
        try:
            if job.stage in ("claimed", "queued") and not os.path.lexists(job.input):
                header_error = CollageError(
                    "was removed from work/ before it was harmonized (by something other than "
                    "the watcher): drop it into inbox/ again",
                    path=job.name,
                )
            if job.stage in ("claimed", "queued"):
                if header_error is not None:
                    job.mark_failed(self._report(job, header_error, internal=False), "input")
                elif self.farm:
                    self.farm.submit(job)  # locked by us until its result is in
                    self.farm.sync(time.monotonic())
                    keep = True
                    return
                elif not self._render(job):
                    return  # interrupted: stays in work/ for the next start
            self._finish(job)
        finally:
            if not keep:
                job.release()

    def _render(self, job: Job) -> bool:
        """Render and record the outcome. False when cancelled (the job is requeued)."""
        attempt = job.start_attempt()
        if attempt > MAX_ATTEMPTS:
            exc = CollageError(
                f"the watcher stopped {attempt - 1} times while working on this file "
                "(it may need more memory than this machine has): make the canvas smaller "
                "or render it on a bigger machine with psd-collage render",
                path=job.name,
            )
            job.mark_failed(self._report(job, exc, internal=False), "input")
            return True
        started = time.time()
        self.board.job_started(
            {
                "job": job.id,
                "name": job.name,
                "worker": f"{self.board.host}:{self.board.pid}",
                "attempt": attempt,
                "started": iso(started),
                "started_ts": started,
                "phase": "read",
                "done": 0,
                "total": 0,
            }
        )
        log.info("start %s (job %s, attempt %d)", job.name, job.id, attempt)
        phases: list[str] = []

        def progress(phase: str, done: int, total: int) -> None:
            if not phases or phases[-1] != phase:
                phases.append(phase)
                log.info("%s: %s", job.name, phase)
            self.board.job_progress(phase, done, total)

        outcome = render_outcome(
            self.renderer,
            name=job.name,
            job_id=job.id,
            input=job.input,
            output=job.prepare_output(),
            sidecar=job.sidecar,
            progress=progress,
            stop=self._stop.is_set,
            deadline=self.policy.deadline(),
            root=self.layout.root,
            hide=(job.folder, self.layout.inbox),
        )
        if outcome.kind == "cancelled":
            job.requeue()
            log.info("interrupted %s: it stays in work/ and runs again at the next start", job.name)
            self.board.running = None
            return False
        if outcome.kind == "model":
            # The folder's model is broken, not this file: keep the job, stop the service.
            job.requeue()
            self.board.running = None
            self.board.message = str(outcome.error)
            log.error(
                "cannot load the model (%s): stopping; %s stays in work/ and runs at the "
                "next start",
                outcome.error,
                job.name,
            )
            raise outcome.error
        if outcome.kind == "done":
            job.mark_done(outcome.output, outcome.preview, outcome.summary)
        else:
            if not isinstance(outcome.error, CollageError):
                log.error("internal error on %s: %r", job.name, outcome.error)
            job.mark_failed(outcome.report, outcome.cause)
        return True

    def _finish(self, job: Job) -> None:
        try:
            placed = job.finalize()
        except OSError as exc:
            placed = self._fail_unplaceable(job, exc)
            if placed is None:
                return
        state = job.state
        finished = state.get("finished_at") or time.time()
        entry = {
            "job": job.id,
            "name": job.name,
            "outcome": state["stage"],
            **{k: str(p.relative_to(self.layout.root)) for k, p in placed.items()},
            "error": state.get("error"),
            "cause": state.get("cause"),
            "attempt": state.get("attempt") or state.get("attempts"),
            "worker": state.get("worker"),
            "mtime": iso(state.get("mtime")),
            "ready_at": iso(state.get("ready_at")),
            "started": iso(state.get("started_at")),
            "finished": iso(finished),
            **self._durations(state, finished),
            **(state.get("result") or {}),
        }
        entry = {k: v for k, v in entry.items() if v is not None}
        self.board.job_finished(entry)
        if self.farm:
            self.farm.finished(entry)
        where = placed.get("done") or placed.get("failed")
        shown = where.relative_to(self.layout.root) if where else "?"
        if state["stage"] == "done":
            log.info("done %s -> %s (%.1f s)", job.name, shown, entry.get("seconds", 0.0))
        else:
            log.warning("failed %s -> %s: %s", job.name, shown, state.get("error"))

    def _fail_unplaceable(self, job: Job, exc: OSError) -> dict[str, Path] | None:
        """A result that cannot go to done/ (read-only, ...) fails the job with the reason, so
        that it does not sit in work/ unexplained; None when even failed/ cannot take it."""
        where = _target_folder(exc)
        reason = exc.strerror or str(exc)
        if job.stage == "done":
            error = CollageError(
                f"was harmonized but its result could not be moved to {where}/ ({reason}): "
                f"whoever runs the hot folder must make {where}/ writable, then retry it",
                path=job.name,
            )
            job.mark_failed(self._report(job, error, internal=False), "service")
            try:
                return job.finalize()
            except OSError as again:
                where, reason = _target_folder(again), again.strerror or str(again)
        message = (
            f"cannot move {job.name} (job {job.id}) to {where}/ ({reason}): it stays in "
            f"work/ until whoever runs the hot folder makes {where}/ writable and restarts"
        )
        log.error("%s", message)
        self.board.message = message
        self.board.write(force=True)
        self._skip_folders.add(job.id)
        return None

    def _durations(self, state: dict[str, Any], finished: float) -> dict[str, float]:
        """wait_s: ready -> started (the watcher's own latency); queue_s: queued -> started on
        a farm worker; seconds: the job itself."""
        out = {}
        if state.get("ready_at") and state.get("started_at"):
            out["wait_s"] = round(state["started_at"] - state["ready_at"], 3)
        if state.get("queued_at") and state.get("started_at"):  # farm: sent -> taken
            out["queue_s"] = round(state["started_at"] - state["queued_at"], 3)
        if state.get("started_at"):
            out["seconds"] = round(finished - state["started_at"], 3)
        return out

    def _report(self, job: Job, exc: BaseException, *, internal: bool) -> str:
        text = failure_report(job.name, exc, job_id=job.id, internal=internal)
        return clean_report(text, (job.folder, self.layout.inbox))

    # -- plumbing ----------------------------------------------------------------
    def _start_logging(self) -> list[logging.Handler]:
        log.setLevel(logging.INFO)
        log.propagate = False
        fmt = logging.Formatter(
            "%(asctime)s.%(msecs)03d [%(process)d] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"
        )
        handlers: list[logging.Handler] = [
            logging.FileHandler(self.layout.log_file, encoding="utf-8"),
            logging.StreamHandler(sys.stderr),
        ]
        for handler in handlers:
            handler.setFormatter(fmt)
            handler.addFilter(_one_printable_line)
            log.addHandler(handler)
        return handlers

    def _start_observer(self):
        """Filesystem events wake the loop; polling for shares where inotify sees nothing."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        wake = self._wake

        class Wake(FileSystemEventHandler):
            def on_any_event(self, event) -> None:  # noqa: ANN001
                wake.set()

        poll = self.options.poll
        observer = PollingObserver(timeout=poll) if poll else Observer()
        try:
            observer.schedule(Wake(), str(self.layout.inbox), recursive=False)
            observer.start()
        except OSError as exc:  # e.g. the inotify watch limit: fall back to polling
            log.warning(
                "file events unavailable (%s): polling every %g s instead",
                exc,
                FALLBACK_POLL_SECONDS,
            )
            observer = PollingObserver(timeout=FALLBACK_POLL_SECONDS)
            observer.schedule(Wake(), str(self.layout.inbox), recursive=False)
            observer.start()
        return observer

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handle(signum: int, _frame: object) -> None:
            if self._stop.is_set():
                raise KeyboardInterrupt  # second signal: stop now (the job stays in work/)
            log.info(
                "%s: stopping; a running job is cancelled at its next step (and runs again "
                "at the next start) or finishes first",
                signal.Signals(signum).name,
            )
            self.board.state = "stopping"
            self.stop()

        for signum in (signal.SIGINT, signal.SIGTERM):
            self._signals[signum] = signal.signal(signum, handle)

    def _restore_signals(self) -> None:
        for signum, previous in self._signals.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, previous)
        self._signals.clear()


def _one_printable_line(record: logging.LogRecord) -> bool:
    """File names come from designers: a newline or ESC in one must not forge log lines or
    rewrite a terminal (escaped as ``\\x1b``; see :func:`terminal_safe`)."""
    record.msg, record.args = terminal_safe(record.getMessage()), None
    return True


def _target_folder(exc: OSError) -> str:
    """``done`` from a failed move's error (os.link names the source first, the target second)."""
    target = exc.filename2 or exc.filename
    return Path(str(target)).parent.name if target else "its folder"
