"""The farm (``watch --broker`` + ``worker``) with the tiny model: 1 versus 2 workers.

A throw-away ``redis-server`` on a free port, one watcher, then N warm workers
(one torch thread each, so that two fit on two cores) on the same queue:

(a) throughput: a batch of small files dropped at once, from the drop to the last
    file in done/, in jobs per minute; median of ``--repeats`` batches per worker
    count, and the 2-worker/1-worker ratio from the same run;
(b) latency from queue to start: with idle warm workers, one file at a time; the
    time from the watcher sending the job to a worker starting it (``queue_s`` in
    the status history), median of ``--drops`` files.

Usage: python benchmarks/bench_farm.py [--json] [--files 12] [--steps 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_watch import CLI, make_psd, render_args, wait_for

from watcher.status import FarmStatus


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        + ["--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    wait_for(lambda: _pingable(port), 10)
    return proc, url


def _pingable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def start(args: list[str], log: Path, threads: int = 1) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*CLI, *args], stdout=out, stderr=subprocess.STDOUT, env=env(threads)
        )


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def done_count(root: Path) -> int:
    return sum(1 for _ in (root / "done").glob("*.psd"))


def batch(root: Path, tmp: Path, files: int, tag: str) -> float:
    """Drop ``files`` at once; seconds from the drop to the last one in done/."""
    before = done_count(root)
    for i in range(files):
        make_psd(tmp / f"{tag}-{i:02d}.psd", hash((tag, i)) % 10_000)
    started = time.monotonic()
    for i in range(files):
        os.rename(tmp / f"{tag}-{i:02d}.psd", root / "inbox" / f"{tag}-{i:02d}.psd")
    if not wait_for(lambda: done_count(root) == before + files, 900):
        sys.exit(f"batch {tag} did not finish; see {root / 'watch.log'}")
    return time.monotonic() - started


def run_farm(work: Path, url: str, workers: int, args: argparse.Namespace) -> dict:
    root = work / f"farm{workers}"
    (root / "inbox").mkdir(parents=True)
    tmp = work / f"tmp{workers}"
    tmp.mkdir()
    watch = start(["watch", str(root), "--broker", url, "--stable", "0.2"], work / "watch.out")
    wait_for(lambda: (root / "work").is_dir(), 30)
    names = [f"w{workers}-{k}" for k in range(workers)]
    procs = [
        start(
            ["worker", "--broker", url, "--root", str(root), "--name", name]
            + render_args(args.steps),
            work / f"{name}.out",
        )
        for name in names
    ]
    farm = FarmStatus(url)
    try:

        def warm() -> bool:
            seen = {w["name"]: w for w in farm.snapshot()["workers"]}
            return all(seen.get(n, {}).get("state") == "idle" for n in names)

        if not wait_for(warm, 300):
            sys.exit("the workers did not start; see their logs in " + str(work))
        # (b) queue -> start, one file at a time on idle warm workers
        latencies = []
        for k in range(args.drops):
            batch(root, tmp, 1, f"lat{k}")

            def recorded(name: str = f"lat{k}-00.psd") -> bool:
                return any(r["name"] == name for r in farm.snapshot()["recent"])

            wait_for(recorded, 30)  # the history is written just after the moves
            latencies.append(farm.snapshot()["recent"][0]["queue_s"])
        # (a) throughput
        seconds = [batch(root, tmp, args.files, f"b{r}") for r in range(args.repeats)]
    finally:
        stop([watch, *procs])
        farm.client.flushdb()
    per_min = [args.files / s * 60 for s in seconds]
    return {
        "workers": workers,
        "jobs_per_min": round(statistics.median(per_min), 1),
        "jobs_per_min_runs": [round(x, 1) for x in per_min],
        "queue_to_start_s": round(statistics.median(latencies), 3),
        "queue_to_start_runs": latencies,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=12, help="files per batch")
    parser.add_argument("--steps", type=int, default=8, help="sampling steps per file")
    parser.add_argument("--repeats", type=int, default=3, help="batches per worker count")
    parser.add_argument("--drops", type=int, default=5, help="single files for the latency")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_farm_"))
    redis, url = start_redis(work)
    try:
        one = run_farm(work, url, 1, args)
        two = run_farm(work, url, 2, args)
    finally:
        redis.terminate()
        redis.wait(10)
    result = {
        "files": args.files,
        "steps": args.steps,
        "cores": os.cpu_count(),
        "torch_threads_per_worker": 1,
        "one_worker": one,
        "two_workers": two,
        "speedup_2_vs_1": round(two["jobs_per_min"] / one["jobs_per_min"], 2),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"tiny model, {args.steps} steps, 64x64 files, {os.cpu_count()} cores, 1 torch thread/worker"
        )
        for row in (one, two):
            print(
                f"{row['workers']} worker(s): {row['jobs_per_min']} jobs/min "
                f"(runs {row['jobs_per_min_runs']}), queue->start {row['queue_to_start_s']} s"
            )
        print(f"2 workers / 1 worker: {result['speedup_2_vs_1']}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
