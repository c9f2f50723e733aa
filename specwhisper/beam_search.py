"""Beam search and best-of-N sampling, as openai-whisper's `decode` does them.

Beam search (temperature 0 with `DecodingOptions.beam_size`): a window's beam_size hypotheses are the
rows of one batch, so each step is one decoder pass over every live beam. A step:
  1. every beam's next-token log-probabilities under greedy's rules (`LogitRules`: suppression,
     timestamp rules), `logprobs_under_rules`;
  2. `select`: each beam's beam_size + 1 best tokens, scored by the beam's summed log-probability plus
     theirs; in score order, candidates ending in end-of-text are set aside as finished and the first
     beam_size others become the next beams (a pure function of tensors, tested on toy ones);
  3. `collect`: the finished ones join the window's list until it holds max_candidates =
     round(beam_size * patience) hypotheses; then the search ends;
  4. the KV cache follows the new beams, a gather of rows (`KVCache.reorder`), and runs their last tokens.
At the token budget, or when fewer than beam_size hypotheses finished, the best unfinished beams join
(`final_candidates`), and `rank` picks one: the summed log-probability over the length (length_penalty
None) or over ((5 + length) / 6) ** length_penalty (Google NMT's). Scores are summed in float32 as in
openai-whisper, so near-ties break the same way.

Best-of (temperature > 0 with `best_of`): each window is sampled best_of times as rows of one batch, by
plain or speculative sampling, and `rank` picks one sample.

`decode_as_asked` chooses among beam search, best-of and one decode per row. The windows of a batch
(several files) are beam-searched one after another, each with its own beam_size-row cache: rows of
one window always share a length, so a step is one uniform pass; batching windows too would save
little on the CPU and cost a copy of each window's audio K/V per beam.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .decoding import (DecodeStats, LogitRules, WindowBatch, WindowResult, autoregressive_decode, no_speech_probs,
                       prefill, synchronize, token_budget)
from .fixed_shape import decode_on_fixed_shapes, decodes_on_fixed_shapes
from .kv_cache import repeat_rows
from .speculative import speculative_decode

if TYPE_CHECKING:
    from .drafters import Drafter
    from .model import Whisper
    from .tokenizer import Tokenizer

Tokens = tuple[int, ...]  # generated tokens: no prompt, no end-of-text


@dataclass(frozen=True)
class Hypothesis:
    """A candidate transcript of one window."""

    tokens: Tokens
    sum_logprob: float  # of its tokens and, when finished, of the end-of-text
    finished: bool  # ended with end-of-text (False: still going at the budget)


@dataclass
class Beams:
    """One window's search: the live beams (one cache row each) and the hypotheses that ended."""

    tokens: list[list[int]]  # never ending in end-of-text
    scores: list[float]  # summed log-probabilities, float32 values
    finished: dict[Tokens, float]  # in the order they were collected


def uses_beam_search(options) -> bool:
    return options.beam_size is not None and options.temperature == 0


def uses_best_of(options) -> bool:
    return options.best_of is not None and options.temperature > 0


# --------------------------------------------------------------------------- pure steps


def select(beams: list[list[int]], scores: list[float], logprobs: Tensor, beam_size: int, eot: int
           ) -> tuple[list[list[int]], list[float], list[int], dict[Tokens, float]]:
    """One step of the search. logprobs (n, V): the next-token log-probabilities of the n beams.

    Returns the next beam_size beams, their scores, the row each continues (its source) and the newly
    finished hypotheses, best first (only those scoring above the last beam kept, as openai-whisper).
    Identical beams (the first step's copies of one prompt) give each candidate once.
    """
    values, tokens = (t.cpu() for t in logprobs.float().topk(beam_size + 1, dim=-1))  # (n, beam_size + 1) each
    totals = torch.tensor(scores, dtype=torch.float32)[:, None] + values  # float32 sums, as openai-whisper's
    candidates: dict[Tokens, tuple[float, int]] = {}
    for row, (row_totals, row_tokens) in enumerate(zip(totals.tolist(), tokens.tolist())):
        for total, token in zip(row_totals, row_tokens):
            candidates[(*beams[row], token)] = (total, row)
    next_beams, next_scores, sources, finished = [], [], [], {}
    for sequence in sorted(candidates, key=lambda s: candidates[s][0], reverse=True):  # stable: ties keep order
        total, row = candidates[sequence]
        if sequence[-1] == eot:
            finished[sequence[:-1]] = total
            continue
        next_beams.append(list(sequence))
        next_scores.append(total)
        sources.append(row)
        if len(next_beams) == beam_size:
            break
    return next_beams, next_scores, sources, finished


def collect(finished: dict[Tokens, float], newly: dict[Tokens, float], max_candidates: int) -> None:
    """Add the newly finished hypotheses (best first) while fewer than max_candidates have finished."""
    for sequence, score in newly.items():
        if len(finished) >= max_candidates:
            return
        finished[sequence] = score


def final_candidates(state: Beams, beam_size: int) -> list[Hypothesis]:
    """The finished hypotheses, topped up to beam_size with the best live beams when fewer finished."""
    hypotheses = [Hypothesis(sequence, score, True) for sequence, score in state.finished.items()]
    if len(hypotheses) < beam_size:
        # np.argsort of float32 scores, reversed: openai-whisper's order, ties included.
        for j in np.argsort(np.array(state.scores, dtype=np.float32))[::-1]:
            hypotheses.append(Hypothesis(tuple(state.tokens[j]), state.scores[j], False))
            if len(hypotheses) >= beam_size:
                break
    return hypotheses


def length_norm(length: int, length_penalty: float | None) -> float:
    """What a summed log-probability is divided by: the length, or Google NMT's ((5 + length) / 6) ** α.
    A bare end-of-text counts as length 1 (openai-whisper would divide by zero)."""
    if length_penalty is None:
        return max(length, 1)
    return ((5 + length) / 6) ** length_penalty


def rank(hypotheses: list[Hypothesis], length_penalty: float | None) -> int:
    """Index of the best hypothesis, the first of equals: openai-whisper's MaximumLikelihoodRanker."""
    return int(np.argmax([h.sum_logprob / length_norm(len(h.tokens), length_penalty) for h in hypotheses]))


def search(first: Tensor, step: Callable[[list[list[int]], list[int]], Tensor], beam_size: int,
           patience: float | None, budget: int, eot: int) -> list[Hypothesis]:
    """Beam search from one prompt. first (1, V): the log-probabilities of the first token; step(beams,
    sources) -> (beam_size, V): those of each beam's next token, once the state followed `sources`.
    budget: tokens a hypothesis may have, end-of-text included. Returns the candidates to `rank`."""
    max_candidates = round(beam_size * (patience or 1.0))
    if max_candidates < 1:
        raise ValueError(f"beam_size {beam_size} x patience {patience} rounds to no candidate")
    state = Beams(tokens=[[]], scores=[0.0], finished={})
    logprobs = first
    for n_tokens in range(1, budget + 1):
        state.tokens, state.scores, sources, newly = select(state.tokens, state.scores, logprobs, beam_size, eot)
        collect(state.finished, newly, max_candidates)
        if len(state.finished) >= max_candidates or n_tokens == budget:
            break
        logprobs = step(state.tokens, sources)
    return final_candidates(state, beam_size)


# --------------------------------------------------------------------------- on the model


def logprobs_under_rules(rules: LogitRules, logits: Tensor, beams: list[list[int]]) -> Tensor:
    """(n, V) float logits -> log-probabilities after each beam's rules (the logits are masked in place)."""
    for row_logits, tokens in zip(logits, beams):
        rules.apply(row_logits, tokens)
    return torch.log_softmax(logits, dim=-1)


def beam_search_window(model: Whisper, tokenizer: Tokenizer, window: WindowBatch, row: int,
                       stats: DecodeStats) -> WindowResult:
    """Beam-search row `row` of the window batch: prefill its prompt once, then beam_size rows."""
    options = window.options
    prompt = window.prompts[row]
    audio_kv = window.audio_kv.rows([row])
    device = model.decoder.token_embedding.weight.device
    synchronize(device)
    started = time.perf_counter()
    cache = model.new_cache(1)
    logits, prompt_hidden = prefill(model, audio_kv, [prompt], cache)
    no_speech = no_speech_probs(model, tokenizer, prompt_hidden, [prompt])[0]
    synchronize(device)
    stats.prefill_seconds += time.perf_counter() - started
    started = time.perf_counter()
    beams_kv = audio_kv.repeat_rows(options.beam_size)

    def step(beams: list[list[int]], sources: list[int]) -> Tensor:
        cache.reorder(sources)
        last = torch.tensor([[tokens[-1]] for tokens in beams], device=logits.device)  # (beam_size, 1)
        hidden = model.decoder(last, beams_kv, cache)[:, -1]  # (beam_size, C)
        stats.main_passes += 1
        return logprobs_under_rules(window.rules, model.decoder.logits(hidden).float(), beams)

    first = logprobs_under_rules(window.rules, logits, [[]])
    hypotheses = search(first, step, options.beam_size, options.patience, token_budget(model, len(prompt), options),
                        tokenizer.eot)
    best = hypotheses[rank(hypotheses, options.length_penalty)]
    stats.generated_tokens += len(best.tokens)
    synchronize(device)
    stats.decode_seconds += time.perf_counter() - started
    # openai-whisper averages over the tokens and one end-of-text, appended or not.
    return WindowResult(tokens=list(best.tokens), language=None, avg_logprob=best.sum_logprob / (len(best.tokens) + 1),
                        no_speech_prob=no_speech, finished=best.finished, sum_logprob=best.sum_logprob)


def beam_search_decode(model: Whisper, tokenizer: Tokenizer, window: WindowBatch,
                       stats: DecodeStats | None = None) -> list[WindowResult]:
    """Beam search for every window of the batch, one window after another."""
    stats = stats if stats is not None else DecodeStats()
    return [beam_search_window(model, tokenizer, window, row, stats) for row in range(len(window.prompts))]


def repeat_window(window: WindowBatch, n: int) -> WindowBatch:
    """Each window n times in a row, as n rows of one batch (the samples of best-of)."""
    def each(rows: list) -> list:
        return [row for row in rows for _ in range(n)]

    return replace(window, mel=repeat_rows(window.mel, n), audio_features=repeat_rows(window.audio_features, n),
                   audio_kv=window.audio_kv.repeat_rows(n), prompts=each(window.prompts),
                   languages=each(window.languages),
                   hints=[list(hint) for hint in each(window.hints)] if window.hints else None)


def best_of_decode(window: WindowBatch, sample: Callable[[WindowBatch], list[WindowResult]]) -> list[WindowResult]:
    """best_of samples of every window (`sample` decodes a batch, one sample per row), the best ranked of each."""
    n = window.options.best_of
    samples = sample(repeat_window(window, n))  # window 0's n samples, then window 1's, ...
    chosen = []
    for start in range(0, len(samples), n):
        group = samples[start:start + n]
        candidates = [Hypothesis(tuple(r.tokens), r.sum_logprob, r.finished) for r in group]
        chosen.append(group[rank(candidates, window.options.length_penalty)])
    return chosen


def decode_as_asked(model: Whisper, tokenizer: Tokenizer, window: WindowBatch, assistant: Drafter | None,
                    stats: DecodeStats) -> list[WindowResult]:
    """Beam search at temperature 0 with beam_size (never with an assistant: speculative decoding serves
    greedy decoding and sampling); best-of above 0 with best_of; else one decode per row. Greedy and
    sampling are speculative when an assistant is given."""
    if uses_beam_search(window.options):
        return beam_search_decode(model, tokenizer, window, stats)

    def one_per_row(batch: WindowBatch) -> list[WindowResult]:
        if decodes_on_fixed_shapes(batch, assistant):
            return decode_on_fixed_shapes(model, tokenizer, batch, assistant, stats)
        if assistant is None:
            return autoregressive_decode(model, tokenizer, batch, stats)
        return speculative_decode(model, tokenizer, assistant, batch, stats)

    if uses_best_of(window.options):
        return best_of_decode(window, one_per_row)
    return one_per_row(window)
