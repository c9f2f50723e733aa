"""How many tokens to draft per main-model pass (γ), and the round records it learns from.

`DraftLengthController` picks γ: constant, or adaptive, from the acceptance rate and the costs
of a draft step and of a verify pass as they are measured, maximizing expected tokens per second.
`RoundRecorder` times each phase of a speculative round and hands the outcome to the decode
statistics and to the controller, so the loop itself holds no clocks. Why each estimate is
smoothed, bounded or regularized the way it is, with the measurements: docs/controller.md.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from .decoding import DecodeStats, RowProgress


@dataclass
class DraftLengthController:
    """Chooses γ, the number of tokens drafted per main-model pass.

    constant: always `gamma`. adaptive: pick the γ that maximizes expected tokens per second,
    E[tokens] / (γ·t_draft + t_verify(γ+1)), with E[tokens] = (1 - α^(γ+1)) / (1 - α). γ = 0
    (no drafting, one token per pass) wins when drafts don't pay; drafting is then re-probed with
    γ = 1 every `probe_every` tokens.
    """

    gamma: int = 4
    adaptive: bool = True
    max_gamma: int = 12
    probe_every: int = 32
    acceptance: float = 0.7  # running estimate of α (per drafted position)
    draft_step_seconds: float | None = None
    verify_base_seconds: float | None = None  # cost of a pass, fixed part
    verify_per_token_seconds: float = 0.0  # and per extra position
    tokens_since_off: int = 0
    smoothing: float = 0.25  # weight of a round in the draft-step cost
    acceptance_smoothing: float = 0.1  # α moves slower: a round is only a few Bernoulli trials
    flat_optimum: float = 0.97  # take the longest γ within this fraction of the best rate
    outlier_ratio: float = 2.0  # a round timed above this multiple of the estimate counts as this multiple
    fit_smoothing: float = 0.1  # weight of each pass in the verify-cost fit (~10 passes)
    slope_ridge: float = 1.0  # positions²: how much spread in pass sizes outweighs the prior slope
    prior_slope_fraction: float = 0.15  # an extra position's cost, as a fraction of a pass, before data
    max_slope_fraction: float = 0.25  # an extra position costs at most this fraction of a mean pass
    # Weighted sums for the verify-cost fit: (1, x, x², seconds, x·seconds), x = positions - 1.
    _fit_sums: list[float] = field(default_factory=lambda: [0.0] * 5, repr=False)

    def next_gamma(self) -> int:
        if not self.adaptive:
            return self.gamma
        if self.gamma == 0:
            if self.tokens_since_off >= self.probe_every:
                self.tokens_since_off = 0
                return 1
            return 0
        return self.gamma

    def update(self, drafted: int, accepted: int, draft_seconds: float, verify_seconds: float, n_positions: int,
               tokens: int, rejections: int, catch_up_seconds: float = 0.0) -> None:
        """One round's outcome. rejections: the rows whose drafts were cut by a rejected token.
        catch_up_seconds: the part of draft_seconds spent feeding the drafter the tokens decided in
        rounds without drafts, a one-off cost counted as a usual sync (about a draft step)."""
        if not self.adaptive:
            return
        if catch_up_seconds > 0 and self.draft_step_seconds is not None:
            draft_seconds += min(self.draft_step_seconds, catch_up_seconds) - catch_up_seconds
        if drafted == 0:
            self.tokens_since_off += tokens
            self._note_verify(verify_seconds, n_positions)
            return
        # α: the chance that a drafted position passes given that every one before it did (positions
        # after a rejection were never tried, so accepted / drafted would understate it).
        rate = accepted / max(accepted + rejections, 1)
        self.acceptance += self.acceptance_smoothing * (rate - self.acceptance)
        step = draft_seconds / drafted
        if self.draft_step_seconds is None:
            self.draft_step_seconds = step
        else:
            step = min(step, self.outlier_ratio * self.draft_step_seconds)
            self.draft_step_seconds += self.smoothing * (step - self.draft_step_seconds)
        self._note_verify(verify_seconds, n_positions)
        self.gamma = self.best_gamma()

    def _note_verify(self, seconds: float, n_positions: int) -> None:
        """Fit pass cost = base + per_token x (positions - 1) by exponentially weighted least squares,
        the slope shrunk towards a prior (ridge) and capped: most passes have one size."""
        w = self.fit_smoothing
        x = n_positions - 1
        sums = self._fit_sums
        if self.verify_base_seconds is not None:
            seconds = min(seconds, self.outlier_ratio * (self.verify_base_seconds + self.verify_per_token_seconds * x))
        for i, value in enumerate((1.0, x, x * x, seconds, x * seconds)):
            sums[i] = (1 - w) * sums[i] + w * value
        n, sx, sxx, sy, sxy = sums
        variance = sxx * n - sx * sx
        if variance > 1e-9 * max(n * n, 1e-30):  # passes of at least two sizes: fit the slope too
            prior = self.prior_slope_fraction * sy / n
            ridge = self.slope_ridge * n * n
            slope = max((sxy * n - sx * sy + ridge * prior) / (variance + ridge), 0.0)
            self.verify_per_token_seconds = min(slope, self.max_slope_fraction * sy / n)
        base = (sy - self.verify_per_token_seconds * sx) / n
        self.verify_base_seconds = max(base, 1e-9)

    def expected_tokens(self, gamma: int) -> float:
        alpha = min(self.acceptance, 0.999)
        return (1 - alpha ** (gamma + 1)) / (1 - alpha)

    def best_gamma(self) -> int:
        if self.draft_step_seconds is None or self.verify_base_seconds is None:
            return self.gamma

        def rate(g: int) -> float:
            cost = g * self.draft_step_seconds + self.verify_base_seconds + g * self.verify_per_token_seconds
            return self.expected_tokens(g) / cost

        rates = [rate(g) for g in range(self.max_gamma + 1)]
        top = max(rates)
        best = max(g for g, r in enumerate(rates) if r >= self.flat_optimum * top)
        if best == 0:
            self.tokens_since_off = 0
        return best


class RoundRecorder:
    """Times the phases of speculative rounds ("prefill", "draft", "sync" inside it, "verify") and, at
    the end of each round, adds them and its counts to the decode statistics and the controller."""

    STATS_FIELDS = {"prefill": "prefill_seconds", "draft": "draft_seconds", "verify": "verify_seconds"}

    def __init__(self, stats: DecodeStats, controller: DraftLengthController):
        self.stats, self.controller = stats, controller
        self.round_seconds: defaultdict[str, float] = defaultdict(float)
        self.synced_last_round = True  # the drafter read its prompt before the first round

    @contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            self.round_seconds[phase] += seconds
            if phase in self.STATS_FIELDS:
                field_name = self.STATS_FIELDS[phase]
                setattr(self.stats, field_name, getattr(self.stats, field_name) + seconds)

    def end_round(self, rows: list[RowProgress], drafts: list[list[int]], accepted: list[int | None],
                  n_positions: int) -> None:
        """rows after the round; per row the drafts verified and how many passed (None: the row sat out)."""
        stats, seconds = self.stats, self.round_seconds
        taking_part = [(row, d, a) for row, d, a in zip(rows, drafts, accepted) if a is not None]
        drafted = sum(len(d) for _, d, _ in taking_part)
        n_accepted = sum(a for _, _, a in taking_part)
        # Fewer accepted than drafted is a rejection, unless an accepted draft finished the row.
        rejections = sum(a < len(d) and not row.last_drafted for row, d, a in taking_part)
        stats.main_passes += 1
        stats.drafted += drafted
        stats.accepted += n_accepted
        stats.rejections += rejections
        stats.accepted_per_round += [a for _, d, a in taking_part if d]
        synced = "sync" in seconds
        catch_up = seconds["sync"] if synced and not self.synced_last_round else 0.0
        self.controller.update(drafted, n_accepted, seconds["draft"], seconds["verify"], n_positions,
                               tokens=n_accepted + len(taking_part), rejections=rejections,
                               catch_up_seconds=catch_up)
        self.synced_last_round = synced
        seconds.clear()
