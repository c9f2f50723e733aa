"""The Triton attention kernels against their PyTorch references, and the dispatcher.

The kernels run under the Triton interpreter on the CPU: TRITON_INTERPRET=1 must
be set before `specwhisper.kernels.*` is first imported (that is when @triton.jit
decides), hence the assignment above the imports. tests/conftest.py sets it too
(on machines without CUDA), so the order in which pytest imports test modules
does not matter. On a CUDA machine, `TRITON_INTERPRET=0 pytest
tests/test_kernels.py` runs the same tests compiled, on the GPU.

Shapes are deliberately not multiples of the blocks (16 queries, 64 keys, 64-row
encoder tiles): cache lengths 0, 1, 2, 17, 200, 439, 447; 1 to 9 new tokens (and
20, two query tiles); 1500 audio keys; batch 1 and 3; 1, 2, 6 and 8 heads; rows
with different lengths in one batch. The interpreter is slow (numpy per op), so
the cases are a chosen subset of that cross product, not all of it.

Tolerances (fp16 in, fp16 out, both sides accumulate in fp32): the reference
rounds once, to fp16 at the end; the kernel also rounds the softmax weights to
fp16 before the P @ V product, as tensor-core kernels do. Observed max error is
2e-3 (one fp16 ulp at 2..4) on outputs of magnitude <= ~4, so FP16_TOL is
4e-3 absolute plus 4e-3 relative. The references themselves are checked
against SDPA in fp32 at 1e-5.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from specwhisper import attention  # noqa: E402
from specwhisper.kernels import cross_attention as cross_mod  # noqa: E402
from specwhisper.kernels.cross_attention import cross_attention, cross_attention_reference  # noqa: E402
from specwhisper.kernels.decode_attention import (  # noqa: E402
    decode_attention, decode_attention_reference, num_splits_for)
from specwhisper.kernels.encoder_attention import encoder_attention, encoder_attention_reference  # noqa: E402

INTERPRETED = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
if INTERPRETED and not attention._kernels_interpreted():
    pytest.skip("specwhisper.kernels was imported before TRITON_INTERPRET=1 was set; "
                "set it in tests/conftest.py", allow_module_level=True)

HEAD_DIM = 64  # every Whisper size
S_MAX = 448  # decoder context: KV cache slots per row
S_AUDIO = 1500  # encoder positions
FP16_TOL = dict(atol=4e-3, rtol=4e-3)
FP32_TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def _fresh_dispatch_state(monkeypatch):
    """Each test starts on "auto" with empty stats and no disabled kernels."""
    monkeypatch.setattr(attention, "_backend", "auto")
    monkeypatch.setattr(attention, "_auto_disabled", {})
    attention.reset_backend_stats()
    yield
    attention.reset_backend_stats()


def randn(*shape, dtype=torch.float16, scale=1.0, device=DEVICE):
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def make_decode_inputs(batch, heads, n_new, q_starts, dtype=torch.float16, seed=0, device=DEVICE):
    """q (B, H, T, D) and a (B, H, S_MAX, D) cache whose slots past each row's
    q_start + T hold large junk: a kernel that reads them is visibly wrong."""
    torch.manual_seed(seed)
    q = randn(batch, heads, n_new, HEAD_DIM, dtype=dtype, device=device)
    k_cache = randn(batch, heads, S_MAX, HEAD_DIM, dtype=dtype, scale=100.0, device=device)
    v_cache = randn(batch, heads, S_MAX, HEAD_DIM, dtype=dtype, scale=100.0, device=device)
    for b, start in enumerate(q_starts):
        n_valid = start + n_new
        k_cache[b, :, :n_valid] = randn(heads, n_valid, HEAD_DIM, dtype=dtype, device=device)
        v_cache[b, :, :n_valid] = randn(heads, n_valid, HEAD_DIM, dtype=dtype, device=device)
    q_start = torch.tensor(q_starts, dtype=torch.long, device=device)
    return q, k_cache, v_cache, q_start


def assert_fp16_close(out, ref):
    assert out.dtype == ref.dtype == torch.float16 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), **FP16_TOL)


# ----------------------------------------------------------------------------
# The references agree with SDPA (fp32, so the check is tight)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("n_new, q_starts", [(1, [0]), (5, [1, 17, 2]), (9, [439, 0, 17])])
def test_decode_reference_matches_sdpa(n_new, q_starts):
    q, k_cache, v_cache, q_start = make_decode_inputs(len(q_starts), 2, n_new, q_starts, dtype=torch.float32)
    n_keys = max(q_starts) + n_new
    mask = attention.causal_cache_mask(q_start, n_new, n_keys)
    expected = F.scaled_dot_product_attention(q, k_cache[:, :, :n_keys], v_cache[:, :, :n_keys], attn_mask=mask)
    torch.testing.assert_close(decode_attention_reference(q, k_cache, v_cache, q_start), expected, **FP32_TOL)


def test_cross_and_encoder_references_match_sdpa():
    torch.manual_seed(0)
    q, k, v = (randn(3, 2, n, HEAD_DIM, dtype=torch.float32) for n in (5, 77, 77))
    torch.testing.assert_close(cross_attention_reference(q, k, v), F.scaled_dot_product_attention(q, k, v), **FP32_TOL)
    torch.testing.assert_close(encoder_attention_reference(k, k, v), F.scaled_dot_product_attention(k, k, v),
                               **FP32_TOL)


# ----------------------------------------------------------------------------
# Kernels against references
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("batch, heads, n_new, q_starts, num_splits", [
    (1, 1, 1, [0], None),  # empty cache: the query sees only itself
    (1, 6, 1, [1], None),
    (1, 8, 1, [447], None),  # the last slot of the cache
    (1, 8, 1, [447], 4),  # ... with the key range split over 4 programs
    (3, 8, 5, [1, 17, 2], None),  # a different length per row
    (3, 6, 9, [2, 439, 17], 3),
    (3, 1, 9, [17, 0, 200], 7),  # splits that are empty for the short rows
    (1, 2, 20, [5], 2),  # more than 16 new tokens: two query tiles (prompt prefill)
])
def test_decode_attention(batch, heads, n_new, q_starts, num_splits):
    q, k_cache, v_cache, q_start = make_decode_inputs(batch, heads, n_new, q_starts)
    out = decode_attention(q, k_cache, v_cache, q_start, num_splits=num_splits)
    assert_fp16_close(out, decode_attention_reference(q, k_cache, v_cache, q_start))


def test_decode_attention_strided_inputs_and_output_layout():
    """The model's split_heads hands over (B, T, H, D) memory viewed as (B, H, T, D)."""
    q, k_cache, v_cache, q_start = make_decode_inputs(3, 6, 3, [17, 17, 17])
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    out = decode_attention(q_strided, k_cache, v_cache, q_start, key_bound=17 + 3)
    assert_fp16_close(out, decode_attention_reference(q, k_cache, v_cache, q_start))
    assert out.transpose(1, 2).is_contiguous()  # merge_heads' reshape is a view


@pytest.mark.parametrize("batch, heads, n_new, n_keys, num_splits", [
    (1, 1, 1, S_AUDIO, None),
    (1, 8, 9, S_AUDIO, None),  # heuristic: 8 programs, so the 1500 keys are split
    (3, 6, 5, S_AUDIO, 1),  # one program walks all 1500 keys
    (3, 1, 2, S_AUDIO, 3),
    (1, 2, 3, 77, 16),  # more splits asked for than key blocks: clamped
])
def test_cross_attention(batch, heads, n_new, n_keys, num_splits):
    torch.manual_seed(1)
    q = randn(batch, heads, n_new, HEAD_DIM)
    k, v = randn(batch, heads, n_keys, HEAD_DIM), randn(batch, heads, n_keys, HEAD_DIM)
    out = cross_attention(q, k, v, num_splits=num_splits)
    assert_fp16_close(out, cross_attention_reference(q, k, v))


@pytest.mark.parametrize("batch, heads, n_queries, n_keys", [
    (1, 1, S_AUDIO, S_AUDIO),  # Whisper's shape, one head: 24 x 24 tiles, both ragged
    (3, 2, 77, 77),
    (1, 6, 130, 130),
    (2, 1, 1, 1),
    (1, 2, 33, 200),  # different query and key lengths
])
def test_encoder_attention(batch, heads, n_queries, n_keys):
    torch.manual_seed(2)
    q = randn(batch, n_queries, heads, HEAD_DIM).transpose(1, 2)  # strided, like split_heads
    k = randn(batch, n_keys, heads, HEAD_DIM).transpose(1, 2)
    v = randn(batch, n_keys, heads, HEAD_DIM).transpose(1, 2)
    out = encoder_attention(q, k, v)
    assert_fp16_close(out, encoder_attention_reference(q, k, v))
    assert out.transpose(1, 2).is_contiguous()


def test_num_splits_heuristic():
    device = torch.device("cpu")  # assumes a T4's 40 SMs: target 80 programs
    assert num_splits_for(n_programs=8, key_bound=S_AUDIO, device=device) == 5  # capped: >= 256 keys each
    assert num_splits_for(n_programs=48, key_bound=S_AUDIO, device=device) == 2
    assert num_splits_for(n_programs=80, key_bound=S_AUDIO, device=device) == 1  # grid already full
    assert num_splits_for(n_programs=8, key_bound=S_MAX, device=device) == 1  # cache too short to split


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_stale_inf_slots_leave_the_outputs_finite(dtype):
    """A row's slots past its own keys (stale: rolled-back drafts, a longer row's length) get weight 0, and
    0 * inf is NaN: with inf there, the reference and the ragged SDPA path give what zeros there give."""
    q_starts, n_new = [3, 17, 9], 4
    q, k_cache, v_cache, q_start = make_decode_inputs(len(q_starts), 2, n_new, q_starts, dtype=dtype)
    k_zero, v_zero, k_inf, v_inf = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    for b, start in enumerate(q_starts):
        for cache, junk in ((k_zero, 0.0), (v_zero, 0.0), (k_inf, float("inf")), (v_inf, float("-inf"))):
            cache[b, :, start + n_new:] = junk
    reference = decode_attention_reference(q, k_inf, v_inf, q_start)
    assert torch.isfinite(reference).all()
    assert torch.equal(reference, decode_attention_reference(q, k_zero, v_zero, q_start))
    with attention.use_attention_backend("torch"):
        ragged = attention.self_attention(q, k_inf, v_inf, q_start)  # no uniform_start: rows differ
        expected = attention.self_attention(q, k_zero, v_zero, q_start)
    assert torch.isfinite(ragged).all()
    assert torch.equal(ragged, expected)


def test_kernels_reject_unsupported_inputs():
    q = randn(1, 2, 3, 48)  # head_dim 48 is not a power of two
    with pytest.raises(ValueError, match="head_dim"):
        cross_attention(q, q, q)
    q = randn(1, 2, 3, HEAD_DIM)
    with pytest.raises(ValueError, match="q_start"):
        decode_attention(q, q, q, torch.zeros(2, dtype=torch.long, device=DEVICE))


# ----------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------

def call_all_three(dtype=torch.float16, q_starts=(3, 17), n_new=4, uniform_start=None, device=DEVICE):
    """Run the three entry points on small inputs; returns their outputs."""
    q, k_cache, v_cache, q_start = make_decode_inputs(len(q_starts), 2, n_new, list(q_starts), dtype=dtype,
                                                      device=device)
    torch.manual_seed(3)
    audio_k, audio_v = (randn(len(q_starts), 2, 100, HEAD_DIM, dtype=dtype, device=device) for _ in range(2))
    return (attention.self_attention(q, k_cache, v_cache, q_start, uniform_start),
            attention.cross_attention(q, audio_k, audio_v),
            attention.encoder_attention(audio_k, audio_k, audio_v))


def test_backend_setting_and_context_manager():
    assert attention.get_attention_backend() == "auto"
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.set_attention_backend("cuda")
    with attention.use_attention_backend("torch"):
        assert attention.get_attention_backend() == "torch"
        with pytest.raises(RuntimeError), attention.use_attention_backend("triton"):
            raise RuntimeError("the previous backend must come back even after an error")
        assert attention.get_attention_backend() == "torch"
    assert attention.get_attention_backend() == "auto"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_auto_never_picks_triton_on_cpu(dtype):
    """On CPU tensors "auto" runs SDPA, except the C decoder kernel for fp32 decoder attention."""
    call_all_three(dtype, device="cpu")
    decoder = "cpu" if dtype == torch.float32 and attention.cpu_kernel_unavailable_reason() is None else "torch"
    assert attention.last_backend_used() == {"self": decoder, "cross": decoder, "encoder": "torch"}
    assert attention.backend_call_counts() == {"self": {decoder: 1}, "cross": {decoder: 1}, "encoder": {"torch": 1}}
    assert attention.triton_unavailable_reason("self", "cpu") is not None


@pytest.mark.parametrize("q_starts, uniform_start", [((3, 17), None), ((9, 9), 9)])
def test_forced_triton_matches_forced_torch(q_starts, uniform_start):
    with attention.use_attention_backend("torch"):
        expected = call_all_three(q_starts=q_starts, uniform_start=uniform_start)
    with attention.use_attention_backend("triton"):
        got = call_all_three(q_starts=q_starts, uniform_start=uniform_start)
    assert attention.last_backend_used() == {"self": "triton", "cross": "triton", "encoder": "triton"}
    assert attention.backend_call_counts()["self"] == {"torch": 1, "triton": 1}
    for out, ref in zip(got, expected):
        assert_fp16_close(out, ref)


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(attention, "_kernels_interpreted", lambda: False)
    with attention.use_attention_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        call_all_three(device="cpu")


def test_auto_falls_back_once_when_a_kernel_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("pretend compilation failed")

    monkeypatch.setattr(attention, "_auto_wants_triton", lambda *args: True)  # as if on a CUDA fp16 GPU
    monkeypatch.setattr(cross_mod, "cross_attention", broken)
    with pytest.warns(RuntimeWarning, match="pretend compilation failed"):
        first = call_all_three()
    assert attention.last_backend_used() == {"self": "triton", "cross": "torch", "encoder": "triton"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cross now stays on torch without warning again
        second = call_all_three()
    assert attention.backend_call_counts()["cross"] == {"torch": 2}
    torch.testing.assert_close(first[1], second[1])
    with attention.use_attention_backend("triton"), pytest.raises(RuntimeError, match="pretend"):
        call_all_three()  # a forced backend never hides the error


def test_dispatch_matches_sdpa_semantics_scale():
    """Scale is 1/sqrt(head_dim) on both paths (a kernel using another would fail here)."""
    torch.manual_seed(4)
    q, k, v = randn(1, 1, 2, HEAD_DIM, scale=4.0), randn(1, 1, 70, HEAD_DIM), randn(1, 1, 70, HEAD_DIM)
    with attention.use_attention_backend("triton"):
        out = attention.cross_attention(q, k, v)
    weights = (q.float() @ k.float().transpose(-1, -2) / math.sqrt(HEAD_DIM)).softmax(-1)
    assert_fp16_close(out, (weights @ v.float()).half())
