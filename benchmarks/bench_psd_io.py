"""Writing variants into a big PSD: psd-tools' plain path versus ``write_variants``.

Builds a 4000 x 3000 RGB document with 10 layers in a temporary folder (not timed),
then times, interleaved and in one process:

(a) naive: what a psd-tools user writes: open, add 4 full-canvas pixel layers with
    ``PixelLayer.frompil`` (3 of them hidden), ``psd.save()`` (which recomposites
    the whole document to refresh the flattened image);
(b) ours: ``write_variants`` with the same 4 variants and a pin map (the editing
    case, which also reads the stored composite).

Each run happens in a forked child, so its peak RSS above the starting point is
measured too. Medians of ``--repeats`` runs; ratio = ours / naive (goal <= 0.08). The
machine (CPU, cores, load average at the start) is printed with the figures: on a
shared machine both sides slow down, so compare ratios measured in one run.
``--codecs`` also writes once with RLE, RAW and ZIP colour channels (time, size).

Usage: python benchmarks/bench_psd_io.py [--json] [--width 4000 --height 3000]
       [--layers 10] [--variants 4] [--repeats 3] [--codecs]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from psd_tools import PSDImage
from psd_tools.api.layers import PixelLayer
from psd_tools.constants import Compression

from psd_collage.psd.writer import write_variants


def smooth_noise(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    """Photo-like content (smooth shapes plus grain), float32 in [0, 1]."""
    coarse = rng.random((height // 32 + 2, width // 32 + 2, channels), dtype=np.float32)
    image = np.asarray(
        Image.fromarray((coarse * 255).astype(np.uint8).squeeze()).resize(
            (width, height), Image.BICUBIC
        ),
        np.float32,
    ).reshape(height, width, channels)
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    return np.clip(image / 255.0, 0, 1)


def build_document(path: Path, width: int, height: int, layers: int) -> None:
    """A background plus ``layers - 1`` objects of varied size with soft alpha."""
    rng = np.random.default_rng(0)
    psd = PSDImage.new("RGB", (width, height), color=1.0)
    psd.create_pixel_layer_from_array(smooth_noise(rng, height, width, 3), name="Background")
    for index in range(1, layers):
        w = int(width * rng.uniform(0.2, 0.5))
        h = int(height * rng.uniform(0.2, 0.5))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        alpha = np.clip(1.5 - 2 * np.hypot(xx / w - 0.5, yy / h - 0.5) * 1.6, 0, 1)[..., None]
        pixels = np.concatenate([smooth_noise(rng, h, w, 3), alpha], axis=2)
        left, top = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        psd.create_pixel_layer_from_array(pixels, name=f"object {index}", left=left, top=top)
    psd.save(path)  # composites once, so the file carries a real flattened image


def naive(source: Path, output: Path, variants: list[np.ndarray]) -> None:
    psd = PSDImage.open(source)
    for index, variant in enumerate(variants):
        image = Image.fromarray(np.rint(variant * 255).astype(np.uint8), "RGB")
        layer = PixelLayer.frompil(image, psd, f"seed {index}")
        layer.visible = index == 0
    psd.save(output)


def ours(
    source: Path,
    output: Path,
    variants: list[np.ndarray],
    pin: np.ndarray,
    compression: Compression | None = None,
) -> None:
    names = [f"seed {index}" for index in range(len(variants))]
    write_variants(
        source, output, variants, names, "[harmonized] bench", pin=pin, compression=compression
    )


def machine() -> dict[str, object]:
    """What the figures were measured on: CPU model, cores, load average at the start."""
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        cpu = next((line.split(":", 1)[1].strip() for line in fh if "model name" in line), cpu)
    load = [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else []
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_1_5_15": load}


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _child(queue, function, args) -> None:
    start = _rss_kib()
    began = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        function(*args)
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    queue.put((seconds, max(0, peak - start) / 1024))


def measure(function, *args) -> tuple[float, float]:
    """(seconds, extra peak RSS in MiB) of one call, in a forked child."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, function, args))
    process.start()
    result = queue.get()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"{function.__name__} failed")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--variants", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--codecs", action="store_true", help="also compare RLE/RAW/ZIP")
    args = parser.parse_args()

    at_start = machine()
    with tempfile.TemporaryDirectory(prefix="bench_psd_io.") as folder:
        root = Path(folder)
        source = root / "poster.psd"
        began = time.perf_counter()
        build_document(source, args.width, args.height, args.layers)
        build_s = time.perf_counter() - began
        rng = np.random.default_rng(1)
        variants = [smooth_noise(rng, args.height, args.width, 3) for _ in range(args.variants)]
        pin = np.zeros((args.height, args.width), np.float32)
        pin[:, : args.width // 2] = 1.0  # half the poster kept, as when editing one layer

        naive_runs, ours_runs = [], []
        for _ in range(args.repeats):
            naive_runs.append(measure(naive, source, root / "naive.psd", variants))
            ours_runs.append(measure(ours, source, root / "ours.psd", variants, pin))
        naive_s = statistics.median(run[0] for run in naive_runs)
        ours_s = statistics.median(run[0] for run in ours_runs)
        result = {
            "machine": at_start,
            "document": f"{args.width}x{args.height} RGB 8-bit, {args.layers} layers",
            "variants": args.variants,
            "repeats": args.repeats,
            "input_mb": round(source.stat().st_size / 2**20, 1),
            "build_s": round(build_s, 2),
            "naive_s": round(naive_s, 3),
            "ours_s": round(ours_s, 3),
            "ratio": round(ours_s / naive_s, 3),
            "naive_peak_rss_mb": round(max(run[1] for run in naive_runs)),
            "ours_peak_rss_mb": round(max(run[1] for run in ours_runs)),
            "naive_output_mb": round((root / "naive.psd").stat().st_size / 2**20, 1),
            "ours_output_mb": round((root / "ours.psd").stat().st_size / 2**20, 1),
        }
        if args.codecs:
            codecs = {}
            for codec in (Compression.RLE, Compression.RAW, Compression.ZIP):
                output = root / f"ours-{codec.name.lower()}.psd"
                seconds, _ = measure(ours, source, output, variants, pin, codec)
                codecs[codec.name.lower()] = {
                    "s": round(seconds, 3),
                    "output_mb": round(output.stat().st_size / 2**20, 1),
                }
            result["codecs"] = codecs

    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
