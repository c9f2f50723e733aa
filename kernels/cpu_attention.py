"""Decoder attention on the CPU whose rows do not depend on each other: exact verification at batched cost.

Why this kernel exists
----------------------
Speculative output equals greedy output only if a verify pass (the last decided token plus γ
drafts, T = γ+1 queries in one call) gives every position the bits a one-token greedy step gives
it. PyTorch's CPU attention does not: SDPA and the BLAS behind `matmul` pick their blocking and
their summation order by the number of queries and keys, so the same query gets different bits
in a call of 1 query and in a call of 5 (docs/exactness.md). Computing each position in a call of
its own is exact, but re-reads every layer's keys and values once per position. This kernel
computes every (row, query) with arithmetic that depends only on that query, its key count and
the keys and values it sees (see the invariant in cpu_attention.c), so one call serves any T, and
it reads each head's K/V once for all T queries.

It is also simply faster than SDPA for decoding on the CPU: one query against 1,500 encoder keys
is a matrix-vector product, bound by reading K/V, and SDPA's per-call setup costs more than the
arithmetic (docs/cpu-fast-path.md has the measurements).

The kernel is C (cpu_attention.c, ~150 lines: GCC/Clang vector extensions and OpenMP), compiled
on first use with the machine's C compiler (`$CC`, else cc/gcc/clang) into the specwhisper cache,
keyed by the source, the compiler and the CPU, and loaded with ctypes: no torch headers, so it
compiles in a fraction of a second. Where no compiler works, `unavailable_reason()` says why and
specwhisper.attention uses its exact per-position SDPA path instead.

Layout and semantics: q (B, H, T, D); k, v (B, H, S, D) with contiguous rows (a KV cache's slots
or the encoder's K/V); query t of row b sees keys 0 .. n_keys[b, t] - 1, all of them unmasked:
n_keys = S for cross-attention, q_start[b] + t + 1 for cached self-attention.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("cpu_attention.c")
MAX_HEAD_DIM = 128  # DMAX in the C source
# Tried in order: the fastest code for this CPU, then portable code, then without OpenMP. Never fused
# multiply-adds of the compiler's choosing: the C code writes each one out (fma8).
FLAG_SETS = (["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"], ["-O3", "-fopenmp", "-ffp-contract=off"],
             ["-O3", "-ffp-contract=off"])


def cached_attention_reference(q: Tensor, k: Tensor, v: Tensor, n_keys: Tensor) -> Tensor:
    """Plain PyTorch: each query attends keys 0 .. n_keys[b, t] - 1 (masked matmul, softmax, matmul).

    q: (B, H, T, D); k, v: (B, H, S, D); n_keys: (B, T) int. Returns (B, H, T, D) fp32.
    Memory traffic (fp32): reads Q, K, V, writes the (B, H, T, S) scores, reads and writes them again
    for the softmax and reads them a third time for the second matmul. The kernel reads K, V and Q
    once and keeps each row's S scores in a scratch row.
    """
    scores = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, H, T, S)
    visible = torch.arange(k.shape[2], device=q.device) < n_keys[:, None, :, None]  # (B, 1, T, S)
    return scores.masked_fill(~visible, float("-inf")).softmax(dim=-1) @ v.float()


def cached_attention(q: Tensor, k: Tensor, v: Tensor, n_keys: Tensor) -> Tensor:
    """The kernel. q (B, H, T, D), k and v (B, H, S, D) fp32 CPU tensors with D a multiple of 8 (at most
    128) and unit-stride rows D apart (`supports`); n_keys (B, T) int, each in 1..S. Returns (B, H, T, D)."""
    library = load_library()
    if library is None:
        raise RuntimeError(f"the CPU attention kernel is unavailable: {unavailable_reason()}")
    if not supports(q, k, v):
        raise ValueError("cached_attention takes fp32 CPU tensors with D a multiple of 8 (<= 128) and rows "
                         "of D contiguous floats")
    return _launch(library, q, k, v, n_keys)


def _launch(library: ctypes.CDLL, q: Tensor, k: Tensor, v: Tensor, n_keys: Tensor) -> Tensor:
    batch, heads, n_queries, head_dim = q.shape
    n_slots = k.shape[2]
    q, n_keys = q.contiguous(), n_keys.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    scratch = torch.empty(batch * heads * n_queries * n_slots, dtype=torch.float32)  # each row's scores
    library.cached_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), n_keys.data_ptr(),
                             batch, heads, n_queries, head_dim, n_slots, k.stride(0), k.stride(1),
                             v.stride(0), v.stride(1), head_dim ** -0.5, scratch.data_ptr(),
                             torch.get_num_threads())
    return out


def supports(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether `cached_attention` takes these tensors (given a built library)."""
    head_dim = q.shape[-1]
    return (q.device.type == k.device.type == v.device.type == "cpu"
            and q.dtype == k.dtype == v.dtype == torch.float32
            and head_dim % 8 == 0 and head_dim <= MAX_HEAD_DIM
            and k.stride(3) == 1 and v.stride(3) == 1 and k.stride(2) == head_dim and v.stride(2) == head_dim)


# ----------------------------------------------------------------------------- building and loading

KERNELS = Path(__file__).parent
_failures: dict[str, str] = {}  # C source name -> why it could not be built or checked


def unavailable_reason() -> str | None:
    """None when this kernel is built and passed its check, else why not (one line)."""
    load_library()
    return _failures.get(SOURCE.name)


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled attention kernel, checked against the reference; None (see `unavailable_reason`) if not."""
    library = build_library(SOURCE.name)
    if library is None:
        return None
    pointer, size, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    library.cached_attention.argtypes = [pointer] * 5 + [size] * 9 + [real, pointer, ctypes.c_int]
    library.cached_attention.restype = None
    try:
        _check(library)
    except RuntimeError as err:
        _failures[SOURCE.name] = str(err)
        return None
    return library


def build_library(source_name: str) -> ctypes.CDLL | None:
    """Compile kernels/<source_name> once per machine into the specwhisper cache and load it; None when that
    fails (the reason is kept for `failure(source_name)`). SPECWHISPER_CPU_KERNEL=0 turns every C kernel off."""
    if source_name in _failures:
        return None
    if os.environ.get("SPECWHISPER_CPU_KERNEL", "1") == "0":
        _failures[source_name] = "disabled by SPECWHISPER_CPU_KERNEL=0"
        return None
    try:
        return ctypes.CDLL(str(_build(KERNELS / source_name)))
    except Exception as err:  # noqa: BLE001 - no compiler, a failed build: say why, fall back
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        _failures[source_name] = f"{type(err).__name__}: {message}"
        return None


def failure(source_name: str) -> str | None:
    return _failures.get(source_name)


def _compiler() -> str:
    for name in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang")):
        if shutil.which(name):
            return name
    raise RuntimeError("no C compiler found (set CC, or install gcc)")


def _build(source: Path) -> Path:
    """The compiled library's path, building it if these sources, this compiler and this CPU have none yet."""
    from ..weights.resolve import cache_dir

    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    sources = b"".join(path.read_bytes() for path in sorted(KERNELS.glob("*.c")))  # a source may include another
    cpu = platform.processor() + platform.machine() + _cpu_flags()
    key = hashlib.sha256(sources + version.encode() + cpu.encode()).hexdigest()[:16]
    folder = cache_dir() / "kernels"
    target = folder / f"{source.stem}-{key}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in FLAG_SETS:
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            built = Path(tmp) / target.name
            run = subprocess.run([compiler, *flags, "-shared", "-fPIC", "-I", str(KERNELS), "-o", str(built),
                                  str(source), "-lm"], capture_output=True, text=True, check=False)
            if run.returncode == 0:
                os.replace(built, target)  # atomic: another process may be building the same file
                return target
            errors.append(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}")
    raise RuntimeError(f"{compiler} could not build {source.name}: {errors[-1]}")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                return line
    except OSError:
        pass
    return ""


def _check(library: ctypes.CDLL) -> None:
    """The built kernel against the reference, and each row of a 5-query call against the same row alone."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 64, generator=generator) for n in (5, 37, 37))
    n_keys = torch.tensor([[30, 31, 32, 33, 34], [37, 37, 37, 37, 37]])
    out = _launch(library, q, k, v, n_keys)
    if not torch.allclose(out, cached_attention_reference(q, k, v, n_keys), atol=1e-5, rtol=1e-5):
        raise RuntimeError("the built kernel disagrees with the PyTorch reference")
    for t in range(5):
        alone = _launch(library, q[:, :, t:t + 1], k, v, n_keys[:, t:t + 1])
        if not torch.equal(alone[:, :, 0], out[:, :, t]):
            raise RuntimeError("the built kernel's rows depend on each other")
