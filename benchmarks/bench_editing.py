"""What the safe editing loop costs: the weights hash, the XMP record, the live-type overlay.

Times, interleaved and in one process, medians of ``--repeats`` runs:

(a) ``weights_digest`` over a synthetic model of ``--megabytes`` MB of float16
    weights, as GB/s; SD 1.5 (about 2.1 GB in fp16, 4.3 GB in fp32) is extrapolated;
(b) ``write_variants`` of a ``--width`` x ``--height`` RGB document, 2 variants: plain
    (baseline), with this render's settings recorded in the XMP, and also with the
    output group inserted below a live overlay (type layers above the output);
    ratios against the baseline measured in the same run.

Usage: python benchmarks/bench_editing.py [--json] [--repeats 5] [--megabytes 256]
       [--width 2000 --height 1500]
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
from psd_tools import PSDImage

from psd_collage.engine.models import weights_digest
from psd_collage.psd.writer import write_variants


class _Components:
    """Just enough of ModelComponents for weights_digest."""

    def __init__(self, megabytes: int) -> None:
        count = megabytes * 2**20 // 2 // 16
        self.unet = torch.nn.Sequential(
            *[torch.nn.Linear(1, count, bias=False).half() for _ in range(16)]
        )

    def modules(self):
        yield "unet", self.unet


def _median_time(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--width", type=int, default=2000)
    parser.add_argument("--height", type=int, default=1500)
    args = parser.parse_args()

    components = _Components(args.megabytes)
    digest_s = _median_time(lambda: weights_digest(components), args.repeats)
    gb_per_s = args.megabytes / 1024 / digest_s

    rng = np.random.default_rng(0)
    width, height = args.width, args.height
    variants = [rng.random((height, width, 3), dtype=np.float32) for _ in range(2)]
    overlay = np.zeros((height, width, 4), np.uint8)
    overlay[height // 3 : height // 2, width // 4 : 3 * width // 4] = (255, 255, 255, 255)
    record = {
        "model": "m",
        "prompt": "p" * 200,
        "layers": [{"id": i, "box": [0, 0, 9, 9]} for i in range(10)],
    }
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "in.psd"
        psd = PSDImage.new("RGB", (width, height), color=1.0)
        psd.create_pixel_layer_from_array(
            rng.random((height, width, 3), dtype=np.float32), name="bg"
        )
        psd.create_pixel_layer_from_array(
            rng.random((100, 100, 3), dtype=np.float32), name="text stand-in", top=10, left=10
        )
        psd.save(source)
        out = Path(folder) / "out.psd"
        names = ["seed 1", "seed 2"]
        runs = {
            "plain": lambda: write_variants(source, out, variants, names, "[harmonized] g"),
            "record": lambda: write_variants(
                source, out, variants, names, "[harmonized] g", record=record
            ),
            "record+live": lambda: write_variants(
                source,
                out,
                variants,
                names,
                "[harmonized] g",
                record=record,
                insert_at=1,
                overlay=overlay,
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):  # interleaved
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "digest_gb_per_s": round(gb_per_s, 3),
        "digest_sd15_fp16_s": round(2.1 / gb_per_s, 2),
        "digest_sd15_fp32_s": round(4.3 / gb_per_s, 2),
        "write_s": {name: round(value, 3) for name, value in medians.items()},
        "write_ratio": {
            name: round(value / medians["plain"], 3) for name, value in medians.items()
        },
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"weights_digest: {gb_per_s:.2f} GB/s -> SD 1.5 ~{result['digest_sd15_fp16_s']} s fp16, "
        f"~{result['digest_sd15_fp32_s']} s fp32 (once per model load)"
    )
    for name, value in medians.items():
        print(f"write_variants {name:12s} {value:6.3f} s  ratio {value / medians['plain']:.2f}")


if __name__ == "__main__":
    main()
