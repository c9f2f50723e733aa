"""CPU fast path: linear layers with weights prepacked for oneDNN.

Why: on the CPU a decoder step is a handful of matrix-vector products, bound by
how fast the weights stream from memory. PyTorch's default fp32 path (MKL sgemm)
reaches only ~9 GB/s on such skinny products on the 2-core AMD machines this
project is developed on, and gets *slower* with a few rows (the γ+1 tokens of a
verification pass: 22 ms for base's 106 MB output projection with 5 rows, vs
11 ms with 1). oneDNN with weights reordered once into its blocked layout streams
them at ~25 GB/s for 1 to 16 rows (3.5-6 ms for the same projection).

It also makes a row's result independent of how many rows are computed with it
(bitwise, checked in tests/test_prepack.py), which is what lets a multi-token
verification pass reproduce single-token greedy logits exactly.

The swap happens after loading (like gpt-fast's quantization pass), so the model
file keeps plain `nn.Linear` layers and still loads any checkpoint.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .model import Whisper
from .screening import ScreenedHead, screen_available


def prepack_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's blocked layout (inference only)."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in): oneDNN takes a matrix
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


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


def prepack_linears(network: Whisper) -> Whisper:
    """Replace every nn.Linear (and the tied output projection) by a PackedLinear, in place;
    self-attention's query/key/value projections become one fused PackedLinear. Where fbgemm runs,
    the decoder also gets an fp16 screen of its output projection (specwhisper.screening)."""
    for block in list(network.encoder.blocks) + list(network.decoder.blocks):
        fuse_qkv(block.attn)
    replace_linears(network)
    decoder = network.decoder
    decoder.output_projection = PackedLinear(decoder.token_embedding.weight, None)
    if screen_available():
        decoder.screened_head = ScreenedHead(decoder.token_embedding.weight)
    return network
