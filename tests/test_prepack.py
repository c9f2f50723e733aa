"""The oneDNN-prepacked linear layers compute what nn.Linear computes, row by row identically."""

import pytest
import torch
from torch import nn

from specwhisper.prepack import PackedLinear, prepack_available

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
