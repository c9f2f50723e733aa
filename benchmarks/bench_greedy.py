"""Greedy decoding speed on the CPU: specwhisper against transformers, same weights, same process.

    python benchmarks/bench_greedy.py [--models base tiny.en] [--limit N] [--batch B]

Both sides read the same converted safetensors folder, in fp32, with torch's default
thread count, and decode ../shared/audio/dev greedily (first 30 s of each clip, audio
padded to 30 s before the log-mel: the transformers convention, so the token ids can
be compared). specwhisper runs four times: as `load_model` sets it up on the CPU
(prepacked linears, specwhisper.prepack: the decoder blocks' fp16-valued weights held in
fp16 for fbgemm, the rest in oneDNN's fp32 layout; greedy choices from an fp16 screen of
the output projection, specwhisper.screening); the same model without the screen (every
logit from the fp32 projection); with the decoder blocks in oneDNN fp32 too (`fp32
blocks`); and with plain nn.Linear (`prepack=False`), so the effect of each shows in the
same run.

Per model it prints, summed over all clips (audio file reading is not timed):
  - wall time, split into log-mel / encoder / decode, and transformers' time over ours;
  - decode ms/token: everything after the encoder stack (cross-attention K/V projection,
    prompt, one pass per token) over the tokens generated, and the steady-state
    per-step ms (passes after the prompt only), which is what the napkin math is about;
  - tokens generated, and on how many clips the token ids equal transformers';
  - napkin math: the bytes one decoder step must read (decoder weights, the tied output
    projection, the window's cross-attention K/V; fp32), the bandwidth each side's
    step time implies, and the floor at this machine's bandwidth, measured here. With
    the screen the projection is read in fp16 (half the bytes); each token's exact
    log-probability then costs a share of one fp32 GEMM per window, counted in its steps.

transformers' decode is timed alone by handing `generate` the precomputed
`encoder_outputs`; a streamer timestamps each token, which splits its first
forward (cross K/V + prompt) from the steps that follow.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from common import read_manifest
from specwhisper import audio, load_model
from specwhisper.decoding import (DecodeStats, DecodingOptions, LogitRules, WindowBatch, autoregressive_decode,
                                  build_prompts, resolve_languages)
from specwhisper.prepack import PackedLinear, prepack_linears
from specwhisper.speech_model import SpeechModel

BYTES_FP32 = 4
BANDWIDTH_BUFFER_BYTES = 256 * 2**20  # far beyond the last-level cache (32 MB on the dev box)
BANDWIDTH_REPEATS = 5
TARGET_BASE_STEP_MS = 12.0  # the goal for a base decoder step on the 2-core dev box
REFERENCE_STEP_MS = {"faster-whisper": 9.0, "transformers": 25.0}  # base, same box, from the issue


@dataclass
class Timings:
    """Seconds and counts for one implementation, summed over the clips."""

    log_mel: float = 0.0
    encoder: float = 0.0
    decode: float = 0.0  # cross-attention K/V + prompt + steps
    steps: float = 0.0  # the passes after the prompt
    passes: int = 0
    tokens: list[list[int]] = field(default_factory=list)  # per clip, text tokens only

    @property
    def total(self) -> float:
        return self.log_mel + self.encoder + self.decode

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.decode / max(self.n_tokens, 1)

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.steps / max(self.passes, 1)


# --------------------------------------------------------------------------- specwhisper


def run_ours(model: SpeechModel, clips: list[np.ndarray], language: str | None, timings: Timings) -> None:
    """The greedy path of `transcribe.decode_window`, with the cross-attention K/V projection timed
    apart from the encoder (transformers does it inside generate, so it counts as decode on both sides)."""
    network = model.network
    started = time.perf_counter()
    mel = torch.stack([audio.log_mel_padded_audio(c, n_mels=model.dims.n_mels) for c in clips])  # (B, n_mels, 3000)
    encoding = time.perf_counter()
    features = network.encoder(mel)  # (B, 1500, n_audio_state)
    decoding = time.perf_counter()
    audio_kv = network.decoder.audio_kv(features)
    options = DecodingOptions(language=language)
    languages, _ = resolve_languages(network, model.tokenizer, audio_kv, options.language)
    prompts = build_prompts(model.tokenizer, options, languages)
    rules = LogitRules(model.tokenizer, model.suppress_tokens, model.begin_suppress_tokens, options,
                       model.dims.n_vocab)
    stats = DecodeStats()
    window = WindowBatch(mel, features, audio_kv, prompts, languages, rules, options)
    results = autoregressive_decode(network, model.tokenizer, window, stats)
    finished = time.perf_counter()
    timings.log_mel += encoding - started
    timings.encoder += decoding - encoding
    timings.decode += finished - decoding
    timings.steps += stats.decode_seconds
    timings.passes += stats.main_passes
    timings.tokens += [r.tokens for r in results]


# --------------------------------------------------------------------------- transformers


class StepClock:
    """A generate() streamer that only notes when each token arrives (the prompt arrives first)."""

    def __init__(self):
        self.arrivals: list[float] = []

    def put(self, value) -> None:
        self.arrivals.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_transformers(hf, feature_extractor, clips: list[np.ndarray], language: str | None, eot: int,
                     timings: Timings) -> None:
    from transformers.modeling_outputs import BaseModelOutput

    kwargs = dict(language=language, task="transcribe") if language else {}
    started = time.perf_counter()
    mel = feature_extractor(clips if len(clips) > 1 else clips[0], sampling_rate=audio.SAMPLE_RATE,
                            return_tensors="pt").input_features  # (B, n_mels, 3000)
    encoding = time.perf_counter()
    features = hf.model.encoder(mel).last_hidden_state
    decoding = time.perf_counter()
    clock = StepClock()
    out = hf.generate(encoder_outputs=BaseModelOutput(last_hidden_state=features), do_sample=False, num_beams=1,
                      return_timestamps=False, streamer=clock, **kwargs)
    finished = time.perf_counter()
    timings.log_mel += encoding - started
    timings.encoder += decoding - encoding
    timings.decode += finished - decoding
    # arrivals: prompt, first token (after the first forward: cross K/V + prompt), then one per step.
    timings.steps += clock.arrivals[-1] - clock.arrivals[1]
    timings.passes += len(clock.arrivals) - 2
    timings.tokens += [[t for t in row if t < eot] for row in out.tolist()]  # drop prompt, end-of-text, padding


# --------------------------------------------------------------------------- napkin math


def measure_bandwidth() -> tuple[float, float]:
    """Best-of-N GB/s of a large fp32 sum (read only) and copy (read + write), with torch's threads."""
    n = BANDWIDTH_BUFFER_BYTES // BYTES_FP32
    src = torch.rand(n)
    dst = torch.empty_like(src)
    read_s = copy_s = float("inf")
    for _ in range(BANDWIDTH_REPEATS):
        started = time.perf_counter()
        src.sum()
        read_s = min(read_s, time.perf_counter() - started)
        started = time.perf_counter()
        dst.copy_(src)
        copy_s = min(copy_s, time.perf_counter() - started)
    return BANDWIDTH_BUFFER_BYTES / read_s / 1e9, 2 * BANDWIDTH_BUFFER_BYTES / copy_s / 1e9


def step_bytes(model: SpeechModel, batch: int) -> dict[str, int]:
    """Bytes one greedy decoder pass reads at fp32, by part (the self-attention cache, a few
    hundred kB at typical lengths, and one row of each embedding are left out)."""
    dims = model.dims
    d = dims.n_text_state
    per_layer = (
        4 * d * d + 3 * d  # self-attention q, k, v, out (k has no bias)
        + 2 * d * d + 2 * d  # cross-attention q, out: its k, v projections ran once per window
        + 8 * d * d + 5 * d  # MLP d -> 4d -> d
        + 3 * 2 * d  # three LayerNorms
    )
    return {
        "decoder layers": dims.n_text_layer * per_layer * BYTES_FP32,
        "output projection": dims.n_vocab * d * BYTES_FP32,  # tied to the token embedding
        "cross-attention K/V": batch * dims.n_text_layer * 2 * dims.n_audio_ctx * d * BYTES_FP32,
    }


# --------------------------------------------------------------------------- report


def print_rows(header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        print("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def identical(a: Timings, b: Timings) -> int:
    return sum(x == y for x, y in zip(a.tokens, b.tokens))


def report(name: str, model: SpeechModel, runs: dict[str, Timings], n_clips: int, batch: int,
           bandwidth: tuple[float, float]) -> None:
    ours, plain, hf, fp32_blocks = runs["ours"], runs["plain"], runs["transformers"], runs["fp32 blocks"]
    dims = model.dims
    print(f"\n## {name}: {dims.n_text_layer}-layer decoder, width {dims.n_text_state}, vocab {dims.n_vocab}; "
          f"{n_clips} clips, batch {batch}, fp32, CPU, {torch.get_num_threads()} torch threads")
    unscreened = runs["no screen"]
    header = ["", "specwhisper", "no screen", "fp32 blocks", "no prepack", "transformers", "tf / ours",
              "no screen / ours", "fp32 blocks / ours"]

    def row(label, get, fmt=float):
        values = [get(t) for t in (ours, unscreened, fp32_blocks, plain, hf)]
        if fmt is int:  # counts: equal on both sides when the tokens are
            return [label] + values + ["", "", ""]
        return [label] + [fmt(v) for v in values] + [ratio(values[4], values[0]), ratio(values[1], values[0]),
                                                     ratio(values[2], values[0])]

    print_rows(header, [
        row("total s", lambda t: t.total),
        row("  log-mel s", lambda t: t.log_mel),
        row("  encoder s", lambda t: t.encoder),
        row("  decode s (cross K/V + prompt + steps)", lambda t: t.decode),
        row("decode ms / token", lambda t: t.ms_per_token),
        row("step ms (after the prompt)", lambda t: t.ms_per_step),
        row("tokens generated", lambda t: t.n_tokens, int),
        row("decoder steps", lambda t: t.passes, int),
    ])
    print(f"identical token ids vs transformers: specwhisper {identical(ours, hf)}/{n_clips} clips, "
          f"no screen {identical(unscreened, hf)}/{n_clips}, fp32 blocks {identical(fp32_blocks, hf)}/{n_clips}, "
          f"no prepack {identical(plain, hf)}/{n_clips}")

    parts = step_bytes(model, batch)
    total_bytes = sum(parts.values())
    # specwhisper reads the output projection in fp16 through the screen, and the blocks' weights held in fp16.
    half_block_bytes = sum(m.in_features * m.out_features * BYTES_FP32 // 2
                           for name, m in model.network.decoder.blocks.named_modules()
                           if isinstance(m, PackedLinear) and m.half_weights
                           and not name.endswith(("cross_attn.key", "cross_attn.value")))  # those run once per window
    ours_bytes = total_bytes - half_block_bytes - \
        (parts["output projection"] // 2 if model.network.decoder.screened_head else 0)
    read_gbs, copy_gbs = bandwidth
    floor_ms = 1e3 * total_bytes / (read_gbs * 1e9)
    print("napkin math, one decoder step: " + " + ".join(f"{v / 1e6:.1f} MB {k}" for k, v in parts.items())
          + f" = {total_bytes / 1e6:.1f} MB read")
    print(f"  memory bandwidth measured here: {read_gbs:.1f} GB/s read (sum), {copy_gbs:.1f} GB/s copy "
          f"(read + write) -> floor {floor_ms:.2f} ms/step at the read bandwidth")
    if ours_bytes != total_bytes:
        print(f"  with the fp16 screen and fp16-held block weights specwhisper reads {ours_bytes / 1e6:.1f} MB "
              f"per step: floor {1e3 * ours_bytes / (read_gbs * 1e9):.2f} ms/step")
    for label, t, nbytes in (("specwhisper", ours, ours_bytes),
                             ("no screen", unscreened, ours_bytes + parts["output projection"] // 2),
                             ("fp32 blocks", fp32_blocks, ours_bytes + half_block_bytes),
                             ("no prepack", plain, total_bytes), ("transformers", hf, total_bytes)):
        gbs = nbytes / (t.ms_per_step * 1e-3) / 1e9 if t.passes else 0.0
        print(f"  {label:>12}: {t.ms_per_step:6.2f} ms/step -> {gbs:5.1f} GB/s implied "
              f"({100 * gbs / read_gbs:3.0f}% of measured read), {t.ms_per_step / floor_ms:.1f}x the fp32 floor")
    if name == "base" and batch == 1:
        refs = ", ".join(f"{k} ~{v:.0f} ms" for k, v in REFERENCE_STEP_MS.items())
        verdict = "met" if ours.ms_per_step <= TARGET_BASE_STEP_MS else "not met"
        print(f"  target: <= {TARGET_BASE_STEP_MS:.0f} ms per base step ({refs} in the issue): "
              f"{ours.ms_per_step:.2f} ms, {verdict}")


def bench_model(name: str, rows: list[dict], batch: int, bandwidth: tuple[float, float]) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    ours = load_model(name, device="cpu", dtype=torch.float32)
    plain = load_model(name, device="cpu", dtype=torch.float32, prepack=False)
    fp32_blocks = load_model(name, device="cpu", dtype=torch.float32, prepack=False)
    prepack_linears(fp32_blocks.network, half_weights=False)
    hf = transformers.WhisperForConditionalGeneration.from_pretrained(ours.folder, dtype=torch.float32).eval()
    # The converted folder has no preprocessor_config.json; the defaults are Whisper's front end.
    feature_extractor = transformers.WhisperFeatureExtractor(feature_size=ours.dims.n_mels)
    language = "en" if ours.multilingual else None
    eot = ours.tokenizer.eot

    screen = ours.network.decoder.screened_head

    def run_all(clips: list[np.ndarray], runs: dict[str, Timings]) -> None:
        # Interleaved per batch, so load from other users of the machine hits all alike.
        run_ours(ours, clips, language, runs["ours"])
        ours.network.decoder.screened_head = None
        run_ours(ours, clips, language, runs["no screen"])
        ours.network.decoder.screened_head = screen
        run_ours(fp32_blocks, clips, language, runs["fp32 blocks"])
        run_ours(plain, clips, language, runs["plain"])
        run_transformers(hf, feature_extractor, clips, language, eot, runs["transformers"])

    samples = [audio.load_audio(r["path"]) for r in rows]
    with torch.inference_mode():
        run_all(samples[:batch], {k: Timings() for k in ("ours", "no screen", "fp32 blocks", "plain", "transformers")})  # warm-up
        runs = {k: Timings() for k in ("ours", "no screen", "fp32 blocks", "plain", "transformers")}
        for start in range(0, len(samples), batch):
            run_all(samples[start:start + batch], runs)
    report(name, ours, runs, len(samples), batch, bandwidth)


def load_average() -> str:
    """1-, 5- and 15-minute load averages: on a shared box, the context the times need."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["base"])
    parser.add_argument("--folder", default="dev")
    parser.add_argument("--limit", type=int, default=None, help="only the first N clips")
    parser.add_argument("--batch", type=int, default=1, help="clips per decode call on both sides")
    args = parser.parse_args()
    rows = read_manifest(args.folder)[:args.limit]
    with torch.inference_mode():
        bandwidth = measure_bandwidth()
    print(f"greedy decoding on ../shared/audio/{args.folder}, specwhisper vs transformers, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {load_average()} at the start")
    for name in args.models:
        bench_model(name, rows, args.batch, bandwidth)
    print(f"\nload average {load_average()} at the end: this run adds about {torch.get_num_threads()}; "
          "more means others shared the CPUs and the times above are noise")


if __name__ == "__main__":
    main()
