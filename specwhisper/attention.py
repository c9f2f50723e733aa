"""Attention dispatch: one entry point per attention shape Whisper uses.

The model calls these three functions and never `F.scaled_dot_product_attention`
directly, so the fused Triton kernels (in `kernels/`, importable as
`specwhisper.kernels`) can replace the PyTorch path without touching the model.

All tensors are (batch, heads, length, head_dim).

- `self_attention`: decoder queries for T new tokens against the KV cache.
  Row b's first new query sits at position `q_start[b]`; query i of row b may see
  keys 0 .. q_start[b] + i (causal inside the new block, and everything cached
  before it). Keys past that are stale or unwritten slots and are masked.
- `cross_attention`: decoder queries against the encoder output's K/V, no mask.
- `encoder_attention`: encoder self-attention, no mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "torch", "triton")


def causal_cache_mask(q_start: Tensor, n_new: int, n_keys: int) -> Tensor:
    """Boolean mask (B, 1, T, S): True where query i of row b may attend key j."""
    query_pos = q_start[:, None] + torch.arange(n_new, device=q_start.device)  # (B, T)
    key_pos = torch.arange(n_keys, device=q_start.device)  # (S,)
    return (key_pos[None, None, :] <= query_pos[:, :, None])[:, None]  # (B, 1, T, S)


def self_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, q_start: Tensor,
                   uniform_start: int | None = None) -> Tensor:
    """q: (B, H, T, D); k_cache, v_cache: (B, H, S_max, D); q_start: (B,) int64.

    `uniform_start` is q_start's value when every row shares it (a Python int the
    caller already knows), which lets a single-token step skip building a mask.
    Returns (B, H, T, D).
    """
    n_new = q.shape[2]
    if uniform_start is not None:
        n_keys = uniform_start + n_new
        k, v = k_cache[:, :, :n_keys], v_cache[:, :, :n_keys]
        if n_new == 1:  # one query sees every valid key: no mask at all
            return F.scaled_dot_product_attention(q, k, v)
        mask = causal_cache_mask(q_start, n_new, n_keys)
    else:
        n_keys = int(q_start.max()) + n_new
        k, v = k_cache[:, :, :n_keys], v_cache[:, :, :n_keys]
        mask = causal_cache_mask(q_start, n_new, n_keys)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def cross_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q: (B, H, T, D); k, v: (B, H, S_audio, D). Returns (B, H, T, D)."""
    return F.scaled_dot_product_attention(q, k, v)


def encoder_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q, k, v: (B, H, S, D). Returns (B, H, S, D)."""
    return F.scaled_dot_product_attention(q, k, v)
