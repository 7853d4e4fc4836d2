"""One render of a claimed job and what became of it, the same in the watcher and a farm worker.

The single-process watcher records the :class:`Outcome` in the job's stage
record right away; a farm worker writes it to ``work/<id>/result.json`` for the
watcher, which alone records it and makes the final moves (see :mod:`watcher.farm`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psd_collage.errors import Cancelled, CollageError, ModelError
from psd_collage.policy import Deadline
from psd_collage.settings import read_sidecar

from .jobs import failure_report
from .stability import is_outside

#: progress(phase, done, total), as :class:`psd_collage.render.Renderer` reports it.
Progress = Callable[[str, int, int], None]


@dataclass
class Outcome:
    """``done`` (output, preview, summary), ``failed`` (report), ``cancelled`` (stopped by
    the service: run it again later) or ``model`` (the service's own model cannot load:
    not the file's fault, keep it and stop)."""

    kind: str
    output: Path | None = None
    preview: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    report: str = ""
    error: BaseException | None = None

    @property
    def cause(self) -> str | None:
        """Why a failed job failed: ``input`` (the file, its settings or its size: the same
        file fails the same way again) or ``internal`` (a bug or the machine: a retry may
        succeed)."""
        if self.kind != "failed":
            return None
        return "input" if isinstance(self.error, CollageError | Cancelled) else "internal"


def render_outcome(
    renderer: Any,
    *,
    name: str,
    job_id: str,
    input: Path,
    output: Path,
    sidecar: Path | None,
    progress: Progress,
    stop: Callable[[], bool],
    deadline: Deadline,
    root: Path,
    hide: Iterable[Path] = (),
) -> Outcome:
    """Render ``input`` into ``output`` and classify what happened (never raises for a job).

    ``stop`` cancels the render (the service is stopping); the ``deadline`` (the policy's
    job_timeout) ends it as failed. ``hide`` are folders whose paths are cut from reports:
    the designer knows the file by its name, not by ``work/<id>/``. A file or sidecar
    that is a link leading out of ``root`` is never read.
    """

    def report(exc: BaseException, internal: bool) -> str:
        return clean_report(failure_report(name, exc, job_id=job_id, internal=internal), hide)

    for path in (input, sidecar):
        if path is not None and is_outside(path, root):
            exc = CollageError(
                "is a link to a file outside the hot folder, which is never read; copy the "
                "file itself into inbox/",
                path=path.name,
            )
            return Outcome("failed", report=report(exc, False), error=exc)
    try:
        result = renderer.render_file(
            input,
            output,
            sidecar=sidecar,
            preview=None,
            progress=progress,
            cancel=deadline.cancel_callback(stop),
        )
    except Cancelled as exc:
        if deadline.passed() and not stop():
            return Outcome("failed", report=report(deadline.error(name), False), error=exc)
        return Outcome("cancelled", error=exc)
    except ModelError as exc:
        if not _sidecar_names_weights(sidecar):
            return Outcome("model", error=exc)
        return Outcome("failed", report=report(exc, False), error=exc)
    except CollageError as exc:
        return Outcome("failed", report=report(exc, False), error=exc)
    except Exception as exc:
        return Outcome("failed", report=report(exc, True), error=exc)
    return Outcome(
        "done",
        output=Path(result.output),
        preview=Path(result.preview) if result.preview else None,
        summary={
            "timings": {k: round(v, 3) for k, v in result.timings.items()},
            "variants": result.variants,
            "warnings": result.warnings,
            "model": result.settings.get("model"),
        },
    )


def clean_report(text: str, folders: Iterable[Path]) -> str:
    """Cut ``folder/`` prefixes from a report: messages name files by their own name."""
    for folder in folders:
        text = text.replace(f"{folder}{os.sep}", "")
    return text


#: Sidecar keys that name weight files: a model error with one of them set is the file's.
WEIGHT_KEYS = ("model", "lora", "controlnet")


def _sidecar_names_weights(sidecar: Path | None) -> bool:
    """Whether the designer's sidecar (or upload settings) names a model, LoRA or ControlNet.

    A missing LoRA named by a designer is that job's error, not a broken service: only
    the operator's own weights may stop it.
    """
    try:
        return sidecar is not None and any(key in read_sidecar(sidecar) for key in WEIGHT_KEYS)
    except (CollageError, OSError):
        return False
