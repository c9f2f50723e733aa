"""Attention dispatch: one entry point per attention shape Whisper uses.

The model calls these three functions and never `F.scaled_dot_product_attention`
directly, so the fused Triton kernels (in `kernels/`, importable as
`specwhisper.kernels`) can replace the PyTorch path without touching the model.

All tensors are (batch, heads, length, head_dim).

- `self_attention`: decoder queries for T new tokens against the KV cache.
  Row b's first new query sits at position `q_start[b]`; query i of row b may see
  keys 0 .. q_start[b] + i (causal inside the new block, and everything cached
  before it). Keys past that are stale or unwritten slots and are masked.
- `cross_attention`: decoder queries against the encoder output's K/V, no mask.
  (`cross_attention_with_scores` also returns the weights' logits: word timing's pass, PyTorch only.)
- `encoder_attention`: encoder self-attention, no mask.
- `causal_attention`: queries, keys and values of one block with a causal mask and no
  cache (a draft's training forward).

Exactness is state, set once per decoder pass: inside `positions_computed_alone(True)`
(the main decoder after its prompt) every (row, new position) must get the bits it would get
alone, however many are verified together (why: docs/exactness.md). On the CPU the decoder
attention kernel (`kernels/cpu_attention.py`) gives that by construction, in one call; where it
cannot be built, each position runs in an SDPA call of its own (`one_position_at_a_time`).

Backends
--------
`set_attention_backend(name)` (or `with use_attention_backend(name):`) picks
the implementation for all three:

- "auto" (default): the Triton kernels for CUDA fp16 tensors on a GPU where
  they are known to work (`triton_unavailable_reason` says why not); on the CPU
  in fp32, the C decoder kernel for self- and cross-attention of up to
  CPU_KERNEL_MAX_QUERIES new tokens, and always after the prompt
  (`cpu_kernel_unavailable_reason` says why not); PyTorch SDPA for everything
  else. If a Triton kernel fails to compile or launch, that attention kind warns
  once and uses SDPA for the rest of the process.
- "torch": always SDPA.
- "triton": always the kernels; errors are raised, never hidden. On CPU tensors
  this works only under the Triton interpreter (TRITON_INTERPRET=1 set before
  `specwhisper.kernels` is first imported), which is how the tests run them.

`last_backend_used()` and `backend_call_counts()` report which path ran.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from types import SimpleNamespace
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "torch", "triton")
ATTENTION_KINDS = ("self", "cross", "encoder")
_KERNEL_HEAD_DIMS = (16, 32, 64, 128)  # power-of-two tiles; Whisper uses 64 everywhere
# New tokens up to which "auto" prefers the CPU decoder kernel outside exact mode (drafts, short prompts);
# a long prompt is a matrix-matrix product, where SDPA's blocked kernel is the faster one.
CPU_KERNEL_MAX_QUERIES = 16

_backend = "auto"
_last_used: dict[str, str] = {}  # kind -> backend that ran its latest call
_call_counts: Counter[tuple[str, str]] = Counter()  # (kind, backend) -> calls
_auto_disabled: dict[str, str] = {}  # kind -> error that made "auto" give up on Triton
_positions_alone: ContextVar[bool] = ContextVar("positions_alone", default=False)


# ----------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------

def set_attention_backend(name: str) -> None:
    """Select "auto", "torch" or "triton" for all later attention calls."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")
    _backend = name


def get_attention_backend() -> str:
    return _backend


@contextmanager
def use_attention_backend(name: str) -> Iterator[None]:
    """Use backend `name` inside the block, then restore the previous one."""
    previous = _backend
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def last_backend_used() -> dict[str, str]:
    """{"self" | "cross" | "encoder": "torch" | "triton" | "cpu"} for each kind's latest call."""
    return dict(_last_used)


def backend_call_counts() -> dict[str, dict[str, int]]:
    """{kind: {backend: number of calls}} since the last `reset_backend_stats()`."""
    counts: dict[str, dict[str, int]] = {}
    for (kind, backend), n in _call_counts.items():
        counts.setdefault(kind, {})[backend] = n
    return counts


def reset_backend_stats() -> None:
    _last_used.clear()
    _call_counts.clear()


@cache
def _kernels() -> SimpleNamespace:
    """Import the kernel modules on first use: importing triton is slow, and its
    interpreter switch (TRITON_INTERPRET) is read when the kernels are defined."""
    from .kernels import cross_attention, decode_attention, encoder_attention
    return SimpleNamespace(decode=decode_attention, cross=cross_attention, encoder=encoder_attention)


def _cpu_kernel():
    """specwhisper.kernels.cpu_attention (plain Python and ctypes: importing it imports no triton)."""
    from .kernels import cpu_attention
    return cpu_attention


def cpu_kernel_unavailable_reason() -> str | None:
    """None if the CPU decoder attention kernel is built and checked here, else why not."""
    return _cpu_kernel().unavailable_reason()


def _use_cpu_kernel(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """"auto"'s rule on the CPU: the C kernel, in exact mode or for a few new tokens, where it runs."""
    if _backend != "auto" or q.device.type != "cpu":
        return False
    if not (computing_positions_alone() or q.shape[2] <= CPU_KERNEL_MAX_QUERIES):
        return False
    kernel = _cpu_kernel()
    return kernel.supports(q, k, v) and kernel.load_library() is not None


def _kernels_interpreted() -> bool:
    return type(_kernels().decode._attend_kv_split).__name__ == "InterpretedFunction"


def _triton_version() -> tuple[int, int]:
    import triton
    match = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return (int(match[1]), int(match[2])) if match else (0, 0)


@cache
def _device_verdict(kind: str, device: torch.device) -> str | None:
    """None when "auto" may run the `kind` kernel on this CUDA device, else why not."""
    try:
        _kernels()
    except Exception as err:  # ImportError, or a triton that fails to initialise
        return f"triton is not importable ({type(err).__name__}: {err})"
    if _kernels_interpreted():
        return "TRITON_INTERPRET=1: the interpreter is a CPU emulator for tests"
    capability = torch.cuda.get_device_capability(device)
    if capability < (7, 5):
        return f"compute capability {capability} < (7, 5): older than the T4 the kernels are sized for"
    # Triton <= 3.2 emits Turing's fp16 MMA; 3.3 aborts on fp16 dots below sm_80;
    # >= 3.4 compiles them to FMA there (kernels/README.md has the details).
    version = _triton_version()
    if capability < (8, 0) and version[:2] == (3, 3):
        # An LLVM abort kills the process; no try/except can fall back from it.
        return "triton 3.3 aborts compiling fp16 tl.dot below sm_80 (use 3.2, or >= 3.4)"
    if capability < (8, 0) and version >= (3, 3) and kind == "encoder":
        return ("triton >= 3.3 lowers tl.dot to FMA below sm_80 (no tensor cores): "
                "SDPA is faster for the compute-bound encoder")
    return None


def triton_unavailable_reason(kind: str, device: torch.device | str) -> str | None:
    """None if "auto" would run the Triton kernel for `kind` on `device`, else the reason."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"{device.type} tensors: the kernels are for CUDA (the interpreter is test-only)"
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _device_verdict(kind, device)


def _require_triton(q: Tensor) -> None:
    """For the forced "triton" backend: raise a clear error where it cannot run."""
    if q.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"attention backend 'triton' does not support {q.device.type} tensors")
    try:
        _kernels()
    except Exception as err:
        raise RuntimeError(f"attention backend 'triton' needs an importable triton: {err}") from err
    if q.device.type == "cpu" and not _kernels_interpreted():
        raise RuntimeError(
            "attention backend 'triton' on CPU tensors runs only under the Triton interpreter: "
            "set TRITON_INTERPRET=1 before specwhisper.kernels is first imported")
    if q.device.type == "cuda" and not _kernels_interpreted():
        if torch.cuda.get_device_capability(q.device) < (8, 0) and _triton_version() == (3, 3):
            raise RuntimeError("triton 3.3 aborts compiling fp16 tl.dot below sm_80; use 3.2 or >= 3.4")


def _choose(kind: str, q: Tensor, k: Tensor, v: Tensor) -> str:
    if _backend == "torch":
        return "torch"
    if _backend == "triton":
        _require_triton(q)
        return "triton"
    return "triton" if kind not in _auto_disabled and _auto_wants_triton(kind, q, k, v) else "torch"


def _auto_wants_triton(kind: str, q: Tensor, k: Tensor, v: Tensor) -> bool:
    """"auto"'s rule: CUDA fp16 with a kernel-sized head on a device that passes."""
    if not (q.is_cuda and q.dtype == k.dtype == v.dtype == torch.float16
            and q.shape[-1] in _KERNEL_HEAD_DIMS):
        return False
    return triton_unavailable_reason(kind, q.device) is None


def _run_triton(kind: str, launch: Callable[[SimpleNamespace], Tensor]) -> Tensor | None:
    """Run a kernel; in "auto", a failure warns once and returns None (use SDPA)."""
    if _backend == "triton":
        out = launch(_kernels())
    else:
        try:
            out = launch(_kernels())
        except Exception as err:
            _auto_disabled[kind] = f"{type(err).__name__}: {err}"
            warnings.warn(f"specwhisper: the Triton {kind}-attention kernel failed ({_auto_disabled[kind]}); "
                          "using PyTorch SDPA for it from now on", RuntimeWarning, stacklevel=3)
            return None
    _record(kind, "triton")
    return out


def _record(kind: str, backend: str) -> None:
    if torch.compiler.is_compiling():
        return  # a traced pass must not depend on these counts (each change would recompile it)
    _last_used[kind] = backend
    _call_counts[kind, backend] += 1


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------

def causal_cache_mask(q_start: Tensor, n_new: int, n_keys: int) -> Tensor:
    """Boolean mask (B, 1, T, S): True where query i of row b may attend key j."""
    query_pos = q_start[:, None] + torch.arange(n_new, device=q_start.device)  # (B, T)
    key_pos = torch.arange(n_keys, device=q_start.device)  # (S,)
    return (key_pos[None, None, :] <= query_pos[:, :, None])[:, None]  # (B, 1, T, S)


@contextmanager
def positions_computed_alone(enabled: bool = True) -> Iterator[None]:
    """Inside the block, give every (row, new position) the bits it would get alone (see the module doc)."""
    token = _positions_alone.set(enabled)
    try:
        yield
    finally:
        _positions_alone.reset(token)


def computing_positions_alone() -> bool:
    """Whether inside `positions_computed_alone(True)`. Never in a pass torch.compile traces (its tracer cannot
    read a ContextVar): those are fixed-shape passes (specwhisper.fixed_shape), exact by their shapes."""
    return not torch.compiler.is_compiling() and _positions_alone.get()


def one_position_at_a_time(q: Tensor) -> bool:
    """Whether the PyTorch path must compute each (row, new position) of q (B, H, T, D) in a call of its own.

    SDPA's CPU kernels sum in an order that depends on how many queries and rows one call holds; one
    call per position gives each the bits of a one-token greedy step. Only on the CPU: on a GPU the
    fused kernels decide, and many tiny launches would cost more.
    """
    return computing_positions_alone() and q.device.type == "cpu" and q.shape[0] * q.shape[2] > 1


def _each_position(q: Tensor, attend: Callable[[int, int], Tensor]) -> Tensor:
    """(B, H, T, D) -> (B, H, T, D) from attend(row, i) -> (1, H, 1, D), one call per row and new position."""
    return torch.cat([torch.cat([attend(row, i) for i in range(q.shape[2])], dim=2) for row in range(q.shape[0])])


def self_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, q_start: Tensor,
                   uniform_start: int | None = None, fixed_mask: Tensor | None = None) -> Tensor:
    """q: (B, H, T, D); k_cache, v_cache: (B, H, S_max, D); q_start: (B,) int64.

    `uniform_start` is q_start's value when every row shares it (a Python int the
    caller already knows), which lets a single-token step skip building a mask.
    `fixed_mask` (B, 1, T, S_max): read all S_max slots under this mask, whatever the lengths (a
    StaticKVCache's passes: fixed shapes, nothing read back, capturable).
    Returns (B, H, T, D).
    """
    n_new = q.shape[2]
    if fixed_mask is not None:
        return fixed_shape_self_attention(q, k_cache, v_cache, q_start, fixed_mask)
    if _choose("self", q, k_cache, v_cache) == "triton":
        # The kernel reads q_start on the device; uniform_start only bounds the
        # key range for its split heuristic, so no host sync either way.
        key_bound = None if uniform_start is None else uniform_start + n_new
        out = _run_triton("self", lambda kern: kern.decode.decode_attention(
            q, k_cache, v_cache, q_start, key_bound=key_bound))
        if out is not None:
            return out
    if _use_cpu_kernel(q, k_cache, v_cache):
        _record("self", "cpu")
        n_keys = q_start[:, None] + torch.arange(1, n_new + 1, device=q.device)  # (B, T): query i sees start + i + 1
        return _cpu_kernel().cached_attention(q, k_cache, v_cache, n_keys)
    _record("self", "torch")
    if one_position_at_a_time(q):
        starts = q_start.tolist()  # the CPU only: no device sync
        # Query i of a row sees keys 0 .. start + i, exactly as a one-token step does (no mask).
        return _each_position(q, lambda row, i: F.scaled_dot_product_attention(
            q[row:row + 1, :, i:i + 1], k_cache[row:row + 1, :, :starts[row] + i + 1],
            v_cache[row:row + 1, :, :starts[row] + i + 1]))
    if uniform_start is not None:
        n_keys = uniform_start + n_new
        k, v = k_cache[:, :, :n_keys], v_cache[:, :, :n_keys]
        if n_new == 1:  # one query sees every valid key: no mask at all
            return F.scaled_dot_product_attention(q, k, v)
        mask = causal_cache_mask(q_start, n_new, n_keys)
    else:
        n_keys = int(q_start.max()) + n_new
        k, v = k_cache[:, :, :n_keys], v_cache[:, :, :n_keys]
        mask = causal_cache_mask(q_start, n_new, n_keys)
        # A shorter row's stale slots get weight 0, and 0 * inf is NaN in SDPA's sums: zero them.
        stale = (torch.arange(n_keys, device=q.device) >= (q_start + n_new)[:, None])[:, None, :, None]  # (B, 1, S, 1)
        k, v = k.masked_fill(stale, 0.0), v.masked_fill(stale, 0.0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def fixed_shape_self_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, q_start: Tensor, mask: Tensor) -> Tensor:
    """`self_attention` over every cache slot: the kernel with its key bound at S_max (it reads q_start on the
    device), or SDPA with the pass's mask (B, 1, T, S_max). No host int enters, so every pass has one shape."""
    if _choose("self", q, k_cache, v_cache) == "triton":
        out = _run_triton("self", lambda kern: kern.decode.decode_attention(q, k_cache, v_cache, q_start))
        if out is not None:
            return out
    _record("self", "torch")
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)


def cross_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q: (B, H, T, D); k, v: (B, H, S_audio, D). Returns (B, H, T, D)."""
    if _choose("cross", q, k, v) == "triton":
        out = _run_triton("cross", lambda kern: kern.cross.cross_attention(q, k, v))
        if out is not None:
            return out
    if _use_cpu_kernel(q, k, v):
        _record("cross", "cpu")
        n_keys = torch.full((q.shape[0], q.shape[2]), k.shape[2], dtype=torch.int64)  # (B, T): every key
        return _cpu_kernel().cached_attention(q, k, v, n_keys)
    _record("cross", "torch")
    if one_position_at_a_time(q):
        return _each_position(q, lambda row, i: F.scaled_dot_product_attention(
            q[row:row + 1, :, i:i + 1], k[row:row + 1], v[row:row + 1]))
    return F.scaled_dot_product_attention(q, k, v)


def cross_attention_with_scores(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-attention step by step, for word timing's one pass: (output (B, H, T, D), the fp32 scores
    before the softmax (B, H, T, S)). No fused kernel exposes the scores; decoding never calls this."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, T, S)
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v, scores


def encoder_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q, k, v: (B, H, S, D). Returns (B, H, S, D)."""
    if _choose("encoder", q, k, v) == "triton":
        out = _run_triton("encoder", lambda kern: kern.encoder.encoder_attention(q, k, v))
        if out is not None:
            return out
    _record("encoder", "torch")
    return F.scaled_dot_product_attention(q, k, v)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q, k, v: (B, H, T, D) of one block, query i seeing keys 0 .. i. Returns (B, H, T, D)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
