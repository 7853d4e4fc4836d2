"""``psd-collage status``: the status dict (see :mod:`watcher.status`) as text for people."""

from __future__ import annotations

from typing import Any

from psd_collage.errors import terminal_safe


def format_status(data: dict[str, Any], *, recent: int = 10) -> str:
    """A few lines: the totals, then running, queued, waiting, workers and recent jobs."""
    counts = data.get("counts") or {}
    where = "farm" if data.get("mode") == "farm" else "hot folder"
    if data.get("broker"):
        where += f" via {data['broker']}"
    lines = [
        f"{where}: {data.get('state', '?')} - {len(data.get('queued') or [])} queued, "
        f"{len(data.get('running') or [])} running, {counts.get('done', 0)} done, "
        f"{counts.get('failed', 0)} failed (updated {data.get('updated', '?')})"
    ]
    if data.get("message"):
        lines.append(terminal_safe(f"note: {data['message']}"))
    sections = [
        ("running", data.get("running"), _running),
        (
            "queued",
            data.get("queued"),
            lambda q: f"{q.get('name')}  since {q.get('queued_at') or q.get('ready_at') or '?'}",
        ),
        (
            "waiting in inbox",
            data.get("waiting"),
            lambda w: f"{w.get('name')}  ({w.get('reason')})",
        ),
        (
            "workers",
            data.get("workers"),
            _worker,
        ),
        ("recent", (data.get("recent") or [])[:recent], _recent),
    ]
    for title, items, show in sections:
        if items:
            lines.append(f"{title}:")
            # names come from designers: one printable line each (no forged lines, no ESC)
            lines.extend(f"  {terminal_safe(show(item))}" for item in items)
    return "\n".join(lines)


def _worker(w: dict[str, Any]) -> str:
    if w.get("state") == "gone":
        return f"{w.get('name')}  gone (silent for {w.get('silent_s', 0):.0f} s)"
    return f"{w.get('name')}  {w.get('state')}  {w.get('file') or ''}  seen {w.get('updated')}"


def _running(r: dict[str, Any]) -> str:
    if r.get("phase") == "redelivery":
        where = f"{r['worker']} is gone" if r.get("worker") else "its worker is gone"
        return (
            f"{r.get('name')}: {where}, waiting for another worker (attempt {r.get('attempt', 1)})"
        )
    where = f" on {r['worker']}" if r.get("worker") else ""
    steps = f" {r.get('done', 0)}/{r.get('total', 0)}" if r.get("total") else ""
    return f"{r.get('name')}{where}: {r.get('phase', '?')}{steps}, attempt {r.get('attempt', 1)}, since {r.get('started', '?')}"


def _recent(r: dict[str, Any]) -> str:
    outcome = r.get("outcome", "?")
    target = r.get("done") or r.get("failed") or ""
    extra = f" ({r['seconds']:.1f} s)" if isinstance(r.get("seconds"), int | float) else ""
    if r.get("worker"):
        extra += f" on {r['worker']}"
    line = f"{r.get('finished', '?')}  {outcome:6} {r.get('name')} -> {target}{extra}"
    if outcome == "failed" and r.get("error"):
        line += f": {r['error']}"
    return line
