"""CPU fast path: linear layers with weights prepacked for oneDNN.

Why: on the CPU a decoder step is a handful of matrix-vector products, bound by
how fast the weights stream from memory. PyTorch's default fp32 path (MKL sgemm)
reaches only ~9 GB/s on such skinny products on the 2-core AMD machines this
project is developed on, and gets *slower* with a few rows (the γ+1 tokens of a
verification pass: 22 ms for base's 106 MB output projection with 5 rows, vs
11 ms with 1). oneDNN with weights reordered once into its blocked layout streams
them at ~25 GB/s for 1 to 16 rows (3.5-6 ms for the same projection).

Both libraries used here also give a row the same bits whether it is computed alone or
among others (oneDNN only for inputs up to ~1024 wide: wider products are sliced, see
ONEDNN_ROW_EXACT_WIDTH; checked in tests/test_prepack.py). That, with attention computed
one position at a time after the prompt (specwhisper.attention), is what lets a
multi-token verification pass reproduce single-token greedy steps bit for bit.

The decoder's blocks go one step further when their weights allow it. Whisper's released
weights are fp16 numbers (the offline CTranslate2 files store fp16; most hub checkpoints were
trained or exported in fp16), so an fp16 copy of such a weight holds exactly the same values
in half the bytes. fbgemm's fp16 GEMM reads those, converts them to fp32 and multiplies and
accumulates in fp32: the same fp32 product, summed in another order. A base decoder step
streams 88 MB of block weights; at half the bytes a greedy step took 9.2 instead of 12.8 ms
on the development machine (benchmarks/bench_greedy.py, the `fp32 blocks` column). A weight
with any value that is not an fp16 number (an fp32 fine-tune) keeps the oneDNN fp32 path, so
no weight is ever rounded. The encoder stays on oneDNN: its 1500-row products are bound by
arithmetic, not by bytes, and run ~10 % faster there.

The swap happens after loading (like gpt-fast's quantization pass), so the model
file keeps plain `nn.Linear` layers and still loads any checkpoint.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from .model import Whisper
from .screening import ScreenedHead, fp16_gemm_available


def prepack_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


# oneDNN computes a row alone and among others with the same bits only while the input width is at
# most ~1024 (measured: 1024 yes, 1280, 1500 and 2048 no, for every output width and row count tried);
# wider products are split into slices of at most this width, summed in a fixed order.
ONEDNN_ROW_EXACT_WIDTH = 512


def holds_fp16_values(weight: Tensor) -> bool:
    """True when every entry of `weight` is an fp16 number, so an fp16 copy loses nothing."""
    return bool(torch.equal(weight.detach().half().float(), weight.detach().float()))


class PackedLinear(nn.Module):
    """y = x W^T + b with W prepacked once (inference only), in one of two libraries' layouts:

    - oneDNN's blocked fp32 layout (default). `max_in_per_call`: split the input features into
      slices of at most this many, one product each, summed in order (see ONEDNN_ROW_EXACT_WIDTH);
    - with `half_weights`, fbgemm's fp16 layout: fp32 activations and accumulation, half the bytes,
      for a weight whose values are all fp16 numbers (refused otherwise: the result must be the fp32
      product of the weights as loaded, never of rounded ones).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, half_weights: bool = False,
                 max_in_per_call: int | None = None):
        super().__init__()
        weight = weight.detach()
        self.out_features, self.in_features = weight.shape
        self.half_weights = half_weights
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        if half_weights:
            if not holds_fp16_values(weight):
                raise ValueError("half_weights needs a weight whose values are all fp16 numbers")
            # An opaque fbgemm object (fp16 weight and fp32 bias), not a tensor: a plain attribute.
            self.fp16_packed = torch.ops.quantized.linear_prepack_fp16(weight.float(), self.bias)
            return
        width = max_in_per_call or self.in_features
        self.slices = [(start, min(start + width, self.in_features)) for start in range(0, self.in_features, width)]
        self.packed_slices = [torch.ops.mkldnn._reorder_linear_weight(weight[:, a:b].contiguous(), None)
                              for a, b in self.slices]  # CPU tensors only: never moved, never saved

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in): both libraries take a matrix
        if self.half_weights:
            y = torch.ops.quantized.linear_dynamic_fp16(rows.contiguous(), self.fp16_packed)
        elif len(self.slices) == 1:
            y = torch.ops.mkldnn._linear_pointwise(rows, self.packed_slices[0], self.bias, "none", [], "")
        else:
            y = None
            for (a, b), packed in zip(self.slices, self.packed_slices):
                part = torch.ops.mkldnn._linear_pointwise(rows[:, a:b].contiguous(), packed, None, "none", [], "")
                y = part if y is None else y.add_(part)
            if self.bias is not None:
                y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features)


def decoder_linear(weight: Tensor, bias: Tensor | None, half_weights: bool = True) -> PackedLinear:
    """A decoder block's linear, whose rows must come out with the same bits however many are computed
    together (a verify pass reproduces greedy steps): fp16 weights through fbgemm where that is exact
    and fbgemm runs (unless `half_weights` is False), else oneDNN fp32 in slices narrow enough for that."""
    if half_weights and fp16_gemm_available() and holds_fp16_values(weight):
        return PackedLinear(weight, bias, half_weights=True)
    return PackedLinear(weight, bias, max_in_per_call=ONEDNN_ROW_EXACT_WIDTH)


def fuse_qkv(attn: nn.Module, make=None) -> None:
    """Replace self-attention's query/key/value projections by one module computing all three
    (`make(weight, bias)`, PackedLinear by default), in place."""
    weight = torch.cat([attn.query.weight, attn.key.weight, attn.value.weight])  # (3C, C)
    bias = torch.cat([attn.query.bias, torch.zeros_like(attn.query.bias), attn.value.bias])  # key has none
    attn.fused_qkv = (make or PackedLinear)(weight, bias)
    del attn.query, attn.key, attn.value


def replace_linears(root: nn.Module, make=None) -> None:
    """Replace every nn.Linear under `root` by `make(weight, bias)` (PackedLinear by default), in place."""
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, (make or PackedLinear)(child.weight, child.bias))


def prepack_linears(network: Whisper, half_weights: bool = True) -> Whisper:
    """Replace every nn.Linear (and the tied output projection) by a PackedLinear, in place;
    self-attention's query/key/value projections become one fused PackedLinear. The decoder blocks'
    linears hold fp16 weights where that is exact (`decoder_linear`; `half_weights=False`: never, for
    comparisons). Where fbgemm runs, the decoder also gets an fp16 screen of its output projection
    (specwhisper.screening)."""
    make_decoder_linear = functools.partial(decoder_linear, half_weights=half_weights)
    for block in network.encoder.blocks:
        fuse_qkv(block.attn)
    for block in network.decoder.blocks:
        fuse_qkv(block.attn, make_decoder_linear)
    replace_linears(network.decoder.blocks, make_decoder_linear)
    replace_linears(network)
    decoder = network.decoder
    decoder.output_projection = PackedLinear(decoder.token_embedding.weight, None)
    if fp16_gemm_available():
        decoder.screened_head = ScreenedHead(decoder.token_embedding.weight)
    return network
