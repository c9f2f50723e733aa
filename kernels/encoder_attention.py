"""Encoder self-attention: flash-attention forward over 1500 x 1500, no mask.

Why this kernel exists
----------------------
The encoder runs once per 30 s window, but at 1500 positions its attention is
the one compute-heavy attention in Whisper: per (row, head) it does
2 * 1500^2 * 64 * 2 = 576 MFLOP, and the unfused score matrix is
1500^2 * 4 bytes = 9 MB in fp32, written and reread several times per head and
layer. Flash attention tiles Q into BLOCK_M rows per program, streams K/V in
BLOCK_N-row tiles through an online softmax (fp32 accumulators, fp16 operands
for tl.dot), and never writes the scores: traffic drops to reading Q, K, V
(K/V once per Q tile) and writing O, and the kernel becomes MMA-bound.

1500 is not a multiple of any power-of-two block, so the last K/V tile is
masked (scores of out-of-range keys set to -inf) and the last Q tile's loads
and stores are masked.

Block sizes (see `block_config`): on sm_75 (T4) a 64 x 64 Q tile and 64 x 64
K/V tiles: Q 8 KB + 2 stages x (K 8 KB + V 8 KB) = 40 KB of shared memory,
under Turing's 64 KB per block, and 4 warps so each warp owns 16 query rows
(one row-block of Turing's fp16 m16n8k8 MMA, which Triton <= 3.2 emits; later
Triton lowers tl.dot to FMA below sm_80, so "auto" keeps SDPA for this kernel
there, see kernels/README.md). On sm_80+ (164-228 KB of shared memory) a
128-row Q tile and three stages halve the K/V re-reads and hide load latency.
No bf16 on sm_75: the dispatcher only sends fp16 there.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .decode_attention import check_inputs, on_device_of


def block_config(device: torch.device) -> dict[str, int]:
    """Tile sizes and launch parameters for `device` (see module docstring)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)  # sm_75 and the interpreter


def encoder_attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Plain PyTorch: matmul + softmax + matmul, computed in fp32.

    q: (B, H, S_q, D); k, v: (B, H, S_k, D). Returns (B, H, S_q, D) in q's dtype.

    Memory traffic per (row, head) with S_q = S_k = S = 1500, D = 64, fp16 in:
      upcast Q, K, V to fp32       read 3*S*D*2, write 3*S*D*4      (~1.7 MB)
      scores = q @ k^T             write S*S*4                      (9 MB)
      softmax                      read + write S*S*4               (18 MB)
      p @ v                        read S*S*4                       (9 MB)
    About 38 MB per head and layer, against 3*S*D*2 + S*D*2 = 768 KB of
    necessary traffic (Q, K, V in, O out) for the fused kernel.
    """
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, S_q, S_k)
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)  # (B, H, S_q, D)


@triton.jit
def _flash_attention_fwd(
    Q, K, V, Out,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    n_heads, n_queries, n_keys, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """One program: BLOCK_M queries of one (row, head) against all keys.

    Grid: (cdiv(S_q, BLOCK_M), B * H). The Q-tile index varies fastest so that
    programs running together share one head's K/V in L2.
    """
    m_block = tl.program_id(0)
    row_head = tl.program_id(1)
    b = (row_head // n_heads).to(tl.int64)
    h = (row_head % n_heads).to(tl.int64)

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < n_queries

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_valid[:, None], other=0.0)  # (BLOCK_M, D)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # running sum of p @ v
    for start in range(0, n_keys, BLOCK_N):
        keys = start + offs_n
        key_ok = keys < n_keys
        k = tl.load(k_base + keys[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=key_ok[:, None], other=0.0)  # (BLOCK_N, D)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        s = tl.where(key_ok[None, :], s, float("-inf"))
        # The first tile always holds key 0, so m_new is finite from the start
        # and exp2(m_i - m_new) = exp2(-inf) = 0 on the first iteration.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + keys[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=key_ok[:, None], other=0.0)  # (BLOCK_N, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=m_valid[:, None])


def encoder_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Fused unmasked attention. q: (B, H, S_q, D); k, v: (B, H, S_k, D).

    Returns (B, H, S_q, D) in q's dtype, stored as (B, S_q, H, D) in memory so
    the caller's `transpose(1, 2).reshape(B, S_q, H * D)` is a free view.
    """
    check_inputs(q, k, v)
    if k.shape[2] != v.shape[2] or k.shape[2] == 0:
        raise ValueError("k and v must hold the same, non-zero number of keys")
    batch, n_heads, n_queries, head_dim = q.shape
    out = q.new_empty(batch, n_queries, n_heads, head_dim).transpose(1, 2)  # (B, H, S_q, D) view
    if n_queries == 0:
        return out
    cfg = block_config(q.device)
    qk_scale = (1.0 / math.sqrt(head_dim)) * math.log2(math.e)  # scores in log2 units for exp2
    grid = (triton.cdiv(n_queries, cfg["BLOCK_M"]), batch * n_heads)
    with on_device_of(q):
        _flash_attention_fwd[grid](
            q, k, v, out,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            n_heads, n_queries, k.shape[2], qk_scale,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], HEAD_DIM=head_dim,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return out
