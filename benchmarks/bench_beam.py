"""Beam search against greedy decoding on ../shared/audio/dev: wall time, WER, and what a beam step costs.

    OMP_NUM_THREADS=1 python benchmarks/bench_beam.py --threads 1 [--models base] [--beam-sizes 5] [--assistant auto]

Each clip is transcribed whole with `model.transcribe(path, language="en", beam_size=...)`: timestamp
mode, conditioned on the previous text, openai-whisper's temperature fallback (beam search at 0, one
sample per window above it). Greedy runs without an assistant unless --assistant adds a row with one.
WER is over the folder (word edits summed over clips / reference words) after Whisper's English
normalizer. Per row: wall time for all clips (after one warm-up clip), the decode phase alone and its
ratio to greedy's, generated tokens, decoder passes after the prompts (a beam step is one pass over
all beams), ms per pass, the clips whose text equals greedy's, and the KV-cache reorders (gathers of
beam rows) with their mean cost. After the table: the cost of one reorder of the model's cache at
fixed lengths, against the bytes it copies.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import print_table, read_manifest
from specwhisper import load_model
from specwhisper.kv_cache import KVCache
from specwhisper.normalizer import EnglishTextNormalizer, word_error_rate


class ReorderTimer:
    """Wraps KVCache.reorder to count its calls and their time (the search's only copy)."""

    def __init__(self):
        self.calls, self.seconds = 0, 0.0
        self.original = KVCache.reorder

    def __enter__(self):
        timer = self

        def timed(cache, sources):
            started = time.perf_counter()
            timer.original(cache, sources)
            timer.seconds += time.perf_counter() - started
            timer.calls += 1

        KVCache.reorder = timed
        return self

    def __exit__(self, *exc):
        KVCache.reorder = self.original


def transcribe_all(model, rows, assistant=None, **options) -> dict:
    model.transcribe(rows[0]["path"], language="en", assistant=assistant, **options)  # warm-up
    texts, decode, tokens, passes = [], 0.0, 0, 0
    with ReorderTimer() as reorders:
        started = time.perf_counter()
        for row in rows:
            result = model.transcribe(row["path"], language="en", assistant=assistant, **options)
            texts.append(result.text)
            decode += result.timings["decode"]
            tokens += result.stats.generated_tokens
            passes += result.stats.main_passes
        wall = time.perf_counter() - started
    return {"texts": texts, "wall": wall, "decode": decode, "tokens": tokens, "passes": passes,
            "reorders": reorders.calls, "reorder_seconds": reorders.seconds}


def reorder_cost(model, beam_size: int, length: int, repeats: int = 200) -> tuple[float, float]:
    """ms per reorder of a beam_size-row cache at `length` tokens with every row but one moved, and the
    MB that copy reads and writes."""
    cache = model.network.new_cache(beam_size)
    cache.extend([length] * beam_size)
    sources = [0] + list(range(beam_size - 1))  # row 0 kept and duplicated, the last dropped: all others move
    for _ in range(10):
        cache.reorder(sources)
    started = time.perf_counter()
    for _ in range(repeats):
        cache.reorder(sources)
    seconds = (time.perf_counter() - started) / repeats
    layers, _, heads, _, head_dim = cache.keys.shape
    moved_bytes = 2 * (beam_size - 1) * layers * heads * length * head_dim * cache.keys.element_size()  # K and V
    return 1000 * seconds, 2 * moved_bytes / 1e6  # gathered into a temporary, then written back


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["base"])
    parser.add_argument("--beam-sizes", nargs="+", type=int, default=[5])
    parser.add_argument("--assistant", default=None, help="also run greedy with this assistant (e.g. auto)")
    parser.add_argument("--folder", default="dev")
    parser.add_argument("--limit", type=int, default=None, help="first N clips only (to check the script works)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = read_manifest(args.folder)[:args.limit]
    normalize = EnglishTextNormalizer()
    references = [normalize(r["reference"]) for r in rows]
    table, costs = [], []
    for name in args.models:
        model = load_model(name, device="cpu", dtype=torch.float32)
        runs = {"greedy": transcribe_all(model, rows)}
        if args.assistant:
            from specwhisper.cli import resolve_assistant  # what --assistant means on the command line

            assistant = resolve_assistant(model, args.assistant, None, explicit=True)
            runs[f"greedy + {args.assistant}"] = transcribe_all(model, rows, assistant)
        for beam_size in args.beam_sizes:
            runs[f"beam {beam_size}"] = transcribe_all(model, rows, beam_size=beam_size)
        greedy = runs["greedy"]
        for label, run in runs.items():
            wer = word_error_rate(references, [normalize(t) for t in run["texts"]])
            same = sum(a == b for a, b in zip(run["texts"], greedy["texts"]))
            mean_reorder = f"{1000 * run['reorder_seconds'] / run['reorders']:.3f}" if run["reorders"] else "-"
            table.append([name, label, f"{100 * wer:.2f}%", f"{run['wall']:.1f}", f"{run['decode']:.1f}",
                          f"{run['decode'] / greedy['decode']:.2f}x", run["tokens"], run["passes"],
                          f"{1000 * run['decode'] / max(run['passes'], 1):.1f}", f"{same}/{len(rows)}",
                          run["reorders"], mean_reorder])
        for beam_size in args.beam_sizes:
            for length in (50, 150, 448):
                ms, megabytes = reorder_cost(model, beam_size, length)
                costs.append(f"{name}, {beam_size} beams, {length} tokens: {ms:.3f} ms per reorder moving "
                             f"{beam_size - 1} rows ({megabytes:.1f} MB read and written, {megabytes / ms:.1f} GB/s)")
    audio_seconds = sum(float(r["seconds"]) for r in rows)
    print(f"Beam search against greedy on ../shared/audio/{args.folder}: {len(rows)} clips, {audio_seconds:.0f} s "
          f"(model.transcribe, English; CPU fp32, {torch.get_num_threads()} threads)")
    print_table(["model", "decoding", "WER", "wall s", "decode s", "decode/greedy", "tokens", "passes", "ms/pass",
                 "text = greedy", "reorders", "ms/reorder"], table)
    print("\nKV-cache reorder (a gather of beam rows, every row but one moved):")
    for line in costs:
        print("  " + line)


if __name__ == "__main__":
    main()
