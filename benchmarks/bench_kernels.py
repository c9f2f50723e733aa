"""Time the Triton attention kernels against PyTorch SDPA at Whisper's shapes.

    python benchmarks/bench_kernels.py [--kernel decode|cross|encoder|all]

Per kernel and shape it prints the time (triton.testing.do_bench, median ms),
what that achieves against the bound the kernel chases, and the speedup over
the SDPA path that `specwhisper.attention` uses with backend "torch", measured in
the same run:

- decode and cross attention are bandwidth-bound: GB/s counts the bytes that
  must move (the valid K/V rows, Q read and O written, fp16), against the
  device's peak DRAM bandwidth where torch reports it. The unsplit kernel
  (`1 split`) is timed too, so the flash-decoding heuristic can be checked.
- encoder attention is MMA-bound: TFLOP/s counts 4 * S^2 * D per (row, head)
  (two matmuls of 2 * S^2 * D each; softmax not counted).

Each kernel is checked against its reference before it is timed (as llm.c's
dev/cuda does). Without CUDA the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import sys

import torch

DEVICE = "cuda"  # a name, not a literal, so a CPU smoke run under the interpreter can swap it
HEAD_DIM = 64  # every Whisper size
S_MAX = 448  # decoder context
S_AUDIO = 1500  # encoder positions
MODELS = {"base": 8, "large": 20}  # name -> attention heads
CACHE_LENGTHS = (64, 224, 447)
NEW_TOKENS = (1, 5, 9)
BATCHES = (1, 4)


def peak_bandwidth_gbs() -> float | None:
    """DRAM peak from the device's memory clock and bus width, if torch exposes them."""
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate


def bench_ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100)


def check(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(out.float(), ref.float(), atol=4e-3, rtol=4e-3, msg=lambda m: f"{what}: {m}")


def bench_decode(peak: float | None) -> None:
    from specwhisper import attention
    from specwhisper.kernels.decode_attention import (
        decode_attention, decode_attention_reference, num_splits_for, BLOCK_T)

    print("\n## decode / verify self-attention (KV cache of 448 slots, fp16)")
    print(f"{'model':>6} {'B':>2} {'cache':>5} {'T':>2} {'splits':>6} {'triton ms':>9} {'GB/s':>7} "
          f"{'%peak':>5} {'1 split ms':>10} {'sdpa ms':>8} {'speedup':>7}")
    for model, heads in MODELS.items():
        for batch in BATCHES:
            for cache_len in CACHE_LENGTHS:
                for n_new in NEW_TOKENS:
                    start = min(cache_len, S_MAX - n_new)
                    n_keys = start + n_new
                    q = torch.randn(batch, heads, n_new, HEAD_DIM, device=DEVICE, dtype=torch.float16)
                    k = torch.randn(batch, heads, S_MAX, HEAD_DIM, device=DEVICE, dtype=torch.float16)
                    v = torch.randn_like(k)
                    q_start = torch.full((batch,), start, device=DEVICE, dtype=torch.long)
                    check(decode_attention(q, k, v, q_start, key_bound=n_keys),
                          decode_attention_reference(q, k, v, q_start), f"decode {model} B{batch} L{start} T{n_new}")
                    splits = num_splits_for(batch * heads * -(-n_new // BLOCK_T), n_keys, q.device)
                    t_kernel = bench_ms(lambda: decode_attention(q, k, v, q_start, key_bound=n_keys))
                    t_unsplit = bench_ms(lambda: decode_attention(q, k, v, q_start, key_bound=n_keys, num_splits=1))
                    with attention.use_attention_backend("torch"):
                        t_sdpa = bench_ms(lambda: attention.self_attention(q, k, v, q_start, start))
                    n_bytes = 2 * batch * heads * (n_keys + n_new) * HEAD_DIM * 2  # K+V rows, Q+O, fp16
                    gbs = n_bytes / t_kernel / 1e6
                    pct = f"{100 * gbs / peak:5.1f}" if peak else "    -"
                    print(f"{model:>6} {batch:>2} {start:>5} {n_new:>2} {splits:>6} {t_kernel:9.4f} {gbs:7.1f} "
                          f"{pct} {t_unsplit:10.4f} {t_sdpa:8.4f} {t_sdpa / t_kernel:6.2f}x")


def bench_cross(peak: float | None) -> None:
    from specwhisper import attention
    from specwhisper.kernels.cross_attention import cross_attention, cross_attention_reference
    from specwhisper.kernels.decode_attention import num_splits_for, BLOCK_T

    print("\n## cross-attention (1500 encoder keys, fp16)")
    print(f"{'model':>6} {'B':>2} {'T':>2} {'splits':>6} {'triton ms':>9} {'GB/s':>7} {'%peak':>5} "
          f"{'1 split ms':>10} {'sdpa ms':>8} {'speedup':>7}")
    for model, heads in MODELS.items():
        for batch in BATCHES:
            for n_new in NEW_TOKENS:
                q = torch.randn(batch, heads, n_new, HEAD_DIM, device=DEVICE, dtype=torch.float16)
                k = torch.randn(batch, heads, S_AUDIO, HEAD_DIM, device=DEVICE, dtype=torch.float16)
                v = torch.randn_like(k)
                check(cross_attention(q, k, v), cross_attention_reference(q, k, v), f"cross {model} B{batch} T{n_new}")
                splits = num_splits_for(batch * heads * -(-n_new // BLOCK_T), S_AUDIO, q.device)
                t_kernel = bench_ms(lambda: cross_attention(q, k, v))
                t_unsplit = bench_ms(lambda: cross_attention(q, k, v, num_splits=1))
                with attention.use_attention_backend("torch"):
                    t_sdpa = bench_ms(lambda: attention.cross_attention(q, k, v))
                n_bytes = 2 * batch * heads * (S_AUDIO + n_new) * HEAD_DIM * 2
                gbs = n_bytes / t_kernel / 1e6
                pct = f"{100 * gbs / peak:5.1f}" if peak else "    -"
                print(f"{model:>6} {batch:>2} {n_new:>2} {splits:>6} {t_kernel:9.4f} {gbs:7.1f} {pct} "
                      f"{t_unsplit:10.4f} {t_sdpa:8.4f} {t_sdpa / t_kernel:6.2f}x")


def bench_encoder() -> None:
    from specwhisper import attention
    from specwhisper.kernels.encoder_attention import encoder_attention, encoder_attention_reference

    print("\n## encoder self-attention (1500 x 1500, fp16)")
    print(f"{'model':>6} {'B':>2} {'triton ms':>9} {'TFLOP/s':>8} {'sdpa ms':>8} {'sdpa TFLOP/s':>12} {'speedup':>7}")
    for model, heads in MODELS.items():
        for batch in BATCHES:
            q, k, v = (torch.randn(batch, heads, S_AUDIO, HEAD_DIM, device=DEVICE, dtype=torch.float16)
                       for _ in range(3))
            check(encoder_attention(q, k, v), encoder_attention_reference(q, k, v), f"encoder {model} B{batch}")
            t_kernel = bench_ms(lambda: encoder_attention(q, k, v))
            with attention.use_attention_backend("torch"):
                t_sdpa = bench_ms(lambda: attention.encoder_attention(q, k, v))
            flops = 4 * batch * heads * S_AUDIO * S_AUDIO * HEAD_DIM
            print(f"{model:>6} {batch:>2} {t_kernel:9.4f} {flops / t_kernel / 1e9:8.1f} {t_sdpa:8.4f} "
                  f"{flops / t_sdpa / 1e9:12.1f} {t_sdpa / t_kernel:6.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernel", choices=("decode", "cross", "encoder", "all"), default="all")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device; the kernels are only benchmarked on a GPU "
              "(their correctness tests run on the CPU: pytest tests/test_kernels.py).")
        return 0
    import triton

    from specwhisper import attention

    props = torch.cuda.get_device_properties(0)
    peak = peak_bandwidth_gbs()
    print(f"device: {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs), "
          f"torch {torch.__version__}, triton {triton.__version__}, "
          f"peak DRAM {f'{peak:.0f} GB/s' if peak else 'unknown'}")
    for kind in attention.ATTENTION_KINDS:
        reason = attention.triton_unavailable_reason(kind, "cuda")
        print(f"  'auto' for {kind}: {'triton' if reason is None else 'torch (' + reason + ')'}")
    if args.kernel in ("decode", "all"):
        bench_decode(peak)
    if args.kernel in ("cross", "all"):
        bench_cross(peak)
    if args.kernel in ("encoder", "all"):
        bench_encoder()
    return 0


if __name__ == "__main__":
    sys.exit(main())
