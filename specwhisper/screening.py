"""Exact greedy choice from a cheap fp16 screen of the output projection (CPU).

Why: base's tied output projection is 51865 x 512 fp32 = 106 MB, half of everything
a decoder step reads. Greedy decoding needs only the argmax of the logits (after
Whisper's rules), not all 51865 of them exactly. So the step computes every logit
from an fp16 copy of the weights (fbgemm's fp16 GEMM: fp32 activations and
accumulation, half the bytes), with a proven bound on how far each screened logit
can be from the exact one, and then
computes exactly (float64 dot products) only the few tokens whose screened logit
lies within twice that bound of the best. The chosen token is the exact argmax:

    |exact_i - screened_i| <= bound for every token i, so the exact winner t has
    screened_t >= exact_t - bound >= exact_j - bound >= screened_j - 2 bound
    for j = the screened winner; every token below screened_j - 2 bound loses.

The bound (`ScreenedHead.bounds`), for one hidden row x and weight row w_i:
    fp16 rounding of w (round-to-nearest; 2^-10 also covers truncation):
        |x . (w_i - fp16(w_i))| <= 2^-10 |x|_2 |w_i|_2 + 2^-24 |x|_1 (subnormals)
    fp32 accumulation of C products in any order: <= C 2^-24 |x|_2 |fp16(w_i)|_2
With |w_i|_2 replaced by the largest row norm, one number per hidden row; on real
speech only a token or two per step need the exact dot product (docs/cpu-fast-path.md).
tests/test_screening.py checks the bound on real hidden states and that screened greedy
decoding gives the same tokens as the full fp32 projection.

Whisper's timestamp rule (do all timestamps together outweigh the best text token?) is
decided on screened logits when the margin exceeds the bound, otherwise on the exact
row. Log-probabilities (avg_logprob, which drives long-form fallback and silence
decisions) are not screened: `exact_logits` computes them for a whole window at its
end, in one fp32 GEMM over the stored hidden states (`decoding.settle_logprobs`).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn


@functools.cache
def fp16_gemm_available() -> bool:
    """Whether fbgemm's fp16-weight GEMM runs here (x86 CPUs)."""
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(torch.ones(2, 8), None)
        torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 8), packed)
        return True
    except Exception:  # noqa: BLE001 - no fbgemm in this build or on this CPU
        return False


class ScreenedHead(nn.Module):
    """The tied output projection, twice: an fp16 screen of all logits with an error bound per
    hidden row, and exact dot products for chosen tokens (from the fp32 weight, shared by reference)."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.weight = weight.detach()  # (V, C) fp32: the token embedding itself, not a copy
        self.n_vocab, width = self.weight.shape
        self.packed_fp16 = torch.ops.quantized.linear_prepack_fp16(self.weight, None)
        largest_row = float(self.weight.double().norm(dim=1).max())
        # Bound = l2_factor |x|_2 + l1_factor |x|_1 (see the module docstring), with 1 % slack
        # for the rounding of these products themselves.
        self.l2_factor = 1.01 * (2.0 ** -10 + width * 2.0 ** -24 * (1 + 2.0 ** -10)) * largest_row
        self.l1_factor = 1.01 * 2.0 ** -23

    def screen(self, hidden: Tensor) -> tuple[Tensor, list[float]]:
        """hidden (N, C) fp32 -> screened logits (N, V) and each row's bound on |exact - screened|."""
        rows = hidden.reshape(-1, hidden.shape[-1]).contiguous()  # (N, C): fbgemm takes a matrix
        logits = torch.ops.quantized.linear_dynamic_fp16(rows, self.packed_fp16)
        return logits, self.bounds(rows)

    def bounds(self, rows: Tensor) -> list[float]:
        rows = rows.double()
        return (self.l2_factor * rows.norm(dim=-1) + self.l1_factor * rows.abs().sum(dim=-1)).tolist()

    def exact(self, hidden_row: Tensor, token_ids: Tensor) -> Tensor:
        """Exact logits (float64) of `token_ids` for one hidden row (C,). float64 makes the
        value independent of how many tokens are computed together."""
        return self.weight[token_ids].double() @ hidden_row.double()


class ScreenedRow:
    """One position's screened logits: its hidden state, its bound, and the head to refine with."""

    __slots__ = ("head", "hidden", "bound")

    def __init__(self, head: ScreenedHead, hidden: Tensor, bound: float):
        self.head, self.hidden, self.bound = head, hidden, bound

    def argmax(self, filtered: Tensor) -> int:
        """The exact argmax of the filtered logits (masked tokens are -inf in `filtered`)."""
        best = filtered.max()
        candidates = (filtered >= best - 2 * self.bound).nonzero()[:, 0]  # ascending ids
        if len(candidates) == 1:
            return int(candidates[0])
        exact = self.head.exact(self.hidden, candidates)
        return int(candidates[int(exact.argmax())])  # ties: the lowest id, as a full argmax

    def exact_row(self) -> Tensor:
        """All V logits in fp32 from the full weight (106 MB for base): only for the rare steps whose
        timestamp decision the screen cannot settle."""
        return self.head.weight @ self.hidden

