"""Long-form transcription: greedy vs speculative with the distilled draft, same process, same weights.

    python benchmarks/bench_distilled.py [--main base] [--draft auto|FOLDER ...] [--folder long] [--repeats 1]
                                         [--no-faster-whisper] [--threads N] [--oracle]

The recordings of ../shared/audio/long (two LJ Speech chapters, ~4 min each) were never trained
on (the shipped draft learned from ../shared/audio/dev + multilingual). Each file is transcribed
whole by `model.transcribe` (30-s windows advanced by seek, prompted with the text so far,
timestamps on, temperature 0 only: no sampled fallbacks, so the transcripts must be identical),
greedily and speculatively, alternating file by file so background load hits both alike.
faster-whisper (CTranslate2 fp32 on the same base weights: the offline package's model.bin),
if importable, transcribes the same files with matched settings (beam 1, temperature 0, previous
text, timestamps, no VAD).

Printed per method: wall time (audio loading excluded, log-mel and encoder included), the ratio
to our greedy, the encoder's share, and for speculative: acceptance (accepted / drafted), mean
tokens per main-model pass, mean γ, draft ms per drafted token, verify ms per pass, the
acceptance histogram, and whether the transcripts equal greedy's. Several drafts (`--draft A B`) are
compared in the same run, each file decoded by greedy and then by each draft in turn; the
analysis below the table is the first draft's. `--oracle` adds a drafter that replays each file's
greedy tokens and runs no model (oracle.py): the ceiling of drafting in this loop. Then the napkin math: the
bytes a draft step and a main step read, and the speedup the measured acceptance and costs
predict for the decoder (E[tokens per round] / cost of a round, with the γ the controller chose).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from common import print_table, read_manifest
from oracle import GreedyRecorder, OracleDrafter
from specwhisper import audio, load_model
from specwhisper.assistants import make_assistant, resolve_auto_assistant
from specwhisper.decoding import DecodeStats
from specwhisper.draft import ShortlistHead
from specwhisper.draft_files import load_draft
from specwhisper.prepack import Int8Linear, PackedLinear
from specwhisper.weights.resolve import cache_dir

BYTES_FP32 = 4
ORACLE = "oracle draft"  # knows greedy's tokens, runs no model: the ceiling of drafting (oracle.py)


def faster_whisper_folder(name: str) -> Path | None:
    """A CTranslate2 model folder for the offline package of `name`: its model.bin parts joined once."""
    from specwhisper.weights.registry import OFFLINE_PACKAGES
    from specwhisper.weights.resolve import package_file

    package = OFFLINE_PACKAGES.get(name)
    if package is None:
        return None
    parts = [package_file(module, relative) for module, relative in package.model_bin_parts]
    if any(p is None for p in parts):
        return None
    out = cache_dir() / "ctranslate2" / name
    model_bin = out / "model.bin"
    if not model_bin.is_file() or model_bin.stat().st_size != sum(p.stat().st_size for p in parts):
        out.mkdir(parents=True, exist_ok=True)
        with open(model_bin.with_suffix(".tmp"), "wb") as f:
            for part in parts:
                f.write(part.read_bytes())
        model_bin.with_suffix(".tmp").replace(model_bin)
        for extra in ("config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json", "preprocessor_config.json"):
            source = parts[0].parent / extra
            if source.is_file():
                (out / extra).write_bytes(source.read_bytes())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--main", default="base")
    parser.add_argument("--draft", nargs="+", default=["auto"],
                        help="'auto' (the draft found for the main model) or draft folders, compared in one run")
    parser.add_argument("--folder", default="long")
    parser.add_argument("--files", nargs="*", default=None,
                        help="only these files of the folder (e.g. a draft's held-out validation clips)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch (and CTranslate2) threads")
    parser.add_argument("--no-faster-whisper", action="store_true")
    parser.add_argument("--oracle", action="store_true",
                        help="also decode with a draft that knows greedy's tokens and runs no model (oracle.py): "
                             "the most any draft can gain here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    warnings.simplefilter("error")  # a silent fallback to greedy would make the table meaningless

    model = load_model(args.main, device="cpu", dtype="float32")
    assistants = {}  # row label -> assistant
    for choice in args.draft:
        if choice == "auto":
            assistant = resolve_auto_assistant(model)
            if assistant is None:
                raise SystemExit(f"no distilled draft found for {args.main}; pass --draft FOLDER")
        else:
            assistant = make_assistant(model, load_draft(model, Path(choice)))
        label = "specwhisper + draft" if len(args.draft) == 1 else f"+ draft {len(assistants) + 1}"
        assistants[label] = assistant
    rows = [r for r in read_manifest(args.folder) if args.files is None or r["file"] in args.files]
    samples = {r["file"]: audio.load_audio(r["path"]) for r in rows}
    audio_seconds = sum(len(s) for s in samples.values()) / audio.SAMPLE_RATE
    load_start = os.getloadavg()
    print(f"main {args.main} | {len(rows)} files, {audio_seconds:.0f} s of ../shared/audio/{args.folder} | "
          f"{torch.get_num_threads()} threads | load average {load_start[0]:.2f}")
    for label, assistant in assistants.items():
        draft = assistant.model
        print(f"{label}: {draft.folder} ({assistant.kind}, {draft.dims.n_text_layer} layers, "
              f"{type(draft.network.decoder.output_projection).__name__})")

    options = dict(language="en", temperature=0.0)
    model.transcribe(next(iter(samples.values()))[:audio.SAMPLE_RATE * 5], **options)  # warm-up

    methods = {"greedy": None, **assistants}
    if args.oracle:
        methods[ORACLE] = None  # made per file from that file's greedy run, below
    results: dict[str, dict] = {m: {} for m in methods}
    seconds = {m: 0.0 for m in methods}
    stats = {m: DecodeStats() for m in methods}
    for _ in range(args.repeats):
        for name, samples_ in samples.items():
            if args.oracle:  # greedy's tokens for this file, recorded in an untimed run
                recorder = GreedyRecorder()
                model.transcribe(samples_, assistant=recorder, **options)
                methods[ORACLE] = OracleDrafter(recorder.sequences, model.tokenizer.eot)
            for method, helper in methods.items():
                started = time.perf_counter()
                result = model.transcribe(samples_, assistant=helper, **options)
                seconds[method] += time.perf_counter() - started
                results[method][name] = result
                stats[method].add(result.stats)

    fw_seconds, fw_texts = None, None
    if not args.no_faster_whisper:
        fw_seconds, fw_texts = run_faster_whisper(args, samples)

    g = stats["greedy"]
    table = [["specwhisper greedy", seconds["greedy"], "1.00x", f"{100 * g.encoder_seconds / seconds['greedy']:.0f}%",
              "", "1.00", "", f"{1e3 * g.decode_seconds / max(g.main_passes, 1):.1f} (step)", "", "reference"]]
    for label in methods:
        if label == "greedy":
            continue
        s = stats[label]
        identical = sum(results["greedy"][n].tokens == results[label][n].tokens for n in samples)
        rounds = len(s.accepted_per_round)
        table.append([label, seconds[label], f"{seconds['greedy'] / seconds[label]:.2f}x",
                      f"{100 * s.encoder_seconds / seconds[label]:.0f}%", f"{100 * s.acceptance_rate:.1f}%",
                      f"{s.tokens_per_main_pass:.2f}", f"{s.drafted / max(rounds, 1):.1f}",
                      f"{1e3 * s.verify_seconds / max(s.main_passes, 1):.1f} (verify)",
                      f"{1e3 * s.draft_seconds / max(s.drafted, 1):.2f}", f"{identical}/{len(samples)} identical"])
    first = next(iter(assistants))
    s, draft = stats[first], assistants[first].model
    if fw_seconds is not None:
        same_text = sum(fw_texts[n].strip() == results["greedy"][n].text.strip() for n in samples)
        table.append(["faster-whisper fp32", fw_seconds, f"{seconds['greedy'] / fw_seconds:.2f}x", "", "", "", "",
                      "", "", f"{same_text}/{len(samples)} same text"])
    print_table(["method", "wall s", "vs greedy", "encoder", "accepted", "tokens/pass", "mean γ",
                 "main ms/pass", "draft ms/token", "transcripts"], table)
    if fw_seconds is not None:
        for label in assistants:
            print(f"{label.removeprefix('specwhisper ')} vs faster-whisper fp32: {fw_seconds / seconds[label]:.2f}x "
                  f"faster (target 1.5x)")
        print(f"greedy vs faster-whisper: {fw_seconds / seconds['greedy']:.2f}x")
    decode = {m: stats[m].prefill_seconds + stats[m].decode_seconds + stats[m].draft_seconds + stats[m].verify_seconds
              for m in stats}
    for label in (m for m in methods if m != "greedy"):
        print(f"decoder only (prompt + steps, no encoder/log-mel), {label.removeprefix('specwhisper ')}: greedy "
              f"{decode['greedy']:.1f} s, speculative {decode[label]:.1f} s: "
              f"{decode['greedy'] / max(decode[label], 1e-9):.2f}x; encoder {g.encoder_seconds:.1f} s / "
              f"{stats[label].encoder_seconds:.1f} s; α {stats[label].position_acceptance:.2f} per position")
    if args.oracle:
        o = stats[ORACLE]
        print(f"ceiling: the oracle draft (every draft accepted: {o.accepted}/{o.drafted}; no model run) is "
              f"{seconds['greedy'] / seconds[ORACLE]:.2f}x greedy overall; no draft can do better in this loop on "
              f"this machine (the issue's target: 2.0x)")
    if len(assistants) > 1 or args.oracle:
        print(f"the rest is about {first}:")
    print(f"accepted per round (drafts accepted: rounds): {s.acceptance_histogram()}; per-position acceptance "
          f"α {s.position_acceptance:.2f}")
    print(f"tokens: greedy {g.generated_tokens}, speculative {s.generated_tokens}; main passes "
          f"{g.main_passes} -> {s.main_passes}")
    napkin(model, draft, g, s)
    if s.main_passes:
        feasibility(model, next(iter(samples.values())), seconds, g, s, fw_seconds)
    load_end = os.getloadavg()
    print(f"load average: {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end "
          f"({os.cpu_count()} CPUs; other processes share them)")


def weight_bytes(module) -> int:
    """Bytes of the matrices a pass streams (plain, prepacked or int8 linears; LayerNorms and biases are noise)."""
    total = 0
    for name, m in module.named_modules():
        if name.endswith(("cross_attn.key", "cross_attn.value")):  # run once per window, not per step
            continue
        if isinstance(m, Int8Linear):
            total += m.in_features * m.out_features
        elif isinstance(m, PackedLinear):
            total += m.in_features * m.out_features * BYTES_FP32
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * BYTES_FP32
    return total


def napkin(model, draft, g: DecodeStats, s: DecodeStats) -> None:
    """Bytes per step, and the decoder speedup the measured acceptance and costs predict."""
    embedding_bytes = model.network.decoder.token_embedding.weight.numel() * BYTES_FP32
    # Per step a decoder streams its blocks and its output projection (in fp16 through the screen).
    screened = model.network.decoder.screened_head is not None
    main_bytes = weight_bytes(model.network.decoder.blocks) + embedding_bytes // (2 if screened else 1)
    decoder = draft.network.decoder
    head = decoder.output_projection
    # Blocks, the feature fusion (if any) and the head, each counted once.
    draft_bytes = weight_bytes(decoder.blocks) + (weight_bytes(decoder.fuse) if decoder.reads_features else 0)
    if head is None or head is model.network.decoder.output_projection:
        draft_bytes += embedding_bytes
    elif isinstance(head, ShortlistHead) and head.packed is None:  # its rows are a buffer, not a linear
        draft_bytes += head.rows.numel() * BYTES_FP32
    else:
        draft_bytes += weight_bytes(head)
    step = g.decode_seconds / max(g.main_passes, 1)
    draft_token = s.draft_seconds / max(s.drafted, 1)
    verify = s.verify_seconds / max(s.main_passes, 1)
    print(f"napkin: a main step reads {main_bytes / 2**20:.0f} MB of weights, a draft step {draft_bytes / 2**20:.0f} MB "
          f"({100 * draft_bytes / main_bytes:.0f}%); measured: draft token {1e3 * draft_token:.1f} ms = "
          f"{100 * draft_token / step:.0f}% of a greedy step ({1e3 * step:.1f} ms), verify pass "
          f"{1e3 * verify:.1f} ms = {verify / step:.2f} steps")
    if s.main_passes:
        predicted = s.tokens_per_main_pass * step / (verify + draft_token * s.drafted / s.main_passes)
        print(f"predicted decoder speedup from these: {s.tokens_per_main_pass:.2f} tokens per pass x "
              f"{1e3 * step:.1f} ms / ({1e3 * verify:.1f} ms verify + {s.drafted / s.main_passes:.1f} drafts x "
              f"{1e3 * draft_token:.1f} ms) = {predicted:.2f}x")


def verify_costs(model, samples, max_positions: int = 8, repeats: int = 12) -> tuple[float, float]:
    """(fixed, per extra position) seconds of a main-model verify pass on a real window: the decoder
    over T positions plus the logits verification reads, fitted by least squares over T = 1..max,
    with the sizes interleaved so that background load hits each alike."""
    from specwhisper.decoding import DecodingOptions, forward_ragged, prefill, step_logits
    from specwhisper.transcription import encode_audio

    network, tokenizer = model.network, model.tokenizer
    audio_kv, _ = encode_audio(model, audio.first_window_mel(samples, model.dims.n_mels)[None])
    cache = network.new_cache(1)
    prompt = tokenizer.sot_sequence("en", "transcribe", timestamps=True)
    prefill(network, audio_kv, [prompt], cache)
    text = tokenizer.encode(" the history of the art of printing")  # any tokens: only the cost is read
    block = (text * max_positions)[:max_positions]
    options = DecodingOptions(temperature=0.0)
    sizes, times = [], []
    for _ in range(repeats):
        for n in range(1, max_positions + 1):
            started = time.perf_counter()
            hidden = forward_ragged(network.decoder, audio_kv, cache, [block[:n]])
            step_logits(network, hidden.reshape(-1, hidden.shape[-1]), options)
            times.append(time.perf_counter() - started)
            sizes.append(n - 1)
            cache.rollback([len(prompt)])
    x, y = torch.tensor(sizes, dtype=torch.float64), torch.tensor(times, dtype=torch.float64)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    return float(y.mean()) - slope * float(x.mean()), slope


def best_rate(alpha: float, draft: float, fixed: float, per_position: float, max_gamma: int = 64) -> tuple[float, int]:
    """Max over γ of expected tokens per second of a round, E[tokens] / (γ·draft + fixed + γ·per_position),
    with E[tokens] = (1 - α^(γ+1)) / (1 - α) (γ+1 at α = 1). Returns (tokens per second, γ)."""
    def expected(g: int) -> float:
        return g + 1.0 if alpha >= 1 else (1 - alpha ** (g + 1)) / (1 - alpha)
    return max((expected(g) / (g * draft + fixed + g * per_position), g) for g in range(max_gamma + 1))


def requirements(target: float, share: float, step: float, alpha: float, draft: float, fixed: float,
                 per_position: float) -> str:
    """For an overall speedup `target`: the per-position acceptance the measured draft cost would need,
    and the draft cost the measured acceptance would need (bisection: both are monotone)."""
    if target * share >= 1:
        return ""
    decoder = (1 - share) / (1 / target - share)

    def reaches(a: float, d: float) -> bool:
        return best_rate(a, d, fixed, per_position)[0] * step >= decoder

    def boundary(ok, bad: float, good: float) -> float:
        """Where `ok` turns true between `bad` (false) and `good` (true)."""
        for _ in range(50):
            middle = (bad + good) / 2
            bad, good = (bad, middle) if ok(middle) else (middle, good)
        return good

    parts = [f"α ≥ {boundary(lambda a: reaches(a, draft), 0.0, 1.0):.2f} at this draft cost"
             if reaches(1.0, draft) else "more than α = 1 gives at this draft cost",
             f"a draft token ≤ {1e3 * boundary(lambda d: reaches(alpha, d), 1.0, 0.0):.2f} ms at this α"
             if reaches(alpha, 0.0) else "more than a free draft gives at this α"]
    return ": " + "; ".join(parts)


def feasibility(model, samples, seconds: dict, g: DecodeStats, s: DecodeStats, fw_seconds: float | None) -> None:
    """What decoder speedup the issue's targets need, and what the measured costs allow.

    The encoder and log-mel run once per window in both methods, so only the decoder can gain:
    overall = 1 / (e + (1 - e) / decoder speedup), with e the encoder's share of greedy's wall time.
    The cost model is the controller's: a round of γ drafts costs γ·draft + verify(γ+1 positions)
    and yields E[tokens] = (1 - α^(γ+1)) / (1 - α), α the per-position acceptance.
    """
    fixed, per_position = verify_costs(model, samples)
    step = g.decode_seconds / max(g.main_passes, 1)  # a greedy step, as the loop measured it
    draft = s.draft_seconds / max(s.drafted, 1)  # a drafted token, its share of the sync pass included
    alpha = s.position_acceptance
    share = 1 - g.decode_seconds / seconds["greedy"]  # encoder, log-mel, prompts, seek bookkeeping

    def needed(overall: float) -> str:
        if overall * share >= 1:
            return "impossible (the part no draft touches alone takes longer)"
        return f"{(1 - share) / (1 / overall - share):.2f}x"

    def overall(decoder_speedup: float) -> float:
        return 1 / (share + (1 - share) / decoder_speedup)

    print(f"feasibility: {100 * share:.0f}% of greedy's wall time is outside the decoder steps; measured greedy "
          f"step {1e3 * step:.2f} ms, verify pass {1e3 * fixed:.2f} ms + {1e3 * per_position:.2f} ms per extra "
          f"position, draft {1e3 * draft:.2f} ms per token, α {alpha:.2f} per position "
          f"({s.accepted} accepted, {s.rejections} rejections)")
    targets = [("2.0x own greedy", 2.0)]
    if fw_seconds is not None:
        targets.append(("1.5x faster than faster-whisper", 1.5 * seconds["greedy"] / fw_seconds))
    for label, target in targets:
        print(f"  {label} = {target:.2f}x over greedy overall: needs the decoder steps {needed(target)} faster"
              + requirements(target, share, step, alpha, draft, fixed, per_position))
    cases = [("perfect drafts (α = 1) at this draft cost", 1.0, draft),
             ("free drafts (zero cost) at this α", alpha, 0.0),
             ("this draft (α and cost as measured)", alpha, draft)]
    for label, a, d in cases:
        rate, gamma = best_rate(a, d, fixed, per_position)
        print(f"  ceiling with {label}: decoder {rate * step:.2f}x (γ = {gamma}), overall {overall(rate * step):.2f}x")


def run_faster_whisper(args, samples: dict) -> tuple[float | None, dict | None]:
    try:
        from faster_whisper import WhisperModel
    except ImportError as err:
        print(f"faster-whisper not importable ({err}); skipping it (pip install faster-whisper)", file=sys.stderr)
        return None, None
    folder = faster_whisper_folder(args.main)
    if folder is None:
        print(f"no offline CTranslate2 package for {args.main}; skipping faster-whisper", file=sys.stderr)
        return None, None
    fw = WhisperModel(str(folder), device="cpu", compute_type="float32", cpu_threads=torch.get_num_threads())
    settings = dict(language="en", beam_size=1, best_of=1, temperature=0.0, condition_on_previous_text=True,
                    without_timestamps=False, vad_filter=False, word_timestamps=False)
    list(fw.transcribe(next(iter(samples.values()))[:audio.SAMPLE_RATE * 5], **settings)[0])  # warm-up
    seconds, texts = 0.0, {}
    for _ in range(args.repeats):
        for name, samples_ in samples.items():
            started = time.perf_counter()
            segments, _ = fw.transcribe(samples_, **settings)
            texts[name] = "".join(segment.text for segment in segments)
            seconds += time.perf_counter() - started
    return seconds, texts


if __name__ == "__main__":
    main()
