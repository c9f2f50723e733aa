"""What a verify pass costs per position: base's decoder and logits over 1..9 positions, two exact paths.

    python benchmarks/bench_verify.py [--repeats 6]

A real window (the first 30 s of ../shared/audio/long's first file) after a 155-token prompt, then one
decoder pass (forward and the logits verification reads) over T = 1, 2, 5, 9 new positions, rolled
back after each. "kernel" is the CPU decoder attention kernel (backend auto), "per-position SDPA"
the exact path without it (backend torch): each position's attention in an SDPA call of its own. The
two alternate `--repeats` times, 15 timed passes each, so background load hits both alike; medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import print_table, read_manifest
from specwhisper import attention, audio, load_model
from specwhisper.decoding import DecodingOptions, forward_ragged, prefill, step_logits
from specwhisper.transcription import encode_audio

POSITIONS = (1, 2, 5, 9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = load_model("base", device="cpu", dtype="float32")
    network, tokenizer = model.network, model.tokenizer
    samples = audio.load_audio(read_manifest("long")[0]["path"])
    audio_kv, _ = encode_audio(model, audio.first_window_mel(samples, model.dims.n_mels)[None])
    previous = tokenizer.encode(" the history of the art of printing" * 20)[:150]
    prompt = [tokenizer.sot_prev] + previous + tokenizer.sot_sequence("en", "transcribe", True)
    cache = network.new_cache(1)
    prefill(network, audio_kv, [prompt], cache)
    start = cache.lengths[0]

    def one_pass(positions: int) -> float:
        started = time.perf_counter()
        hidden = forward_ragged(network.decoder, audio_kv, cache, [[220] * positions])
        step_logits(network, hidden.reshape(-1, hidden.shape[-1]), DecodingOptions())
        seconds = time.perf_counter() - started
        cache.rollback([start])
        return seconds

    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        for backend in ("auto", "torch"):
            with attention.use_attention_backend(backend):
                for positions in POSITIONS:
                    for _ in range(3):
                        one_pass(positions)
                    times.setdefault((backend, positions), []).extend(one_pass(positions) for _ in range(15))
    median = {key: 1e3 * statistics.median(value) for key, value in times.items()}
    rows = [[f"{t}", f"{median['auto', t]:.2f}", f"{median['torch', t]:.2f}"] for t in POSITIONS]
    print(f"CPU attention kernel: {attention.cpu_kernel_unavailable_reason() or 'built and checked'}")
    print_table(["positions", "kernel ms", "per-position SDPA ms"], rows)
    first, last = POSITIONS[0], POSITIONS[-1]
    for backend, label in (("auto", "kernel"), ("torch", "per-position SDPA")):
        slope = (median[backend, last] - median[backend, first]) / (last - first)
        print(f"{label}: {slope:.2f} ms per extra position")


if __name__ == "__main__":
    main()
