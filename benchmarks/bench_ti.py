"""Textual inversion with the tiny models: time per training step, per layer, and cached.

For each model (tiny SD-1.x-shaped, tiny SDXL-shaped) one layer target at the
working resolution is learned from scratch (uncached: every step timed through
the progress callback), then asked for again on the same engine (cached) and on
a freshly loaded engine (cached after a "restart"; the load itself not counted).
The probe loss (fixed batch, before -> after) says whether training did anything.

Then the same file rendered twice (samples/picnic.psd with ``[ti]`` on the cat
layer, tiny model, 4 sampling steps): the first render trains, the second, by a
new renderer (a restart), finds the token in the cache. Model loading is left out.

The tiny models have random weights: the figures measure our training loop and
cache, not the cost on a real model (a real SD 1.5 step is far heavier). The
authors' 250 steps take minutes per layer on two CPU cores even for the tiny
model, so the default runs 30 steps and extrapolates the 250-step time from the
median step.

Usage: python benchmarks/bench_ti.py [--json] [--steps 30] [--size 256] [--batch 4]
                                     [--models tiny,tiny-sdxl] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from psd_collage.engine import load_engine
from psd_collage.engine.textual_inversion import (
    InversionSettings,
    InversionTarget,
    learn_inversions,
)


def make_target(size: int) -> InversionTarget:
    """A red square on a grey collage, its mask the square (a third of the canvas)."""
    rng = np.random.default_rng(0)
    image = np.clip(0.5 + rng.normal(0, 0.05, (size, size, 3)), 0, 1).astype(np.float32)
    lo, hi = size // 4, size // 4 + int(size * 0.58)
    image[lo:hi, lo:hi] = (0.9, 0.1, 0.1)
    mask = np.zeros((size, size), np.float32)
    mask[lo:hi, lo:hi] = 1.0
    return InversionTarget("a red vintage car", image, mask, "a red vintage car")


def bench_model(model: str, settings: InversionSettings, size: int, cache: Path) -> dict:
    target = make_target(size)
    engine = load_engine(model, device="cpu")
    stamps: list[float] = []

    def progress(done: int, total: int) -> None:
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    [first] = learn_inversions(engine, [target], settings, cache=cache, progress=progress)
    uncached = time.perf_counter() - start
    steps = np.diff([start, *stamps])[1:]  # skip step 1: it also encodes the image and probes
    if not len(steps):
        raise SystemExit("--steps must be at least 2 to time a step")

    start = time.perf_counter()
    [again] = learn_inversions(engine, [target], settings, cache=cache)
    cached = time.perf_counter() - start

    restarted_engine = load_engine(model, device="cpu")
    start = time.perf_counter()
    [restarted] = learn_inversions(restarted_engine, [target], settings, cache=cache)
    cached_restart = time.perf_counter() - start
    assert again.cached and restarted.cached and not first.cached

    return {
        "model": model,
        "size": size,
        "steps": settings.steps,
        "batch": settings.batch,
        "step_s_median": statistics.median(steps),
        "step_s_p90": float(np.percentile(steps, 90)),
        "layer_uncached_s": uncached,
        "layer_250_steps_s_est": uncached + (250 - settings.steps) * statistics.median(steps),
        "layer_cached_s": cached,
        "layer_cached_after_restart_s": cached_restart,
        "speedup_cached": uncached / cached if cached > 0 else float("inf"),
        "probe_loss_before": first.probe_loss[0],
        "probe_loss_after": first.probe_loss[1],
        "init_word": first.init_word,
    }


SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "picnic.psd"


def bench_render(steps: int, cache: Path) -> dict:
    """Render time (load excluded) of the sample with one TI layer: uncached, then cached."""
    import os

    from psd_collage.render import Renderer

    os.environ["PSD_COLLAGE_CACHE"] = str(cache)
    options = {
        "model": "tiny", "variants": 1, "steps": 4, "seed": 1, "ti_steps": steps,
        "layers": {"a tabby cat": {"ti": True}},
    }  # fmt: skip
    seconds = []
    for name in ("uncached", "cached"):
        result = Renderer(overrides=options).render_file(SAMPLE, cache / f"{name}.psd")
        seconds.append(sum(v for k, v in result.timings.items() if k != "load"))
    return {"render_uncached_s": seconds[0], "render_cached_s": seconds[1], "ti_steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--steps", type=int, default=30, help="training steps (authors: 250)")
    parser.add_argument("--size", type=int, default=256, help="working size, px (tiny: 256)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--models", default="tiny,tiny-sdxl")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = InversionSettings(steps=args.steps, batch=args.batch)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            results.append(bench_model(model.strip(), settings, args.size, Path(tmp) / model))
        render = bench_render(args.steps, Path(tmp) / "render")

    report = {"torch_threads": torch.get_num_threads(), "results": results, "render": render}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"textual inversion, CPU, {report['torch_threads']} torch thread(s)")
    for r in results:
        print(
            f"{r['model']:>10} {r['size']}px batch {r['batch']}: "
            f"{r['step_s_median'] * 1000:.0f} ms/step (p90 {r['step_s_p90'] * 1000:.0f}), "
            f"{r['steps']} steps = {r['layer_uncached_s']:.1f} s per layer "
            f"(250 steps ~ {r['layer_250_steps_s_est']:.0f} s); "
            f"cached {r['layer_cached_s'] * 1000:.1f} ms "
            f"(after restart {r['layer_cached_after_restart_s'] * 1000:.1f} ms, "
            f"{r['speedup_cached']:.0f}x); "
            f"probe loss {r['probe_loss_before']:.4f} -> {r['probe_loss_after']:.4f}"
        )
    print(
        f"render of samples/picnic.psd with one [ti] layer ({render['ti_steps']} steps): "
        f"{render['render_uncached_s']:.1f} s uncached, {render['render_cached_s']:.1f} s cached"
    )


if __name__ == "__main__":
    main()
