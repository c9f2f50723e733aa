"""What word timestamps cost: milliseconds per window, split into the decoder pass, the attention
matrix (softmax, z-score, median filter) and DTW, beside the window's decoding time.

    OMP_NUM_THREADS=1 python benchmarks/bench_word_timing.py [--model base] [--threads 1]

Greedy, fp32 on the CPU, language fixed to English, on every clip of ../shared/audio/dev (one or two
windows each). Each part is timed on the final tokens of every window, as `transcribe` runs it.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import print_table, read_manifest
from specwhisper import load_model
from specwhisper.audio import load_audio
from specwhisper.word_timing import alignment_heads, attention_pass, token_frame_matrix, token_start_times


def time_parts(model, heads, result, samples) -> dict[str, float]:
    """Seconds of each part of the alignment of a one-window clip (`result` its transcript)."""
    from specwhisper.audio import log_mel_windows
    from specwhisper.transcription import encode_audio

    tokenizer = model.tokenizer
    text = [t for t in result.tokens if t < tokenizer.eot]
    prompt = tokenizer.sot_sequence("en", "transcribe", timestamps=False)
    mel, n_mel_frames = log_mel_windows(samples, n_mels=model.dims.n_mels)
    audio_kv, _ = encode_audio(model, mel[:, :3000][None])
    layers = sorted({layer for layer, _ in heads})
    with torch.inference_mode():
        started = time.perf_counter()
        _, scores = attention_pass(model.network, audio_kv, prompt + text + [tokenizer.eot], layers)
        passed = time.perf_counter()
        matrix = token_frame_matrix(scores, heads, n_mel_frames // 2)[len(prompt) - 1:-1]
        filtered = time.perf_counter()
        token_start_times(matrix)
        done = time.perf_counter()
    return {"pass": passed - started, "matrix": filtered - passed, "dtw": done - filtered, "tokens": len(text)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="base")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu", dtype=torch.float32)
    heads = alignment_heads(model)
    rows = read_manifest("dev")
    totals = {"windows": 0, "encoder": 0.0, "decode": 0.0, "words": 0.0, "pass": 0.0, "matrix": 0.0, "dtw": 0.0, "tokens": 0}
    one_window = 0
    for row in rows:
        samples = load_audio(row["path"])
        model.transcribe(samples, language="en", temperature=0.0)  # warm-up of this clip's shapes
        result = model.transcribe(samples, language="en", temperature=0.0, word_timestamps=True)
        totals["windows"] += result.windows
        totals["encoder"] += result.timings["encoder"]
        totals["decode"] += result.timings["decode"]
        totals["words"] += result.timings.get("word_timestamps", 0.0)
        if result.windows == 1:
            one_window += 1
            for name, value in time_parts(model, heads, result, samples).items():
                totals[name] += value
    n = totals["windows"]
    print(f"{args.model}, {args.threads} thread(s), {len(rows)} dev clips, {n} windows "
          f"({totals['tokens'] / one_window:.0f} text tokens per single-window clip)")
    print_table(["per window", "ms"], [
        ["encoder", 1000 * totals["encoder"] / n],
        ["decoding (greedy, after the encoder)", 1000 * totals["decode"] / n],
        ["word timestamps, all of it", 1000 * totals["words"] / n],
        ["  decoder pass with explicit cross-attention", 1000 * totals["pass"] / one_window],
        ["  softmax, z-score, median filter", 1000 * totals["matrix"] / one_window],
        ["  DTW", 1000 * totals["dtw"] / one_window]])


if __name__ == "__main__":
    main()
