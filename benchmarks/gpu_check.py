"""The GPU path, checked and timed in one run: what to run first on a machine with a GPU.

Random weights at real shapes (base and large-v2 decoders; no network, no weight files), a stub
tokenizer, sized for 5 minutes on one GPU. Prints, section by section:

  versions      python, torch, triton, the device, its SMs and compute capability
  kernels       the Triton attention kernels against their fp32 references (max abs error)
  bits          row i of an M-row product against the 1-row product (the everyday path's premise,
                which cuBLAS may break) and against row 0 at the same M (the fixed-shape premise),
                per op; per model, a verify pass against one pass per token, everyday and fixed-shape
  greedy against speculative
                tokens of fixed-shape greedy decoding against fixed-shape speculative decoding with
                the main model as its own draft and with its first 2 layers as the draft
  timings       a fixed-shape main pass at 1-16 rows, a draft step, ops (launches) and host reads
                (syncs) per token, graphs on and off

`--device cpu` runs the same at small shapes (the kernels under Triton's interpreter): how CI and
reviewers exercise it. A line with FAIL means a premise the GPU path stands on does not hold here;
the exit status is then 1.

    python benchmarks/gpu_check.py                 # CUDA, base and large-v2 shapes
    python benchmarks/gpu_check.py --device cpu    # small shapes, a minute or two
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def import_from_checkout() -> None:
    """Let the script run from a plain checkout where the package is not installed (a bare GPU machine
    with torch, numpy, tiktoken and regex): the repository on sys.path, and its top-level `kernels/`
    and `weights/` under the names the package installs them as."""
    if importlib.util.find_spec("specwhisper") is not None and importlib.util.find_spec("specwhisper.kernels"):
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import specwhisper
    for name in ("kernels", "weights"):
        module = importlib.import_module(name)
        sys.modules[f"specwhisper.{name}"] = module
        setattr(specwhisper, name, module)


import_from_checkout()

from common import print_table
from specwhisper.decoding import (DecodeStats, DecodingOptions, LogitRules, WindowBatch, autoregressive_decode,
                                  synchronize)
from specwhisper.device_rules import DeviceRules, row_summary
from specwhisper.fixed_shape import block_and_steps, first_layers, fixed_shape_decode
from specwhisper.host_reads import count_host_reads
from specwhisper.model import ModelDims, TextDecoder

SHAPES = {
    # name: (n_text_state, n_text_head, n_text_layer), Whisper's decoders
    "base": (512, 8, 6),
    "large-v2": (1280, 20, 32),
    "small-cpu": (128, 2, 4),  # --device cpu: head_dim 64 as everywhere, a fraction of the work
}
N_VOCAB = 51865  # multilingual
FAILURES: list[str] = []


def verdict(ok: bool, what: str) -> str:
    if not ok:
        FAILURES.append(what)
    return "ok" if ok else "FAIL"


def median_ms(fn, device: torch.device, repeat: int) -> float:
    fn()  # warm: compiles, caches
    times = []
    for _ in range(repeat):
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


class CountOps(TorchDispatchMode):
    """ATen ops run inside the block: on a GPU about one kernel launch each."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------- random models, stub tokenizer

def stub_tokenizer() -> SimpleNamespace:
    """The multilingual vocabulary's special ids: all that decoding reads of a tokenizer."""
    return SimpleNamespace(eot=50257, sot=50258, sot_prev=50361, no_speech=50362, no_timestamps=50363,
                           timestamp_begin=50364, multilingual=True)


def random_decoder(shape: str, device: torch.device, dtype: torch.dtype, n_layers: int | None = None) -> TextDecoder:
    width, heads, layers = SHAPES[shape]
    dims = ModelDims(n_mels=80, n_audio_ctx=1500, n_audio_state=width, n_audio_head=heads, n_audio_layer=0,
                     n_vocab=N_VOCAB, n_text_ctx=448, n_text_state=width, n_text_head=heads,
                     n_text_layer=n_layers or layers)
    torch.manual_seed(0)
    with torch.device(device):
        decoder = TextDecoder(dims)
    with torch.no_grad():
        for name, parameter in decoder.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
            elif parameter.dim() == 1:  # LayerNorm scales
                parameter.fill_(1.0)
            else:
                parameter.normal_(0, 0.02 if "embedding" in name else width ** -0.5)
    decoder.dims = dims
    return decoder.to(dtype).eval()


def random_window(decoder: TextDecoder, batch: int, max_new_tokens: int) -> WindowBatch:
    dims, device, dtype = decoder.dims, decoder.token_embedding.weight.device, decoder.token_embedding.weight.dtype
    generator = torch.Generator(device).manual_seed(1)
    features = torch.randn(batch, dims.n_audio_ctx, dims.n_audio_state, device=device, generator=generator).to(dtype)
    options = DecodingOptions(language="en", timestamps=True, max_new_tokens=max_new_tokens)
    tokenizer = stub_tokenizer()
    rules = LogitRules(tokenizer, list(range(50259, 50358)), [220, tokenizer.eot], options, dims.n_vocab)
    prompts = [[tokenizer.sot, 50259, 50359] for _ in range(batch)]  # <|startoftranscript|> <|en|> <|transcribe|>
    return WindowBatch(None, features, decoder.audio_kv(features), prompts, ["en"] * batch, rules, options)


def as_model(decoder: TextDecoder) -> SimpleNamespace:
    """What decoding reads of a Whisper model, without an encoder."""
    from specwhisper.model import new_decoder_cache
    return SimpleNamespace(decoder=decoder, dims=decoder.dims, new_cache=lambda batch, max_len=None: new_decoder_cache(
        decoder.dims, decoder.token_embedding.weight, batch, max_len))


# ----------------------------------------------------------------------------- sections

def section_versions(device: torch.device) -> None:
    print("\n## versions")
    try:
        import triton
        triton_version = triton.__version__
    except Exception as err:  # noqa: BLE001 - reported, not raised
        triton_version = f"not importable ({type(err).__name__})"
    rows = [["python", platform.python_version()], ["torch", torch.__version__], ["triton", triton_version],
            ["TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0")]]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rows += [["device", props.name], ["SMs", props.multi_processor_count],
                 ["capability", f"{props.major}.{props.minor}"], ["CUDA", torch.version.cuda],
                 ["memory GiB", round(props.total_memory / 2**30, 1)]]
    else:
        rows += [["device", f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"]]
    print_table(["what", "value"], rows)


def section_kernels(device: torch.device, dtype: torch.dtype, heads: int) -> None:
    print("\n## kernels against their references")
    try:
        from specwhisper.kernels import cross_attention, decode_attention, encoder_attention
    except Exception as err:  # noqa: BLE001
        print(f"skipped: triton kernels not importable ({type(err).__name__}: {err})")
        return
    generator = torch.Generator(device).manual_seed(2)

    def rand(*shape):
        return torch.randn(*shape, device=device, generator=generator).to(dtype)

    keys = 1500 if device.type == "cuda" else 96
    q_start = torch.tensor([5, 40], device=device)
    cases = [
        ("decode (T=1)", lambda q, k, v: decode_attention.decode_attention(q, k, v, q_start),
         lambda q, k, v: decode_attention.decode_attention_reference(q, k, v, q_start), (2, heads, 1, 64), 448),
        ("verify (T=8)", lambda q, k, v: decode_attention.decode_attention(q, k, v, q_start),
         lambda q, k, v: decode_attention.decode_attention_reference(q, k, v, q_start), (2, heads, 8, 64), 448),
        ("cross (T=8)", cross_attention.cross_attention, cross_attention.cross_attention_reference,
         (2, heads, 8, 64), keys),
        ("encoder", encoder_attention.encoder_attention, encoder_attention.encoder_attention_reference,
         (1, heads, keys, 64), keys),
    ]
    rows = []
    for name, kernel, reference, q_shape, n_keys in cases:
        q, k, v = rand(*q_shape), rand(q_shape[0], heads, n_keys, 64), rand(q_shape[0], heads, n_keys, 64)
        error = (kernel(q, k, v).float() - reference(q, k, v).float()).abs().max().item()
        tolerance = 2e-2 if dtype == torch.float16 else 1e-4
        rows.append([name, f"{error:.2e}", f"{tolerance:.0e}", verdict(error <= tolerance, f"kernel {name}")])
    print_table(["kernel", "max |err|", "tolerance", ""], rows)


def section_bits(decoders: dict[str, TextDecoder], device: torch.device, dtype: torch.dtype) -> None:
    print("\n## bits")
    print("per op, inputs of M rows: row i against the same row alone (M=1: the everyday path needs it) and "
          "against row 0 at the same M (fixed shapes need it)")
    rows = []
    width = next(iter(decoders.values())).dims.n_text_state
    generator = torch.Generator(device).manual_seed(3)
    linear = torch.nn.Linear(width, 4 * width, device=device, dtype=dtype)
    norm = torch.nn.LayerNorm(width, device=device, dtype=dtype)
    ops = {"linear (addmm)": linear, "linear, no bias (mm)": lambda x: x @ linear.weight.T, "layernorm": norm}
    with torch.inference_mode():
        for name, op in ops.items():
            for m in (2, 4, 8, 16):
                x = torch.randn(1, width, device=device, generator=generator).to(dtype).expand(m, width).contiguous()
                out = op(x)
                alone = op(x[:1])
                same_as_alone = all(torch.equal(out[i], alone[0]) for i in range(m))
                same_as_row0 = all(torch.equal(out[i], out[0]) for i in range(m))
                rows.append([name, m, "equal" if same_as_alone else "differ",
                             verdict(same_as_row0, f"{name} rows at M={m}")])
    print_table(["op", "M", "row i vs alone", "row i vs row 0 (fixed M)"], rows)

    print("\nper model: a block of 7 tokens in one pass against 7 one-token passes, hidden states after the decoder")
    rows = []
    for shape, decoder in decoders.items():
        window = random_window(decoder, batch=2, max_new_tokens=8)
        prompts = [window.prompts[0], [50361, 400, 401, 402] + window.prompts[1]]  # rows start apart
        block = [50364, 400, 1000, 2000, 3000, 50370, 11]
        with torch.inference_mode():
            together, steps = block_and_steps(decoder, window.audio_kv, prompts, block)
            fixed_ok = torch.equal(together, steps)
            everyday_together, everyday_steps = everyday_block_and_steps(decoder, window, prompts, block)
        rows.append([shape, "everyday", "equal" if torch.equal(everyday_together, everyday_steps) else
                     f"differ ({(everyday_together - everyday_steps).abs().max().item():.1e})", ""])
        rows.append([shape, "fixed shapes", "equal" if fixed_ok else
                     f"differ ({(together - steps).abs().max().item():.1e})", verdict(fixed_ok, f"{shape} fixed bits")])
    print_table(["model", "passes", "verify pass vs steps", ""], rows)


def everyday_block_and_steps(decoder: TextDecoder, window: WindowBatch, prompts, block):
    """The everyday (varying-shape) KVCache path's block and steps; on the CPU it is exact by computing
    positions alone, on a GPU by nothing."""
    from specwhisper.decoding import forward_ragged
    from specwhisper.model import new_decoder_cache
    cache = new_decoder_cache(decoder.dims, decoder.token_embedding.weight, len(prompts))
    forward_ragged(decoder, window.audio_kv, cache, prompts)
    lengths = list(cache.lengths)
    tokens = torch.tensor([block] * len(prompts), device=decoder.token_embedding.weight.device)
    together = decoder(tokens, window.audio_kv, cache)
    cache.rollback(lengths)
    steps = torch.cat([decoder(tokens[:, i:i + 1], window.audio_kv, cache) for i in range(len(block))], dim=1)
    return together, steps


def section_tokens(decoders: dict[str, TextDecoder], max_new_tokens: int) -> None:
    print("\n## greedy against speculative (fixed shapes)")
    rows = []
    for shape, decoder in decoders.items():
        window = random_window(decoder, batch=2, max_new_tokens=max_new_tokens)
        model, tokenizer = as_model(decoder), stub_tokenizer()
        with torch.inference_mode():
            greedy = fixed_shape_decode(model, tokenizer, window)
            for draft_name, draft in (("self", decoder), ("2 layers", first_layers(decoder, 2))):
                stats = DecodeStats()
                speculative = fixed_shape_decode(model, tokenizer, window, stats,
                                                 draft=(draft, draft.audio_kv(window.audio_features)), gamma=4)
                same = all(g.tokens == s.tokens for g, s in zip(greedy, speculative))
                rows.append([shape, draft_name, "off", sum(len(g.tokens) for g in greedy),
                             f"{stats.acceptance_rate:.2f}", f"{stats.generated_tokens / stats.main_passes:.2f}",
                             verdict(same, f"{shape} greedy == speculative ({draft_name})")])
            if window.audio_kv.keys[0].is_cuda:  # the same decodes replayed from CUDA graphs
                two_layers = first_layers(decoder, 2)
                replayed = fixed_shape_decode(model, tokenizer, window, use_graphs=True)
                stats = DecodeStats()
                replayed_speculative = fixed_shape_decode(model, tokenizer, window, stats, draft=(
                    two_layers, two_layers.audio_kv(window.audio_features)), gamma=4, use_graphs=True)
                same = all(g.tokens == r.tokens == s.tokens
                           for g, r, s in zip(greedy, replayed, replayed_speculative))
                rows.append([shape, "2 layers", "on", sum(len(r.tokens) for r in replayed),
                             f"{stats.acceptance_rate:.2f}", f"{stats.generated_tokens / stats.main_passes:.2f}",
                             verdict(same, f"{shape} graphs == eager")])
    print_table(["model", "draft", "graphs", "tokens", "accepted", "tokens/pass", "identical tokens"], rows)


def section_timings(decoders: dict[str, TextDecoder], device: torch.device, repeat: int,
                    max_new_tokens: int) -> None:
    from specwhisper.fixed_shape import CapturedStep, FixedDecoder, draft_step
    print("\n## timings")
    graph_modes = [False, True] if device.type == "cuda" else [False]
    rows = []
    for shape, decoder in decoders.items():
        window = random_window(decoder, batch=1, max_new_tokens=8)
        with torch.inference_mode():
            for rows_per_pass in (1, 2, 4, 8, 16):
                fixed = FixedDecoder.allocate(decoder, window.audio_kv, rows_per_pass)
                fixed.prefill(window.prompts)
                start = fixed.cache.lengths.clone()
                fixed.n_new.fill_(rows_per_pass)

                def one_pass(fixed=fixed, start=start):
                    fixed.cache.set_lengths(start)
                    hidden = fixed.run()
                    return decoder.logits(hidden[:, :1])  # greedy needs one row's logits, verification all

                cells = [shape, f"main pass, {rows_per_pass} rows"]
                for graphs in graph_modes:
                    step = CapturedStep(one_pass, graphs, moves=[fixed.cache.lengths])
                    cells.append(median_ms(step, device, repeat))
                rows.append(cells)
            draft = first_layers(decoder, 2)
            fixed = FixedDecoder.allocate(draft, window.audio_kv, 2)
            fixed.prefill(window.prompts)
            start = fixed.cache.lengths.clone()
            rules = DeviceRules(window.rules, N_VOCAB, device)
            summary = torch.tensor([row_summary(window.rules, [50364, 400])], device=device)

            def one_draft_step(fixed=fixed, start=start, rules=rules, summary=summary):
                fixed.cache.set_lengths(start)
                return draft_step(fixed, rules, summary)

            rows.append([shape, "draft step (2 layers)"] + [median_ms(CapturedStep(one_draft_step, graphs, moves=[]), device,
                                                                      repeat) for graphs in graph_modes])
    print_table(["model", "what", "ms"] + (["ms, graphs"] if len(graph_modes) == 2 else []), rows)

    print("\nper token: ATen ops (about one launch each on a GPU) and host reads (a sync each on a GPU)")
    rows = []
    for shape, decoder in decoders.items():
        window = random_window(decoder, batch=1, max_new_tokens=max_new_tokens)
        model, tokenizer = as_model(decoder), stub_tokenizer()
        runs = [("everyday greedy", lambda stats: autoregressive_decode(model, tokenizer, window, stats)),
                ("fixed greedy", lambda stats: fixed_shape_decode(model, tokenizer, window, stats, use_graphs=False)),
                ("fixed speculative, self draft", lambda stats: fixed_shape_decode(
                    model, tokenizer, window, stats, draft=(decoder, window.audio_kv), gamma=4, use_graphs=False))]
        for name, run in runs:
            stats = DecodeStats()
            with torch.inference_mode(), count_host_reads(device) as reads, CountOps() as ops:
                run(stats)
            tokens = stats.generated_tokens
            rows.append([shape, name, tokens, stats.main_passes, f"{ops.ops / tokens:.0f}",
                         f"{sum(reads.values()) / tokens:.2f}", f"{sum(reads.values()) / stats.main_passes:.2f}"])
        for name, draft in (("fixed greedy", None), ("fixed speculative, self draft", decoder)):
            for graphs in graph_modes:
                ms = decode_ms_per_token(lambda stats: fixed_shape_decode(
                    model, tokenizer, window, stats, draft=None if draft is None else (draft, window.audio_kv),
                    gamma=4, use_graphs=graphs), device)
                rows.append([shape, f"{name}{', graphs' if graphs else ''}: ms/token", "", "", "", "", f"{ms:.2f}"])
        ms = decode_ms_per_token(lambda stats: autoregressive_decode(model, tokenizer, window, stats), device)
        rows.append([shape, "everyday greedy: ms/token", "", "", "", "", f"{ms:.2f}"])
    print_table(["model", "path", "tokens", "main passes", "ops/token", "reads/token", "reads/pass or ms"], rows)


def decode_ms_per_token(run, device: torch.device) -> float:
    """One whole decode timed after a first one (which captures the graphs, kept for the next windows)."""
    with torch.inference_mode():
        run(DecodeStats())
        stats = DecodeStats()
        synchronize(device)
        started = time.perf_counter()
        run(stats)
        synchronize(device)
    return (time.perf_counter() - started) * 1000 / stats.generated_tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(SHAPES),
                        help="decoder shapes (default: base large-v2 on cuda, small-cpu on cpu)")
    parser.add_argument("--repeat", type=int, default=None, help="timed repetitions (default 20 cuda, 5 cpu)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per row decoded (default 64 cuda, 24 cpu)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu", file=sys.stderr)
        return 2
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels under the interpreter, before their import
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    shapes = args.models or (["base", "large-v2"] if device.type == "cuda" else ["small-cpu"])
    repeat = args.repeat or (20 if device.type == "cuda" else 5)
    tokens = args.tokens or (64 if device.type == "cuda" else 24)

    section_versions(device)
    decoders = {shape: random_decoder(shape, device, dtype) for shape in shapes}
    section_kernels(device, dtype, SHAPES[shapes[0]][1])
    section_bits(decoders, device, dtype)
    section_tokens(decoders, tokens)
    section_timings(decoders, device, repeat, tokens)
    print(f"\n{len(FAILURES)} failed: {', '.join(FAILURES)}" if FAILURES else "\nall checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
