"""The CPU path's speed, to compare two checkouts side by side (the GPU path must not tax it).

    python benchmarks/bench_cpu_path.py [--limit 40] [--rounds 2] [--before DIR]

On the dev clips, with base, one process per measurement: greedy decoding (ms per decoder step:
decode time / main passes) and `--assistant auto` against greedy (the speculative ratio, from wall
time of the whole transcription loop, encoder included). With `--before DIR` (a checkout of the
earlier commit, e.g. `git worktree add /tmp/before <commit>`), the same measurement runs from that
checkout's `specwhisper` in turn with this one, `--rounds` times, and the table shows both sides and
their ratio: a paired comparison that holds when the machine's speed drifts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MEASURE = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[2])
from common import read_manifest
import specwhisper
clips = [row["path"] for row in read_manifest("dev")][:int(sys.argv[1])]
model = specwhisper.load_model("base")
from specwhisper.assistants import resolve_auto_assistant
auto = resolve_auto_assistant(model)
out = {"source": specwhisper.__file__}
for name, assistant in (("greedy", None), ("auto", auto)):
    model.transcribe(clips[0], language="en", assistant=assistant)  # warm
    decode, passes, started = 0.0, 0, time.perf_counter()
    for clip in clips:
        result = model.transcribe(clip, language="en", assistant=assistant)
        decode += result.stats.decode_seconds + result.stats.draft_seconds + result.stats.verify_seconds
        passes += result.stats.main_passes
    out[name] = {"wall": time.perf_counter() - started, "ms_per_pass": 1000 * decode / passes}
print(json.dumps(out))
"""


def measure(source: Path | None, limit: int) -> dict:
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", MEASURE, str(limit), str(HERE)], capture_output=True, text=True,
                          env=env, cwd=HERE, check=True)  # not the repository root: its specwhisper would come first
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=40, help="dev clips")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", type=Path, default=None, help="a checkout of the earlier commit")
    args = parser.parse_args()
    sides = {"this": None} if args.before is None else {"before": args.before.resolve(), "this": None}
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, source in sides.items():
            result = measure(source, args.limit)
            if source is not None and not result["source"].startswith(str(source)):
                sys.exit(f"--before {source}: specwhisper was imported from {result['source']}")
            runs[name].append(result)

    def figures(result: dict) -> dict:
        return {"greedy ms/step": result["greedy"]["ms_per_pass"], "greedy wall s": result["greedy"]["wall"],
                "auto wall s": result["auto"]["wall"], "speculative ratio": result["greedy"]["wall"] / result["auto"]["wall"]}

    print(f"base, {args.limit} dev clips, {args.rounds} rounds, medians; threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    header = ["figure"] + [f"{name} (median)" for name in sides] + (["this / before, per round"] if len(sides) == 2 else [])
    print(" | ".join(header))
    for figure in figures(runs["this"][0]):
        cells = [figure]
        for name in sides:
            cells.append(f"{statistics.median(figures(r)[figure] for r in runs[name]):.3f}")
        if len(sides) == 2:
            ratios = [figures(t)[figure] / figures(b)[figure] for t, b in zip(runs["this"], runs["before"])]
            cells.append(", ".join(f"{r:.3f}" for r in ratios))
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
