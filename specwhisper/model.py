"""The Whisper network: audio encoder and text decoder, nothing else.

No decoding logic, no hooks, no I/O. State lives outside the modules and is
passed in explicitly: the decoder's self-attention KV cache (`KVCache`) and
the cross-attention K/V computed once per audio window (`AudioKV`), both in
`specwhisper.kv_cache`.

Every released Whisper size (tiny ... large-v3, large-v3-turbo, distil-whisper)
is this same code with different `ModelDims`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import attention
from .kv_cache import AudioKV, KVCache, StaticKVCache


@dataclass(frozen=True)
class ModelDims:
    n_mels: int  # mel bins of the input: 80, or 128 for large-v3
    n_audio_ctx: int  # encoder positions: 1500 (30 s at 50 frames/s after the stride-2 conv)
    n_audio_state: int  # encoder width
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int  # 51864 (English-only), 51865 (multilingual), 51866 (large-v3)
    n_text_ctx: int  # decoder positions: 448 tokens
    n_text_state: int  # decoder width
    n_text_head: int
    n_text_layer: int  # 2 for distil-whisper, 4 for large-v3-turbo

    @property
    def head_dim(self) -> int:
        return self.n_text_state // self.n_text_head


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Whisper's fixed encoder positions: (length, channels), sin half then cos half."""
    assert channels % 2 == 0
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2, dtype=torch.float64))
    scaled_time = torch.arange(length, dtype=torch.float64)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1).float()


def split_heads(x: Tensor, n_head: int) -> Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, n_head, width // n_head).transpose(1, 2)  # (B, H, T, D)


def merge_heads(x: Tensor) -> Tensor:
    batch, n_head, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, n_head * head_dim)  # (B, T, H*D)


class MultiHeadAttention(nn.Module):
    """Projections only; which attention runs (encoder, cached self, cross) is the caller's choice."""

    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)  # Whisper's key projection has no bias
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)
        # One module computing [query | key | value] at once may stand in for the three
        # (specwhisper.prepack installs it): one weight stream and one call instead of three.
        self.fused_qkv: nn.Module | None = None

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, T, C) -> q, k, v each (B, H, T, D)."""
        if self.fused_qkv is not None:
            q, k, v = self.fused_qkv(x).chunk(3, dim=-1)  # (B, T, 3C) -> 3 x (B, T, C)
        else:
            q, k, v = self.query(x), self.key(x), self.value(x)
        return split_heads(q, self.n_head), split_heads(k, self.n_head), split_heads(v, self.n_head)

    def encoder_forward(self, x: Tensor) -> Tensor:
        """x: (B, S, C) -> (B, S, C), every position sees every other."""
        q, k, v = self.project_qkv(x)
        return self.out(merge_heads(attention.encoder_attention(q, k, v)))

    def self_forward(self, x: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        """x: (B, T, C) for T new tokens. With a cache: their K/V are written at its lengths and they attend
        to everything cached. Without one: causal attention inside x alone (training, differentiable)."""
        q, k, v = self.project_qkv(x)
        if cache is None:
            return self.out(merge_heads(attention.causal_attention(q, k, v)))
        k_cache, v_cache = cache.write(layer, k, v)
        out = attention.self_attention(q, k_cache, v_cache, cache.lengths_tensor(), cache.uniform_length(),
                                       fixed_mask=cache.pass_mask())
        return self.out(merge_heads(out))

    def cross_forward(self, x: Tensor, audio_kv: AudioKV, layer: int, scores: dict | None = None) -> Tensor:
        """x: (B, T, C) attends to the audio window's precomputed K/V. If `layer` is a key of `scores`, the
        attention runs step by step and its pre-softmax scores (B, H, T, S) are stored there (word timing)."""
        q = split_heads(self.query(x), self.n_head)
        k, v = audio_kv.keys[layer], audio_kv.values[layer]
        if scores is not None and layer in scores:
            out, scores[layer] = attention.cross_attention_with_scores(q, k, v)
        else:
            out = attention.cross_attention(q, k, v)
        return self.out(merge_heads(out))

    def project_audio_kv(self, audio_features: Tensor) -> tuple[Tensor, Tensor]:
        """audio_features: (B, S, C) -> K, V each (B, H, S, D). Done once per window."""
        # Contiguous (B, H, S, D): each head's keys in one block of memory; a one-token step reads the
        # strided view of the (B, S, H*D) projection at a third of the speed (docs/cpu-fast-path.md).
        keys = split_heads(self.key(audio_features), self.n_head).contiguous()
        values = split_heads(self.value(audio_features), self.n_head).contiguous()
        return keys, values


def mlp(n_state: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))


class EncoderBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.mlp = mlp(n_state)
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn.encoder_forward(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class DecoderBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head)
        self.cross_attn_ln = nn.LayerNorm(n_state)
        self.mlp = mlp(n_state)
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x: Tensor, audio_kv: AudioKV, cache: KVCache | None, layer: int,
                cross_scores: dict | None = None) -> Tensor:
        x = x + self.attn.self_forward(self.attn_ln(x), cache, layer)
        x = x + self.cross_attn.cross_forward(self.cross_attn_ln(x), audio_kv, layer, cross_scores)
        return x + self.mlp(self.mlp_ln(x))


def run_blocks(blocks: nn.ModuleList, x: Tensor, audio_kv: AudioKV, cache: KVCache | None,
               cross_scores: dict | None = None) -> Tensor:
    """Decoder blocks on first-block inputs x (B, T, C) at the cache's lengths; then the cache holds
    the T new positions. Without a cache: teacher forcing from position 0 with a causal mask.
    cross_scores: {layer: None, ...} to fill with those layers' cross-attention scores (B, H, T, S)."""
    for layer, block in enumerate(blocks):
        x = block(x, audio_kv, cache, layer, cross_scores)
    if cache is not None:
        cache.advance(x.shape[1])
    return x


def cross_attention_kv(blocks: nn.ModuleList, audio_features: Tensor) -> AudioKV:
    """Cross-attention K/V of every block for these audio features (B, S, C), computed once per window."""
    pairs = [block.cross_attn.project_audio_kv(audio_features) for block in blocks]
    return AudioKV(keys=[k for k, _ in pairs], values=[v for _, v in pairs])


def tied_logits(hidden: Tensor, token_embedding: nn.Embedding, output_projection: nn.Module | None) -> Tensor:
    """(..., C) -> (..., n_vocab): the output projection tied to the token embedding, or a module
    computing it (specwhisper.prepack) or standing in for it (a draft's head)."""
    if output_projection is not None:
        return output_projection(hidden)
    return hidden @ token_embedding.weight.T


class AudioEncoder(nn.Module):
    def __init__(self, dims: ModelDims):
        super().__init__()
        n_state = dims.n_audio_state
        self.conv1 = nn.Conv1d(dims.n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(dims.n_audio_ctx, n_state))
        self.blocks = nn.ModuleList(EncoderBlock(n_state, dims.n_audio_head) for _ in range(dims.n_audio_layer))
        self.ln_post = nn.LayerNorm(n_state)

    def forward(self, mel: Tensor) -> Tensor:
        """mel: (B, n_mels, 3000) -> audio features (B, 1500, n_audio_state)."""
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x))  # (B, C, 1500)
        x = x.transpose(1, 2)  # (B, 1500, C)
        if x.shape[1:] != self.positional_embedding.shape:
            raise ValueError(f"encoder expects {2 * self.positional_embedding.shape[0]} mel frames, got {mel.shape[-1]}")
        x = x + self.positional_embedding
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


class TextDecoder(nn.Module):
    def __init__(self, dims: ModelDims):
        super().__init__()
        n_state = dims.n_text_state
        self.token_embedding = nn.Embedding(dims.n_vocab, n_state)
        self.positional_embedding = nn.Parameter(torch.empty(dims.n_text_ctx, n_state))
        self.blocks = nn.ModuleList(DecoderBlock(n_state, dims.n_text_head) for _ in range(dims.n_text_layer))
        self.ln = nn.LayerNorm(n_state)
        # The output projection is tied to the token embedding; a faster module computing the same
        # product may stand in for it (specwhisper.prepack).
        self.output_projection: nn.Module | None = None
        # Optionally a cheap screen of the same projection with an error bound, for exact greedy
        # choices without computing every logit exactly (specwhisper.screening; used by decoding).
        self.screened_head: nn.Module | None = None

    def audio_kv(self, audio_features: Tensor) -> AudioKV:
        return cross_attention_kv(self.blocks, audio_features)

    def forward(self, tokens: Tensor, audio_kv: AudioKV, cache: KVCache | StaticKVCache,
                cross_scores: dict | None = None) -> Tensor:
        """Run T new tokens per row at positions cache.lengths .. +T, append them to the cache.

        tokens: (B, T) -> hidden states (B, T, n_text_state) after the final LayerNorm.
        Use `logits` on the positions you need: greedy needs the last, verification all.
        cross_scores: {layer: None, ...}; those layers' pre-softmax cross-attention scores (B, H, T, S)
        are stored in it (word timing's pass; decoding passes none).
        """
        positions = cache.positions(tokens.shape[1])  # (B, T)
        x = self.token_embedding(tokens) + self.positional_embedding[positions]
        # After the prompt, every position gets the bits a one-token step gives it, however many are
        # computed together: what lets a verify pass reproduce greedy steps exactly (docs/exactness.md).
        # The prompt runs as one block in greedy and speculative decoding alike.
        if cache.computes_positions_alone():
            with attention.positions_computed_alone():
                x = run_blocks(self.blocks, x, audio_kv, cache, cross_scores)
        else:
            x = run_blocks(self.blocks, x, audio_kv, cache, cross_scores)
        return self.ln(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, n_vocab)."""
        return tied_logits(hidden, self.token_embedding, self.output_projection)


class Whisper(nn.Module):
    def __init__(self, dims: ModelDims):
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(dims)
        self.decoder = TextDecoder(dims)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A preallocated self-attention cache sized for this decoder."""
        return new_decoder_cache(self.dims, self.decoder.token_embedding.weight, batch_size, max_len)


def new_decoder_cache(dims: ModelDims, like: Tensor, batch_size: int, max_len: int | None = None) -> KVCache:
    """A KV cache for a decoder of these dims, on `like`'s device and in its dtype."""
    return KVCache.allocate(n_layer=dims.n_text_layer, batch_size=batch_size, n_head=dims.n_text_head,
                            max_len=max_len or dims.n_text_ctx, head_dim=dims.head_dim, dtype=like.dtype,
                            device=like.device)
