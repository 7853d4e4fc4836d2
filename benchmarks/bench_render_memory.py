"""Peak memory (RSS) of a whole render of a big poster with ``--model tiny``.

Builds an 8000 x 6000 RGB document with 10 layers (a background and soft-edged
objects; in a separate process, not measured), then runs ``psd-collage render``
on it in a fresh child process and reports that child's peak RSS and its phase
timings. Goal: peak RSS under 4 GB. The tiny model keeps the figure about the
document handling (reader, masks, pinning, writer), which is what scales with the
canvas; a real model adds its own weights (about 2-4 GB for SD 1.5 on the CPU).

Usage: python benchmarks/bench_render_memory.py [--json] [--width 8000 --height 6000]
       [--layers 10] [--variants 4] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_psd_io import build_document  # noqa: E402

CHILD = """
import json, resource, sys
from psd_collage.cli import main
try:
    main(sys.argv[2:], standalone_mode=False)
finally:
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    open(sys.argv[1], "w").write(json.dumps({"peak_rss_mb": peak_kib / 1024}))
"""


def render_once(document: Path, variants: int, folder: Path) -> dict:
    report, output = folder / "peak.json", folder / "out.psd"
    args = ["render", str(document), "-o", str(output), "--model", "tiny", "--json",
            "--variants", str(variants), "--steps", "4", "--seed", "1"]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(report), *args], capture_output=True, text=True
    )
    if run.returncode != 0:
        raise SystemExit(f"render failed:\n{run.stderr}")
    result = json.loads(run.stdout.splitlines()[-1])
    return {**json.loads(report.read_text()), "timings": result["timings"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--width", type=int, default=8000)
    parser.add_argument("--height", type=int, default=6000)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--variants", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        document = folder / "poster.psd"
        builder = multiprocessing.get_context("spawn").Process(
            target=build_document, args=(document, args.width, args.height, args.layers)
        )
        builder.start()
        builder.join()
        runs = [render_once(document, args.variants, folder) for _ in range(args.repeats)]
    peak = statistics.median(r["peak_rss_mb"] for r in runs)
    figures = {
        "document": f"{args.width}x{args.height}, {args.layers} layers, RGB 8-bit",
        "variants": args.variants,
        "peak_rss_mb": round(peak, 1),
        "goal_mb": 4096,
        "timings_s": runs[len(runs) // 2]["timings"],
    }
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"render of {figures['document']}, {args.variants} variants, --model tiny")
        print(f"  peak RSS {peak:.0f} MB (goal < 4096 MB)")
        for phase, seconds in figures["timings_s"].items():
            print(f"  {phase:<8} {seconds:7.2f} s")


if __name__ == "__main__":
    main()
