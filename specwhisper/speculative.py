"""Speculative decoding: a drafter proposes tokens, the main model verifies them all in one pass.

One round (`speculative_round`), for every row of a batch of windows still decoding:
  1. sync: the drafter is told each row's accepted text (`Drafter.sync`, specwhisper.drafters);
  2. draft: it proposes up to γ tokens per row (`Drafter.propose`; γ from specwhisper.controller);
  3. verify: the main model runs each row's last decided token and its drafts in one pass, γ+1
     positions, causal inside the block, against its KV cache (`verify`);
  4. accept: the longest prefix of drafts the main model agrees with, then the main model's own
     next token (`greedy_accept`; `sample_accept` at temperature > 0: pure rules); the cache rolls
     back past the rejected drafts.
The transcript is the main model's own, token for token (greedy) or in distribution (sampling):
on the CPU a verify pass gives every position the bits of a one-token greedy step (docs/exactness.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .controller import Costs, RoundRecorder, calibrate
from .decoding import (DecodeState, DecodeStats, RowProgress, WindowBatch, WindowResult, begin_window, choose_token,
                       decide, end_window, forward_ragged, step_logits)
from .drafters import Drafts, Verified

if TYPE_CHECKING:
    from .drafters import Drafter
    from .model import Whisper
    from .screening import ScreenedRow
    from .tokenizer import Tokenizer


# ----------------------------------------------------------------------------- the accept rules (pure)

def greedy_accept(main_choices: list[int], drafts: list[int]) -> int:
    """How many drafts agree with the main model's greedy choices at their positions.

    main_choices[i] is the main model's token after the accepted prefix plus drafts[:i]; it may be
    shorter than drafts + 1 when the caller stopped at the first disagreement.
    """
    accepted = 0
    while accepted < len(drafts) and accepted < len(main_choices) and main_choices[accepted] == drafts[accepted]:
        accepted += 1
    return accepted


def sample_accept(p: Tensor, q: Tensor | None, draft: int, generator: torch.Generator | None
                  ) -> tuple[bool, int | None]:
    """Speculative sampling's rule for one drafted token.

    p: the main model's distribution (V,) at this position; q: the drafter's (V,), or None when the
    draft is a fixed proposal (a point mass on `draft`). Accept with probability min(1, p/q); otherwise
    return a replacement sampled from max(0, p - q), normalized. Either way the token that results is
    distributed exactly as p.
    """
    p_draft = float(p[draft])
    q_draft = 1.0 if q is None else float(q[draft])
    # Drawn on p's device: the generator is the model's, and a CUDA generator cannot draw CPU numbers.
    if q_draft > 0 and torch.rand((), generator=generator, device=p.device).item() < min(1.0, p_draft / q_draft):
        return True, None
    residual = p.clone()
    if q is None:
        residual[draft] = 0.0
    else:
        residual = torch.clamp(p - q, min=0.0)
    total = float(residual.sum())
    if total <= 0:  # p == q up to rounding: any token of p is a correct replacement
        residual, total = p, float(p.sum())
    return False, int(torch.multinomial(residual / total, 1, generator=generator))


# ----------------------------------------------------------------------------- the loop

def speculative_decode(model: Whisper, tokenizer: Tokenizer, drafter: Drafter, window: WindowBatch,
                       stats: DecodeStats) -> list[WindowResult]:
    """Decode a batch of windows with drafts from `drafter`; equals `autoregressive_decode`'s output."""
    recorder = RoundRecorder(stats, drafter.controller, model.decoder.token_embedding.weight.device)
    with recorder.timing("prefill"):
        state = begin_window(model, tokenizer, window)
        drafter.prepare(window, state.prompt_hidden)
        if drafter.controller.adaptive and drafter.controller.costs is None:
            drafter.controller.costs = calibrate_costs(model, window, state, drafter)
    while not all(row.finished for row in state.rows):
        speculative_round(model, window, state, drafter, recorder)
    with recorder.timing("verify"):
        return end_window(model, window, state, stats, with_draft_mask=True)


def speculative_round(model: Whisper, window: WindowBatch, state: DecodeState, drafter: Drafter,
                      recorder: RoundRecorder) -> None:
    """sync -> draft -> verify -> accept, once for every row still decoding."""
    rows, cache = state.rows, state.cache
    gamma = recorder.controller.next_gamma()
    with recorder.timing("draft"):
        drafter.sync([None if row.finished else row.tokens for row in rows])
        drafts = drafter.propose(gamma)

    with recorder.timing("verify"):
        verification = verify(model, window, state, drafts)
        accepted = [None if not block else accept(row, verification, r, window, drafts.probs)
                    for r, (row, block) in enumerate(zip(rows, verification.blocks))]
        kept = [0 if n is None else 1 + n for n in accepted]  # the last decided token and the accepted drafts
        cache.rollback([start + n for start, n in zip(verification.starts, kept)])
        drafter.verified(Verified([row.tokens for row in rows], verification.starts, kept, verification.hidden))
    recorder.end_round(rows, verification.drafts, [drafts.is_free(r) for r in range(len(rows))], accepted, gamma)


def calibrate_costs(model: Whisper, window: WindowBatch, state: DecodeState, drafter: Drafter) -> Costs:
    """The controller's cost model, timed once on this window (docs/controller.md): main passes over a few
    block sizes, and the drafter's rounds (sync and γ steps) on the accepted text. Leaves both as they were."""
    rows, cache = state.rows, state.cache
    starts = list(cache.lengths)

    def verify_pass(positions: int) -> None:
        blocks = [[] if row.finished else [row.tokens[-1] if row.tokens else 0] * positions for row in rows]
        hidden = forward_ragged(model.decoder, window.audio_kv, cache, blocks)  # (B, T, C)
        step_logits(model, hidden.reshape(-1, hidden.shape[-1]), window.options)
        cache.rollback(starts)

    target = drafter.model_drafter()

    def draft_round(gamma: int) -> None:
        target.sync([None if row.finished else row.tokens for row in rows])
        target.propose(gamma)

    device = model.decoder.token_embedding.weight.device
    if target is None:
        return calibrate(verify_pass, lambda gamma: None, device=device)
    return calibrate(verify_pass, draft_round, device=device)


@dataclass
class Verification:
    """One verify pass: per row, what it ran and the main model's logits at each position."""

    drafts: list[list[int]]  # the drafts verified (clipped to the row's budget and the cache)
    blocks: list[list[int]]  # the tokens run: the last decided token and the drafts ([] for finished rows)
    starts: list[int]  # cache position of each row's first token
    hidden: Tensor  # (B, T, C)
    logits: Tensor  # (B, T, V) float
    screens: list[list[ScreenedRow] | None]  # per row, per position, when the logits are screened


def verify(model: Whisper, window: WindowBatch, state: DecodeState, drafts: Drafts) -> Verification:
    """One main-model pass over every active row's last decided token and its drafts."""
    room = model.dims.n_text_ctx - max(state.cache.lengths)
    # A row may not draft past its token budget, nor the batch past the cache.
    clipped = [d[:max(0, min(row.budget - len(row.tokens), room - 1))] for row, d in zip(state.rows, drafts.tokens)]
    blocks = [[] if row.finished else [row.tokens[-1]] + d for row, d in zip(state.rows, clipped)]
    starts = list(state.cache.lengths)
    hidden = forward_ragged(model.decoder, window.audio_kv, state.cache, blocks)  # (B, T, C)
    batch, positions, width = hidden.shape
    logits, screens = step_logits(model, hidden.reshape(batch * positions, width), window.options)  # (B*T, V)
    per_row = [None if screens is None else screens[r * positions:(r + 1) * positions] for r in range(batch)]
    return Verification(clipped, blocks, starts, hidden, logits.view(batch, positions, -1), per_row)


def accept(row: RowProgress, verification: Verification, r: int, window: WindowBatch,
           probs: list[list[Tensor]] | None) -> int:
    """Commit row r's accepted drafts, then the main model's own token; return how many drafts passed."""
    drafts, logits, screens = verification.drafts[r], verification.logits[r], verification.screens[r]
    if window.options.temperature > 0:
        return accept_sampled(row, logits, drafts, window, probs[r] if probs else None)
    rules = window.rules
    choices, filtered = [], []  # the main model's choice after each accepted prefix, up to the first disagreement
    for i in range(len(drafts) + 1):
        screen = screens[i] if screens else None
        filtered.append(rules.apply(logits[i], row.tokens + drafts[:i], screen))
        choices.append(choose_token(filtered[i], 0.0, None, screen))
        if i == len(drafts) or choices[i] != drafts[i]:
            break
    n_accepted = greedy_accept(choices, drafts)
    for i in range(n_accepted):
        row.commit(drafts[i], filtered[i], drafted=True, screen=screens[i] if screens else None)
        if row.finished:  # an accepted end-of-text, or the budget is spent
            return i + 1
    row.commit(choices[n_accepted], filtered[n_accepted], screen=screens[n_accepted] if screens else None)
    return n_accepted


def accept_sampled(row: RowProgress, logits: Tensor, drafts: list[int], window: WindowBatch,
                   probs: list[Tensor] | None) -> int:
    """`accept` at temperature > 0: position by position, `sample_accept` with the drafter's q."""
    temperature, generator = window.options.temperature, window.generator
    for i, drafted in enumerate(drafts):
        filtered = window.rules.apply(logits[i], row.tokens)
        passed, replacement = sample_accept(torch.softmax(filtered / temperature, dim=-1),
                                            probs[i] if probs else None, drafted, generator)
        row.commit(drafted if passed else replacement, filtered, drafted=passed)
        if not passed or row.finished:
            return i + passed
    decide(row, logits[len(drafts)], window)  # every draft passed: the main model's own next token
    return len(drafts)
