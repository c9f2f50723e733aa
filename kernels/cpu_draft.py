"""A distilled draft's decoder step on the CPU, fused into one C call.

Why this kernel exists
----------------------
A draft proposes tokens one step at a time, and on the CPU its step is not bound by arithmetic nor
by bytes but by the number of operations: a 2-layer draft step in PyTorch is ~60 operator calls
(13 small matrix-vector products, attention, LayerNorms, GELU, residual adds), each costing tens
of microseconds of dispatch and threading overhead, for ~25 MB of weights and K/V that the memory
streams in well under a millisecond. Fused into one call (cpu_draft.c) the step pays that
overhead once. Verification decides every token, so the draft's weights may be int8 (one scale
per output row, fp32 activations and accumulation) and its numbers need not match the PyTorch
module's bit for bit; `DraftDecoder.forward` stays the reference (and the training path), and the
tests check the two agree closely.

The library is built with cpu_attention.c (whose attention helpers it uses) by the same builder.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .cpu_attention import build_library

SOURCE_NAME = "cpu_draft.c"


class Linear8(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("out", ctypes.c_int64), ("in_", ctypes.c_int64)]


class Norm(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class Block(ctypes.Structure):
    _fields_ = [("attn_ln", Norm), ("cross_ln", Norm), ("mlp_ln", Norm), ("qkv", Linear8), ("attn_out", Linear8),
                ("cross_query", Linear8), ("cross_out", Linear8), ("fc1", Linear8), ("fc2", Linear8)]


class Draft(ctypes.Structure):
    _fields_ = [("n_layer", ctypes.c_int64), ("width", ctypes.c_int64), ("heads", ctypes.c_int64),
                ("head_dim", ctypes.c_int64), ("n_ctx", ctypes.c_int64), ("token_embedding", ctypes.c_void_p),
                ("positional", ctypes.c_void_p), ("has_fuse", ctypes.c_int), ("fuse", Linear8),
                ("fuse_norm", Norm), ("final_ln", Norm), ("blocks", ctypes.POINTER(Block))]


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled draft-step library, or None where it cannot be built (`build_library` says why) or would
    not be vectorized."""
    library = build_library(SOURCE_NAME)
    if library is None:
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.draft_step.argtypes = [ctypes.POINTER(Draft), size, pointer, pointer, pointer, pointer, pointer,
                                   pointer, pointer, size, pointer, pointer, ctypes.c_int]
    library.draft_step.restype = None
    # Without AVX2 the step compiles to plain C: right, but slower than the PyTorch modules it replaces.
    return library if library.draft_step_vectorized() else None


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight (out, in) -> int8 (out, in) and one fp32 scale per row, w ~ q * scale (symmetric, 127 levels)."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12)
    return (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous(), scale.contiguous()


class _Keep:
    """Holds the tensors a ctypes structure points into, so they live as long as it does."""

    def __init__(self):
        self.tensors: list[Tensor] = []

    def ptr(self, tensor: Tensor | None) -> int | None:
        if tensor is None:
            return None
        tensor = tensor.detach().contiguous()
        self.tensors.append(tensor)
        return tensor.data_ptr()

    def linear8(self, weight: Tensor, bias: Tensor | None) -> Linear8:
        q, scale = quantize_rows(weight)
        return Linear8(self.ptr(q), self.ptr(scale), self.ptr(None if bias is None else bias.float()),
                       weight.shape[0], weight.shape[1])

    def norm(self, module: nn.LayerNorm) -> Norm:
        return Norm(self.ptr(module.weight.float()), self.ptr(module.bias.float()))


@dataclass
class DraftStep:
    """The fused step of one draft decoder (`specwhisper.draft.DraftDecoder`), its weights in int8."""

    model: Draft
    blocks: ctypes.Array
    keep: _Keep
    width: int
    heads: int
    head_dim: int

    @classmethod
    def build(cls, decoder, n_ctx: int) -> "DraftStep":
        """From a draft decoder's plain (unpacked) modules and the main model's shared embeddings."""
        keep = _Keep()
        blocks = (Block * len(decoder.blocks))()
        for block, spec in zip(decoder.blocks, blocks):
            attn, cross, mlp = block.attn, block.cross_attn, block.mlp
            qkv = torch.cat([attn.query.weight, attn.key.weight, attn.value.weight])  # (3C, C)
            qkv_bias = torch.cat([attn.query.bias, torch.zeros_like(attn.query.bias), attn.value.bias])
            spec.attn_ln, spec.cross_ln, spec.mlp_ln = (keep.norm(n) for n in (block.attn_ln, block.cross_attn_ln,
                                                                                 block.mlp_ln))
            spec.qkv = keep.linear8(qkv, qkv_bias)
            spec.attn_out = keep.linear8(attn.out.weight, attn.out.bias)
            spec.cross_query = keep.linear8(cross.query.weight, cross.query.bias)
            spec.cross_out = keep.linear8(cross.out.weight, cross.out.bias)
            spec.fc1 = keep.linear8(mlp[0].weight, mlp[0].bias)
            spec.fc2 = keep.linear8(mlp[2].weight, mlp[2].bias)
        width, heads = decoder.ln.normalized_shape[0], decoder.blocks[0].attn.n_head
        has_fuse = decoder.fuse is not None
        model = Draft(len(decoder.blocks), width, heads, width // heads, n_ctx,
                      keep.ptr(decoder.token_embedding.weight.float()), keep.ptr(decoder.positional_embedding.float()),
                      int(has_fuse), keep.linear8(decoder.fuse.weight, decoder.fuse.bias) if has_fuse else Linear8(),
                      keep.norm(decoder.fuse_norm) if has_fuse else Norm(), keep.norm(decoder.ln), blocks)
        return cls(model, blocks, keep, width, heads, width // heads)

    def __call__(self, tokens: Tensor, positions: Tensor, features: Tensor | None, keys: Tensor, values: Tensor,
                 audio_keys: list[Tensor], audio_values: list[Tensor]) -> Tensor:
        """tokens, positions (B,) int64; features (B, C) or None; keys, values: the cache (L, B, H, S, D);
        audio_keys/values per layer (B, H, S_audio, D). Writes the new K/V, returns hidden states (B, C)."""
        batch, n_audio = tokens.shape[0], audio_keys[0].shape[2]
        hidden = torch.empty(batch, self.width)
        scratch = torch.empty(12 * self.width + self.heads * max(self.model.n_ctx, n_audio))
        k_ptrs = (ctypes.c_void_p * len(audio_keys))(*[k.data_ptr() for k in audio_keys])
        v_ptrs = (ctypes.c_void_p * len(audio_values))(*[v.data_ptr() for v in audio_values])
        features = None if features is None else features.float().contiguous()
        load_library().draft_step(ctypes.byref(self.model), batch, tokens.data_ptr(), positions.data_ptr(),
                                  None if features is None else features.data_ptr(), keys.data_ptr(),
                                  values.data_ptr(), k_ptrs, v_ptrs, n_audio, hidden.data_ptr(), scratch.data_ptr(),
                                  torch.get_num_threads())
        return hidden
