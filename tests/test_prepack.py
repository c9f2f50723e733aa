"""The prepacked linear layers (oneDNN fp32, and fbgemm with fp16-valued weights) compute what
nn.Linear computes, row by row identically."""

import pytest
import torch
from torch import nn

from specwhisper.model import ModelDims, Whisper
from specwhisper.prepack import (Int8Linear, PackedLinear, decoder_linear, holds_fp16_values, int8_available,
                                 prepack_available, prepack_linears)
from specwhisper.screening import fp16_gemm_available

pytestmark = pytest.mark.skipif(not prepack_available(torch.device("cpu"), torch.float32),
                                reason="this torch build has no oneDNN linear ops")


@pytest.mark.parametrize("in_features,out_features,bias", [(64, 300, True), (512, 2048, True), (96, 1001, False)])
def test_packed_linear_matches_nn_linear(in_features, out_features, bias):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    packed = PackedLinear(linear.weight, linear.bias)
    x = torch.randn(2, 7, in_features)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)


def test_a_row_gives_the_same_bits_alone_or_with_others():
    """Verification runs γ+1 rows at once; greedy runs one. Their logits must agree exactly."""
    torch.manual_seed(1)
    weight = torch.randn(5003, 384)
    packed = PackedLinear(weight, None)
    x = torch.randn(9, 384)
    with torch.no_grad():
        together = packed(x)
        alone = torch.cat([packed(x[i:i + 1]) for i in range(9)])
    assert torch.equal(together, alone)


needs_fbgemm = pytest.mark.skipif(not fp16_gemm_available(), reason="no fbgemm fp16 GEMM in this torch build")


@needs_fbgemm
def test_half_weights_compute_the_fp32_product_of_fp16_valued_weights():
    """fp16 storage of weights that are fp16 numbers: the same fp32 product, to fp32 rounding."""
    torch.manual_seed(2)
    linear = nn.Linear(512, 1536)
    with torch.no_grad():
        linear.weight.copy_(linear.weight.half().float())  # what Whisper's released weights are
    packed = PackedLinear(linear.weight, linear.bias, half_weights=True)
    x = torch.randn(3, 5, 512)
    with torch.no_grad():
        exact = (x.double() @ linear.weight.double().T + linear.bias.double()).float()
        torch.testing.assert_close(packed(x), exact, atol=2e-5, rtol=1e-5)


@needs_fbgemm
@pytest.mark.parametrize("rows", [2, 5, 13, 104, 300])
def test_half_weights_give_a_row_the_same_bits_alone_or_with_others(rows):
    """As for oneDNN: a verify pass of γ+1 rows (or a batch of them) must reproduce single-token steps."""
    torch.manual_seed(3)
    weight, bias = torch.randn(2048, 512).half().float(), torch.randn(2048)
    packed = PackedLinear(weight, bias, half_weights=True)
    x = torch.randn(rows, 512)
    with torch.no_grad():
        assert torch.equal(packed(x), torch.cat([packed(x[i:i + 1]) for i in range(rows)]))


def test_half_weights_refuse_a_weight_that_fp16_would_round():
    weight = torch.randn(8, 16).half().float()
    weight[3, 5] += 1e-4  # between two fp16 numbers
    assert not holds_fp16_values(weight)
    with pytest.raises(ValueError, match="fp16 numbers"):
        PackedLinear(weight, None, half_weights=True)


@needs_fbgemm
def test_decoder_linears_are_half_only_where_exact():
    fp16_valued = torch.randn(64, 32).half().float()
    assert decoder_linear(fp16_valued, None).half_weights
    assert not decoder_linear(fp16_valued + 1e-5, None).half_weights  # an fp32 fine-tune: oneDNN, unrounded


def packed_modules():
    torch.manual_seed(5)
    weight, bias = torch.randn(16, 32), torch.randn(16)
    modules = [PackedLinear(weight, bias), PackedLinear(weight, bias, max_in_per_call=8)]
    if fp16_gemm_available():
        modules.append(PackedLinear(weight.half().float(), bias, half_weights=True))
    if int8_available():
        modules.append(Int8Linear(weight, bias))
    return modules


@pytest.mark.parametrize("move, message", [
    (lambda m: m.to("meta"), "load it again on meta instead of moving it"),
    (lambda m: m.half(), "load it again in torch.float16 instead of converting it"),
    (lambda m: m.to(torch.float64), "load it again in torch.float64"),
])
def test_packed_modules_refuse_to_leave_the_cpu_or_fp32(move, message):
    """Packed weights are opaque CPU objects: `.to()` would leave them behind and the model would fail later."""
    for packed in packed_modules():
        model = nn.Sequential(nn.LayerNorm(32), packed)  # as in a model: the move starts at its root
        with pytest.raises(RuntimeError, match="prepacked for the CPU") as error:
            move(model)
        assert message in str(error.value) and "\n" not in str(error.value)


def test_packed_modules_stay_usable_after_a_move_to_where_they_are():
    x = torch.randn(3, 32)
    for packed in packed_modules():
        with torch.no_grad():
            before = packed(x)
            assert torch.equal(packed.to("cpu").float().to("cpu", torch.float32).cpu()(x), before)


def test_a_prepacked_network_stays_on_the_cpu_in_fp32_and_refuses_to_move():
    dims = ModelDims(n_mels=80, n_audio_ctx=16, n_audio_state=32, n_audio_head=2, n_audio_layer=1, n_vocab=100,
                     n_text_ctx=8, n_text_state=32, n_text_head=2, n_text_layer=1)
    network = prepack_linears(Whisper(dims).eval())
    assert network.to("cpu").float() is network
    with pytest.raises(RuntimeError, match="load it again on meta instead of moving it"):
        network.to("meta")
