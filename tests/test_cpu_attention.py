"""The CPU decoder attention kernel (kernels/cpu_attention.c): right, and batch-invariant.

Right: equal to the plain PyTorch reference within fp32 rounding on odd shapes. Batch-invariant:
a query's output has the same bits whatever else shares the call (other queries, other batch
rows, their key counts) and whatever lies in the cache past its own keys. That is the property a
verify pass needs to reproduce greedy steps bit for bit (tests/test_exactness.py checks it on
whole models).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from specwhisper.kernels import cpu_attention
from specwhisper.kernels.cpu_attention import cached_attention, cached_attention_reference

pytestmark = pytest.mark.skipif(cpu_attention.unavailable_reason() is not None,
                                reason=f"CPU attention kernel unavailable: {cpu_attention.unavailable_reason()}")


def random_problem(batch: int, heads: int, queries: int, slots: int, head_dim: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, head_dim, generator=generator)
    k = torch.randn(batch, heads, slots, head_dim, generator=generator)
    v = torch.randn(batch, heads, slots, head_dim, generator=generator)
    n_keys = torch.randint(1, slots + 1, (batch, queries), generator=generator)
    return q, k, v, n_keys


@pytest.mark.parametrize("batch,heads,queries,slots,head_dim", [
    (1, 8, 1, 1500, 64),  # a greedy step's cross-attention
    (2, 3, 5, 37, 64),  # odd sizes everywhere
    (3, 1, 17, 450, 8),  # more queries than a verify pass has, a tiny head
    (1, 2, 4, 65, 128),  # the widest head the kernel takes, keys one past a block
])
def test_kernel_matches_the_reference_on_odd_shapes(batch, heads, queries, slots, head_dim):
    q, k, v, n_keys = random_problem(batch, heads, queries, slots, head_dim, seed=queries)
    out = cached_attention(q, k, v, n_keys)
    torch.testing.assert_close(out, cached_attention_reference(q, k, v, n_keys), atol=2e-6, rtol=2e-5)


def test_a_query_gets_the_same_bits_whatever_shares_its_call():
    q, k, v, n_keys = random_problem(3, 4, 13, 448, 64, seed=1)
    together = cached_attention(q, k, v, n_keys)
    for b in range(3):
        for t in range(13):
            alone = cached_attention(q[b:b + 1, :, t:t + 1], k[b:b + 1], v[b:b + 1], n_keys[b:b + 1, t:t + 1])
            assert torch.equal(alone[0, :, 0], together[b, :, t]), (b, t)
    # The same queries in another grouping: reversed, in pairs.
    flipped = cached_attention(q.flip(2), k, v, n_keys.flip(1))
    assert torch.equal(flipped.flip(2), together)
    for t in range(0, 12, 2):
        pair = cached_attention(q[:, :, t:t + 2], k, v, n_keys[:, t:t + 2])
        assert torch.equal(pair, together[:, :, t:t + 2])


def test_slots_past_a_query_s_keys_do_not_matter():
    """A KV cache holds stale or unwritten slots past each row's length; only the first n_keys count."""
    q, k, v, _ = random_problem(1, 8, 5, 448, 64, seed=2)
    n_keys = torch.tensor([[250, 251, 252, 253, 254]])
    out = cached_attention(q, k, v, n_keys)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 254:] = 1e4 * torch.randn_like(k2[:, :, 254:])
    v2[:, :, 254:] = float("nan")
    assert torch.equal(cached_attention(q, k2, v2, n_keys), out)
    short = cached_attention(q, k[:, :, :260].contiguous(), v[:, :, :260].contiguous(), n_keys)
    assert torch.equal(short, out)


def test_strided_cache_views_are_read_in_place():
    """A layer's slice of the cache (L, B, H, S, D) and a head-major view are taken as they are."""
    generator = torch.Generator().manual_seed(3)
    cache = torch.randn(4, 2, 8, 448, 64, generator=generator)  # (L, B, H, S, D)
    q = torch.randn(2, 8, 3, 64, generator=generator)
    n_keys = torch.tensor([[10, 11, 12], [300, 301, 302]])
    out = cached_attention(q, cache[2], cache[3], n_keys)
    assert torch.equal(out, cached_attention(q, cache[2].clone(), cache[3].clone(), n_keys))
    torch.testing.assert_close(out, cached_attention_reference(q, cache[2], cache[3], n_keys), atol=2e-6, rtol=2e-5)


def test_unsupported_inputs_are_refused_in_one_line():
    q, k, v, n_keys = random_problem(1, 2, 3, 20, 64, seed=4)
    with pytest.raises(ValueError, match="fp32 CPU tensors"):
        cached_attention(q.double(), k.double(), v.double(), n_keys)
    with pytest.raises(ValueError, match="multiple of 8"):
        cached_attention(q[..., :60], k[..., :60].contiguous(), v[..., :60].contiguous(), n_keys)
    assert not cpu_attention.supports(q, k.transpose(2, 3), v)


def test_disabled_kernel_says_why_and_attention_falls_back():
    code = ("from specwhisper import attention; from specwhisper.kernels import cpu_attention as c; "
            "import torch; q = torch.randn(1, 2, 3, 64); k = torch.randn(1, 2, 9, 64); "
            "out = attention.cross_attention(q, k, k); "
            "print(c.unavailable_reason()); print(attention.last_backend_used()['cross'])")
    env = dict(os.environ, SPECWHISPER_CPU_KERNEL="0")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert run.stdout.splitlines() == ["disabled by SPECWHISPER_CPU_KERNEL=0", "torch"]
