"""Peak memory (RSS) of a whole render of a big poster with ``--model tiny``.

Builds an 8000 x 6000 RGB document with 10 layers (a background and soft-edged
objects; in a separate process, not measured), then renders it (the public API that
``psd-collage render`` runs) in a fresh child process and reports that child's peak
RSS (median of ``--repeats``), the peak reached by the end of each phase, the phase
that set it, and the phase timings. Goal: peak RSS under 2 GB. The tiny model keeps the figure about the
document handling (reader, masks, pinning, writer), which is what scales with the
canvas; a real model adds its own weights (about 2-4 GB for SD 1.5 on the CPU).

Usage: python benchmarks/bench_render_memory.py [--json] [--width 8000 --height 6000]
       [--layers 10] [--variants 4] [--repeats 3]
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
from bench_psd_io import build_document, machine  # noqa: E402

GOAL_MB = 2048

CHILD = """
import json, sys
from psd_collage.render import Renderer

def high_water_mb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0

# The peak RSS so far, noted as each phase starts: the phase in which it last rose
# is the one that sets the peak (exact, unlike sampling).
marks, current = [], ["read"]

def progress(phase, done, total):
    if phase != current[0]:
        marks.append((current[0], high_water_mb()))
        current[0] = phase

report, document, output, variants = sys.argv[1:5]
settings = dict(model="tiny", variants=int(variants), steps=4, seed=1)
result = Renderer(overrides=settings).render_file(document, output, progress=progress)
marks.append((current[0], high_water_mb()))
peak_kib = high_water_mb() * 1024  # VmHWM: ru_maxrss can carry the parent's over exec
with open(report, "w") as fh:
    json.dump({"peak_rss_mb": peak_kib / 1024, "marks": marks, "timings": result.timings}, fh)
"""


def render_once(document: Path, variants: int, folder: Path) -> dict:
    report, output = folder / "peak.json", folder / "out.psd"
    output.unlink(missing_ok=True)
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(report), str(document), str(output), str(variants)],
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise SystemExit(f"render failed:\n{run.stderr}")
    figures = json.loads(report.read_text())
    figures["phase_peaks_mb"] = phase_peaks(figures.pop("marks"))
    return figures


def phase_peaks(marks: list[list]) -> dict[str, float]:
    """Peak RSS reached by the end of each phase (MB), in order; the peak's phase last.

    Phases as progress reports them: "read" (the PSD into layers), "load" (the model,
    then planning: masks, noise maps), "sample" (diffusion, decoding, the writer's
    inputs), "write" (the variants into the PSD).
    """
    peaks: dict[str, float] = {}
    for phase, high in marks:
        peaks[phase] = round(max(high, peaks.get(phase, 0.0)), 1)
    return peaks


def peak_phase(peaks: dict[str, float]) -> str:
    """The phase in which the high-water mark last rose."""
    previous, phase_of_peak = 0.0, "read"
    for phase, high in peaks.items():
        if high > previous:
            phase_of_peak, previous = phase, high
    return phase_of_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--width", type=int, default=8000)
    parser.add_argument("--height", type=int, default=6000)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--variants", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    at_start = machine()
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
    middle = sorted(runs, key=lambda r: r["peak_rss_mb"])[len(runs) // 2]
    figures = {
        "machine": at_start,
        "document": f"{args.width}x{args.height}, {args.layers} layers, RGB 8-bit",
        "variants": args.variants,
        "repeats": args.repeats,
        "peak_rss_mb": round(peak, 1),
        "runs_peak_rss_mb": [round(r["peak_rss_mb"], 1) for r in runs],
        "goal_mb": GOAL_MB,
        "peak_phase": peak_phase(middle["phase_peaks_mb"]),
        "phase_peaks_mb": middle["phase_peaks_mb"],
        "timings_s": middle["timings"],
    }
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"render of {figures['document']}, {args.variants} variants, --model tiny")
        print(f"  machine: {at_start}")
        print(f"  peak RSS {peak:.0f} MB, median of {args.repeats} (goal < {GOAL_MB} MB)")
        print(f"  set in phase: {figures['peak_phase']}")
        for phase, high in figures["phase_peaks_mb"].items():
            print(f"  peak by the end of {phase:<7} {high:7.0f} MB")
        for phase, seconds in figures["timings_s"].items():
            print(f"  {phase:<8} {seconds:7.2f} s")


if __name__ == "__main__":
    main()
