"""Decode / verify attention: a few new queries against the decoder's KV cache.

Why this kernel exists
----------------------
Every decoder step of every layer runs self-attention for T new tokens
(T = 1 for plain greedy decoding, T = gamma + 1 <= ~16 when verifying drafted
tokens) against a preallocated cache of S_max = 448 slots per (row, head), of
which only the first `q_start[b] + T` hold valid keys. PyTorch spends several
small launches on it (building the mask from q_start, then SDPA; unfused, two
matmuls and a masked softmax with the (T, L) fp32 scores written and reread
between them); at Whisper's sizes each launch moves only a few hundred KB, so
the step is launch-bound rather than bandwidth-bound. This kernel does it in one launch
(two when the key range is split, see below), reads each valid K/V row exactly
once for all T queries of a head, never touches stale slots, and keeps the scores
in registers with an online softmax (fp16 in, fp32 accumulation).

Flash-decoding split: with batch 1 and 8 heads there are only 8 (row, head)
programs, far fewer than a GPU has SMs, and each of them walks the whole key
range alone. When the grid is that under-filled and the key range is long, the
launcher cuts the key range into `num_splits` chunks, each program writes a
normalised partial output and its log-sum-exp, and `_combine_splits` merges them
(no atomics, deterministic). Cross-attention (1500 keys) is where this pays; the
self-attention cache (<= 448 keys) is rarely long enough, see `num_splits_for`.

Layout and semantics are those of `specwhisper.attention.self_attention`: row b's
first new query sits at position q_start[b] and query i sees keys
0 .. q_start[b] + i. The length is read on the device, so the launcher never
synchronises with the host (CUDA-graph friendly) even when rows differ.

sm_75 (T4) notes: fp16 only (Turing has no bf16 tensor cores); the Q tile is
BLOCK_T x HEAD_DIM = 16 x 64 (2 KB in fp16) and the K and V tiles 64 x 64 (8 KB
each), so even with two pipeline stages a program needs about 34 KB of shared
memory, under the 64 KB a Turing block may use. BLOCK_T = 16 because tl.dot needs every
dimension >= 16; with T = 1 most of the Q tile is padding, which costs tensor-core
(or FMA) work that is idle anyway: this kernel is memory-bound.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_T = 16  # new queries per program; tl.dot's minimum M
BLOCK_N = 64  # keys per inner-loop step: a 64 x 64 fp16 K tile is 8 KB
NUM_WARPS = 4
NUM_STAGES = 2  # 2 x (K + V) tiles = 32 KB of shared memory: fits sm_75's 64 KB
# Untuned guess: a split must cover at least this many keys to be worth its
# partial-output round trip and the second launch. bench_kernels.py prints the
# split and unsplit timings side by side so it can be tuned on real hardware.
MIN_KEYS_PER_SPLIT = 256
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FALLBACK_SM_COUNT = 40  # a T4's SM count, used on the CPU interpreter


# ----------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------

def decode_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor,
                               q_start: Tensor) -> Tensor:
    """Plain PyTorch: matmul + mask + softmax + matmul, computed in fp32.

    q: (B, H, T, D); k_cache, v_cache: (B, H, S_max, D); q_start: (B,) int.
    Returns (B, H, T, D) in q's dtype.

    Memory traffic, with L = max(q_start) + T keys and fp16 inputs (2 bytes):
      K, V slices, upcast to fp32       read 2*B*H*L*D*2, write 2*B*H*L*D*4 (+ V's zeroed stale rows)
      scores = q @ k^T                  read K again (fp32), write B*H*T*L*4
      masked_fill, softmax              read + write B*H*T*L*4 twice
      p @ v                             read B*H*T*L*4 and V again (fp32)
    Only the first line's read (4*B*H*L*D bytes, 256 bytes per key per head at
    D = 64) is necessary; the fused kernel does that and nothing else, in one
    launch instead of about eight.
    """
    n_new = q.shape[2]
    n_keys = int(q_start.max()) + n_new
    query_pos = q_start[:, None] + torch.arange(n_new, device=q.device)  # (B, T)
    key_pos = torch.arange(n_keys, device=q.device)  # (L,)
    visible = key_pos[None, None, :] <= query_pos[:, :, None]  # (B, T, L)
    k = k_cache[:, :, :n_keys].float()  # (B, H, L, D)
    # A weight of 0 times a stale inf is NaN: zero the rows no query of the row may see.
    seen_by_row = key_pos[None, :] < (q_start + n_new)[:, None]  # (B, L)
    v = torch.where(seen_by_row[:, None, :, None], v_cache[:, :, :n_keys].float(), 0.0)  # (B, H, L, D)
    scores = q.float() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, L)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))  # (B, H, T, L)
    return (scores.softmax(dim=-1) @ v).to(q.dtype)  # (B, H, T, D)


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------

@triton.jit
def _attend_kv_split(
    Q, K, V, QStart, Out, PartOut, PartLse,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    n_heads, n_new, n_keys_total, keys_per_split, qk_scale,
    CAUSAL: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """One program: BLOCK_T queries of one (row, head) against one key chunk.

    Grid: (B * H, cdiv(T, BLOCK_T), num_splits). CAUSAL reads q_start from
    QStart and applies the cache mask; without it every one of the n_keys_total
    keys is visible (cross-attention). SPLIT writes the chunk's normalised output
    and base-2 log-sum-exp to PartOut / PartLse for `_combine_splits`; otherwise
    the final output goes straight to Out.
    """
    row_head = tl.program_id(0)
    t_block = tl.program_id(1)
    split = tl.program_id(2)
    b = (row_head // n_heads).to(tl.int64)
    h = (row_head % n_heads).to(tl.int64)

    offs_t = t_block * BLOCK_T + tl.arange(0, BLOCK_T)  # query index within the new block
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    t_valid = offs_t < n_new

    if CAUSAL:
        q_start = tl.load(QStart + b).to(tl.int32)
        # Keys visible to this block's last real query; clamped so a bad q_start
        # can never read past the cache.
        t_end = tl.minimum((t_block + 1) * BLOCK_T, n_new)
        n_keys = tl.minimum(q_start + t_end, n_keys_total)
        last_visible = q_start + offs_t  # (BLOCK_T,) last key each query may see
    else:
        n_keys = n_keys_total
    key_lo = split * keys_per_split
    key_hi = tl.minimum(key_lo + keys_per_split, n_keys)

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_t[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=t_valid[:, None], other=0.0)  # (BLOCK_T, D)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_T], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_T, HEAD_DIM], dtype=tl.float32)  # running sum of p @ v
    for start in range(key_lo, key_hi, BLOCK_N):
        keys = start + offs_n
        key_ok = keys < key_hi
        k = tl.load(k_base + keys[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=key_ok[:, None], other=0.0)  # (BLOCK_N, D)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_T, BLOCK_N), log2 units
        visible = key_ok[None, :]
        if CAUSAL:
            visible = visible & (keys[None, :] <= last_visible[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A query with no visible key yet (possible in a later split) keeps
        # m = -inf; shift by 0 instead so exp2 sees -inf - 0, not -inf + inf.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + keys[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=key_ok[:, None], other=0.0)  # (BLOCK_N, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # an empty chunk yields 0 output, lse -inf
    out = acc / l_safe[:, None]
    if SPLIT:
        part_row = (row_head * tl.num_programs(2) + split) * n_new + offs_t  # (BLOCK_T,)
        tl.store(PartOut + part_row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=t_valid[:, None])
        tl.store(PartLse + part_row, m_i + tl.log2(l_safe), mask=t_valid)
    else:
        o_ptrs = Out + b * stride_ob + h * stride_oh + offs_t[:, None] * stride_ot + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=t_valid[:, None])


@triton.jit
def _combine_splits(
    PartOut, PartLse, Out,
    stride_ob, stride_oh, stride_ot, stride_od,
    n_heads, n_new, n_splits,
    BLOCK_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Merge the per-chunk outputs of one query: a softmax over the chunks' lse.

    Grid: (B * H, T). Chunk 0 always holds key 0, which every query sees, so the
    max lse is finite; empty chunks have lse = -inf and weigh 0.
    """
    row_head = tl.program_id(0)
    t = tl.program_id(1)
    b = (row_head // n_heads).to(tl.int64)
    h = (row_head % n_heads).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    split_ok = offs_s < n_splits

    part_row = (row_head * n_splits + offs_s) * n_new + t  # (BLOCK_SPLITS,)
    lse = tl.load(PartLse + part_row, mask=split_ok, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, axis=0))  # (BLOCK_SPLITS,)
    part = tl.load(PartOut + part_row[:, None] * HEAD_DIM + offs_d[None, :],
                   mask=split_ok[:, None], other=0.0)  # (BLOCK_SPLITS, D)
    out = tl.sum(part * weight[:, None], axis=0) / tl.sum(weight, axis=0)  # (D,)
    tl.store(Out + b * stride_ob + h * stride_oh + t * stride_ot + offs_d * stride_od,
             out.to(Out.dtype.element_ty))


# ----------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------

def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _FALLBACK_SM_COUNT
    return _cuda_sm_count(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    """SMs of GPU `index`, read once: GPUs of one machine may differ, and every decode step asks."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits_for(n_programs: int, key_bound: int, device: torch.device) -> int:
    """How many chunks to cut a key range of up to `key_bound` keys into.

    Aim for about two waves of programs over the SMs, but never give a chunk
    fewer than MIN_KEYS_PER_SPLIT keys. A grid that is already full gains
    nothing from splitting and pays the second launch, so it gets 1.
    """
    target_programs = 2 * _sm_count(device)
    if n_programs >= target_programs:
        return 1
    max_splits = max(1, key_bound // MIN_KEYS_PER_SPLIT)
    return max(1, min(triton.cdiv(target_programs, n_programs), max_splits))


def on_device_of(q: Tensor) -> contextlib.AbstractContextManager:
    """Make q's GPU the current one for a launch: Triton launches on the current device, not q's."""
    return torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()


def check_inputs(q: Tensor, *kv: Tensor) -> None:
    """Raise ValueError for inputs the kernels do not handle."""
    head_dim = q.shape[-1]
    if q.dim() != 4 or any(t.dim() != 4 for t in kv):
        raise ValueError("expected (batch, heads, length, head_dim) tensors")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} not in {SUPPORTED_HEAD_DIMS}")
    if q.dtype not in SUPPORTED_DTYPES or any(t.dtype != q.dtype for t in kv):
        raise ValueError(f"q, k, v must share one dtype of {SUPPORTED_DTYPES}")
    for t in kv:
        if t.shape[:2] != q.shape[:2] or t.shape[-1] != head_dim:
            raise ValueError(f"K/V shape {tuple(t.shape)} does not match q {tuple(q.shape)}")
        if t.device != q.device:
            raise ValueError("q, k, v must be on one device")


def launch_kv_split_attention(q: Tensor, k: Tensor, v: Tensor, q_start: Tensor | None,
                              key_bound: int, num_splits: int | None) -> Tensor:
    """Shared launcher of `_attend_kv_split` (+ `_combine_splits`).

    q: (B, H, T, D); k, v: (B, H, S, D); q_start: (B,) for the causal cache
    mask, or None for no mask (all S keys visible). `key_bound` is an upper
    bound on the keys any row needs, used only to pick the split count.
    Returns (B, H, T, D), stored as (B, T, H, D) in memory so the caller's
    `transpose(1, 2).reshape(B, T, H * D)` is a free view.
    """
    batch, n_heads, n_new, head_dim = q.shape
    n_keys_total = k.shape[2]
    out = q.new_empty(batch, n_new, n_heads, head_dim).transpose(1, 2)  # (B, H, T, D) view
    if n_new == 0:
        return out
    n_programs = batch * n_heads * triton.cdiv(n_new, BLOCK_T)
    if num_splits is None:
        num_splits = num_splits_for(n_programs, key_bound, q.device)
    n_key_blocks = triton.cdiv(max(key_bound, 1), BLOCK_N)
    num_splits = max(1, min(num_splits, n_key_blocks))
    keys_per_split = triton.cdiv(n_key_blocks, num_splits) * BLOCK_N
    num_splits = triton.cdiv(max(key_bound, 1), keys_per_split)  # drop empty tail chunks
    split = num_splits > 1
    if split:
        part_out = torch.empty(batch * n_heads, num_splits, n_new, head_dim,
                               device=q.device, dtype=torch.float32)
        part_lse = torch.empty(batch * n_heads, num_splits, n_new,
                               device=q.device, dtype=torch.float32)
    else:
        part_out = part_lse = out  # unused when SPLIT is off
    causal = q_start is not None
    qk_scale = (1.0 / math.sqrt(head_dim)) * math.log2(math.e)  # scores in log2 units for exp2

    grid = (batch * n_heads, triton.cdiv(n_new, BLOCK_T), num_splits)
    with on_device_of(q):
        _attend_kv_split[grid](
            q, k, v, q_start if causal else q, out, part_out, part_lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            n_heads, n_new, n_keys_total, keys_per_split, qk_scale,
            CAUSAL=causal, SPLIT=split,
            BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, HEAD_DIM=head_dim,
            num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )
        if split:
            _combine_splits[(batch * n_heads, n_new)](
                part_out, part_lse, out, *out.stride(),
                n_heads, n_new, num_splits,
                BLOCK_SPLITS=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
                num_warps=1,
            )
    return out


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, q_start: Tensor,
                     key_bound: int | None = None, num_splits: int | None = None) -> Tensor:
    """Fused self-attention of T new tokens against the KV cache.

    q: (B, H, T, D); k_cache, v_cache: (B, H, S_max, D); q_start: (B,) integer
    tensor on q's device (first new position of each row). `key_bound`, if the
    caller knows it (max(q_start) + T), only helps pick the split count; it
    defaults to S_max so no host sync is needed. `num_splits` overrides the
    heuristic (tests and benchmarks). Returns (B, H, T, D) in q's dtype.
    """
    check_inputs(q, k_cache, v_cache)
    if k_cache.shape != v_cache.shape:
        raise ValueError("k_cache and v_cache must have the same shape")
    if q_start.shape != (q.shape[0],) or q_start.device != q.device:
        raise ValueError("q_start must be a (batch,) tensor on q's device")
    s_max = k_cache.shape[2]
    key_bound = s_max if key_bound is None else max(1, min(key_bound, s_max))
    return launch_kv_split_attention(q, k_cache, v_cache, q_start, key_bound, num_splits)
