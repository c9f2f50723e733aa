"""A distilled draft on the CPU, fused into C: its decoder step, and whole rounds of greedy drafting.

Why this kernel exists
----------------------
A draft proposes tokens one step at a time, and on the CPU its step is not bound by arithmetic nor
by bytes but by the number of operations: a 2-layer draft step in PyTorch is ~60 operator calls
(13 small matrix-vector products, attention, LayerNorms, GELU, residual adds), then a shortlist
head, Whisper's rules over a 51,865-entry vector and an argmax, each costing tens of microseconds
of dispatch and threading overhead, for ~30 MB of weights and K/V that the memory streams in well
under a millisecond. In C (cpu_draft.c) a step pays that overhead once, and `propose` drafts γ
tokens (head, rules, argmax, step) in a single call.

Verification decides every token, so the draft may be rounded: its linear layers are int8 weights
(one scale per output row) times int8 activations (one scale per vector), summed in int32 with the
CPU's integer dot products (AVX-512 VNNI, else AVX2). `DraftDecoder.forward` and the PyTorch rules
stay the reference (and the training path); the tests check the kernel agrees with them closely.
Sampled drafts (temperature > 0) take the PyTorch path.

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
_P, _I = ctypes.c_void_p, ctypes.c_int64


class Linear8(ctypes.Structure):
    _fields_ = [("q", _P), ("scale", _P), ("bias", _P), ("row_sum", _P), ("out", _I), ("in_", _I)]


class Norm(ctypes.Structure):
    _fields_ = [("weight", _P), ("bias", _P)]


class Block(ctypes.Structure):
    _fields_ = [("attn_ln", Norm), ("cross_ln", Norm), ("mlp_ln", Norm), ("qkv", Linear8), ("attn_out", Linear8),
                ("cross_query", Linear8), ("cross_out", Linear8), ("fc1", Linear8), ("fc2", Linear8)]


class Draft(ctypes.Structure):
    _fields_ = [("n_layer", _I), ("width", _I), ("heads", _I), ("head_dim", _I), ("n_ctx", _I),
                ("token_embedding", _P), ("positional", _P), ("has_fuse", ctypes.c_int), ("fuse", Linear8),
                ("fuse_norm", Norm), ("final_ln", Norm), ("blocks", ctypes.POINTER(Block)), ("head", Linear8),
                ("head_ids", _P), ("suppressed", _P), ("begin_suppressed", _P), ("n_timestamps", _I),
                ("timestamp_begin", _I), ("max_initial_timestamp", _I), ("timestamps", ctypes.c_int)]


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled draft library, or None where it cannot be built (`build_library` says why) or would not
    be vectorized (then it is slower than the PyTorch modules it replaces)."""
    library = build_library(SOURCE_NAME)
    if library is None or not library.draft_step_vectorized():
        return None
    draft = ctypes.POINTER(Draft)
    library.draft_step.argtypes = [draft, _I, _P, _P, _P, _P, _P, _P, _P, _I, _P, _P, ctypes.c_int]
    library.draft_propose.argtypes = [draft, _I, _I] + [_P] * 11 + [_I] + [_P] * 5 + [ctypes.c_int]
    library.scratch_floats.argtypes = [draft, _I]
    library.scratch_floats.restype = _I
    for function in (library.draft_step, library.draft_propose):
        function.restype = None
    return library


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight (out, in) -> int8 (out, in) and one fp32 scale per row, w ~ q * scale (symmetric, 127 levels)."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12)
    return (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous(), scale.contiguous()


class _Tensors:
    """Holds the tensors a ctypes structure points into, so they live as long as it does."""

    def __init__(self):
        self.kept: list[Tensor] = []

    def ptr(self, tensor: Tensor | None) -> int | None:
        if tensor is None:
            return None
        tensor = tensor.detach().contiguous()
        self.kept.append(tensor)
        return tensor.data_ptr()

    def linear8(self, weight: Tensor, bias: Tensor | None) -> Linear8:
        q, scale = quantize_rows(weight)
        return Linear8(self.ptr(q), self.ptr(scale), self.ptr(None if bias is None else bias.float()),
                       self.ptr(q.sum(dim=1, dtype=torch.int32)), weight.shape[0], weight.shape[1])

    def norm(self, module: nn.LayerNorm) -> Norm:
        return Norm(self.ptr(module.weight.float()), self.ptr(module.bias.float()))


@dataclass
class RuleState:
    """Per row, what Whisper's rules need to know of the tokens so far (the C side updates it)."""

    last: Tensor  # (B,) int64: the last token, -1 if none
    before_last: Tensor
    last_timestamp: Tensor  # the latest timestamp token, -1 if none
    n_generated: Tensor

    @classmethod
    def of(cls, generated: list[list[int]], timestamp_begin: int) -> "RuleState":
        def nth_last(tokens: list[int], n: int) -> int:
            return tokens[-n] if len(tokens) >= n else -1
        stamps = [next((t for t in reversed(tokens) if t >= timestamp_begin), -1) for tokens in generated]
        return cls(*(torch.tensor(values, dtype=torch.int64) for values in (
            [nth_last(t, 1) for t in generated], [nth_last(t, 2) for t in generated], stamps,
            [len(t) for t in generated])))


class DraftKernel:
    """One draft decoder (`specwhisper.draft.DraftDecoder`) with a shortlist head, in int8, in C."""

    def __init__(self, decoder, n_ctx: int, head_ids: Tensor, head_rows: Tensor, head_bias: Tensor):
        self.tensors = keep = _Tensors()
        self.blocks = (Block * len(decoder.blocks))()
        for block, spec in zip(decoder.blocks, self.blocks):
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
        self.width, self.heads = decoder.ln.normalized_shape[0], decoder.blocks[0].attn.n_head
        has_fuse = decoder.fuse is not None
        self.head_ids = head_ids.to(torch.int64).contiguous()
        self.model = Draft(len(decoder.blocks), self.width, self.heads, self.width // self.heads, n_ctx,
                           keep.ptr(decoder.token_embedding.weight.float()),
                           keep.ptr(decoder.positional_embedding.float()), int(has_fuse),
                           keep.linear8(decoder.fuse.weight, decoder.fuse.bias) if has_fuse else Linear8(),
                           keep.norm(decoder.fuse_norm) if has_fuse else Norm(), keep.norm(decoder.ln),
                           self.blocks, keep.linear8(head_rows, head_bias), keep.ptr(self.head_ids))

    @staticmethod
    def shortlist_layout(ids: Tensor, eot: int, timestamp_begin: int, n_vocab: int) -> bool:
        """Whether a shortlist starts [end-of-text, every timestamp in order]: the layout the C rules read."""
        n_timestamps = n_vocab - timestamp_begin
        return (len(ids) > 1 + n_timestamps and int(ids[0]) == eot
                and torch.equal(ids[1:1 + n_timestamps].cpu(), torch.arange(timestamp_begin, n_vocab)))

    def set_rules(self, suppress: Tensor, begin_suppress: Tensor, timestamps: bool, timestamp_begin: int,
                  n_vocab: int, max_initial_timestamp: int | None) -> None:
        """Whisper's rules for the next window, as masks over the shortlist (from decoding.LogitRules)."""
        suppressed = torch.isin(self.head_ids, suppress.cpu()).to(torch.uint8)
        begin = torch.isin(self.head_ids, begin_suppress.cpu()).to(torch.uint8)
        model = self.model
        model.suppressed, model.begin_suppressed = self.tensors.ptr(suppressed), self.tensors.ptr(begin)
        model.n_timestamps, model.timestamp_begin = n_vocab - timestamp_begin, timestamp_begin
        model.max_initial_timestamp = -1 if max_initial_timestamp is None else max_initial_timestamp
        model.timestamps = int(timestamps)

    def _scratch(self, n_audio: int) -> Tensor:
        return torch.empty(load_library().scratch_floats(ctypes.byref(self.model), n_audio))

    def step(self, tokens: Tensor, positions: Tensor, features: Tensor | None, keys: Tensor, values: Tensor,
             audio_keys: list[Tensor], audio_values: list[Tensor]) -> Tensor:
        """tokens, positions (B,) int64; features (B, C) or None; keys, values: the cache (L, B, H, S, D);
        audio_keys/values per layer (B, H, S_audio, D) fp16. Writes the new K/V, returns hidden states (B, C)."""
        batch, n_audio = tokens.shape[0], audio_keys[0].shape[2]
        # Every tensor the C code reads or writes is held in a local: a temporary's memory would be freed
        # before the call runs.
        tokens, positions = tokens.contiguous(), positions.contiguous()
        features = None if features is None else features.float().contiguous()
        hidden, scratch = torch.empty(batch, self.width), self._scratch(n_audio)
        keys_at, values_at = _pointers(audio_keys, audio_values)
        load_library().draft_step(ctypes.byref(self.model), batch, tokens.data_ptr(), positions.data_ptr(),
                                  None if features is None else features.data_ptr(), keys.data_ptr(),
                                  values.data_ptr(), keys_at, values_at, n_audio, hidden.data_ptr(),
                                  scratch.data_ptr(), torch.get_num_threads())
        return hidden

    def propose(self, gamma: int, active: list[bool], hidden: Tensor, positions: list[int], rules: RuleState,
                keys: Tensor, values: Tensor, audio_keys: list[Tensor], audio_values: list[Tensor]
                ) -> list[list[int]]:
        """Up to γ greedy drafts per active row from each row's state after its last fed token (hidden
        (B, C), the next write positions). Feeds every draft but the last into the cache."""
        batch, n_audio = len(active), audio_keys[0].shape[2]
        out, n_out = torch.empty(batch, gamma, dtype=torch.int64), torch.zeros(batch, dtype=torch.int64)
        hidden = hidden.float().contiguous().clone()  # overwritten step by step
        active_mask = torch.tensor(active, dtype=torch.uint8)
        starts = torch.tensor(positions, dtype=torch.int64)
        scores, feature, scratch = torch.empty(len(self.head_ids)), torch.empty(self.width), self._scratch(n_audio)
        keys_at, values_at = _pointers(audio_keys, audio_values)
        load_library().draft_propose(
            ctypes.byref(self.model), batch, gamma, active_mask.data_ptr(), hidden.data_ptr(), starts.data_ptr(),
            rules.last.data_ptr(), rules.before_last.data_ptr(), rules.last_timestamp.data_ptr(),
            rules.n_generated.data_ptr(), keys.data_ptr(), values.data_ptr(), keys_at, values_at, n_audio,
            out.data_ptr(), n_out.data_ptr(), scores.data_ptr(), feature.data_ptr(), scratch.data_ptr(),
            torch.get_num_threads())
        return [out[b, :n].tolist() for b, n in enumerate(n_out.tolist())]


def _pointers(audio_keys: list[Tensor], audio_values: list[Tensor]) -> tuple[ctypes.Array, ctypes.Array]:
    return ((ctypes.c_void_p * len(audio_keys))(*[k.data_ptr() for k in audio_keys]),
            (ctypes.c_void_p * len(audio_values))(*[v.data_ptr() for v in audio_values]))
