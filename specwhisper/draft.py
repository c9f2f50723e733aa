"""A distilled draft's network: a few decoder blocks built around an already-loaded main model.

On a CPU a full Whisper assistant cannot pay: its decoder step costs a good part of the main
model's, plus its own encoder pass per window. A draft made of a few of the main model's own
decoder layers, reading the main model's encoder output, costs a fraction of a main step and,
once distilled (`specwhisper distill`), agrees with the main model's greedy choice most of the
time. Verification keeps the output exact whatever the draft proposes.

`DraftNetwork` is what the speculative loop (specwhisper.drafters) and training drive:
  - `encoder` IS the main model's encoder module (shared by reference, never run twice);
  - `decoder` is a `DraftDecoder`: the main model's token and position embeddings (shared by
    reference, never trained), its own N `DecoderBlock`s (initialised from main layers spread from
    first to last: 0 and 5 for base with N=2) and final LayerNorm, and an output head:
      "full"      the main model's tied projection (nothing of its own);
      "shortlist" only the K tokens the main model actually emits, scored against the shared
                  embedding's rows plus a learned bias; every other token gets -inf;
      "lowrank"   E ≈ U·Vᵀ of rank r, initialised from the embedding's SVD and trained.
With `features` the first block's input of position t is `fuse([embedding + position ; main hidden
state at t-1])` (EAGLE-style): the main model's own final hidden state, which verification computes
anyway. The decoder runs cached (step by step, as drafting does) or, without a cache, teacher-forced
over whole sequences with a causal mask (training): the same blocks either way.

Saving, loading and finding drafts: specwhisper.draft_files. Why these choices: docs/drafts.md.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import IncompatibleAssistantError
from .kernels import cpu_draft
from .kv_cache import AudioKV, KVCache
from .model import DecoderBlock, TextDecoder, Whisper, cross_attention_kv, new_decoder_cache, run_blocks, tied_logits
from .prepack import Int8Linear, PackedLinear, is_packed, prepack_blocks
from .weights.hf_layout import rename_hf_key, safetensors_files

if TYPE_CHECKING:
    from .speech_model import SpeechModel

HEADS = ("full", "shortlist", "lowrank")
KERNEL_MAX_TOKENS = 4  # tokens per row fed through the fused C step; a longer block (a prompt) runs as one pass
DEFAULT_RANK = 64  # low-rank head: 64 of base's 512 dimensions cost 1/8 of the full projection


# ----------------------------------------------------------------------------- output heads

class ShortlistHead(nn.Module):
    """Scores only K tokens: their rows of the shared embedding, plus a learned bias (K,).

    Every other token's logit is -inf, so it can never be drafted; the main model's verification
    still decides every token, so the output stays exact.
    """

    def __init__(self, embedding: Tensor, ids: Tensor):
        super().__init__()
        self.n_vocab = embedding.shape[0]
        self.register_buffer("ids", ids.to(embedding.device, torch.long))
        # Rebuilt from the main model at load, never saved: the file holds only the bias.
        self.register_buffer("rows", embedding.detach()[self.ids], persistent=False)  # (K, C): indexing copies
        self.bias = nn.Parameter(torch.zeros(len(ids), dtype=embedding.dtype, device=embedding.device))
        self.packed: nn.Module | None = None

    def short_logits(self, hidden: Tensor) -> Tensor:
        """(..., C) -> (..., K): scores of the shortlisted tokens, in shortlist order."""
        if self.packed is not None:
            return self.packed(hidden)
        return hidden @ self.rows.T + self.bias

    def forward(self, hidden: Tensor) -> Tensor:
        """(..., C) -> (..., n_vocab) with -inf outside the shortlist."""
        short = self.short_logits(hidden)
        out = short.new_full((*short.shape[:-1], self.n_vocab), float("-inf"))
        return out.index_copy_(-1, self.ids, short)

    def prepack(self, int8: bool = False) -> None:
        self.packed = (Int8Linear if int8 else PackedLinear)(self.rows, self.bias.detach())

    def log_probs(self, hidden: Tensor) -> tuple[Tensor, Tensor | None]:
        return torch.log_softmax(self.short_logits(hidden).float(), dim=-1), self.ids


class LowRankHead(nn.Module):
    """logits = (hidden · D) · Uᵀ + b with D (C, r) and U (V, r), from the embedding's truncated SVD."""

    def __init__(self, embedding: Tensor, rank: int, from_svd: bool = True):
        super().__init__()
        n_vocab, width = embedding.shape
        if not 1 <= rank < width:
            raise ValueError(f"a low-rank head needs 1 <= rank < {width}, got {rank}")
        self.down = nn.Linear(width, rank, bias=False, device=embedding.device, dtype=embedding.dtype)
        self.up = nn.Linear(rank, n_vocab, device=embedding.device, dtype=embedding.dtype)
        if from_svd:  # (a head about to be loaded skips it)
            with torch.no_grad():
                # E = U S Vᵀ: h Eᵀ = (h V_r) (U_r S_r)ᵀ keeps the r strongest directions.
                u, s, vh = torch.linalg.svd(embedding.detach().float(), full_matrices=False)
                self.down.weight.copy_(vh[:rank])  # (r, C)
                self.up.weight.copy_(u[:, :rank] * s[:rank])  # (V, r)
                self.up.bias.zero_()

    def forward(self, hidden: Tensor) -> Tensor:
        return self.up(self.down(hidden))

    def prepack(self, int8: bool = False) -> None:
        self.down = PackedLinear(self.down.weight, None)
        self.up = PackedLinear(self.up.weight, self.up.bias)

    def log_probs(self, hidden: Tensor) -> tuple[Tensor, Tensor | None]:
        return torch.log_softmax(self(hidden).float(), dim=-1), None


def with_shortlist(network: DraftNetwork, ids: list[int] | Tensor) -> ShortlistHead:
    """Give a shortlist draft a new list of tokens, keeping the learned bias of every token in both.

    For continuing training on new audio (`distill --init`). A token that enters the list starts at
    the median of the old biases: a fresh head's 0 sits above most trained biases and would make the
    newcomers the draft's favourite guesses.
    """
    old = network.decoder.output_projection
    if not isinstance(old, ShortlistHead):
        raise ValueError("with_shortlist needs a draft with a shortlist head")
    head = ShortlistHead(network.decoder.token_embedding.weight, torch.as_tensor(ids, dtype=torch.long))
    old_index = {int(t): i for i, t in enumerate(old.ids.tolist())}
    with torch.no_grad():
        head.bias.fill_(float(old.bias.median()))
        pairs = [(i, old_index[int(t)]) for i, t in enumerate(head.ids.tolist()) if int(t) in old_index]
        if pairs:
            new_rows, old_rows = (torch.tensor(side, device=head.bias.device) for side in zip(*pairs))
            head.bias[new_rows] = old.bias.detach()[old_rows]
    network.decoder.output_projection = head
    return head


# ----------------------------------------------------------------------------- the network

class DraftDecoder(nn.Module):
    """N decoder blocks reading the main model's embeddings, with an optional feature input and head."""

    def __init__(self, main: TextDecoder, n_layer: int, features: bool = False):
        super().__init__()
        like = main.token_embedding.weight
        n_state, n_head = like.shape[1], main.blocks[0].attn.n_head
        self.token_embedding = main.token_embedding  # shared by reference
        self.positional_embedding = main.positional_embedding
        self.blocks = nn.ModuleList(DecoderBlock(n_state, n_head) for _ in range(n_layer)).to(like.device, like.dtype)
        self.ln = nn.LayerNorm(n_state, device=like.device, dtype=like.dtype)
        # [embedding + position ; normalised main hidden state] (2C) -> C. The main model's hidden
        # state is ~300x a token embedding in size after its LayerNorm: fuse_norm rescales it first.
        self.fuse = nn.Linear(2 * n_state, n_state, device=like.device, dtype=like.dtype) if features else None
        self.fuse_norm = nn.LayerNorm(n_state, device=like.device, dtype=like.dtype) if features else None
        self.output_projection: nn.Module | None = None  # a head; None: the main model's tied projection
        # The draft in C (kernels/cpu_draft.py), installed by `DraftNetwork.prepack` on the CPU: its steps
        # feed a few tokens into a cache (the drafting case), and it can draft greedy rounds whole.
        self.kernel: cpu_draft.DraftKernel | None = None

    @property
    def reads_features(self) -> bool:
        return self.fuse is not None

    def audio_kv(self, audio_features: Tensor) -> AudioKV:
        return cross_attention_kv(self.blocks, audio_features)

    def embed(self, tokens: Tensor, positions: Tensor, features: Tensor | None) -> Tensor:
        """The first block's input: tokens, positions (B, T), features (B, T, C) -> (B, T, C)."""
        # The main model's tensors are read, never trained.
        x = F.embedding(tokens, self.token_embedding.weight.detach()) + self.positional_embedding.detach()[positions]
        if self.fuse is None:
            return x
        if features is None:
            raise ValueError("this draft reads the main model's hidden states: pass `features`")
        return self.fuse(torch.cat([x, self.fuse_norm(features.to(x.dtype))], dim=-1))  # (B, T, 2C) -> (B, T, C)

    def forward(self, tokens: Tensor, audio_kv: AudioKV, cache: KVCache | None = None,
                features: Tensor | None = None) -> Tensor:
        """tokens (B, T) -> hidden states (B, T, C) after the final LayerNorm. With a cache: at its
        lengths, appended to it. Without: from position 0, causal, differentiable (training).
        features (B, T, C): the main model's hidden state one position before each token."""
        if cache is not None and self.kernel is not None and tokens.shape[1] <= KERNEL_MAX_TOKENS:
            return self._kernel_forward(tokens, audio_kv, cache, features)
        if cache is not None:
            positions = cache.positions(tokens.shape[1])  # (B, T)
        else:
            positions = torch.arange(tokens.shape[1], device=tokens.device)[None].expand_as(tokens)
        return self.ln(run_blocks(self.blocks, self.embed(tokens, positions, features), audio_kv, cache))

    def _kernel_forward(self, tokens: Tensor, audio_kv: AudioKV, cache: KVCache, features: Tensor | None) -> Tensor:
        """`forward` with a cache, one token at a time through the fused C step."""
        if self.fuse is not None and features is None:
            raise ValueError("this draft reads the main model's hidden states: pass `features`")
        positions = cache.positions(tokens.shape[1])  # (B, T)
        half = audio_kv.half()
        hidden = [self.kernel.step(tokens[:, t], positions[:, t], None if features is None else features[:, t],
                                   cache.keys, cache.values, half.keys, half.values)
                  for t in range(tokens.shape[1])]
        cache.advance(tokens.shape[1])
        return torch.stack(hidden, dim=1)  # (B, T, C)

    def logits(self, hidden: Tensor) -> Tensor:
        return tied_logits(hidden, self.token_embedding, self.output_projection)

    def log_probs(self, hidden: Tensor) -> tuple[Tensor, Tensor | None]:
        """Log-probabilities over the tokens the head can propose: (..., V), or (..., K) for a shortlist
        with its ids (K,) as second output (None otherwise). Differentiable."""
        head = self.output_projection
        if isinstance(head, (ShortlistHead, LowRankHead)):
            return head.log_probs(hidden)
        return torch.log_softmax((hidden @ self.token_embedding.weight.detach().T).float(), dim=-1), None


class DraftNetwork(nn.Module):
    """A distilled draft: the main model's encoder (shared) and a `DraftDecoder`."""

    def __init__(self, main: Whisper, n_layer: int, features: bool = False):
        super().__init__()
        self.dims = replace(main.dims, n_text_layer=n_layer)
        self.encoder = main.encoder  # shared by reference: one module, one encoder pass
        self.decoder = DraftDecoder(main.decoder, n_layer, features)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return new_decoder_cache(self.dims, self.decoder.token_embedding.weight, batch_size, max_len)

    def own_modules(self) -> nn.ModuleDict:
        """The draft's own modules (blocks, final LayerNorm, fusion, non-shared head): what is trained and saved."""
        decoder = self.decoder
        modules = {"blocks": decoder.blocks, "ln": decoder.ln}
        if decoder.reads_features:
            modules.update(fuse=decoder.fuse, fuse_norm=decoder.fuse_norm)
        if isinstance(decoder.output_projection, (ShortlistHead, LowRankHead)):
            modules["head"] = decoder.output_projection
        return nn.ModuleDict(modules)

    def own_parameters(self) -> list[nn.Parameter]:
        return list(self.own_modules().parameters())

    def own_state_dict(self) -> dict[str, Tensor]:
        """Only the draft's own tensors, under the names `load_own_state` expects."""
        for name, module in self.own_modules().named_modules():
            if is_packed(module):
                raise ValueError(f"draft module {name} is prepacked and cannot be saved")
        return {name: tensor.detach() for name, tensor in self.own_modules().state_dict().items()}

    def load_own_state(self, state: dict[str, Tensor]) -> None:
        """Raises IncompatibleAssistantError (one line) when the tensors do not fit this draft's shape."""
        modules = self.own_modules()
        expected = modules.state_dict()
        if set(state) != set(expected):
            missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise IncompatibleAssistantError(f"draft weights do not fit its config (missing {missing[:3]}, "
                                             f"unexpected {unexpected[:3]})")
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise IncompatibleAssistantError(f"draft tensor {name} has shape {tuple(tensor.shape)}, "
                                                 f"expected {tuple(expected[name].shape)}")
        modules.load_state_dict({k: v.to(expected[k].device, expected[k].dtype) for k, v in state.items()})

    @property
    def is_prepacked(self) -> bool:
        return any(is_packed(m) for m in self.decoder.blocks.modules())

    def prepack(self, main: Whisper, int8: bool = False) -> DraftNetwork:
        """The CPU fast path for the draft's own modules (the shared encoder is the main model's
        business): the same block pass as the main model's, in int8 if asked (`Int8Linear`); a packed
        head, or the main model's packed projection for the full head."""
        decoder = self.decoder
        head = decoder.output_projection
        if int8 and isinstance(head, ShortlistHead) and cpu_draft.load_library() is not None:
            # From the plain modules, before they are packed.
            decoder.kernel = cpu_draft.DraftKernel(decoder, self.dims.n_text_ctx, head.ids, head.rows, head.bias)
        prepack_blocks(decoder.blocks, Int8Linear if int8 else PackedLinear)
        if decoder.reads_features and isinstance(decoder.fuse, nn.Linear):
            decoder.fuse = PackedLinear(decoder.fuse.weight, decoder.fuse.bias)
        if isinstance(decoder.output_projection, (ShortlistHead, LowRankHead)):
            decoder.output_projection.prepack(int8)
        elif decoder.output_projection is None:
            decoder.output_projection = main.decoder.output_projection
        return self


def shift_features(hidden: Tensor) -> Tensor:
    """(B, T, C) hidden states -> the feature input of each position: the previous position's hidden
    state, zeros at position 0."""
    return F.pad(hidden, (0, 0, 1, 0))[:, :-1]


# ----------------------------------------------------------------------------- building one

def spread_layers(n_main_layers: int, n_layers: int) -> tuple[int, ...]:
    """Main decoder layers to initialise N draft blocks from, spread from first to last: (0, 5) for 2 of 6."""
    if not 1 <= n_layers <= n_main_layers:
        raise ValueError(f"a draft needs 1 to {n_main_layers} layers (the main model's), got {n_layers}")
    if n_layers == 1:
        return (0,)
    return tuple(round(i * (n_main_layers - 1) / (n_layers - 1)) for i in range(n_layers))


def main_block_states(main: SpeechModel, layers: tuple[int, ...]) -> list[dict[str, Tensor]]:
    """The main model's decoder blocks `layers` as plain fp32 CPU tensors, one dict per layer (read
    from its folder, in one pass over the files, when the loaded blocks are prepacked)."""
    blocks = main.network.decoder.blocks
    if not any(is_packed(m) for layer in layers for m in blocks[layer].modules()):
        return [{k: v.detach().to("cpu", torch.float32).clone() for k, v in blocks[layer].state_dict().items()}
                for layer in layers]
    from safetensors import safe_open

    prefixes = {f"decoder.blocks.{layer}.": {} for layer in layers}
    for path in safetensors_files(main.folder):
        with safe_open(str(path), framework="pt") as f:
            for hf_name in f.keys():
                name = rename_hf_key(hf_name)
                for prefix, state in prefixes.items():
                    if name.startswith(prefix):
                        state[name[len(prefix):]] = f.get_tensor(hf_name).float()
    return [prefixes[f"decoder.blocks.{layer}."] for layer in layers]


def init_feature_fusion(decoder: DraftDecoder) -> None:
    """Start the fusion passing the embedding through and ignoring the feature (so training starts from
    the plain draft), with fuse_norm's gain at the embedding's RMS."""
    width = decoder.ln.normalized_shape[0]
    with torch.no_grad():
        decoder.fuse.weight.zero_()
        decoder.fuse.weight[:, :width].copy_(torch.eye(width))
        decoder.fuse.bias.zero_()
        decoder.fuse_norm.weight.fill_(float(decoder.token_embedding.weight.detach().float().pow(2).mean().sqrt()))


def make_head(decoder: DraftDecoder, head: str, shortlist: list[int] | Tensor | None = None, rank: int | None = None,
              from_svd: bool = True) -> None:
    """Give the decoder its output head ("full": none of its own)."""
    embedding = decoder.token_embedding.weight
    if head == "shortlist":
        if shortlist is None or len(shortlist) == 0:
            raise ValueError("a shortlist head needs the token ids it may propose")
        decoder.output_projection = ShortlistHead(embedding, torch.as_tensor(shortlist, dtype=torch.long))
    elif head == "lowrank":
        decoder.output_projection = LowRankHead(embedding, rank or DEFAULT_RANK, from_svd=from_svd)
    elif head != "full":
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")


def build_draft_network(main: SpeechModel, init_layers: tuple[int, ...], head: str = "full",
                        shortlist: list[int] | Tensor | None = None, rank: int | None = None,
                        features: bool = False) -> DraftNetwork:
    """A new draft around `main`: its blocks copied from the main model's `init_layers`, its final
    LayerNorm from the main model's, and the requested head. Plain (trainable) layers."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    network = DraftNetwork(main.network, len(init_layers), features)
    decoder = network.decoder
    with torch.no_grad():
        for block, state in zip(decoder.blocks, main_block_states(main, init_layers)):
            block.load_state_dict({k: v.to(main.device, main.dtype) for k, v in state.items()})
        decoder.ln.load_state_dict(main.network.decoder.ln.state_dict())
    if features:
        init_feature_fusion(decoder)
    make_head(decoder, head, shortlist, rank)
    return network.eval()
