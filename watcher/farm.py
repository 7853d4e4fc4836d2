"""Several GPU machines: the hot folder's jobs on Celery with a Redis broker.

Who does what:

- ``psd-collage watch ROOT --broker URL`` claims dropped files into ``work/<id>/``
  exactly as the single-process watcher does, then sends one Celery task naming the
  job folder *relative to ROOT* (never the PSD's bytes). It alone records outcomes in
  the job's stage record and makes the final moves (see :mod:`watcher.jobs`), so no
  file ends twice whatever the workers do.
- ``psd-collage worker --broker URL --root PATH`` runs on each GPU machine: one Celery
  worker, one pool process with one warm :class:`~psd_collage.render.Renderer`, one
  job at a time. It renders into ``work/<id>/out/`` and writes ``result.json`` last.

Crash semantics, from Celery and its Redis transport:

- ``acks_late``: a job is acknowledged only when its render has ended, so a worker
  killed mid-job (``kill -9``, power cut) leaves it unacknowledged; Redis gives it to
  another worker after the ``visibility_timeout``, which is set just longer than the
  longest a live job can run (the policy's ``job_timeout`` plus the hard-kill grace):
  minutes, not Celery's default hour.
- ``reject_on_worker_lost``: when the pool process dies (out of memory, a crashing
  driver) the job goes back to the queue at once.
- A redelivered job that a live worker still renders waits on ``.render.lock`` (an
  flock, released by the kernel when its holder dies), then sees ``result.json``
  and stops: a job never renders twice at the same time, and finishes once.
- Each start of a render counts in ``render.json``; a job that has been started
  :data:`~watcher.jobs.MAX_ATTEMPTS` times without finishing fails with the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject, SecurityWarning, TimeLimitExceeded
from celery.signals import worker_process_init

from psd_collage.atomic import atomic_write_text
from psd_collage.errors import CollageError
from psd_collage.policy import Policy

from .execute import render_outcome
from .jobs import MAX_ATTEMPTS, OUT_DIR, failure_report
from .layout import Layout, output_name, sidecar_in
from .status import WORKER_HEARTBEAT, FarmStatus

log = logging.getLogger("psd_collage.worker")

TASK_NAME = "psd_collage.render_job"
QUEUE = "psd-collage"
RESULT_NAME = "result.json"  # the worker's outcome; written last, read by the watcher
ATTEMPTS_NAME = "render.json"  # how often a worker started this job's render
RENDER_LOCK = ".render.lock"  # flock'ed by the worker rendering the job
ROOT_ID_NAME = ".psd-collage-id"  # in ROOT: which hot folder this is (see root_id)
#: Seconds past the job timeout before Celery kills a render stuck inside one step.
HARD_LIMIT_GRACE = 60.0
#: Seconds on top of the longest possible job before Redis hands a silent job out again.
VISIBILITY_MARGIN = 60.0
#: How often a worker's Redis connection looks for jobs whose worker died (seconds).
RESTORE_INTERVAL = 10.0


def visibility_timeout_for(policy: Policy) -> float:
    """Longer than any live job can run (so none is handed out twice), otherwise short."""
    return (policy.job_timeout or 3600.0) + HARD_LIMIT_GRACE + VISIBILITY_MARGIN


def make_app(
    broker: str, *, visibility_timeout: float, restore_interval: float = RESTORE_INTERVAL
) -> Celery:
    """The Celery app of a farm: the watcher sends with it, the workers consume with it."""
    app = Celery("psd_collage", broker=broker, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,  # outcomes travel on disk (result.json), next to the files
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,  # never hold a second job while rendering one
        worker_concurrency=1,
        worker_send_task_events=True,  # for Flower
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=2,
        broker_transport_options={
            "visibility_timeout": visibility_timeout,
            "unacked_restore_interval": restore_interval,
            "unacked_restore_throttle": 1,
        },
    )
    app.task(name=TASK_NAME, base=RenderTask, bind=True)(render_job)
    return app


def send_job(app: Celery, job: str, name: str, root_id: str) -> str:
    """Queue ``work/<job>`` (relative to ROOT); fails fast when the broker is down."""
    result = app.send_task(TASK_NAME, args=[f"work/{job}", name, root_id], retry=False)
    return result.id


def root_id(root: Path, *, create: bool = False) -> str | None:
    """The hot folder's identity (``ROOT/.psd-collage-id``): a worker whose ``--root`` is
    another folder than the watcher's must not take its jobs for finished ones."""
    path = root / ROOT_ID_NAME
    with contextlib.suppress(FileNotFoundError):
        return path.read_text(encoding="utf-8").strip()
    if not create:
        return None
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(secrets.token_hex(8) + "\n")
    return path.read_text(encoding="utf-8").strip()


# ---------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------


@dataclass
class WorkerConfig:
    """What ``psd-collage worker`` was told: where ROOT is here, defaults and limits."""

    broker: str
    root: Path
    name: str
    defaults: dict[str, Any] = field(default_factory=dict)
    policy: Policy = field(default_factory=Policy)


class WorkerState:
    """The pool process's warm state: one renderer reused for every job (and model cache)."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.layout = Layout(config.root)
        self.status = FarmStatus(config.broker)
        self._renderer = None
        self._ready = threading.Event()
        self.jobs_started = 0

    def warm_up(self) -> None:
        """Build the renderer and load this machine's model before the first job asks."""
        from psd_collage.render import Renderer
        from psd_collage.settings import Settings

        try:
            self._renderer = Renderer(defaults=self.config.defaults, policy=self.config.policy)
            started = time.monotonic()
            self._renderer.engine_for(Settings().updated(self.config.defaults))
            log.info("model loaded in %.1f s", time.monotonic() - started)
        except Exception as exc:  # the first job reports it, with the file's own settings
            log.error("cannot load the model yet: %s", exc)
        finally:
            self._ready.set()
        if self.jobs_started:
            return  # a job arrived while the model loaded: "working" stays, not "idle"
        with contextlib.suppress(Exception):
            model = self.config.defaults.get("model")
            self.status.worker_seen(self.config.name, {"state": "idle", "model": model})

    def heartbeat(self, interval: float = WORKER_HEARTBEAT) -> None:
        """Tell the status this worker is alive, busy or not, until the process dies.

        A thread: a render step of minutes (or a model still loading) does not stop it,
        so a worker that stops beating is gone (killed, its machine down), see
        :meth:`~watcher.status.FarmStatus.snapshot`.
        """
        while True:
            with contextlib.suppress(Exception):  # Redis away: the next beat tries again
                self.status.worker_heartbeat(self.config.name)
            time.sleep(interval)

    @property
    def renderer(self):
        """The one renderer of this process (it keeps the model warm between jobs)."""
        self._ready.wait()
        return self._renderer

    def job_folder(self, job: str) -> Path | None:
        """``work/<id>`` inside ROOT, as a real folder; None for anything else."""
        parts = Path(job).parts
        if len(parts) != 2 or parts[0] != "work" or parts[1].startswith("."):
            raise Reject(f"not a job folder: {job!r}", requeue=False)
        folder = self.layout.work / parts[1]
        if folder.is_symlink() or not folder.is_dir():
            return None
        return folder

    def report(self, record: dict[str, Any]) -> None:
        """Best effort: a render goes on while Redis is away."""
        try:
            self.status.job_running(record)
        except Exception as exc:  # redis errors: the status is not worth failing a job
            log.debug("status not updated: %s", exc)


_config: WorkerConfig | None = None
_state: WorkerState | None = None


def configure_worker(config: WorkerConfig | None) -> None:
    """Set before the pool forks: every pool process builds its own state from it."""
    global _config, _state
    _config, _state = config, None


def worker_state() -> WorkerState:
    global _state
    if _state is None:
        if _config is None:
            raise RuntimeError("this process is not a psd-collage worker")
        _state = WorkerState(_config)
        threading.Thread(target=_state.warm_up, name="warm-up", daemon=True).start()
        threading.Thread(target=_state.heartbeat, name="heartbeat", daemon=True).start()
    return _state


def _start_pool_process(**_: Any) -> None:
    """A new pool process starts loading the model at once (Celery's worker_process_init)."""
    worker_state()


class RenderTask(Task):
    """Records a hard time limit (the pool process was killed) as the job's outcome."""

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:  # noqa: ANN001
        if not isinstance(exc, TimeLimitExceeded) or _config is None:
            return
        folder = Layout(_config.root).root / str(args[0])
        name = str(args[1])
        timeout = _config.policy.job_timeout or 0
        error = CollageError(
            f"the render was stuck and was ended after {timeout:g} s (the limit job_timeout="
            f"{timeout:g}); use fewer steps, variants or a smaller resolution, or ask whoever "
            "runs the hot folder",
            path=name,
        )
        with contextlib.suppress(OSError):
            if folder.is_dir() and not (folder / RESULT_NAME).exists():
                _write_result(
                    folder,
                    {
                        "outcome": "failed",
                        "report": failure_report(name, error, job_id=folder.name, internal=False),
                        "cause": "input",
                        "worker": _config.name,
                    },
                )


def render_job(task: Task, job: str, name: str, root: str | None = None) -> str:
    """The task: render ``ROOT/job`` once, whatever how often it is delivered."""
    state = worker_state()
    if root is not None and root != root_id(state.layout.root):
        # A wrong --root (or the share not mounted): give the job back and stop here,
        # rather than taking every job for one finished long ago.
        log.error(
            "--root %s is not the watcher's hot folder (no matching %s): stopping this "
            "worker; mount the shared ROOT and give its path",
            state.layout.root,
            ROOT_ID_NAME,
        )
        os.kill(os.getppid(), signal.SIGTERM)
        raise Reject("wrong --root", requeue=True)
    folder = state.job_folder(job)
    if folder is None:
        return "gone"  # finished and moved by the watcher: a late duplicate
    with _render_lock(folder) as locked:
        if not locked:
            return "gone"
        if (folder / RESULT_NAME).exists():
            return "finished before"
        attempt = _count_attempt(folder, state.config.name)
        if attempt > MAX_ATTEMPTS:
            error = CollageError(
                f"the render was started {attempt - 1} times and its worker stopped each time "
                "(killed, out of memory, or its machine went down): make the canvas smaller "
                "or render it on a bigger machine with psd-collage render",
                path=name,
            )
            report = failure_report(name, error, job_id=folder.name, internal=False)
            result = {"outcome": "failed", "report": report, "cause": "input", "attempt": attempt}
            _write_result(folder, result)
            return "failed"
        return _render(state, task, folder, name, attempt)


def _render(state: WorkerState, task: Task, folder: Path, name: str, attempt: int) -> str:
    state.jobs_started += 1
    started = time.time()
    worker = state.config.name
    record = {
        "job": folder.name,
        "name": name,
        "worker": worker,
        "attempt": attempt,
        "started": _iso(started),
        "phase": "read",
        "done": 0,
        "total": 0,
    }
    state.report(record)
    with contextlib.suppress(Exception):
        state.status.worker_seen(worker, {"state": "working", "job": folder.name, "file": name})
    log.info("start %s (job %s, attempt %d)", name, folder.name, attempt)
    last = [0.0]

    def progress(phase: str, done: int, total: int) -> None:
        record.update(phase=phase, done=done, total=total)
        now = time.monotonic()
        if now - last[0] >= 0.5 or done == total:
            last[0] = now
            state.report(record)

    out = folder / OUT_DIR
    with contextlib.suppress(FileNotFoundError):
        for leftover in out.iterdir():  # a killed attempt's temporary files
            leftover.unlink()
    out.mkdir(exist_ok=True)
    sidecar = sidecar_in(folder, name)
    outcome = render_outcome(
        state.renderer,
        name=name,
        job_id=folder.name,
        input=folder / name,
        output=out / output_name(name),
        sidecar=sidecar,
        progress=progress,
        stop=lambda: False,
        deadline=state.config.policy.deadline(),
        root=state.layout.root,
        hide=(folder, state.layout.inbox),
    )
    if outcome.kind == "model":
        # This machine's model cannot load: not the file's fault. Give the job back
        # and stop this worker; the operator sees why in its log.
        log.error("cannot load the model (%s): stopping this worker", outcome.error)
        os.kill(os.getppid(), signal.SIGTERM)
        raise Reject(str(outcome.error), requeue=True)
    result: dict[str, Any] = {"outcome": outcome.kind, "worker": worker, "attempt": attempt}
    result.update(started=started, finished=time.time())
    if outcome.kind == "done":
        result.update(
            output=str(outcome.output.relative_to(folder)),
            preview=str(outcome.preview.relative_to(folder)) if outcome.preview else None,
            summary=outcome.summary,
        )
    else:
        result.update(report=outcome.report, cause=outcome.cause)
    state.report({**record, "state": "finishing", "phase": "finished"})
    _write_result(folder, result)  # last: the watcher takes over from here
    with contextlib.suppress(Exception):
        state.status.worker_seen(worker, {"state": "idle", "job": None})
    log.info("%s %s (%.1f s)", outcome.kind, name, time.time() - started)
    return outcome.kind


def run_worker(config: WorkerConfig, *, visibility_timeout: float | None = None) -> int:
    """``psd-collage worker``: consume jobs until stopped (SIGTERM: finish the job, then exit)."""
    visibility = visibility_timeout or visibility_timeout_for(config.policy)
    restore = min(RESTORE_INTERVAL, max(0.5, visibility / 4))
    app = make_app(config.broker, visibility_timeout=visibility, restore_interval=restore)
    if config.policy.job_timeout:
        app.conf.task_time_limit = config.policy.job_timeout + HARD_LIMIT_GRACE
    configure_worker(config)
    note = replace_root_advice()
    if note:
        log.warning("%s", note)
    worker_process_init.connect(_start_pool_process, weak=False)
    worker = app.Worker(
        hostname=config.name,
        pool="prefork",
        concurrency=1,
        loglevel="INFO",
        without_mingle=True,
        without_gossip=True,
        queues=[QUEUE],
    )
    worker.start()
    with contextlib.suppress(Exception):  # stopped cleanly: off the status at once
        FarmStatus(config.broker).worker_gone(config.name)
    return worker.exitcode or 0


def replace_root_advice() -> str | None:
    """Silence Celery's advice to use ``--uid`` (an option of ``celery worker``, which
    ``psd-collage worker`` does not have); our own advice when running as root instead."""
    warnings.filterwarnings("ignore", category=SecurityWarning)
    if os.geteuid() != 0:
        return None
    return (
        "this worker runs as root: run it as an unprivileged user who can write the hot "
        "folder (sudo -u USER psd-collage worker ..., or User= in its systemd unit)"
    )


def default_worker_name() -> str:
    return f"psd-collage-{os.getpid()}@{socket.gethostname()}"


def read_result(folder: Path) -> dict[str, Any] | None:
    """A worker's ``result.json`` (None while there is none, or it is not readable yet)."""
    try:
        data = json.loads((folder / RESULT_NAME).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("outcome") in ("done", "failed") else None


def prepare_job_folder(folder: Path) -> None:
    """The watcher creates the render lock before sending, so a worker never has to."""
    (folder / RENDER_LOCK).touch(exist_ok=True)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _render_lock(folder: Path, poll: float = 0.5):
    """Hold ``.render.lock``; wait while another live worker holds it. False: job gone."""
    try:
        fd = os.open(folder / RENDER_LOCK, os.O_RDWR)
    except FileNotFoundError:
        yield False
        return
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not (folder / RENDER_LOCK).exists():
                    yield False
                    return
                time.sleep(poll)
        yield True
    finally:
        os.close(fd)


def _count_attempt(folder: Path, worker: str) -> int:
    try:
        data = json.loads((folder / ATTEMPTS_NAME).read_text(encoding="utf-8"))
        attempts = int(data.get("attempts", 0))
    except (FileNotFoundError, ValueError, TypeError, AttributeError):
        attempts = 0
    attempts += 1
    atomic_write_text(
        folder / ATTEMPTS_NAME,
        json.dumps({"attempts": attempts, "worker": worker, "started": time.time()}),
    )
    return attempts


def _write_result(folder: Path, result: Mapping[str, Any]) -> None:
    atomic_write_text(folder / RESULT_NAME, json.dumps(dict(result), indent=2, default=str))


def _iso(ts: float) -> str | None:
    from .status import iso

    return iso(ts)
