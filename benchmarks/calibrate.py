"""The engine's calibration questions, settled on the ``shapes`` model (bench_quality --calibrate).

Each question runs the same held-out collages and seeds both ways:

- size measure of the automatic weights: visible area (ours) vs longest side (authors');
- steering schedule: f at the step's true sigma (ours) vs at sigmas[k], k from 0 (authors');
- dilation of the pinned area by int(4t/1000) latent px (authors') vs none (ours);
- the 1 % minimum area below which a layer is not steered, on small placeholders;
- textual inversion with and without ``[ti]`` on two-tone objects.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from bench_quality import (
    Runner,
    blob_cases,
    evaluate,
    make_cases,
    steering_rate,
    wanted,
)

from psd_collage.render import Renderer
from psd_collage.shapes import metrics
from psd_collage.shapes.psd import read_variants, write_scene_psd
from psd_collage.shapes.world import COLOURS, disc


def _quality(runner: Runner, cases, noise: float, **options: Any) -> dict[str, float]:
    return evaluate(runner, cases, noise, lambda p: runner.collage(p, **options)).row()


def _show(question: str, name: str, value: Any) -> None:
    if isinstance(value, dict):
        text = "  ".join(f"{k} {v:.3f}" for k, v in value.items() if k != "seconds")
    else:
        text = f"{value:.3f}"
    print(f"{question:<14} {name:<26} {text}", flush=True)


def calibrate(args: argparse.Namespace, runner: Runner, folder: Path) -> dict[str, Any]:
    n = args.collages
    cases = make_cases(n, folder)
    blobs = blob_cases(n, folder)
    out: dict[str, Any] = {}

    if wanted(args, "size"):
        _size(runner, cases, blobs, out)
    if wanted(args, "schedule"):
        _schedule(runner, cases, blobs, out)
    if wanted(args, "dilation"):
        q = out["dilation"] = {}
        for dilate in (False, True):
            q[str(dilate)] = _quality(runner, cases, 0.6, pin_dilation=dilate)
            _show("dilation", "int(4t/1000) px" if dilate else "none", q[str(dilate)])
    if wanted(args, "min_area"):
        q = out["min_area"] = {}
        small = blob_cases(n, folder, radius=(5.0, 7.0))  # 0.5-0.9 % of the canvas each
        for min_area in (0.01, 0.0):
            q[str(min_area)] = steering_rate(runner, small, min_area=min_area)
            _show("min area", f"{min_area:.0%} (small blobs)", q[str(min_area)])
        q["unsteered"] = steering_rate(runner, small, steer=False)
        _show("min area", "inside=0, outside=0", q["unsteered"])
    if wanted(args, "ti"):
        out["ti"] = textual_inversion(args, folder)
    return out


def _size(runner: Runner, cases, blobs, out: dict[str, Any]) -> None:
    q = out["size_measure"] = {}
    for measure in ("area", "side"):
        q[measure] = {
            "steering": steering_rate(runner, blobs, size_measure=measure),
            **_quality(runner, cases, 0.6, size_measure=measure),
        }
        _show("size measure", measure, q[measure])


def _schedule(runner: Runner, cases, blobs, out: dict[str, Any]) -> None:
    q = out["schedule"] = {}
    for schedule in ("sigma", "authors"):
        q[schedule] = {
            "steering@0.8": steering_rate(runner, blobs, noise=0.8, steering_schedule=schedule),
            "steering@0.6": steering_rate(runner, blobs, noise=0.6, steering_schedule=schedule),
            **_quality(runner, cases, 0.6, steering_schedule=schedule),
        }
        _show("schedule", schedule, q[schedule])


def textual_inversion(args: argparse.Namespace, folder: Path) -> dict[str, float]:
    """Two-tone objects (lower half another colour) at noise 0.5, with and without [ti]:
    the share of halves that keep their own colour."""
    count = max(4, args.collages // 10)
    cases = make_cases(count, folder)
    rng = np.random.default_rng(7)
    seconds = [
        str(rng.choice([c for c in COLOURS if c != case.scene.objects[-1].colour]))
        for case in cases
    ]
    results: dict[str, float] = {}
    renderer = Renderer(
        overrides={
            "model": args.model,
            "steps": args.steps,
            "seed": args.seed,
            "ti_steps": args.ti_steps,
            "variants": 1,  # only the first is scored
        }
    )
    for flag in ("", ", ti"):
        hits = []
        for case, second in zip(cases, seconds, strict=True):
            scene = case.scene
            path = write_scene_psd(
                case.path,
                scene,
                object_tags=f"[noise=0.5{flag}]",
                backdrop_tags="[noise=0.3]",
                two_tone=second,
            )
            out = folder / (path.stem + (".ti.psd" if flag else ".plain.psd"))
            renderer.render_file(path, out)
            image = read_variants(out)[0]
            shape = scene.objects[-1]  # the front object: fully visible
            region = metrics.core(disc(shape))
            rows = np.arange(128)[:, None] + 0.5
            upper, lower = region & (rows < shape.cy - 2), region & (rows > shape.cy + 2)
            for half, colour in ((upper, shape.colour), (lower, second)):
                if half.sum() >= 9:
                    hits.append(float(metrics.region_colour(image, half) == colour))
        results["with ti" if flag else "without ti"] = float(np.mean(hits))
        _show(
            "ti", "with [ti]" if flag else "without", results["with ti" if flag else "without ti"]
        )
    return results
