"""A decoder-only draft for speculative decoding, built around an already-loaded main model.

Why: on a CPU a full Whisper assistant cannot pay. tiny.en's decoder step costs about 0.6 of
base's, plus its own encoder pass per window. A draft made of a few of the main model's own
decoder layers, reading the main model's encoder output, costs a fraction of a main step
and, once distilled (`specwhisper.distill`), agrees with the main model's greedy choice
most of the time. Verification keeps the output exact whatever the draft proposes.

The draft network is `Whisper`-shaped (`.dims`, `.encoder`, `.decoder`, `.new_cache`), so
the speculative loop drives it like any assistant:
  - `encoder` IS the main model's encoder module (shared by reference, never run twice:
    `make_assistant` sees the same module and picks the "shared-encoder" kind);
  - `decoder.token_embedding` and `decoder.positional_embedding` ARE the main model's;
  - its own N decoder blocks (initialised from the main model's layers spread from first to
    last: 0 and 5 for base with N=2) and its own final LayerNorm;
  - an output head (`decoder.output_projection`):
      "full"      the main model's tied projection (shared, nothing of its own);
      "shortlist" only the K tokens the main model actually emits (learned from its outputs),
                  scored against the shared embedding's rows plus a learned bias; every other
                  token gets -inf and can never be drafted;
      "lowrank"   E ≈ U·Vᵀ of rank r, initialised from the embedding's SVD and trained.

With `features=True` the draft also reads the main model's own final hidden state (EAGLE-style):
the input of position t is `fuse([token embedding + position ; main hidden at t-1])`. Verification
computes those hidden states anyway, so the draft sees what the main model "was thinking" when it
chose the token it is now extending; while drafting several tokens ahead it feeds back its own
output in their place. This lifts agreement far more than depth does, at the cost of one 2C x C
linear per step.

On disk a draft is a folder: `draft.json` (the main model it belongs to, with a fingerprint of
its weights, the layer map, the head, training information) and `draft.safetensors` (only the
draft's own tensors: blocks, LayerNorm, head). `load_draft(main, folder)` rebuilds it around
`main` and refuses, in one line, a draft made for another model.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import IncompatibleAssistantError
from .kv_cache import AudioKV, KVCache
from .loading import SpeechModel
from .model import DecoderBlock, ModelDims, Whisper, merge_heads
from .prepack import PackedLinear, fuse_qkv, prepack_available, replace_linears
from .weights.hf_layout import rename_hf_key, safetensors_files

FORMAT = "specwhisper-draft"
FORMAT_VERSION = 1
CONFIG_FILE = "draft.json"
WEIGHTS_FILE = "draft.safetensors"
HEADS = ("full", "shortlist", "lowrank")
DEFAULT_RANK = 64  # low-rank head: 64 of base's 512 dimensions cost 1/8 of the full projection
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# "int8-delta": each weight matrix of the blocks stored as int8 (change from the main model's layer
# it started from) x a per-row fp32 scale; everything else in fp32. Training moves the weights
# ~5 % from their start, so the rounding error is ~0.1 % of a weight's norm (fp16's is ~0.05 %),
# at a quarter of the fp32 size, and git's zlib shrinks the small deltas further.
STORAGE_FORMATS = (*STORAGE_DTYPES, "int8-delta")
DELTA_LEVELS = 127  # int8 range used: symmetric, -127..127

# The main model's fingerprint: a few values of tensors no load-time pass rewrites (the
# embeddings, the encoder's first convolution, the final LayerNorms), compared with a
# tolerance so that the same weights loaded in fp16 or bf16 still match.
FINGERPRINT_TENSORS = ("decoder.token_embedding.weight", "decoder.positional_embedding", "encoder.conv1.weight",
                       "encoder.ln_post.weight", "decoder.ln.weight")
FINGERPRINT_VALUES_PER_TENSOR = 8
FINGERPRINT_RTOL = 2e-2  # bf16 keeps ~3 significant digits
FINGERPRINT_ATOL = 2e-3


# ----------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class DraftConfig:
    """What a saved draft is, and what it needs from the main model it is rebuilt around."""

    main_name: str
    main_dims: ModelDims
    main_fingerprint: tuple[float, ...]
    init_layers: tuple[int, ...]  # main decoder layer each draft block started from
    head: str = "full"
    shortlist: tuple[int, ...] | None = None  # head "shortlist": the token ids it can propose, best first
    rank: int | None = None  # head "lowrank"
    training: dict = field(default_factory=dict)  # how it was made: command, data, agreement, ...
    features: bool = False  # reads the main model's hidden state of the previous position (see the module doc)

    @property
    def n_layer(self) -> int:
        return len(self.init_layers)

    def as_json(self) -> dict:
        out = asdict(self)
        out["main_dims"] = asdict(self.main_dims)
        out["main_fingerprint"] = list(self.main_fingerprint)
        out["init_layers"] = list(self.init_layers)
        out["shortlist"] = None if self.shortlist is None else list(self.shortlist)
        return {"format": FORMAT, "version": FORMAT_VERSION, **out}

    @classmethod
    def from_json(cls, data: dict, source: str) -> "DraftConfig":
        if data.get("format") != FORMAT:
            raise IncompatibleAssistantError(f"{source}: not a specwhisper draft (format {data.get('format')!r})")
        if data.get("version") != FORMAT_VERSION:
            raise IncompatibleAssistantError(f"{source}: draft format version {data.get('version')}, "
                                             f"this specwhisper reads version {FORMAT_VERSION}")
        try:
            return cls(main_name=data["main_name"], main_dims=ModelDims(**data["main_dims"]),
                       main_fingerprint=tuple(data["main_fingerprint"]), init_layers=tuple(data["init_layers"]),
                       head=data["head"], shortlist=None if data["shortlist"] is None else tuple(data["shortlist"]),
                       rank=data.get("rank"), training=data.get("training") or {},
                       features=bool(data.get("features", False)))
        except (KeyError, TypeError) as err:
            raise IncompatibleAssistantError(f"{source}: malformed draft config ({type(err).__name__}: {err})") from None


def spread_layers(n_main_layers: int, n_layers: int) -> tuple[int, ...]:
    """Main decoder layers to initialise N draft blocks from, spread from first to last: (0, 5) for 2 of 6.

    One block starts from layer 0 (closest to the embeddings the draft shares).
    """
    if not 1 <= n_layers <= n_main_layers:
        raise ValueError(f"a draft needs 1 to {n_main_layers} layers (the main model's), got {n_layers}")
    if n_layers == 1:
        return (0,)
    return tuple(round(i * (n_main_layers - 1) / (n_layers - 1)) for i in range(n_layers))


def fingerprint(network: Whisper) -> tuple[float, ...]:
    """A few weight values that identify the main model (dtype-independent: compared with a tolerance)."""
    tensors = dict(network.named_parameters()) | dict(network.named_buffers())
    values: list[float] = []
    for name in FINGERPRINT_TENSORS:
        flat = tensors[name].detach().reshape(-1)
        n = FINGERPRINT_VALUES_PER_TENSOR
        index = torch.arange(n, device=flat.device) * (flat.numel() - 1) // (n - 1)  # evenly spaced, ends included
        values += flat[index].float().cpu().tolist()
    return tuple(values)


def check_main(config: DraftConfig, main: SpeechModel, source: str) -> None:
    """Raise IncompatibleAssistantError (one line) unless `main` is the model the draft was made for."""
    theirs, ours = config.main_dims, main.dims
    if theirs != ours:
        differ = [f"{k} {getattr(theirs, k)} vs {getattr(ours, k)}" for k in asdict(ours)
                  if getattr(theirs, k) != getattr(ours, k)]
        raise IncompatibleAssistantError(f"{source}: draft made for {config.main_name}, whose dims differ from "
                                         f"{main.name}'s ({', '.join(differ[:3])})")
    expected = torch.tensor(config.main_fingerprint)
    actual = torch.tensor(fingerprint(main.network))
    if expected.shape != actual.shape or not torch.allclose(actual, expected, rtol=FINGERPRINT_RTOL,
                                                            atol=FINGERPRINT_ATOL):
        raise IncompatibleAssistantError(f"{source}: draft made for {config.main_name}, but {main.name}'s weights "
                                         "differ from that model's (fingerprint mismatch)")


# ----------------------------------------------------------------------------- output heads

class ShortlistHead(nn.Module):
    """Scores only K tokens: their rows of the shared embedding, plus a learned bias (K,).

    Every other token's logit is -inf, so it can never be drafted; the main model's
    verification still decides every token, so the output stays exact.
    """

    def __init__(self, embedding: Tensor, ids: Tensor):
        super().__init__()
        self.n_vocab = embedding.shape[0]
        self.register_buffer("ids", ids.to(embedding.device, torch.long))
        # Rebuilt from the main model at load, never saved: the file holds only the bias.
        self.register_buffer("rows", embedding.detach()[self.ids], persistent=False)  # (K, C): indexing copies
        self.bias = nn.Parameter(torch.zeros(len(ids), dtype=embedding.dtype, device=embedding.device))
        self.packed: PackedLinear | None = None

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

    def prepack(self) -> None:
        self.packed = PackedLinear(self.rows, self.bias.detach())


def with_shortlist(network: Whisper, ids: list[int] | Tensor) -> ShortlistHead:
    """Give a shortlist draft a new list of tokens, keeping the learned bias of every token in both.

    For continuing training on new audio (`distill --init`): the new teacher outputs choose the list
    again, and a token that enters it starts at the median of the old biases (a token that left the
    list had been learned as rarely emitted; zero, the fresh head's start, sits above most trained
    biases and would make the newcomers the draft's favourite guesses).
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


class LowRankHead(nn.Module):
    """logits = (hidden · D) · Uᵀ + b with D (C, r) and U (V, r), from the embedding's truncated SVD."""

    def __init__(self, embedding: Tensor, rank: int):
        super().__init__()
        n_vocab, width = embedding.shape
        if not 1 <= rank < width:
            raise ValueError(f"a low-rank head needs 1 <= rank < {width}, got {rank}")
        self.down = nn.Linear(width, rank, bias=False)
        self.up = nn.Linear(rank, n_vocab)
        with torch.no_grad():
            # E = U S Vᵀ: h Eᵀ = (h V_r) (U_r S_r)ᵀ keeps the r strongest directions.
            u, s, vh = torch.linalg.svd(embedding.detach().float(), full_matrices=False)
            self.down.weight.copy_(vh[:rank])  # (r, C)
            self.up.weight.copy_(u[:, :rank] * s[:rank])  # (V, r)
            self.up.bias.zero_()
        self.to(embedding.device, embedding.dtype)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.up(self.down(hidden))

    def prepack(self) -> None:
        self.down = PackedLinear(self.down.weight, None)
        self.up = PackedLinear(self.up.weight, self.up.bias)


# ----------------------------------------------------------------------------- the draft network

def _plain_block_states(main: SpeechModel, layers: tuple[int, ...]) -> list[dict[str, Tensor]]:
    """The main model's decoder blocks `layers` as plain fp32 CPU tensors, one dict per layer (read
    from its folder, in one pass over the files, when the loaded blocks are prepacked)."""
    blocks = main.network.decoder.blocks
    if not any(isinstance(m, PackedLinear) for layer in layers for m in blocks[layer].modules()):
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


def init_state(main: SpeechModel, config: DraftConfig) -> dict[str, Tensor]:
    """What the draft's own blocks and LayerNorm started from (own_state_dict names, fp32 CPU)."""
    state = {f"blocks.{i}.{k}": v for i, block in enumerate(_plain_block_states(main, config.init_layers))
             for k, v in block.items()}
    state.update({f"ln.{k}": v.detach().to("cpu", torch.float32) for k, v in main.network.decoder.ln.state_dict().items()})
    return state


def _draft_shell(main: SpeechModel, n_layer: int) -> Whisper:
    """The draft's skeleton: the main model's encoder and embeddings by reference, fresh blocks and LayerNorm."""
    main_net = main.network
    dims = replace(main_net.dims, n_text_layer=n_layer)
    with torch.device("meta"):  # nothing of the skeleton's own encoder or embeddings is ever allocated
        network = Whisper(dims)
    network.encoder = main_net.encoder  # shared by reference: one module, one encoder pass
    decoder = network.decoder
    decoder.token_embedding = main_net.decoder.token_embedding
    decoder.positional_embedding = main_net.decoder.positional_embedding
    decoder.blocks = nn.ModuleList(DecoderBlock(dims.n_text_state, dims.n_text_head)
                                   for _ in range(n_layer)).to(main.device, main.dtype)
    decoder.ln = nn.LayerNorm(dims.n_text_state).to(main.device, main.dtype)
    decoder.exact_positions = False  # verification decides every token: a draft may batch its positions
    return network


def add_feature_fusion(network: Whisper, init: bool = True) -> nn.Linear:
    """decoder.fuse: (…, 2C) [token embedding + position ; normalised main hidden] -> (…, C),
    initialised to pass the embedding through and ignore the feature (so training starts from the
    plain draft).

    decoder.fuse_norm rescales the main model's hidden state first: after its final LayerNorm
    (weights ~9 on average for base) an entry is ~300x the size of a token embedding's (~0.03),
    and fed raw it swamps the embedding as soon as the fusion learns to read it (agreement fell
    from 80 % to 60 % in training). The LayerNorm's gain starts at the embedding's RMS.
    """
    width = network.dims.n_text_state
    param = network.decoder.blocks[0].attn_ln.weight
    fuse = nn.Linear(2 * width, width).to(param.device, param.dtype)
    norm = nn.LayerNorm(width).to(param.device, param.dtype)
    embedding = network.decoder.token_embedding.weight
    if init:  # (a draft being loaded gets these from its file)
        with torch.no_grad():
            fuse.weight.zero_()
            fuse.weight[:, :width].copy_(torch.eye(width))
            fuse.bias.zero_()
            norm.weight.fill_(float(embedding.detach().float().pow(2).mean().sqrt()))
    network.decoder.fuse = fuse
    network.decoder.fuse_norm = norm
    return fuse


def uses_features(network: Whisper) -> bool:
    """True for a draft that reads the main model's hidden states (`features=True`)."""
    return getattr(network.decoder, "fuse", None) is not None


def build_draft_network(main: SpeechModel, init_layers: tuple[int, ...], head: str = "full",
                        shortlist: list[int] | Tensor | None = None, rank: int | None = None,
                        features: bool = False) -> Whisper:
    """A new draft around `main`: its blocks copied from the main model's `init_layers`, its final
    LayerNorm from the main model's, and the requested head. Plain (trainable) layers."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    network = _draft_shell(main, len(init_layers))
    if features:
        add_feature_fusion(network)
    decoder = network.decoder
    with torch.no_grad():
        for block, state in zip(decoder.blocks, _plain_block_states(main, init_layers)):
            block.load_state_dict({k: v.to(main.device, main.dtype) for k, v in state.items()})
        decoder.ln.load_state_dict(main.network.decoder.ln.state_dict())
    embedding = decoder.token_embedding.weight
    if head == "shortlist":
        if shortlist is None or len(shortlist) == 0:
            raise ValueError("a shortlist head needs the token ids it may propose")
        decoder.output_projection = ShortlistHead(embedding, torch.as_tensor(shortlist, dtype=torch.long))
    elif head == "lowrank":
        decoder.output_projection = LowRankHead(embedding, rank or DEFAULT_RANK)
    return network.eval()


def own_modules(network: Whisper) -> nn.ModuleDict:
    """The draft's own modules (blocks, final LayerNorm, non-shared head): what is trained and saved."""
    modules = {"blocks": network.decoder.blocks, "ln": network.decoder.ln}
    if uses_features(network):
        modules["fuse"] = network.decoder.fuse
        modules["fuse_norm"] = network.decoder.fuse_norm
    head = network.decoder.output_projection
    if isinstance(head, (ShortlistHead, LowRankHead)):
        modules["head"] = head
    return nn.ModuleDict(modules)


def own_parameters(network: Whisper) -> list[nn.Parameter]:
    return list(own_modules(network).parameters())


def own_state_dict(network: Whisper) -> dict[str, Tensor]:
    """Only the draft's own tensors, under the names `load_own_state` expects."""
    for name, module in own_modules(network).named_modules():
        if isinstance(module, (PackedLinear, Int8Linear)):
            raise ValueError(f"draft module {name} is prepacked for oneDNN and cannot be saved")
    return {name: tensor.detach() for name, tensor in own_modules(network).state_dict().items()}


def load_own_state(network: Whisper, state: dict[str, Tensor]) -> None:
    modules = own_modules(network)
    expected = modules.state_dict()
    if set(state) != set(expected):
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise IncompatibleAssistantError(f"draft weights do not fit its config (missing {missing[:3]}, "
                                         f"unexpected {unexpected[:3]})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise IncompatibleAssistantError(f"draft tensor {name} has shape {tuple(tensor.shape)}, "
                                             f"expected {tuple(expected[name].shape)}")
    ref = expected[next(iter(expected))]
    modules.load_state_dict({k: v.to(ref.device, expected[k].dtype) for k, v in state.items()})


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W in int8 (one scale per output row), through PyTorch's dynamic-quantized
    linear (fbgemm): a quarter of fp32's bytes per step.

    Why a draft may be rounded: verification decides every token, so the draft's numbers change
    only how often it is right, never the output. A 2-layer draft with a 16k-token head reads
    ~60 MB per step in fp32 and ~16 MB in int8, which also lets its weights stay in the CPU's last-level
    cache between the γ steps of a round (measured on the long recordings: see the README).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        import warnings

        weight = weight.detach().float().cpu()
        self.out_features, self.in_features = weight.shape
        scale = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
        with warnings.catch_warnings():  # PyTorch marks quantized tensor creation deprecated; it still works
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(weight, scale, torch.zeros(len(scale), dtype=torch.long), 0,
                                                 torch.qint8)
            self.linear = torch.ao.nn.quantized.dynamic.Linear(self.in_features, self.out_features, dtype=torch.qint8)
            self.linear.set_weight_bias(qweight, None if bias is None else bias.detach().float().cpu())

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in)
        return self.linear(rows).view(*x.shape[:-1], self.out_features)


@functools.cache
def int8_available() -> bool:
    """Whether PyTorch's dynamic int8 linear runs here (x86 fbgemm or ARM qnnpack engines)."""
    try:
        Int8Linear(torch.randn(4, 8), torch.zeros(4))(torch.randn(1, 8))
        return True
    except Exception:  # noqa: BLE001 - no quantized engine, or the API is gone
        return False


def prepack_draft(network: Whisper, main: SpeechModel, int8: bool = False) -> Whisper:
    """The CPU fast path for the draft's own modules only (the shared encoder is the main model's
    business, and may be packed already): fused QKV and oneDNN linears in its blocks, a packed head.
    The full head uses the main model's packed projection when it has one.
    int8: the blocks' linears and a shortlist head in int8 instead (`Int8Linear`)."""
    make = Int8Linear if int8 else PackedLinear
    for block in network.decoder.blocks:
        if block.attn.fused_qkv is None:
            fuse_qkv(block.attn, make)
        replace_linears(block, make)
    if uses_features(network) and isinstance(network.decoder.fuse, nn.Linear):
        network.decoder.fuse = PackedLinear(network.decoder.fuse.weight, network.decoder.fuse.bias)
    head = network.decoder.output_projection
    if isinstance(head, ShortlistHead) and int8:
        head.packed = Int8Linear(head.rows, head.bias.detach())
    elif isinstance(head, (ShortlistHead, LowRankHead)):
        head.prepack()
    elif head is None:
        network.decoder.output_projection = main.network.decoder.output_projection
    return network


def is_prepacked(network: Whisper) -> bool:
    return any(isinstance(m, (PackedLinear, Int8Linear)) for m in network.decoder.blocks.modules())


def wrap(main: SpeechModel, network: Whisper, name: str, folder: Path | None = None) -> SpeechModel:
    """The draft as a SpeechModel: the main model's tokenizer object and decoding rules."""
    return SpeechModel(network=network, tokenizer=main.tokenizer, name=name, folder=folder or main.folder,
                       suppress_tokens=list(main.suppress_tokens),
                       begin_suppress_tokens=list(main.begin_suppress_tokens))


# ----------------------------------------------------------------------------- the training-mode forward

def draft_input(network: Whisper, tokens: Tensor, positions: Tensor, features: Tensor | None,
                detach_shared: bool = False) -> Tensor:
    """The first block's input: token embedding + position, fused with the main model's hidden
    state of the previous position for a feature draft. tokens, positions (B, T) -> (B, T, C)."""
    decoder = network.decoder
    embedding, position_table = decoder.token_embedding.weight, decoder.positional_embedding
    if detach_shared:  # training: the main model's tensors get no gradient
        embedding, position_table = embedding.detach(), position_table.detach()
    x = F.embedding(tokens, embedding) + position_table[positions]
    if uses_features(network):
        if features is None:
            raise ValueError("this draft reads the main model's hidden states: pass `features`")
        x = decoder.fuse(torch.cat([x, decoder.fuse_norm(features.to(x.dtype))], dim=-1))  # (B, T, 2C) -> (B, T, C)
    return x


def draft_forward(network: Whisper, tokens: Tensor, audio_kv: AudioKV, cache: KVCache,
                  features: Tensor | None = None) -> Tensor:
    """`TextDecoder.forward` for a draft: tokens (B, T) at the cache's lengths, with the main model's
    hidden states of the previous positions (B, T, C) when the draft reads them. Returns (B, T, C)."""
    x = draft_input(network, tokens, cache.positions(tokens.shape[1]), features)
    return network.decoder.forward_inputs(x, audio_kv, cache)


def shift_features(hidden: Tensor) -> Tensor:
    """(B, T, C) hidden states -> the feature input of each position: the previous position's
    hidden state, zeros at position 0."""
    return F.pad(hidden, (0, 0, 1, 0))[:, :-1]


def decode_all_positions(network: Whisper, tokens: Tensor, audio_kv: AudioKV,
                         features: Tensor | None = None) -> Tensor:
    """Teacher forcing without a KV cache: tokens (B, T) from position 0 -> hidden (B, T, C).

    The same blocks as `TextDecoder.forward` with a causal mask instead of a cache, so autograd
    can run through it (the cache's in-place writes into one shared buffer cannot be
    differentiated layer after layer). Right-padding is harmless: a position sees only those
    before it. The shared embeddings are detached: training never touches the main model.
    """
    decoder = network.decoder
    n_tokens = tokens.shape[1]
    positions = torch.arange(n_tokens, device=tokens.device)[None].expand_as(tokens)
    x = draft_input(network, tokens, positions, features, detach_shared=True)  # (B, T, C)
    for layer, block in enumerate(decoder.blocks):
        attn = block.attn
        q, k, v = attn.project_qkv(block.attn_ln(x))  # (B, H, T, D) each
        x = x + attn.out(merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True)))
        x = x + block.cross_attn.cross_forward(block.cross_attn_ln(x), audio_kv, layer)
        x = x + block.mlp(block.mlp_ln(x))
    return decoder.ln(x)


def head_log_probs(network: Whisper, hidden: Tensor) -> tuple[Tensor, Tensor | None]:
    """Log-probabilities over the tokens the head can propose: (..., V), or (..., K) for a shortlist,
    with the shortlist's ids (K,) as second output (None otherwise). Differentiable."""
    head = network.decoder.output_projection
    if isinstance(head, ShortlistHead):
        return torch.log_softmax(head.short_logits(hidden).float(), dim=-1), head.ids
    if isinstance(head, LowRankHead):
        return torch.log_softmax(head(hidden).float(), dim=-1), None
    logits = hidden @ network.decoder.token_embedding.weight.detach().T  # the tied projection
    return torch.log_softmax(logits.float(), dim=-1), None


# ----------------------------------------------------------------------------- save / load

def new_config(main: SpeechModel, network: Whisper, init_layers: tuple[int, ...], training: dict | None = None
               ) -> DraftConfig:
    head = network.decoder.output_projection
    kind, shortlist, rank = "full", None, None
    if isinstance(head, ShortlistHead):
        kind, shortlist = "shortlist", tuple(int(i) for i in head.ids.tolist())
    elif isinstance(head, LowRankHead):
        kind, rank = "lowrank", head.down.out_features
    return DraftConfig(main_name=main.name, main_dims=main.dims, main_fingerprint=fingerprint(main.network),
                       init_layers=tuple(init_layers), head=kind, shortlist=shortlist, rank=rank,
                       training=dict(training or {}), features=uses_features(network))


def save_draft(network: Whisper, config: DraftConfig, folder: str | os.PathLike, dtype: str = "float32",
               main: SpeechModel | None = None) -> Path:
    """Write draft.json and draft.safetensors (the draft's own tensors, in `dtype`) into `folder`.

    float32 reloads bit-identically; float16 halves the file; int8-delta (see STORAGE_FORMATS)
    quarters it, and reloads to the same values every time (init + int8 x scale in fp32).
    """
    from safetensors.torch import save_file

    if dtype not in STORAGE_FORMATS:
        raise ValueError(f"storage dtype must be one of {', '.join(STORAGE_FORMATS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    own = {k: v.detach().to("cpu") for k, v in own_state_dict(network).items()}
    if dtype == "int8-delta":
        if main is None:
            raise ValueError("int8-delta storage needs the main model (the layers the draft started from)")
        tensors = encode_deltas(own, init_state(main, config))
    else:
        tensors = {k: v.to(STORAGE_DTYPES[dtype] if v.is_floating_point() else v.dtype).contiguous().clone()
                   for k, v in own.items()}
    data = config.as_json()
    data["storage_dtype"] = dtype
    # Write to temporary names and rename, so an interrupted save never leaves a half-written draft.
    tmp_weights, tmp_config = folder / (WEIGHTS_FILE + ".tmp"), folder / (CONFIG_FILE + ".tmp")
    save_file(tensors, str(tmp_weights), metadata={"format": FORMAT})
    tmp_config.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp_weights, folder / WEIGHTS_FILE)
    os.replace(tmp_config, folder / CONFIG_FILE)
    return folder


DELTA_MARKER = "__int8_delta__"  # a one-element tensor present only in int8-delta files


def encode_deltas(own: dict[str, Tensor], init: dict[str, Tensor]) -> dict[str, Tensor]:
    """Weight matrices with a starting point -> {name.q: int8 (rows, cols), name.scale: fp32 (rows,)};
    the rest (biases, LayerNorms, head) as fp32."""
    tensors = {DELTA_MARKER: torch.ones(1, dtype=torch.int8)}
    for name, value in own.items():
        if value.dim() == 2 and name in init and value.is_floating_point():
            delta = value.float() - init[name]
            scale = (delta.abs().amax(dim=1) / DELTA_LEVELS).clamp_min(torch.finfo(torch.float32).tiny)
            tensors[f"{name}.q"] = (delta / scale[:, None]).round().clamp(-DELTA_LEVELS, DELTA_LEVELS).to(torch.int8)
            tensors[f"{name}.scale"] = scale
        else:
            tensors[name] = value.float().contiguous().clone() if value.is_floating_point() else value.clone()
    return tensors


def decode_deltas(tensors: dict[str, Tensor], init: dict[str, Tensor]) -> dict[str, Tensor]:
    state = {}
    for name, value in tensors.items():
        if name.endswith(".q"):
            base = name[:-2]
            if base not in init:
                raise IncompatibleAssistantError(f"draft tensor {base}: stored as a change, but has no starting point")
            state[base] = init[base] + value.float() * tensors[f"{base}.scale"][:, None]
        elif not name.endswith(".scale"):
            state[name] = value
    return state


def draft_folder(path: str | os.PathLike) -> Path | None:
    """The draft folder `path` names (the folder, or its draft.json / draft.safetensors), or None."""
    path = Path(path)
    if path.is_file() and path.name in (CONFIG_FILE, WEIGHTS_FILE):
        path = path.parent
    return path if (path / CONFIG_FILE).is_file() else None


def read_config(folder: str | os.PathLike) -> DraftConfig:
    folder = Path(folder)
    try:
        data = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IncompatibleAssistantError(f"{folder / CONFIG_FILE}: unreadable draft config ({err})") from None
    return DraftConfig.from_json(data, str(folder))


def load_draft(main: SpeechModel, path: str | os.PathLike, prepack: bool = True, int8: bool | None = None
               ) -> SpeechModel:
    """Rebuild a saved draft around the already-loaded `main` (sharing its encoder and embeddings).

    Raises IncompatibleAssistantError (one line) when the draft was made for another model.
    prepack: on the CPU in fp32, pack the draft's own linears for oneDNN (as `load_model` does).
    int8: run those linears in int8 (`Int8Linear`); default: on the CPU whenever it is available,
    where it makes a draft step about twice as fast. The draft's numbers never reach the output.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = draft_folder(path)
    if folder is None:
        raise IncompatibleAssistantError(f"{path}: no {CONFIG_FILE} (not a specwhisper draft)")
    config = read_config(folder)
    check_main(config, main, str(folder))
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as err:
        raise IncompatibleAssistantError(f"{folder / WEIGHTS_FILE}: cannot read the draft's weights "
                                         f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if state.pop(DELTA_MARKER, None) is not None:
        state = decode_deltas(state, init_state(main, config))
    network = _empty_draft_network(main, config)
    load_own_state(network, state)
    if prepack and prepack_available(main.device, main.dtype):
        prepack_draft(network, main, int8=int8_available() if int8 is None else int8)
    return wrap(main, network, name=f"{main.name}+draft{config.n_layer}", folder=folder)


def _empty_draft_network(main: SpeechModel, config: DraftConfig) -> Whisper:
    """A draft network of the config's shape around `main`, its own tensors not yet filled in."""
    network = _draft_shell(main, config.n_layer)
    if config.features:
        add_feature_fusion(network, init=False)
    decoder = network.decoder
    embedding = decoder.token_embedding.weight
    if config.head == "shortlist":
        if not config.shortlist or max(config.shortlist) >= main.dims.n_vocab or min(config.shortlist) < 0:
            raise IncompatibleAssistantError("draft config: a shortlist head needs ids inside the vocabulary")
        decoder.output_projection = ShortlistHead(embedding, torch.tensor(config.shortlist, dtype=torch.long))
    elif config.head == "lowrank":
        decoder.output_projection = _lowrank_shell(embedding, config.rank or DEFAULT_RANK)
    elif config.head != "full":
        raise IncompatibleAssistantError(f"draft config: unknown head {config.head!r}")
    return network.eval()


def _lowrank_shell(embedding: Tensor, rank: int) -> LowRankHead:
    """A LowRankHead of the right shape without the SVD (its weights are about to be loaded)."""
    head = LowRankHead.__new__(LowRankHead)
    nn.Module.__init__(head)
    n_vocab, width = embedding.shape
    head.down = nn.Linear(width, rank, bias=False, device=embedding.device, dtype=embedding.dtype)
    head.up = nn.Linear(rank, n_vocab, device=embedding.device, dtype=embedding.dtype)
    return head


# ----------------------------------------------------------------------------- finding a draft for a main model

SHIPPED_DRAFTS = Path(__file__).resolve().parent / "assets" / "drafts"


def draft_search_path() -> list[Path]:
    """Where `find_draft` looks, in order: drafts saved under the specwhisper cache
    (`cache_dir()/drafts/<name>/`: a user's own, which win), then the ones shipped in the package."""
    from .weights.resolve import cache_dir

    return [cache_dir() / "drafts", SHIPPED_DRAFTS]


def find_draft(main: SpeechModel) -> Path | None:
    """The first draft folder on `draft_search_path()` made for exactly this main model, or None.

    Only configs are read (a few kB each); a draft for another model is skipped, not an error.
    """
    for root in draft_search_path():
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if (p / CONFIG_FILE).is_file()):
            try:
                check_main(read_config(folder), main, str(folder))
            except IncompatibleAssistantError:
                continue
            if (folder / WEIGHTS_FILE).is_file():
                return folder
    return None
