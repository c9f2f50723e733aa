"""Whisper's logit rules (`decoding.LogitRules`) applied on the device, to a whole pass at once.

`LogitRules.apply` masks one position's logits on the host side of a decision: it reads the tokens
so far as a Python list and decides the timestamp rule with a `bool(...)`, a sync per position on a
GPU. Here the same rules mask every position of a (B, T, V) pass in a few tensor operations, so a
greedy step or a verify pass decides its tokens with nothing read back until the choices themselves.

The tokens before a pass are summarised per row on the host (`row_summary`: it decided them, so this
costs no sync); the pass's own tokens (a verify pass's drafts) are read on the device, so position i
is masked as if the drafts before it were accepted, as `LogitRules.apply(logits[i], tokens + drafts[:i])`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .decoding import NEG_INF, LogitRules

SUMMARY_FIELDS = 4  # generated count, last token, the one before it, last timestamp (-1: none)


def row_summary(rules: LogitRules, generated: list[int]) -> list[int]:
    """What the rules need to know of a row's generated tokens, as SUMMARY_FIELDS ints."""
    timestamps = [t for t in generated if t >= rules.timestamp_begin]
    return [len(generated), generated[-1] if generated else -1, generated[-2] if len(generated) > 1 else -1,
            timestamps[-1] if timestamps else -1]


class DeviceRules:
    """`LogitRules` for (B, T, V) logits on their device; position t follows `block[:, 1:t + 1]`."""

    def __init__(self, rules: LogitRules, n_vocab: int, device: torch.device):
        self.timestamps = rules.timestamps
        self.ts = rules.timestamp_begin
        self.eot = rules.eot
        self.max_initial = rules.max_initial_timestamp_index
        self.suppressed = torch.zeros(n_vocab, dtype=torch.bool, device=device)  # (V,)
        self.begin_suppressed = torch.zeros(n_vocab, dtype=torch.bool, device=device)
        self.vocab = torch.arange(n_vocab, device=device)  # (V,)
        self.load(rules)

    def load(self, rules: LogitRules) -> None:
        """Another window's token lists, into the same buffers (a captured pass reads them there). Its
        timestamp settings are baked into the pass, so they must not change."""
        if (rules.timestamps, rules.max_initial_timestamp_index, rules.timestamp_begin) != \
                (self.timestamps, self.max_initial, self.ts):
            raise ValueError("these rules differ in their timestamp settings: make new DeviceRules")
        for mask, tokens in ((self.suppressed, rules.suppress), (self.begin_suppressed, rules.begin_suppress)):
            mask.zero_()
            mask[tokens.to(mask.device)] = True

    def apply(self, logits: Tensor, block: Tensor, summary: Tensor) -> Tensor:
        """logits (B, T, V) float, block (B, T) the tokens the pass ran (block[:, 0] the last decided token,
        then drafts), summary (B, SUMMARY_FIELDS) from `row_summary`. Returns the masked logits (B, T, V)."""
        n_positions = logits.shape[1]
        drafts = block[:, 1:]  # (B, T-1): position t follows drafts[:, :t]
        offsets = torch.arange(n_positions, device=logits.device)  # (T,)
        count = summary[:, :1] + offsets  # (B, T): tokens generated before position t
        history = torch.cat([summary[:, 2:3], summary[:, 1:2], drafts], dim=1)  # (B, T+1): ..., penultimate, last
        last, penultimate = history[:, 1:], history[:, :-1]  # (B, T) each, the tokens before position t
        blocked = self.suppressed.expand_as(logits)  # (B, T, V)
        blocked = blocked | (self.begin_suppressed & (count == 0)[..., None])
        if self.timestamps:
            blocked = blocked | self._timestamp_masks(count, last, penultimate, self._last_timestamps(drafts, summary))
        masked = logits.masked_fill(blocked, NEG_INF)
        if self.timestamps:
            logprobs = torch.log_softmax(masked.float(), dim=-1)
            outweigh = torch.logsumexp(logprobs[..., self.ts:], dim=-1) > logprobs[..., :self.ts].max(dim=-1).values
            masked = masked.masked_fill(outweigh[..., None] & (self.vocab < self.ts), NEG_INF)
        return masked

    def advance(self, summary: Tensor, tokens: Tensor) -> None:
        """summary (B, SUMMARY_FIELDS) in place, for one more token (B,) per row: a draft step's rules."""
        count, last, _, last_timestamp = summary.unbind(dim=1)
        summary.copy_(torch.stack([count + 1, tokens, last, torch.where(tokens >= self.ts, tokens, last_timestamp)], 1))

    def _last_timestamps(self, drafts: Tensor, summary: Tensor) -> Tensor:
        """(B, T): the last timestamp before each position (-1: none)."""
        batch, n_drafts = drafts.shape
        index = torch.arange(n_drafts, device=drafts.device).expand(batch, n_drafts)
        latest = torch.where(drafts >= self.ts, index, -1).cummax(dim=1).values  # (B, T-1): last timestamp's index
        from_drafts = torch.where(latest >= 0, drafts.gather(1, latest.clamp(min=0)), summary[:, 3:4])
        return torch.cat([summary[:, 3:4], from_drafts], dim=1)

    def _timestamp_masks(self, count: Tensor, last: Tensor, penultimate: Tensor, last_timestamp: Tensor) -> Tensor:
        """(B, T, V): what `LogitRules._timestamp_rules` masks before its probability rule."""
        vocab = self.vocab
        last_was_ts = (count >= 1) & (last >= self.ts)
        penultimate_was_ts = (count < 2) | (penultimate >= self.ts)
        pair_closed = (last_was_ts & penultimate_was_ts)[..., None]  # text must follow
        text_ended = (last_was_ts & ~penultimate_was_ts)[..., None]  # a timestamp or end-of-text must
        blocked = (pair_closed & (vocab >= self.ts)) | (text_ended & (vocab < self.eot))
        floor = torch.where(last_was_ts & ~penultimate_was_ts, last_timestamp, last_timestamp + 1)
        has_ts = (last_timestamp >= 0)[..., None]
        blocked = blocked | (has_ts & (vocab >= self.ts) & (vocab < floor[..., None]))  # no going back in time
        first = (count == 0)[..., None]
        blocked = blocked | (first & (vocab < self.ts))
        if self.max_initial is not None:
            blocked = blocked | (first & (vocab > self.ts + self.max_initial))
        return blocked
