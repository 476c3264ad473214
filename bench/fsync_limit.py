#!/usr/bin/env python3
"""
The disk's limit for durable maildir deliveries: how many a second this file system can make.

One operation is what a durable maildir delivery does to the disk:

    open tmp/<unique> (O_CREAT|O_EXCL), write SIZE bytes (4 KiB), fsync(file), close,
    rename tmp/<unique> -> new/<unique>, fsync(new/)

run by 1 thread and by T threads at once (each thread its own files, all in one new/, as a real
maildir), so the figures bound what any server that fsyncs before "250" can do on this disk.
Python releases the GIL in write/fsync/rename, so the threads do overlap on the disk.

Bounded: each run stops after --count operations per thread or --seconds, whichever comes
first; --repeat runs per thread count; median ops/s, median p50 latency and the CPU time the
process spent per operation (mostly kernel time in fsync) are reported.

    bench/fsync_limit.py                        # --threads 1,8 in a temp dir under the cwd
    bench/fsync_limit.py --dir /var/lib/mailserver/tmp --seconds 5 --repeat 5

Writes under --dir (default: a new temporary directory under the current directory, so that it
measures the current directory's file system) and deletes its files afterwards. Virtual disks
often allow bursts of fast fsyncs and then throttle: run it right before the benchmark it is
compared with. One JSON line per run, one summary line per thread count, then a small table.
Stdlib only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import filesystem_of


def worker(
    base: Path, tid: int, payload: bytes, count: int, deadline: float, out: dict[int, list[float]]
) -> None:
    tmpd, newd = base / "tmp", base / "new"
    dfd = os.open(newd, os.O_RDONLY | os.O_DIRECTORY)
    lats: list[float] = []
    try:
        for i in range(count):
            t0 = time.perf_counter()
            if t0 > deadline:
                break
            name = f"{int(time.time())}.T{tid}I{i}.fsync-limit"
            tp = tmpd / name
            fd = os.open(tp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tp, newd / name)
            os.fsync(dfd)
            lats.append(time.perf_counter() - t0)
    finally:
        os.close(dfd)
        out[tid] = lats


def one_run(base: Path, threads: int, size: int, count: int, seconds: float) -> dict:
    for d in ("tmp", "new", "cur"):
        (base / d).mkdir(parents=True, exist_ok=True)
    payload = (b"x" * 76 + b"\r\n") * (size // 78) + b"x" * (size % 78)
    lat_out: dict[int, list[float]] = {}
    cpu0 = time.process_time()
    start = time.perf_counter()
    deadline = start + seconds
    ts = [
        threading.Thread(target=worker, args=(base, t, payload, count, deadline, lat_out))
        for t in range(threads)
    ]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    lats = sorted(x for v in lat_out.values() for x in v)
    n = len(lats)

    def pct(p: float) -> float | None:
        return round(lats[min(n - 1, int(p * n))] * 1000, 3) if n else None

    return {
        "bench": "fsync-limit",
        "threads": threads,
        "size": size,
        "ops": n,
        "elapsed_s": round(elapsed, 3),
        "ops_per_s": round(n / elapsed, 1) if elapsed > 0 else None,
        "lat_ms_p50": pct(0.50),
        "lat_ms_p99": pct(0.99),
        "lat_ms_mean": round(statistics.mean(lats) * 1000, 3) if n else None,
        "cpu_s": round(cpu, 3),
        "cpu_us_per_op": round(cpu / n * 1e6, 1) if n else None,
    }


def remove_run_dir(base: Path, limit: int) -> None:
    """Delete what one run wrote (at most C{limit} files)."""
    removed = 0
    for sub in ("new", "tmp", "cur"):
        p = base / sub
        if p.is_dir():
            for name in os.listdir(p):
                if removed >= limit:
                    break
                os.unlink(p / name)
                removed += 1
            os.rmdir(p)
    os.rmdir(base)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", default="1,8", help="comma list of thread counts (1,8)")
    ap.add_argument("--size", type=int, default=4096, help="bytes per file (4096)")
    ap.add_argument("--count", type=int, default=5000, help="max operations per thread (5000)")
    ap.add_argument("--seconds", type=float, default=10.0, help="max seconds per run (10)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per thread count (3)")
    ap.add_argument("--dir", help="where to write (default: a new temp dir under the cwd)")
    ap.add_argument("--results", help="also append every JSON line to this file")
    args = ap.parse_args(argv)
    threads = [int(x) for x in args.threads.split(",") if x.strip()]
    if not threads or min(threads) < 1 or max(threads) > 256:
        ap.error("--threads: 1..256")
    if args.count < 1 or args.seconds <= 0 or args.repeat < 1 or args.size < 1:
        ap.error("--count, --seconds, --repeat and --size must be positive")

    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    top = Path(tempfile.mkdtemp(prefix="fsync-limit.", dir=args.dir or os.getcwd()))

    def emit(obj: dict) -> None:
        line = json.dumps(obj, sort_keys=True)
        print(line, flush=True)
        if args.results:
            with open(args.results, "a") as f:
                f.write(line + "\n")

    emit(
        {
            "bench": "fsync-limit",
            "header": True,
            "filesystem": filesystem_of(top, with_mount=True),
            "threads": threads,
            "size": args.size,
            "count": args.count,
            "seconds": args.seconds,
            "repeat": args.repeat,
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    summaries = []
    try:
        for th in threads:
            runs = []
            for r in range(args.repeat):
                base = top / f"run.{th}t.{r}"
                try:
                    res = one_run(base, th, args.size, args.count, args.seconds)
                finally:
                    remove_run_dir(base, th * args.count + 10)
                res["run"] = r
                emit(res)
                runs.append(res)
            s = {
                "bench": "fsync-limit",
                "summary": True,
                "threads": th,
                "size": args.size,
                "median_ops_per_s": statistics.median(x["ops_per_s"] or 0 for x in runs),
                "runs_ops_per_s": [x["ops_per_s"] for x in runs],
                "median_lat_ms_p50": statistics.median(x["lat_ms_p50"] or 0 for x in runs),
                "median_lat_ms_p99": statistics.median(x["lat_ms_p99"] or 0 for x in runs),
                "median_cpu_us_per_op": statistics.median(x["cpu_us_per_op"] or 0 for x in runs),
            }
            emit(s)
            summaries.append(s)
    finally:
        try:
            top.rmdir()
        except OSError as e:
            print(f"# could not remove {top}: {e}", file=sys.stderr)
    print(
        "\n| threads | median ops/s | each run | p50 ms | p99 ms | CPU µs/op |\n"
        "|---|---|---|---|---|---|"
    )
    for s in summaries:
        print(
            f"| {s['threads']} | **{s['median_ops_per_s']:.0f}** | "
            f"{', '.join(f'{x:.0f}' for x in s['runs_ops_per_s'])} | "
            f"{s['median_lat_ms_p50']:.2f} | {s['median_lat_ms_p99']:.2f} | "
            f"{s['median_cpu_us_per_op']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
