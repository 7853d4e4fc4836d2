"""What ``psd-collage serve`` adds on top of the hot folder, on a 4000 x 3000 document.

Builds a 10-layer 4000 x 3000 RGB PSD and its result with 4 variants (not timed), then
runs the real server in this process (uvicorn on a free port; its watcher is not
started, so nothing renders) and times, interleaved, medians of ``--repeats`` runs:

(a) sending the document: ``POST /api/jobs`` (multipart, header check, atomic landing
    in the inbox) against the baseline of copying it into the inbox by hand;
(b) one variant as a PNG: ``GET /api/jobs/{id}/variants/0.png`` the first time (read
    back from the result PSD, encoded) and again (cached), against the baseline of
    psd-tools' own way to get that layer as an image (``open`` + ``layer.composite()``).

Usage: python benchmarks/bench_serve.py [--json] [--width 4000 --height 3000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from psd_tools import PSDImage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_psd_io import build_document, smooth_noise  # noqa: E402
from serve_helpers import serve_in_thread  # noqa: E402

from psd_collage.psd.writer import write_variants  # noqa: E402
from serve.app import create_app  # noqa: E402
from serve.backend import HotFolderBackend  # noqa: E402


def timed(func) -> float:  # noqa: ANN001
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def prepare(folder: Path, width: int, height: int) -> tuple[Path, Path]:
    source = folder / "poster.psd"
    build_document(source, width, height, 10)
    rng = np.random.default_rng(1)
    variants = [smooth_noise(rng, height, width, 3) for _ in range(4)]
    root = folder / "hot"
    (root / "done").mkdir(parents=True)
    result = root / "done" / "result.psd"
    write_variants(source, result, variants, [f"seed {k}" for k in range(4)], "[harmonized] bench")
    entry = {"job": "bench", "name": "result.psd", "outcome": "done", "done": "done/result.psd"}
    entry["variants"] = [{"seed": k, "layer": f"seed {k}"} for k in range(4)]
    (root / "status.json").write_text(json.dumps({"state": "idle", "recent": [entry]}))
    return source, root


def psd_tools_layer(path: Path) -> None:
    psd = PSDImage.open(path)
    group = next(layer for layer in psd if layer.name.startswith("[harmonized]"))
    next(layer for layer in group if layer.name == "seed 0").composite()


def run(width: int, height: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        source, root = prepare(Path(tmp), width, height)
        size_mb = source.stat().st_size / 1e6
        backend = HotFolderBackend(root, {"model": "tiny"})
        app = create_app(backend, manage_backend=False)
        times: dict[str, list[float]] = {
            k: [] for k in ("copy", "post", "psd_tools", "cold", "warm")
        }
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=600) as client:
            for k in range(repeats):
                target = root / "inbox" / "copied.psd"
                times["copy"].append(timed(lambda: shutil.copyfile(source, target)))  # noqa: B023
                target.unlink()

                def post() -> None:
                    with open(source, "rb") as fh:
                        reply = client.post("/api/jobs", files={"file": ("poster.psd", fh)})
                    assert reply.status_code == 201, reply.text
                    assert client.delete(f"/api/jobs/{reply.json()['id']}").status_code == 200

                times["post"].append(timed(post))
                times["psd_tools"].append(
                    timed(lambda: psd_tools_layer(root / "done" / "result.psd"))
                )
                path = f"/api/jobs/bench/variants/0.png?max={16384 + k}"  # a new cache key
                times["cold"].append(timed(lambda: client.get(path).raise_for_status()))  # noqa: B023
                times["warm"].append(timed(lambda: client.get(path).raise_for_status()))  # noqa: B023
        median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "document": f"{width}x{height}, 10 layers, 4 variants",
        "psd_mb": round(size_mb, 1),
        "seconds": {k: round(v, 3) for k, v in median.items()},
        "upload_mb_per_s": round(size_mb / median["post"], 1),
        "post_vs_copy": round(median["post"] / median["copy"], 2),
        "variant_png_vs_psd_tools": round(median["cold"] / median["psd_tools"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = run(args.width, args.height, args.repeats)
    if args.json:
        print(json.dumps(result))
        return
    s = result["seconds"]
    print(f"document: {result['document']} ({result['psd_mb']} MB)")
    print(
        f"send: POST /api/jobs {s['post']:.2f} s ({result['upload_mb_per_s']} MB/s) vs copy "
        f"into inbox {s['copy']:.2f} s: ratio {result['post_vs_copy']}"
    )
    print(
        f"variant PNG: first {s['cold']:.2f} s, cached {s['warm']:.3f} s; psd-tools layer "
        f"composite {s['psd_tools']:.2f} s: ratio {result['variant_png_vs_psd_tools']}"
    )


if __name__ == "__main__":
    main()
