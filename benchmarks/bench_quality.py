"""Picture quality on the ``shapes`` world, every number from its ground truth.

Held-out collages: objects drawn under one light pasted onto a scene under another (a
daylight red circle on grass at night). Per object: does its region keep its caption's
colour (hue agreement), does the colour's shape match the layer (IoU), and did its
colour move toward what the scene's light gives it (harmonization: 1 = the true lit
colour, 0 = unchanged)? Methods on the same collages and seeds:

- ``collage n=X``: our collage diffusion, objects at noise X, backdrop at 0.3, steering;
- ``img2img s=X``: one global strength X, no steering;
- ``text-to-image``: strength 1, the scene prompt only.

Spatial steering: grey placeholder discs at noise 1 captioned e.g. ``a red circle`` and
``a blue square``; the rate of regions whose colour is their caption's, with the
automatic weights and with ``inside=0, outside=0``. Lock: a locked backdrop rendered end
to end through a PSD comes back identical.

    python benchmarks/bench_quality.py [--collages 100] [--steps 20] [--figure F.png]
    python benchmarks/bench_quality.py --calibrate   # the engine's calibration questions
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from psd_collage.collage import to_u8
from psd_collage.engine import GenerationRequest, load_engine
from psd_collage.psd.reader import read_collage
from psd_collage.render import Renderer, plan_render
from psd_collage.settings import Settings
from psd_collage.shapes import metrics
from psd_collage.shapes.psd import read_variant, write_scene_psd
from psd_collage.shapes.world import LIGHTS, Scene, Shape, draw, random_scenes

BENCH_SEED = 20_261_126  # held out: training scenes come from other seeds
BACKDROP_NOISE = 0.3


@dataclass
class Case:
    """One collage: the scene (its light is the truth) and the light its objects came from."""

    scene: Scene
    object_light: str
    path: Path


@dataclass
class Scores:
    hue: list[float] = field(default_factory=list)
    iou: list[float] = field(default_factory=list)
    harmony: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def row(self) -> dict[str, float]:
        return {
            "hue": float(np.mean(self.hue)),
            "iou": float(np.mean(self.iou)),
            "harmonization": float(np.mean(self.harmony)),
            "seconds": statistics.median(self.seconds) if self.seconds else 0.0,
        }


def make_cases(n: int, folder: Path, seed: int = BENCH_SEED) -> list[Case]:
    """``n`` collages: objects pasted from another light than the scene's."""
    rng = np.random.default_rng(seed)
    lights = list(LIGHTS)
    cases = []
    for i, scene in enumerate(random_scenes(n, seed=seed)):
        other = str(rng.choice([light for light in lights if light != scene.light]))
        cases.append(Case(scene, other, folder / f"collage{i:03d}.psd"))
    return cases


def write_case(
    case: Case, object_noise: float, backdrop: str = f"[noise={BACKDROP_NOISE}]"
) -> Path:
    return write_scene_psd(
        case.path,
        case.scene,
        object_light=case.object_light,
        object_tags=f"[noise={object_noise}]",
        backdrop_tags=backdrop,
    )


def score_case(case: Case, output: np.ndarray, pasted: np.ndarray, scores: Scores) -> None:
    """Add each object's hue agreement, IoU and harmonization to ``scores``."""
    truth = draw([case.scene])
    visible = truth.visible[0]
    for slot, shape in enumerate(case.scene.objects):
        region = metrics.core(visible[slot])
        if region.sum() < 9:
            continue
        others = np.zeros_like(region)
        for other in range(len(case.scene.objects)):
            if other != slot:
                others |= visible[other] > 0.5
        scores.hue.append(float(metrics.region_colour(output, region) == shape.colour))
        scores.iou.append(metrics.colour_iou(output, shape.colour, visible[slot], others))
        scores.harmony.append(
            metrics.harmonization(output[region], pasted[region], truth.images[0][region])
        )


class Runner:
    """The engine, loaded once, and the ways of running a collage through it."""

    def __init__(self, model: str, steps: int, seed: int) -> None:
        self.engine = load_engine(model, device="cpu")
        self.steps, self.seed = steps, seed
        self.settings = Settings().updated({"model": model, "steps": steps, "seed": seed})

    def plan(self, path: Path, **plan_options: Any):
        collage = read_collage(path, self.settings)
        size = self.engine.working_size(collage.document.size)
        return plan_render(collage, self.settings, size, **plan_options)

    def collage(self, path: Path, *, weights: tuple[float, float] | None = None, **options: Any):
        """Our method from the PSD; ``weights`` overrides every phrase's (inside, outside)."""
        plan_options = {k: options.pop(k) for k in list(options) if k == "size_measure"}
        plan = self.plan(path, **plan_options)
        if weights is not None:
            for phrase in plan.phrases:
                phrase.inside, phrase.outside = weights
        return self.generate(plan.image, plan.strength, plan.prompt, plan.phrases, **options)

    def img2img(self, path: Path, strength: float):
        plan = self.plan(path)
        uniform = np.full(plan.strength.shape, strength, np.float32)
        return self.generate(plan.image, uniform, plan.prompt, [])

    def generate(self, image, strength, prompt, phrases, **options: Any) -> np.ndarray:
        request = GenerationRequest(
            image=image,
            strength=strength,
            prompt=prompt,
            phrases=phrases,
            seeds=[self.seed],
            steps=self.steps,
            guidance=7.0,
            **options,
        )
        return self.engine.generate(request).images[0]


def evaluate(
    runner: Runner, cases: list[Case], noise: float, run: Callable[[Path], np.ndarray]
) -> Scores:
    scores = Scores()
    for case in cases:
        path = write_case(case, noise)
        pasted = runner.plan(path).image
        started = time.perf_counter()
        output = run(path)
        scores.seconds.append(time.perf_counter() - started)
        score_case(case, output, pasted, scores)
    return scores


# ---------------------------------------------------------------------------
# Spatial steering: placeholder blobs at noise 1
# ---------------------------------------------------------------------------


def blob_cases(n: int, folder: Path, *, radius: tuple[float, float] = (14, 24)) -> list[Case]:
    """Two grey discs per collage, captioned with two different colours."""
    rng = np.random.default_rng(BENCH_SEED + 1)
    from psd_collage.shapes.world import COLOURS, SHAPES

    cases = []
    for i, base in enumerate(random_scenes(n, seed=BENCH_SEED + 1)):
        colours = rng.choice(list(COLOURS), 2, replace=False)
        r = rng.uniform(*radius, 2)
        # left and right halves, so the discs never overlap
        xs = [rng.uniform(r[0] + 2, 64 - r[0]), rng.uniform(64 + r[1], 126 - r[1])]
        ys = [rng.uniform(rk + 2, 126 - rk) for rk in r]
        objects = tuple(
            Shape(str(rng.choice(SHAPES)), str(c), float(x), float(y), float(rk))
            for c, x, y, rk in zip(colours, xs, ys, r, strict=True)
        )
        scene = Scene(base.backdrop, base.light, base.horizon, objects, base.texture_seed)
        cases.append(Case(scene, base.light, folder / f"blobs{i:03d}.psd"))
    return cases


def steering_rate(
    runner: Runner,
    cases: list[Case],
    *,
    noise: float = 1.0,
    min_area: float | None = None,
    **options: Any,
) -> float:
    """Share of placeholder regions that show their caption's colour."""
    hits = []
    for case in cases:
        path = write_scene_psd(
            case.path,
            case.scene,
            placeholders=True,
            object_tags=f"[noise={noise}]",
            backdrop_tags=f"[noise={BACKDROP_NOISE}]",
        )
        if min_area is not None:
            saved = runner.settings
            runner.settings = saved.updated({"min_area": min_area})
            output = runner.collage(path, **options)
            runner.settings = saved
        else:
            output = runner.collage(path, **options)
        for shape in case.scene.objects:
            region = metrics.core(_disc(shape))
            hits.append(float(metrics.region_colour(output, region) == shape.colour))
    return float(np.mean(hits))


def _disc(shape: Shape) -> np.ndarray:
    yy, xx = np.mgrid[0:128, 0:128].astype(np.float32) + 0.5
    return ((xx - shape.cx) ** 2 + (yy - shape.cy) ** 2 <= shape.r**2).astype(np.float32)


# ---------------------------------------------------------------------------
# Lock: end to end through a PSD
# ---------------------------------------------------------------------------


def lock_rate(model: str, cases: list[Case], steps: int, seed: int, folder: Path) -> float:
    """Share of collages whose locked backdrop pixels come back identical (pin weight 1)."""
    renderer = Renderer(overrides={"model": model, "steps": steps, "seed": seed})
    identical = []
    for case in cases:
        path = write_case(case, 0.6, backdrop="[lock]")
        out = folder / (path.stem + ".out.psd")
        renderer.render_file(path, out)
        result = read_variant(out)
        drawn = draw([case.scene])
        locked = drawn.alphas[0].max(0) == 0  # noise 0: no object over it at all
        a = np.round(result[locked] * 255).astype(np.uint8)
        b = to_u8(drawn.backdrops[0][locked])  # the bytes the PSD's backdrop layer holds
        identical.append(float(np.array_equal(a, b)))
    return float(np.mean(identical))


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

OURS = (0.4, 0.6, 0.8)
STRENGTHS = (0.3, 0.5, 0.7, 0.9)


def quality(args: argparse.Namespace, runner: Runner, folder: Path) -> dict[str, Any]:
    """The table (fidelity and harmonization per method), steering and lock."""
    out: dict[str, Any] = {}
    cases = make_cases(args.collages, folder)
    if _wanted(args, "table"):
        rows: dict[str, dict[str, float]] = {}
        methods: list[tuple[str, float, Callable[[Path], np.ndarray]]] = [
            (f"collage n={noise}", noise, runner.collage) for noise in OURS
        ]
        methods += [(f"img2img s={s}", 0.6, lambda p, s=s: runner.img2img(p, s)) for s in STRENGTHS]
        methods.append(("text-to-image", 0.6, lambda p: runner.img2img(p, 1.0)))
        for name, noise, run in methods:
            rows[name] = evaluate(runner, cases, noise, run).row()
            _print_row(name, rows[name])
        out["rows"] = rows
    if _wanted(args, "steering"):
        blobs = blob_cases(args.collages, folder)
        steer = out["steering"] = {
            "steered": steering_rate(runner, blobs),
            "unsteered": steering_rate(runner, blobs, weights=(0.0, 0.0)),
        }
        print(
            f"steering: right-region rate {steer['steered']:.3f} steered vs "
            f"{steer['unsteered']:.3f} with inside=0, outside=0 ({2 * len(blobs)} regions)"
        )
    if _wanted(args, "lock"):
        lock = out["lock"] = lock_rate(
            args.model, cases[: args.lock], args.steps, args.seed, folder
        )
        print(f"lock: {lock:.3f} of {args.lock} collages with an identical locked backdrop")
    return out


def _wanted(args: argparse.Namespace, part: str) -> bool:
    return not args.only or part in args.only


def _print_row(name: str, row: dict[str, float]) -> None:
    print(
        f"{name:<16} hue {row['hue']:.3f}  iou {row['iou']:.3f}  "
        f"harmonization {row['harmonization']:+.3f}  ({row['seconds']:.2f} s/collage)",
        flush=True,
    )


def figure(results: dict[str, Any], path: Path) -> None:
    """Fidelity (IoU x hue) against harmonization per method, like the paper's figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=90)
    groups = {"collage": "C0", "img2img": "C1", "text-to-image": "C2"}
    for prefix, colour in groups.items():
        names = [n for n in results["rows"] if n.startswith(prefix)]
        xs = [results["rows"][n]["harmonization"] for n in names]
        ys = [results["rows"][n]["iou"] for n in names]
        label = {"collage": "collage diffusion (ours)", "img2img": "img2img, one strength"}
        ax.plot(xs, ys, "o-", color=colour, label=label.get(prefix, prefix))
        for n, x, y in zip(names, xs, ys, strict=True):
            ax.annotate(
                n.split(" ", 1)[-1] if " " in n else "",
                (x, y),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("harmonization (1 = the scene light's true colour)")
    ax.set_ylabel("layer fidelity (IoU of the caption's colour)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--collages", type=int, default=100)
    parser.add_argument("--lock", type=int, default=10, help="collages rendered end to end")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--figure", type=Path, default=None, help="write the trade-off PNG")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers as JSON")
    parser.add_argument("--calibrate", action="store_true", help="the calibration questions")
    parser.add_argument("--ti-steps", type=int, default=100, help="textual inversion steps")
    parser.add_argument(
        "--only",
        nargs="*",
        default=[],
        help="parts to run: table steering lock; with --calibrate: size schedule dilation "
        "min_area ti",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runner = Runner(args.model, args.steps, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        if args.calibrate:
            from calibrate import calibrate  # benchmarks/calibrate.py

            results = calibrate(args, runner, Path(tmp))
        else:
            results = quality(args, runner, Path(tmp))
            if args.figure and "rows" in results:
                figure(results, args.figure)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
