"""Greedy against `--assistant auto` (the shipped draft plus free drafts), on long recordings and short clips.

    python benchmarks/bench_assistant.py [--folders long dev] [--runs 3] [--oracle] [--plot docs/assistant.png]

One process, one model, the files of each folder transcribed whole by `model.transcribe` (30-s
windows, previous-text prompts, timestamps, temperature 0 only, so the transcripts must be
identical), greedy then speculative, file by file so that background load hits both alike. Each run
builds a new assistant, so its cost model is calibrated anew (once per process, as in the CLI):
the runs show how much its decisions move with the machine's noise.

Printed per folder and method, summed over the runs: wall time (audio decoding excluded) and its
ratio to greedy; the decode phase (everything after the encoder: prompts, steps, drafts,
verification) and its ratio; acceptance and tokens per main pass; draft ms per drafted token;
verify ms per pass, and per extra position from the calibrated cost model; free drafts proposed
and accepted; identical transcripts. Then the spread over the runs (tokens drafted, tokens per
pass, ratio), and with --oracle the ceiling: a drafter that replays greedy's tokens, runs no model
and is always right (oracle.py). --plot draws, for the first file of the first folder, per window:
tokens per main pass, mean γ, and where the time went, greedy beside speculative (needs
matplotlib: pip install -e '.[plot]').
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field

import torch

from common import print_table, read_manifest
from oracle import GreedyRecorder, OracleDrafter
from specwhisper import audio, load_model
from specwhisper.assistants import resolve_auto_assistant
from specwhisper.decoding import DecodeStats
from specwhisper.drafters import FreeDrafter


@dataclass
class Method:
    """One way of decoding, summed over files and runs."""

    seconds: float = 0.0
    stats: DecodeStats = field(default_factory=DecodeStats)
    identical: int = 0
    files: int = 0
    per_run: list[tuple[float, DecodeStats]] = field(default_factory=list)  # (seconds, stats) of each run
    slopes: list[float] = field(default_factory=list)  # calibrated ms per extra verified position, per run

    @property
    def decode_seconds(self) -> float:
        s = self.stats
        return s.prefill_seconds + s.decode_seconds + s.draft_seconds + s.verify_seconds


def timed(model, samples, assistant):
    started = time.perf_counter()
    result = model.transcribe(samples, language="en", temperature=0.0, assistant=assistant)
    return time.perf_counter() - started, result


def run_folder(model, folder: str, runs: int, oracle: bool) -> tuple[dict[str, Method], dict]:
    rows = read_manifest(folder)
    samples = {r["file"]: audio.load_audio(r["path"]) for r in rows}
    methods = {"greedy": Method(), "auto": Method()} | ({"oracle": Method()} if oracle else {})
    first_windows = {}
    for run in range(runs):
        assistant = FreeDrafter(resolve_auto_assistant(model))  # a new cost model per run
        oracle_drafter = OracleDrafter([], model.tokenizer.eot) if oracle else None
        run_totals = {name: [0.0, DecodeStats()] for name in methods}
        for name, clip in samples.items():
            greedy_seconds, greedy = timed(model, clip, None)
            outcomes = {"greedy": (greedy_seconds, greedy), "auto": timed(model, clip, assistant)}
            if oracle:
                recorder = GreedyRecorder()
                model.transcribe(clip, language="en", temperature=0.0, assistant=recorder)  # untimed
                oracle_drafter.learn(recorder.sequences)
                outcomes["oracle"] = timed(model, clip, oracle_drafter)
            for method, (seconds, result) in outcomes.items():
                m = methods[method]
                m.seconds += seconds
                m.stats.add(result.stats)
                m.identical += result.tokens == greedy.tokens
                m.files += 1
                run_totals[method][0] += seconds
                run_totals[method][1].add(result.stats)
                if run == 0 and name == rows[0]["file"]:
                    first_windows[method] = result.stats.windows
        for method, (seconds, stats) in run_totals.items():
            methods[method].per_run.append((seconds, stats))
        costs = assistant.controller.costs
        if costs is not None:
            methods["auto"].slopes.append(1e3 * costs.verify_slope)
    return methods, first_windows


def report(folder: str, methods: dict[str, Method], audio_seconds: float) -> None:
    greedy = methods["greedy"]
    rows = []
    for name, m in methods.items():
        s = m.stats
        passes = max(s.main_passes, 1)
        model_drafted = s.drafted - s.free_drafted
        rows.append([
            name, f"{m.seconds:.2f}", f"{greedy.seconds / m.seconds:.2f}x", f"{m.decode_seconds:.2f}",
            f"{greedy.decode_seconds / m.decode_seconds:.2f}x",
            f"{100 * s.acceptance_rate:.1f}%" if s.drafted else "", f"{s.tokens_per_main_pass:.2f}",
            f"{1e3 * s.draft_seconds / model_drafted:.2f}" if model_drafted else "",
            f"{1e3 * (s.verify_seconds if s.drafted else s.decode_seconds) / passes:.1f}",
            f"{statistics.median(m.slopes):.2f}" if m.slopes else "",
            f"{s.free_drafted}/{s.free_accepted}" if s.free_drafted else "",
            f"{m.identical}/{m.files}"])
    print(f"\n../shared/audio/{folder}: {audio_seconds:.0f} s of audio per run")
    print_table(["method", "wall s", "vs greedy", "decode s", "decode vs greedy", "accepted", "tokens/pass",
                 "draft ms/token", "main ms/pass", "ms/extra position", "free drafted/accepted", "identical"], rows)
    auto = methods["auto"]
    spread = [(g[0] / a[0], a[1].drafted - a[1].free_drafted, a[1].tokens_per_main_pass)
              for g, a in zip(greedy.per_run, auto.per_run)]
    print("runs of auto (ratio to greedy, model-drafted tokens, tokens per pass): "
          + "; ".join(f"{r:.2f}x, {d}, {t:.2f}" for r, d, t in spread))
    if "oracle" in methods:
        o = methods["oracle"]
        print(f"oracle ceiling: {greedy.seconds / o.seconds:.2f}x end to end, decode phase "
              f"{greedy.decode_seconds / o.decode_seconds:.2f}x ({o.stats.accepted}/{o.stats.drafted} drafts accepted)")


def plot(windows: dict[str, list[dict]], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot (pip install -e '.[plot]')")
        return
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    colors = {"greedy": "C0", "auto": "C1", "oracle": "C2"}
    for name, records in windows.items():
        x = range(1, len(records) + 1)
        axes[0].plot(x, [r["tokens"] / max(r["passes"], 1) for r in records], marker="o", label=name,
                     color=colors[name])
        if name != "greedy":
            axes[1].plot(x, [r["mean_gamma"] for r in records], marker="o", label=name, color=colors[name])
    axes[0].set_ylabel("tokens per main pass")
    axes[1].set_ylabel("mean γ (model drafts)")
    parts = ["encoder_seconds", "prefill_seconds", "decode_seconds", "draft_seconds", "verify_seconds"]
    names = [n for n in ("greedy", "auto") if n in windows]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        records = windows[name]
        bottom = [0.0] * len(records)
        for j, part in enumerate(parts):
            heights = [r[part] for r in records]
            axes[2].bar([k + 1 + i * width - 0.4 + width / 2 for k in range(len(records))], heights, width,
                        bottom=bottom, color=f"C{j}", label=part.removesuffix("_seconds") if i == 0 else None,
                        alpha=1.0 if i == 0 else 0.6)
            bottom = [b + h for b, h in zip(bottom, heights)]
    axes[2].set_ylabel("seconds (left: greedy, right: auto)")
    axes[2].set_xlabel("window")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--main", default="base")
    parser.add_argument("--folders", nargs="+", default=["long", "dev"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--oracle", action="store_true")
    parser.add_argument("--plot", default=None, metavar="PNG")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    warnings.simplefilter("error")  # a silent fallback to greedy would make the table meaningless
    model = load_model(args.main, device="cpu", dtype="float32")
    model.transcribe(audio.load_audio(read_manifest("dev")[0]["path"]), language="en", temperature=0.0)  # warm-up
    load = os.getloadavg()[0]
    print(f"main {args.main} | {torch.get_num_threads()} threads | {args.runs} runs | load average {load:.2f}")
    plotted = None
    for folder in args.folders:
        methods, first_windows = run_folder(model, folder, args.runs, args.oracle)
        audio_seconds = sum(float(r["seconds"]) for r in read_manifest(folder))
        report(folder, methods, audio_seconds)
        plotted = plotted or first_windows
    print(f"load average: {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    if args.plot and plotted:
        plot(plotted, args.plot)


if __name__ == "__main__":
    main()
