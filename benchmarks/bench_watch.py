"""Hot folder throughput and latency with the tiny model.

(a) latency: from the moment a dropped file becomes stable (its last write plus
    the --stable window) to its job starting, read from status.json; measured
    with native events and with --poll.
(b) throughput: 20 small files through one watcher (--once: the model is loaded
    once and kept warm) versus 20 separate ``psd-collage render`` runs (a cold
    start each), in jobs per minute, and the ratio.
(c) switching: files whose sidecars alternate between two models (the tiny SD-1.x-
    and SDXL-shaped ones, saved as diffusers folders)
    through one warm Renderer, as the watcher and a farm worker hold it: with the
    model cache (both stay loaded) versus a cache with room for one model (every
    switch reloads, as before the cache); model loads and jobs per minute.

Usage: python benchmarks/bench_watch.py [--json] [--files 20] [--steps 1] [--only switching]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from psd_tools import PSDImage
from psd_tools.api.layers import PixelLayer

CLI = [sys.executable, "-m", "psd_collage.cli"]


def make_psd(path: Path, seed: int, size: int = 64) -> None:
    """A small two-layer collage: a background and a captioned square."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    psd = PSDImage.new("RGB", (size, size))
    back = Image.fromarray(np.full((size, size, 3), rng.integers(0, 255, 3), np.uint8), "RGB")
    psd.append(PixelLayer.frompil(back, psd, "green grass", 0, 0))
    box = Image.fromarray(np.full((size // 2, size // 2, 3), rng.integers(0, 255, 3), np.uint8))
    psd.append(PixelLayer.frompil(box, psd, "a red box", size // 4, size // 4))
    psd.save(path)


def render_args(steps: int) -> list[str]:
    return ["--model", "tiny", "--steps", str(steps), "--variants", "1", "--seed", "1"]


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def latency(work: Path, steps: int, drops: int, stable: float, poll: float | None) -> dict:
    """Drop files one at a time into a running watcher; stable -> started, per file."""
    root = work / f"latency-{'poll' if poll else 'events'}"
    (root / "inbox").mkdir(parents=True)
    args = [*CLI, "watch", str(root), "--stable", str(stable), *render_args(steps)]
    if poll:
        args += ["--poll", str(poll)]
    proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)
    dropped: dict[str, float] = {}
    try:
        # Warm the model first so that (a) measures the watcher, not the model load.
        make_psd(root / "warmup.psd", 0)
        shutil.move(root / "warmup.psd", root / "inbox" / "warmup.psd")
        assert wait_for(lambda: (root / "done" / "warmup.psd").exists(), 300), "warm-up failed"
        for i in range(drops):
            make_psd(root / f"d{i}.psd", i + 1)
            shutil.move(root / f"d{i}.psd", root / "inbox" / f"d{i}.psd")  # one rename: a drop
            dropped[f"d{i}.psd"] = time.time()
            assert wait_for(lambda i=i: (root / "done" / f"d{i}.psd").exists(), 300)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    recent = json.loads((root / "status.json").read_text())["recent"]
    after_stable, queue = [], []
    for entry in recent:
        if entry["name"] in dropped:
            # Stable = unchanged for the window since it appeared (a drop is one rename, so
            # the file's own mtime is older than its arrival).
            became_stable = max(ts(entry["mtime"]), dropped[entry["name"]]) + stable
            after_stable.append(ts(entry["started"]) - became_stable)
            queue.append(entry["wait_s"])
    return {
        "mode": f"poll {poll:g} s" if poll else "events",
        "stable_window_s": stable,
        "files": len(after_stable),
        "stable_to_start_s_median": round(statistics.median(after_stable), 3),
        "stable_to_start_s_max": round(max(after_stable), 3),
        "ready_to_start_s_median": round(statistics.median(queue), 3),
    }


def throughput_watch(work: Path, files: int, steps: int, stable: float) -> dict:
    root = work / "throughput"
    (root / "inbox").mkdir(parents=True)
    for i in range(files):
        make_psd(root / "inbox" / f"f{i:02d}.psd", i)
    start = time.perf_counter()
    subprocess.run(
        [*CLI, "watch", str(root), "--once", "--stable", str(stable), *render_args(steps)],
        check=True,
        stderr=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    done = len([p for p in (root / "done").iterdir() if p.suffix == ".psd"])
    recent = json.loads((root / "status.json").read_text())["recent"]
    first = min(ts(r["started"]) for r in recent)
    last = max(ts(r["finished"]) for r in recent)
    return {
        "files": files,
        "done": done,
        "wall_s": round(wall, 2),
        "jobs_per_min": round(60 * done / wall, 1),
        "jobs_per_min_warm": round(60 * done / (last - first), 1),
        "job_s_median": round(statistics.median(r["seconds"] for r in recent), 3),
    }


def throughput_cli(work: Path, files: int, steps: int) -> dict:
    folder = work / "cli"
    folder.mkdir()
    for i in range(files):
        make_psd(folder / f"f{i:02d}.psd", i)
    start = time.perf_counter()
    for i in range(files):
        subprocess.run(
            [*CLI, "render", str(folder / f"f{i:02d}.psd"), *render_args(steps)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    wall = time.perf_counter() - start
    return {"files": files, "wall_s": round(wall, 2), "jobs_per_min": round(60 * files / wall, 1)}


def saved_models(work: Path) -> list[str]:
    """The tiny SD-1.x- and SDXL-shaped models saved as diffusers folders: loading them
    takes the path a real model takes (configs, tokenizers, safetensors from disk)."""
    from psd_collage.engine import build_tiny_pipeline

    folders = []
    for kind in ("sd1", "sdxl"):
        folder = work / f"model-{kind}"
        build_tiny_pipeline(kind).save_pretrained(folder)
        folders.append(str(folder))
    return folders


def switching(work: Path, models: list[str], files: int, steps: int, budget: int | None) -> dict:
    """(c): one in-process Renderer, sidecars alternating between two models."""
    from psd_collage.engine.cache import ModelCache
    from psd_collage.render import Renderer

    folder = work / f"switching-{budget}"
    folder.mkdir(parents=True)
    for i in range(files):
        make_psd(folder / f"f{i:02d}.psd", i)
        (folder / f"f{i:02d}.psd.toml").write_text(f'model = "{models[i % 2]}"\n')
    options = {"steps": steps, "variants": 1, "seed": 1}
    cache = ModelCache(max_bytes=budget)
    renderer = Renderer(overrides=options, cache=cache)
    start, jobs = time.perf_counter(), []
    for i in range(files):
        began = time.perf_counter()
        renderer.render_file(folder / f"f{i:02d}.psd")
        jobs.append(time.perf_counter() - began)
    wall = time.perf_counter() - start
    return {
        "job_s_median": round(statistics.median(jobs), 3),
        "cache": "room for one model" if budget else "default budget",
        "files": files,
        "model_loads": cache.loads.get("model", 0),
        "wall_s": round(wall, 2),
        "jobs_per_min": round(60 * files / wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--drops", type=int, default=5, help="files for the latency test")
    parser.add_argument("--stable", type=float, default=0.5)
    parser.add_argument("--only", choices=["switching"], help="run one part only")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-watch-") as tmp:
        work = Path(tmp)
        # Imports and first-call costs out of the way (a throwaway renderer), then the cache
        # holding both models, then room for one (1 byte: each load evicts the other).
        models = saved_models(work)
        switching(work / "warm-up", models, 2, args.steps, None)
        cached = switching(work, models, args.files, args.steps, None)
        single = switching(work, models, args.files, args.steps, 1)
        results = {"switching": [cached, single]}
        if args.only == "switching":
            print_switching(results, args.json)
            return
        results |= {
            "latency": [
                latency(work, args.steps, args.drops, args.stable, None),
                latency(work, args.steps, args.drops, args.stable, 1.0),
            ],
            "watch": throughput_watch(work, args.files, args.steps, args.stable),
            "render_cli": throughput_cli(work, args.files, args.steps),
        }
    results["speedup"] = round(
        results["watch"]["jobs_per_min"] / results["render_cli"]["jobs_per_min"], 2
    )
    if args.json:
        print(json.dumps(results))
        return
    for row in results["latency"]:
        print(
            f"latency ({row['mode']}, window {row['stable_window_s']} s, {row['files']} drops): "
            f"stable -> job start median {row['stable_to_start_s_median']} s, "
            f"max {row['stable_to_start_s_max']} s; ready -> start {row['ready_to_start_s_median']} s"
        )
    w, c = results["watch"], results["render_cli"]
    print(
        f"watch --once: {w['done']}/{w['files']} files in {w['wall_s']} s = {w['jobs_per_min']} jobs/min "
        f"({w['jobs_per_min_warm']} jobs/min once warm, median job {w['job_s_median']} s)"
    )
    print(f"render CLI x{c['files']}: {c['wall_s']} s = {c['jobs_per_min']} jobs/min")
    print(f"warm watcher / cold CLI runs: {results['speedup']}x")
    print_switching(results, False)


def print_switching(results: dict, as_json: bool) -> None:
    cached, single = results["switching"]
    if as_json:
        print(json.dumps(results))
        return
    for row in (cached, single):
        print(
            f"alternating two model folders, {row['cache']}: {row['files']} files, "
            f"{row['model_loads']} model loads, {row['wall_s']} s = {row['jobs_per_min']} jobs/min "
            f"(median job {row['job_s_median']} s)"
        )
    print(
        f"model cache / one model at a time: {cached['jobs_per_min'] / single['jobs_per_min']:.2f}x"
    )


if __name__ == "__main__":
    main()
