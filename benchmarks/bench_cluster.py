"""Files per minute: one process against Ray's actor pool, on this machine.

    python benchmarks/bench_cluster.py [--runs 2] [--model base] [--sets dev long]
    python benchmarks/bench_cluster.py --sets          # only Ray's own costs

Runs whole commands, as a user would, each into a fresh output folder (so nothing is skipped as
done): `specwhisper transcribe FILES --threads 2 -o DIR` (one process), `specwhisper
transcribe-many FOLDER -o DIR --workers 2 --threads-per-worker 1` and `... --workers 1
--threads-per-worker 2` (Ray started by the command, on this machine), on ../shared/audio/dev and
../shared/audio/long; the settings take turns within each run. Prints the median wall time, files
per minute and the real-time factor of each, then what the results table says about a Ray job:
the model load per worker, the seconds the workers spent on files, and the rest (Ray's start, the
actors' start, the queue's tail); last, how many files per second Ray Data hands out when the work
is nothing (2 no-op actors, one file in flight each, as transcribe-many runs them): the driver-side
ceiling; and the fixed costs of Ray itself (import, start, a first pair of actors, shutdown).
docs/cluster.md makes the napkin math for a cluster from these.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import AUDIO, print_table, read_manifest

SETTINGS = {
    "1 process x 2 threads": lambda files, folder, out: ["transcribe", *files, "--threads", "2", "-o", out],
    "Ray 2 workers x 1 thread": lambda files, folder, out: ["transcribe-many", folder, "-o", out, "--workers", "2",
                                                            "--threads-per-worker", "1"],
    "Ray 1 worker x 2 threads": lambda files, folder, out: ["transcribe-many", folder, "-o", out, "--workers", "1",
                                                            "--threads-per-worker", "2"],
}


def run(command: list[str], model: str) -> tuple[float, list[dict]]:
    """Wall seconds of one whole command, and its results table (empty for `transcribe`)."""
    out = command[command.index("-o") + 1]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "specwhisper", *command, "--model", model], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    table = Path(out) / "results.jsonl"
    rows = [json.loads(line) for line in table.read_text().splitlines()] if table.is_file() else []
    return wall, rows


def scheduling_ceiling(files: int) -> float:
    """Files per second through Ray Data's actor pool as transcribe-many sets it up, with a no-op actor."""
    code = f"""
import json, time, numpy as np, ray, ray.data
ray.init(include_dashboard=False, logging_level="ERROR")
ray.data.DataContext.get_current().enable_progress_bars = False
class Nothing:
    def __call__(self, batch):
        return {{"row": np.array([json.dumps({{"file": str(p)}}) for p in batch["path"]], dtype=object)}}
started = time.perf_counter()
dataset = ray.data.from_items([{{"path": f"/x/{{i}}.wav"}} for i in range({files})], override_num_blocks={files})
dataset = dataset.map_batches(Nothing, batch_size=1, num_cpus=1,
                              compute=ray.data.ActorPoolStrategy(size=2, max_tasks_in_flight_per_actor=1))
rows = sum(len(batch["row"]) for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"))
print(rows / (time.perf_counter() - started))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def ray_fixed_costs() -> str:
    """Seconds of `import ray`, `ray.init()`, a first pair of no-op actors' results, and `ray.shutdown()`."""
    code = """
import json, time, numpy as np
started = time.perf_counter()
import ray, ray.data
imported = time.perf_counter()
ray.init(include_dashboard=False, logging_level="ERROR")
initialized = time.perf_counter()
ray.data.DataContext.get_current().enable_progress_bars = False
class Nothing:
    def __call__(self, batch):
        return batch
dataset = ray.data.from_items([{"path": str(i)} for i in range(4)], override_num_blocks=4)
dataset = dataset.map_batches(Nothing, batch_size=1, num_cpus=1,
                              compute=ray.data.ActorPoolStrategy(size=2, max_tasks_in_flight_per_actor=1))
sum(len(batch["path"]) for batch in dataset.iter_batches(batch_size=None))
first = time.perf_counter()
ray.shutdown()
ended = time.perf_counter()
print(f"import ray {imported - started:.1f} s, ray.init() {initialized - imported:.1f} s, "
      f"a first pair of actors' results {first - initialized:.1f} s, ray.shutdown() {ended - first:.1f} s")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--model", default="base")
    parser.add_argument("--sets", nargs="*", default=["dev", "long"])
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; model {args.model}, its default assistant; load average "
          f"{os.getloadavg()[0]:.2f} at the start")
    for name in args.sets:
        manifest = read_manifest(name)
        files = [row["path"] for row in manifest]
        audio_seconds = sum(float(row["seconds"]) for row in manifest)
        walls = {setting: [] for setting in SETTINGS}
        tables = {setting: [] for setting in SETTINGS}
        for _ in range(args.runs):
            for setting, command in SETTINGS.items():
                with tempfile.TemporaryDirectory() as out:
                    wall, rows = run(command(files, str(AUDIO / name), out), args.model)
                walls[setting].append(wall)
                tables[setting].append(rows)
        print(f"\n../shared/audio/{name}: {len(files)} files, {audio_seconds:.0f} s of audio; median of {args.runs} "
              "runs (each a whole command: start, model load, transcription, outputs)")
        rows = []
        for setting in SETTINGS:
            wall = statistics.median(walls[setting])
            rows.append([setting, round(wall, 1), round(len(files) / wall * 60, 2), round(wall / audio_seconds, 3),
                         round(walls["1 process x 2 threads"][0] / walls[setting][0], 2),
                         " ".join(f"{w:.1f}" for w in walls[setting])])
        print_table(["setting", "wall s", "files/min", "real-time factor", "vs 1 process (run 1)", "runs"], rows)
        print("\nRay jobs, from the results table (median over runs): model load per worker, seconds on files per "
              "worker, and the rest of the wall time")
        rows = []
        for setting in SETTINGS:
            if not tables[setting][0]:
                continue
            loads, busy, rest = [], [], []
            for wall, table in zip(walls[setting], tables[setting]):
                workers = {row["worker"] for row in table}
                per_worker = [sum(r["wall_seconds"] for r in table if r["worker"] == w) for w in workers]
                loads.append(statistics.mean(r["worker_load_seconds"] for r in table))
                busy.append(statistics.mean(per_worker))
                rest.append(wall - max(per_worker) - loads[-1])
            rows.append([setting, round(statistics.median(loads), 2), round(statistics.median(busy), 1),
                         round(statistics.median(rest), 1),
                         round(len(files) / statistics.median(busy) * 60 / len(workers), 2)])
        print_table(["setting", "model load s", "on files s per worker", "rest s", "files/min per worker busy"], rows)
    rate = scheduling_ceiling(2000)
    print(f"\nRay Data with 2 no-op actors: {rate:.0f} files per second (2000 files; Ray's start included)")
    print(f"Ray's own costs: {ray_fixed_costs()}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
