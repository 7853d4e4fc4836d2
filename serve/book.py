"""The jobs the HTTP API shows: uploads joined with what the hot folder says.

An upload lands in ``ROOT/inbox`` under a name no pending upload and no inbox
file has, so when the hot folder later reports a job of that name (running,
done or failed, started after the upload) it is that upload's. The book
remembers each upload (``ROOT/serve.json``), the hot-folder job it became and
its final entry, so ids stay valid after a restart and after the job has left
the status file's recent history. Jobs that did not come through the API
(files dropped by hand) are listed too, under the hot folder's own job id.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import threading
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import tomli_w

from psd_collage.atomic import atomic_write, atomic_write_text
from psd_collage.errors import CollageError
from psd_collage.settings import validate_settings
from watcher.layout import Layout, is_document, numbered, sidecar_name, upload_name

#: The API's job states (a job of the hot folder is in exactly one).
STATES = ("queued", "running", "done", "failed")
#: An upload that is neither in the inbox, nor in work/, nor reported, for this long is lost.
LOST_AFTER_S = 30.0
#: Jobs the book remembers (the oldest finished ones are forgotten first).
KEEP_RECORDS = 500
#: How far a hot folder's clock may be behind ours when matching a job to an upload.
CLOCK_SLACK_S = 2.0
BOOK_NAME = "serve.json"
#: Why a job that failed on its input offers no Retry: the same bytes fail the same way.
INPUT_NOTE = (
    "failed on its input (the file, its settings or its size): retrying it would fail the "
    "same way; fix what the error says and upload the file again"
)


class ApiError(Exception):
    """A request the API refuses: an HTTP status and one line saying what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Record:
    """One job submitted through the API (or retried through it)."""

    id: str
    name: str  # its name in inbox/ (and so in done/ or failed/)
    submitted: float
    job: str | None = None  # the hot folder's job id, once it took the file
    final: dict[str, Any] | None = None  # the hot folder's entry once it ended
    last_seen: float = 0.0  # when the file was last seen in inbox/ or work/
    retries: int = 0
    earlier: list[str] = field(default_factory=list)  # hot-folder jobs of earlier tries


def parse_settings(text: str) -> tuple[dict[str, Any], str]:
    """An upload's ``settings`` (TOML or JSON, a sidecar's keys) -> (checked values, TOML text).

    Checked exactly like a sidecar, so a bad key is refused at upload, not after
    the queue; the TOML text becomes the job's sidecar.
    """
    where = "the upload's settings"
    stripped = text.strip()
    if not stripped:
        return {}, ""
    try:
        if stripped.startswith("{"):
            data = json.loads(stripped)
            text = tomli_w.dumps(_without_nulls(data)) if isinstance(data, dict) else ""
        else:
            data = tomllib.loads(stripped)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ApiError(400, f"{where} are neither valid TOML nor JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"{where} must be a table of settings, like a sidecar")
    try:
        checked = validate_settings(data, where=where, designer=True)
    except CollageError as exc:
        raise ApiError(400, str(exc)) from None
    return checked, text


def _without_nulls(data: dict[str, Any]) -> dict[str, Any]:
    return {
        k: _without_nulls(v) if isinstance(v, dict) else v for k, v in data.items() if v is not None
    }


def safe_name(filename: str) -> str:
    """The base name of an uploaded file, if it is one the hot folder takes."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].strip()
    name = "".join(ch for ch in name if ch.isprintable())
    if not is_document(name):
        raise ApiError(
            400, f"{filename!r} is not a .psd or .psb file name: upload a Photoshop document"
        )
    return upload_name(name)


def _ts(value: Any) -> float | None:
    """A status timestamp (ISO 8601 or seconds) -> seconds."""
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value).timestamp()
    return None


class JobBook:
    """Submit, list, retry and cancel jobs on a hot folder; thread-safe."""

    def __init__(self, layout: Layout, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.layout = layout
        self._snapshot = snapshot
        self._lock = threading.RLock()
        self._path = layout.root / BOOK_NAME
        self._records: dict[str, Record] = self._load()

    # -- submitting ------------------------------------------------------------
    def submit(
        self,
        filename: str,
        data: IO[bytes],
        settings_text: str = "",
        check: Callable[[Path, dict[str, Any]], object] | None = None,
    ) -> dict[str, Any]:
        """Land an upload in the inbox (its sidecar first, both atomically); returns the job."""
        name = safe_name(filename)
        checked, sidecar_text = parse_settings(settings_text)
        job_id = _new_id()
        staged = self.layout.root / f".upload-{job_id}{Path(name).suffix}"
        try:  # copied and checked outside the lock: a big upload does not stall the API
            atomic_write(staged, lambda fh: shutil.copyfileobj(data, fh, 1 << 20))
            if check is not None:
                try:
                    check(staged, checked)
                except CollageError as exc:
                    raise ApiError(400, str(exc).replace(str(staged), name)) from None
            with self._lock:
                name = self._free_inbox_name(name)
                record = Record(id=job_id, name=name, submitted=time.time())
                if sidecar_text:
                    atomic_write_text(self.layout.inbox / sidecar_name(name), sidecar_text)
                os.rename(staged, self.layout.inbox / name)
                record.last_seen = time.time()
                self._records[record.id] = record
                self._save()
                return self._view(record, self._snapshot())
        finally:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()

    def _free_inbox_name(self, name: str) -> str:
        """``name``, or ``stem (2).psd``...: free in the inbox and among pending uploads."""
        stem, suffix = Path(name).stem, Path(name).suffix
        taken = {r.name for r in self._records.values() if r.final is None}
        n = 1
        while True:
            candidate = numbered(stem, n) + suffix
            if candidate not in taken and not any(
                os.path.lexists(self.layout.inbox / c) for c in (candidate, sidecar_name(candidate))
            ):
                return candidate
            n += 1

    # -- reading ---------------------------------------------------------------
    def jobs(self) -> list[dict[str, Any]]:
        """Every job: the API's own, then the hot folder's others; newest first."""
        with self._lock:
            snap = self._snapshot()
            self._reconcile(snap)
            views = [self._view(r, snap) for r in self._records.values()]
            views += self._foreign(snap)
        views.sort(key=lambda v: v.get("submitted") or v.get("started") or "", reverse=True)
        return views

    def job(self, job_id: str) -> dict[str, Any]:
        for view in self.jobs():
            if view["id"] == job_id:
                return view
        raise ApiError(404, f"no job {job_id!r}: it may have been cancelled or forgotten")

    def path_of(self, job_id: str, kind: str) -> Path:
        """``done`` (the result) or ``preview`` of a finished job, checked to lie in ROOT."""
        view = self.job(job_id)
        relative = (view.get("files") or {}).get(kind)
        if view["state"] != "done" or not relative:
            raise ApiError(404, f"job {job_id} has no {kind} (state: {view['state']})")
        return self.inside_root(relative)

    def inside_root(self, relative: str) -> Path:
        """ROOT/relative, refused if it (or a link on the way) leads out of ROOT."""
        root = self.layout.root.resolve()
        path = (root / relative).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise ApiError(404, f"{relative} is not a file in the hot folder")
        return path

    def snapshot(self) -> dict[str, Any]:
        """What the status page shows: the service's state, its workers and every job."""
        jobs = self.jobs()
        snap = self._snapshot()
        return {
            "state": snap.get("state"),
            "message": snap.get("message"),
            "updated": snap.get("updated"),
            "workers": snap.get("workers") or [],
            "jobs": jobs,
        }

    # -- changing --------------------------------------------------------------
    def retry(self, job_id: str) -> dict[str, Any]:
        """Put a failed job's file (and sidecar) back into the inbox; the error text goes."""
        with self._lock:
            view = self.job(job_id)
            if view["state"] != "failed":
                raise ApiError(
                    409, f"job {job_id} is {view['state']}: only a failed job is retried"
                )
            if view.get("cause") == "input":
                raise ApiError(409, f"job {job_id} {INPUT_NOTE}")
            record = self._records.get(job_id)
            entry = (record.final if record else None) or view.get("entry") or {}
            files = {k: entry.get(k) for k in ("failed", "sidecar", "error_file")}
            if not files["failed"]:
                raise ApiError(409, f"job {job_id} left no file in failed/ to retry")
            document = self.inside_root(files["failed"])
            name = self._free_inbox_name(entry.get("name") or document.name)
            if files["sidecar"]:
                os.rename(
                    self.inside_root(files["sidecar"]), self.layout.inbox / sidecar_name(name)
                )
            os.rename(document, self.layout.inbox / name)
            if files["error_file"]:
                with contextlib.suppress(ApiError, OSError):
                    self.inside_root(files["error_file"]).unlink()
            now = time.time()
            earlier = [*(record.earlier if record else []), entry.get("job") or job_id]
            self._records[job_id] = Record(
                id=job_id,
                name=name,
                submitted=now,
                last_seen=now,
                retries=len(earlier),
                earlier=earlier,
            )
            self._save()
            return self._view(self._records[job_id], self._snapshot())

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Take a queued upload out of the inbox; one the hot folder has taken stays."""
        with self._lock:
            view = self.job(job_id)
            record = self._records.get(job_id)
            if view["state"] != "queued" or record is None or record.job is not None:
                raise ApiError(
                    409, f"job {job_id} is {view['state']}: only a queued job can be cancelled"
                )
            try:
                (self.layout.inbox / record.name).unlink()
            except FileNotFoundError:
                raise ApiError(
                    409, f"job {job_id} has just started: only a queued job can be cancelled"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                (self.layout.inbox / sidecar_name(record.name)).unlink()
            del self._records[job_id]
            self._save()
            return {**view, "state": "cancelled"}

    # -- joining uploads with the hot folder's status ----------------------------
    def _reconcile(self, snap: dict[str, Any]) -> None:
        """Bind each waiting upload to the hot folder's job of its name that started after it."""
        running = _running(snap)
        queued = [e for e in snap.get("queued") or [] if isinstance(e, dict) and e.get("job")]
        recent = [e for e in snap.get("recent") or [] if isinstance(e, dict)]
        by_job = {e.get("job"): e for e in recent}
        bound = self._claimed_jobs()
        changed = False
        for record in sorted(self._records.values(), key=lambda r: r.submitted):
            if record.job is None:
                for entry in running + queued + recent[::-1]:
                    job = entry.get("job")
                    began = _ts(
                        entry.get("started") or entry.get("queued_at") or entry.get("finished")
                    )
                    if (
                        entry.get("name") == record.name
                        and job
                        and job not in bound
                        and (began is None or began >= record.submitted - CLOCK_SLACK_S)
                    ):
                        record.job = job
                        bound.add(job)
                        changed = True
                        break
            if record.job is not None and record.final is None and record.job in by_job:
                record.final = by_job[record.job]
                changed = True
        if changed:
            self._save()

    def _claimed_jobs(self) -> set[str]:
        """Hot-folder jobs that are (or were, before a retry) one of our records."""
        jobs = {r.job for r in self._records.values() if r.job}
        return jobs.union(*(r.earlier for r in self._records.values()))

    def _view(self, record: Record, snap: dict[str, Any]) -> dict[str, Any]:
        running = {r.get("job"): r for r in _running(snap)}
        view: dict[str, Any] = {
            "id": record.id,
            "name": record.name,
            "submitted": _iso(record.submitted),
            "retries": record.retries,
        }
        if record.final is not None:
            return {**view, **self._finished(record.id, record.final)}
        if record.job is not None and record.job in running:
            return {**view, **self._running(running[record.job])}
        if self._present(record):
            return {**view, "state": "queued", "progress": {"done": 0, "total": 0}, "error": None}
        if time.time() - record.last_seen < LOST_AFTER_S:
            return {**view, "state": "queued", "progress": {"done": 0, "total": 0}, "error": None}
        return {
            **view,
            "state": "failed",
            "progress": {"done": 0, "total": 0},
            "error": f"{record.name} left the hot folder before it was processed "
            "(moved or removed by someone): upload it again",
            "retryable": False,
        }

    def _present(self, record: Record) -> bool:
        """In inbox/, or claimed into a job folder in work/ (taken, not started yet)."""
        found = (self.layout.inbox / record.name).exists() or any(
            (folder / record.name).exists() for folder in _folders(self.layout.work)
        )
        if found:
            record.last_seen = time.time()
        return found

    def _running(self, running: dict[str, Any]) -> dict[str, Any]:
        return {
            "state": "running",
            "phase": running.get("phase"),
            "progress": {"done": running.get("done", 0), "total": running.get("total", 0)},
            "started": running.get("started"),
            "worker": running.get("worker") or running.get("host"),
            "error": None,
        }

    def _finished(self, job_id: str, entry: dict[str, Any]) -> dict[str, Any]:
        state = "done" if entry.get("outcome") == "done" else "failed"
        variants = [
            {**v, "png": f"/api/jobs/{job_id}/variants/{n}.png"}
            for n, v in enumerate(entry.get("variants") or [])
        ]
        files = {k: entry[k] for k in ("done", "preview", "failed") if entry.get(k)}
        view = {
            "state": state,
            "progress": {"done": 1, "total": 1},
            "error": entry.get("error"),
            "started": entry.get("started"),
            "finished": entry.get("finished"),
            "seconds": entry.get("seconds"),
            "worker": entry.get("worker"),
            "variants": variants if state == "done" else [],
            "files": files,
            "entry": entry,
        }
        if state == "failed":
            view["cause"] = entry.get("cause")
            view["retryable"] = bool(files.get("failed")) and entry.get("cause") != "input"
            if entry.get("cause") == "input":
                view["note"] = INPUT_NOTE
        if state == "done":
            view["result"] = f"/api/jobs/{job_id}/result"
            if files.get("preview"):
                view["preview"] = f"/api/jobs/{job_id}/preview"
        return view

    def _foreign(self, snap: dict[str, Any]) -> list[dict[str, Any]]:
        """Jobs of the hot folder that no upload became: dropped into the inbox by hand."""
        mine = self._claimed_jobs()
        waiting = {r.name for r in self._records.values() if r.job is None}
        out: list[dict[str, Any]] = []
        for running in _running(snap):
            if running.get("job") not in mine:
                view = {"id": running.get("job"), "name": running.get("name")}
                out.append({**view, **self._running(running)})
        for entry in snap.get("recent") or []:
            if isinstance(entry, dict) and entry.get("job") and entry["job"] not in mine:
                out.append(
                    {
                        "id": entry["job"],
                        "name": entry.get("name"),
                        **self._finished(entry["job"], entry),
                    }
                )
        for item in list(snap.get("queued") or []) + list(snap.get("waiting") or []):
            name, job = item.get("name"), item.get("job")
            if job:  # a farm's: claimed, waiting for a worker
                shown = job not in mine
                note = "waiting for a worker"
            else:  # in the inbox (the status file's queue is stale while a job runs)
                shown = bool(name) and name not in waiting and (self.layout.inbox / name).exists()
                note = item.get("reason")
            if shown:
                queued = {"state": "queued", "progress": {"done": 0, "total": 0}, "error": None}
                out.append({"id": job, "name": name, **queued, "note": note})
        return out

    # -- persistence -------------------------------------------------------------
    def _load(self) -> dict[str, Record]:
        try:
            data = json.loads(self._path.read_text(encoding="utf-8"))
            return {r["id"]: Record(**r) for r in data.get("jobs", [])}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return {}

    def _save(self) -> None:
        records = sorted(self._records.values(), key=lambda r: r.submitted)
        excess = len(records) - KEEP_RECORDS
        for record in records:
            if excess <= 0:
                break
            if record.final is not None:
                del self._records[record.id]
                excess -= 1
        body = {"jobs": [asdict(r) for r in self._records.values()]}
        atomic_write_text(self._path, json.dumps(body, indent=1, ensure_ascii=False) + "\n")


def _running(snap: dict[str, Any]) -> list[dict[str, Any]]:
    """The jobs being rendered (a list; one without a farm)."""
    running = snap.get("running") or []
    if isinstance(running, dict):  # a status.json written before the farm existed
        running = [running]
    return [r for r in running if isinstance(r, dict)]


def _new_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="milliseconds")


def _folders(path: Path) -> Iterable[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return []
