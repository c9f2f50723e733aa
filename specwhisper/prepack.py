"""CPU fast path: linear layers with weights prepacked once, swapped in after loading.

Why: on the CPU a decoder step is a handful of matrix-vector products, bound by how fast the
weights stream from memory; PyTorch's default fp32 path streams them slowly and gets slower
with a few rows (a verify pass), oneDNN's prepacked layout does not. Every product used for the
main model's decoder gives a row the same bits whether it is computed alone or among others
(oneDNN only up to ~1024 inputs: wider products are sliced), which a verify pass needs to
reproduce greedy steps bit for bit. Decoder blocks whose weights are all fp16 numbers (Whisper's
released weights are) hold them in fp16 through fbgemm's fp16 GEMM, which multiplies and
accumulates in fp32: the same product from half the bytes, no weight ever rounded. A draft's
linears may run in int8 (`Int8Linear`): verification decides every token.

Measurements and the history of these choices: docs/cpu-fast-path.md.

The swap happens after loading (like gpt-fast's quantization pass), so the model file keeps
plain `nn.Linear` layers and still loads any checkpoint.
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

from .screening import ScreenedHead, fp16_gemm_available

if TYPE_CHECKING:
    from .model import Whisper

# make(weight, bias) -> a module computing x Wᵀ + b: PackedLinear, decoder_linear, Int8Linear
MakeLinear = Callable[[Tensor, "Tensor | None"], nn.Module]


def prepack_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


# oneDNN computes a row alone and among others with the same bits only while the input width is at
# most ~1024 (docs/exactness.md); wider products are split into slices of at most this width,
# summed in a fixed order.
ONEDNN_ROW_EXACT_WIDTH = 512


def holds_fp16_values(weight: Tensor) -> bool:
    """True when every entry of `weight` is an fp16 number, so an fp16 copy loses nothing."""
    return bool(torch.equal(weight.detach().half().float(), weight.detach().float()))


class CpuPacked(nn.Module):
    """A module whose weights are packed for the CPU in fp32: opaque objects that `.to()` would
    silently leave behind, so moving it elsewhere or converting its dtype is an error."""

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0))  # where and in what dtype `.to()`, `.half()`, ... would put a float tensor
        if probe.device.type != "cpu":
            raise RuntimeError("this model's linear layers are prepacked for the CPU (specwhisper.prepack); "
                               f"load it again on {probe.device} instead of moving it")
        if probe.dtype != torch.float32:
            raise RuntimeError("this model's linear layers are prepacked for the CPU in float32 "
                               f"(specwhisper.prepack); load it again in {probe.dtype} instead of converting it")
        return super()._apply(fn, recurse)


class PackedLinear(CpuPacked):
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


class Int8Linear(CpuPacked):
    """y = x Wᵀ + b with W in int8 (one scale per output row), through PyTorch's dynamic-quantized
    linear (fbgemm): a quarter of fp32's bytes. For drafts only: their numbers never reach the output."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
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


def is_packed(module: nn.Module) -> bool:
    return isinstance(module, CpuPacked)


def fuse_qkv(attn: nn.Module, make: MakeLinear = PackedLinear) -> None:
    """Replace self-attention's query/key/value projections by one module computing all three, in place."""
    weight = torch.cat([attn.query.weight, attn.key.weight, attn.value.weight])  # (3C, C)
    bias = torch.cat([attn.query.bias, torch.zeros_like(attn.query.bias), attn.value.bias])  # key has none
    attn.fused_qkv = make(weight, bias)
    del attn.query, attn.key, attn.value


def replace_linears(root: nn.Module, make: MakeLinear = PackedLinear) -> None:
    """Replace every nn.Linear under `root` by `make(weight, bias)`, in place."""
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, make(child.weight, child.bias))


def prepack_blocks(blocks: nn.ModuleList, make: MakeLinear) -> None:
    """The one pass every transformer block goes through: self-attention's query/key/value fused into
    one product, then every linear replaced by `make(weight, bias)`, in place."""
    for block in blocks:
        if block.attn.fused_qkv is None:
            fuse_qkv(block.attn, make)
    replace_linears(blocks, make)


def prepack_linears(network: Whisper, half_weights: bool = True) -> Whisper:
    """The main model's CPU fast path, in place: every block through `prepack_blocks` (the decoder's
    with `decoder_linear`: fp16-held weights where that is exact; `half_weights=False`: never, for
    comparisons), the tied output projection as a PackedLinear, and where fbgemm runs an fp16
    screen of it (specwhisper.screening)."""
    prepack_blocks(network.encoder.blocks, PackedLinear)
    prepack_blocks(network.decoder.blocks, functools.partial(decoder_linear, half_weights=half_weights))
    decoder = network.decoder
    decoder.output_projection = PackedLinear(decoder.token_embedding.weight, None)
    if fp16_gemm_available():
        decoder.screened_head = ScreenedHead(decoder.token_embedding.weight)
    return network
