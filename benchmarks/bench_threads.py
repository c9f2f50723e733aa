"""Decoding time by thread count, on an idle machine and with one core busy with other work.

    python benchmarks/bench_threads.py [--runs 3] [--model base]

Runs `specwhisper transcribe demo --assistant none --stats` as a user would, for each --threads
value, first alone, then beside a process that keeps one core busy (a Python busy loop this script
starts and stops), and prints the median decode time (everything after the encoder) per setting.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

BUSY_LOOP = "import time\nend = time.time() + 600\nwhile time.time() < end: pass\n"


def decode_ms(model: str, threads: int) -> float:
    done = subprocess.run([sys.executable, "-m", "specwhisper", "transcribe", "demo", "--model", model,
                           "--assistant", "none", "--stats", "--threads", str(threads)],
                          capture_output=True, text=True, check=True)
    return float(re.search(r"decode (\d+) ms", done.stderr).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default="base")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    thread_counts = sorted({1, cores})
    rows = []
    for load in ("idle", "one core busy"):
        busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if load != "idle" else None
        time.sleep(1.0 if busy else 0.0)
        try:
            for threads in thread_counts:
                rows.append((load, threads, statistics.median(decode_ms(args.model, threads) for _ in range(args.runs))))
        finally:
            if busy:
                busy.kill()
                busy.wait()
    print(f"{args.model}, demo clip, greedy; median decode ms of {args.runs} runs; {cores} cores")
    print(f"{'machine':<14} {'threads':>7} {'decode ms':>10}")
    for load, threads, ms in rows:
        print(f"{load:<14} {threads:>7} {ms:>10.0f}")


if __name__ == "__main__":
    main()
