"""Greedy vs speculative decoding, same process, same weights, on real speech.

    python benchmarks/bench_speculative.py [--main base] [--assistants tiny.en] [--gammas 2 4 6 adaptive]
                                           [--folder dev] [--limit N] [--batch B]

For every assistant and draft length γ it decodes each clip's first 30-s window (the
`transcribe` feature convention) greedily and then speculatively, and prints:
  - wall time of the decode (encoder included on both sides: the assistant's own encoder is
    part of what speculation costs) and greedy/speculative ratio (> 1: speculative is faster);
  - main-model passes per generated token (the hardware-independent figure: 1.0 for greedy);
  - acceptance rate (accepted / drafted), mean tokens per main pass, a histogram of tokens
    accepted per round;
  - draft and verify time per round, and how many clips came out identical to greedy (must be all).
"""

from __future__ import annotations

import argparse
import time
import warnings
import torch

from common import print_table, read_manifest
from specwhisper import audio, load_model
from specwhisper.assistants import load_assistant
from specwhisper.decoding import DecodeStats, DecodingOptions
from specwhisper.transcription import decode_window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--main", default="base")
    parser.add_argument("--assistants", nargs="+", default=["tiny.en"])
    parser.add_argument("--gammas", nargs="+", default=["2", "4", "6", "adaptive"])
    parser.add_argument("--folder", default="dev")
    parser.add_argument("--language", default="en")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1, help="windows per decode call")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    warnings.simplefilter("error")  # a silent fallback to greedy would make the table meaningless

    main_model = load_model(args.main)
    rows = read_manifest(args.folder)[: args.limit]
    mels = [audio.first_window_mel(audio.load_audio(r["path"]), main_model.dims.n_mels) for r in rows]
    batches = [torch.stack(mels[i:i + args.batch]) for i in range(0, len(mels), args.batch)]
    options = DecodingOptions(language=args.language)
    print(f"main {args.main} | {len(rows)} clips of ../shared/audio/{args.folder} | batch {args.batch} | "
          f"{main_model.device} {str(main_model.dtype).replace('torch.', '')} | {torch.get_num_threads()} threads")

    def run(assistant) -> tuple[list[list[int]], DecodeStats, float]:
        stats, tokens, seconds = DecodeStats(), [], 0.0
        for mel in batches:
            started = time.perf_counter()
            tokens += [r.tokens for r in decode_window(main_model, mel, options, assistant=assistant, stats=stats)]
            seconds += time.perf_counter() - started
        return tokens, stats, seconds

    run(None)  # warm-up
    table, histograms = [], []
    for name in args.assistants:
        for gamma in args.gammas:
            assistant = load_assistant(main_model, name, draft_length=None if gamma == "adaptive" else int(gamma))
            greedy_tokens, greedy_stats, greedy_seconds = run(None)
            spec_tokens, stats, spec_seconds = run(assistant)
            rounds = max(stats.main_passes, 1)
            identical = sum(a == b for a, b in zip(greedy_tokens, spec_tokens))
            table.append([f"{name} ({assistant.kind})", gamma, greedy_seconds, spec_seconds,
                          f"{greedy_seconds / spec_seconds:.2f}x",
                          f"{stats.main_passes / max(stats.generated_tokens, 1):.2f}",
                          f"{100 * stats.acceptance_rate:.1f}%", f"{stats.tokens_per_main_pass:.2f}",
                          f"{1e3 * stats.draft_seconds / rounds:.1f}", f"{1e3 * stats.verify_seconds / rounds:.1f}",
                          f"{1e3 * greedy_stats.decode_seconds / max(greedy_stats.main_passes, 1):.1f}",
                          f"{identical}/{len(greedy_tokens)}"])
            histograms.append((f"{name} γ={gamma}", stats.acceptance_histogram()))
    print_table(["assistant", "γ", "greedy s", "spec s", "speedup", "passes/token", "accepted",
                 "tokens/pass", "draft ms/round", "verify ms/round", "greedy ms/step", "identical"], table)
    for row, histogram in histograms:
        print(f"accepted per round, {row}: {histogram}")


if __name__ == "__main__":
    main()
