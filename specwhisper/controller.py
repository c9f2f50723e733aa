"""How many tokens to draft per main-model pass (γ), and the round records it learns from.

`DraftLengthController` picks γ: constant, or adaptive. Adaptive picks the γ that maximizes
expected tokens per second from a cost model calibrated once per process (`calibrate`: the main
model's verify pass as a function of its positions, the drafter's round as a function of γ) and
the acceptance rate α, the only estimate that moves while decoding. Decoding is deterministic,
so α moves the same way in every run over the same audio, and so does γ: the decisions do not
follow the machine's load from round to round. `RoundRecorder` times each phase of a round for
the decode statistics and feeds the round's counts to the controller, so the loop holds no
clocks. Why: docs/controller.md.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

from .decoding import synchronize

if TYPE_CHECKING:
    import torch

    from .decoding import DecodeStats, RowProgress


@dataclass(frozen=True)
class Costs:
    """Seconds: a verify pass over T positions costs verify_base + verify_slope (T - 1); a round that
    drafts γ > 0 tokens costs draft_base + draft_per_token γ (the sync that feeds the accepted text,
    then γ steps)."""

    verify_base: float
    verify_slope: float
    draft_base: float
    draft_per_token: float

    def verify(self, positions: int) -> float:
        return self.verify_base + self.verify_slope * (positions - 1)

    def draft(self, gamma: int) -> float:
        return self.draft_base + self.draft_per_token * gamma if gamma else 0.0


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y over x; the slope is kept >= 0."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = max(sum((x - mean_x) * (y - mean_y) for x, y in points) / spread, 0.0) if spread else 0.0
    return mean_y - slope * mean_x, slope


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def calibrate(verify: Callable[[int], object], draft: Callable[[int], object], positions: tuple[int, ...] = (1, 3, 6),
              gammas: tuple[int, ...] = (1, 4), repeats: int = 3,
              timer: Callable[[Callable[[], object], int], float] = median_seconds,
              device: torch.device | None = None) -> Costs:
    """Time `verify(T)` (a main pass over T positions) and `draft(γ)` (a drafter's sync and γ steps), each
    the median of `repeats` runs after one warm-up, and fit the two lines of `Costs`. Each run ends when
    `device` has done its work (CUDA), not when its launches return."""
    def waited(run: Callable[[int], object]) -> Callable[[int], object]:
        return lambda n: (run(n), synchronize(device))[0]

    verify, draft = waited(verify), waited(draft)
    for run in (lambda: verify(max(positions)), lambda: draft(max(gammas))):
        run()  # warm-up: caches, lazily built kernels
    verify_base, verify_slope = fit_line([(t - 1, timer(lambda t=t: verify(t), repeats)) for t in positions])
    draft_base, draft_per_token = fit_line([(g, timer(lambda g=g: draft(g), repeats)) for g in gammas])
    return Costs(max(verify_base, 1e-6), verify_slope, draft_base, draft_per_token)


def expected_tokens(alpha: float, gamma: int) -> float:
    """Tokens a round yields when each drafted position passes with probability α, given the ones before it
    did: the accepted drafts plus the main model's own token, (1 - α^(γ+1)) / (1 - α)."""
    alpha = min(alpha, 0.999)
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


@dataclass
class DraftLengthController:
    """Chooses γ, the tokens drafted per main-model pass, and how many free drafts to verify.

    constant: always `gamma`. adaptive (once `costs` are calibrated): the γ that maximizes
    E[tokens] / (draft(γ) + verify(γ+1)); γ = 0 (one token per pass) when drafts do not pay, re-probed
    with γ = 1 every `probe_every` tokens. Free drafts (specwhisper.drafters.FreeDrafter) cost nothing
    to propose: their length maximizes E[tokens] / verify(γ+1) at their own acceptance rate.
    """

    gamma: int = 4
    adaptive: bool = True
    max_gamma: int = 12
    max_free: int = 16
    probe_every: int = 32
    acceptance: float = 0.7  # α of model drafts: smoothed per round, carried from window to window
    free_acceptance: float = 0.9  # α of free drafts
    smoothing: float = 0.1  # weight of one round in α (a round is only a few Bernoulli trials)
    flat_optimum: float = 0.97  # take the longest γ within this fraction of the best rate
    costs: Costs | None = None
    tokens_since_off: int = 0

    def next_gamma(self) -> int:
        if not self.adaptive or self.costs is None:
            return self.gamma
        best = self.best_gamma(self.acceptance, self.costs.draft, self.max_gamma)
        if best == 0:
            if self.tokens_since_off >= self.probe_every:
                self.tokens_since_off = 0
                return 1
            return 0
        self.tokens_since_off = 0
        return best

    def free_length(self) -> int:
        """How many free drafts to verify in one pass."""
        if self.costs is None:
            return self.max_free
        return max(self.best_gamma(self.free_acceptance, lambda g: 0.0, self.max_free), 1)

    def best_gamma(self, alpha: float, draft_cost: Callable[[int], float], max_gamma: int) -> int:
        rates = [expected_tokens(alpha, g) / (draft_cost(g) + self.costs.verify(g + 1)) for g in range(max_gamma + 1)]
        top = max(rates)
        return max(g for g, rate in enumerate(rates) if rate >= self.flat_optimum * top)

    def update(self, drafted: int, accepted: int, rejections: int, tokens: int, free_accepted: int = 0,
               free_rejections: int = 0) -> None:
        """One round's outcome. α is the chance that a drafted position passes given that every one before
        it did: positions after a rejection were never tried, so accepted / drafted would understate it."""
        if not self.adaptive:
            return
        if drafted == 0:
            self.tokens_since_off += tokens
        else:
            self.acceptance += self.smoothing * (accepted / max(accepted + rejections, 1) - self.acceptance)
        if free_accepted + free_rejections:
            rate = free_accepted / (free_accepted + free_rejections)
            self.free_acceptance += self.smoothing * (rate - self.free_acceptance)


class RoundRecorder:
    """Times the phases of speculative rounds ("prefill", "draft", "verify") into the decode statistics,
    and hands each round's counts to the controller."""

    STATS_FIELDS = {"prefill": "prefill_seconds", "draft": "draft_seconds", "verify": "verify_seconds"}

    def __init__(self, stats: DecodeStats, controller: DraftLengthController, device: torch.device | None = None):
        self.stats, self.controller = stats, controller
        self.device = device  # the models' device, waited for before each clock read (CUDA)
        self.round_seconds: defaultdict[str, float] = defaultdict(float)

    @contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        synchronize(self.device)
        started = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            seconds = time.perf_counter() - started
            self.round_seconds[phase] += seconds
            field_name = self.STATS_FIELDS[phase]
            setattr(self.stats, field_name, getattr(self.stats, field_name) + seconds)

    def end_round(self, rows: list[RowProgress], drafts: list[list[int]], free: list[bool],
                  accepted: list[int | None], gamma: int) -> None:
        """rows after the round; per row the drafts verified, whether they were free, and how many passed
        (None: the row sat out)."""
        counts = {True: [0, 0, 0], False: [0, 0, 0]}  # free? -> drafted, accepted, rejections
        taking_part = 0
        for row, row_drafts, is_free, n in zip(rows, drafts, free, accepted):
            if n is None:
                continue
            taking_part += 1
            count = counts[is_free]
            count[0] += len(row_drafts)
            count[1] += n
            # Fewer accepted than drafted is a rejection, unless an accepted draft finished the row.
            count[2] += n < len(row_drafts) and not row.last_drafted
            if row_drafts:
                self.stats.accepted_per_round.append(n)
        stats = self.stats
        stats.main_passes += 1
        stats.drafted += counts[False][0] + counts[True][0]
        stats.accepted += counts[False][1] + counts[True][1]
        stats.rejections += counts[False][2] + counts[True][2]
        stats.free_drafted += counts[True][0]
        stats.free_accepted += counts[True][1]
        stats.gammas.append(gamma)
        self.controller.update(counts[False][0], counts[False][1], counts[False][2],
                               tokens=counts[False][1] + counts[True][1] + taking_part,
                               free_accepted=counts[True][1], free_rejections=counts[True][2])
        self.round_seconds.clear()
