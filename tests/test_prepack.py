"""The prepacked linear layers (oneDNN fp32, and fbgemm with fp16-valued weights) compute what
nn.Linear computes, row by row identically."""

import pytest
import torch
from torch import nn

from specwhisper.prepack import PackedLinear, decoder_linear, holds_fp16_values, prepack_available
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
