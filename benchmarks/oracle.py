"""The ceiling of drafting on this machine: a draft that knows the main model's greedy output.

Why: speculative decoding can only shrink the decoder's steps; the encoder, log-mel and prompts
cost the same with any draft. A draft that proposes exactly the main model's next tokens (so
every draft is accepted) and does no model work at all is the best any draft can be. Running
it through the real speculative loop (`specwhisper.speculative.speculative_decode`, with the
adaptive controller choosing γ) measures, not models, the largest speedup drafting can give on
this hardware, with this loop's own per-round costs (verify passes, rules, bookkeeping).

How: `record_fed_tokens` watches a greedy run and keeps the token sequence the main decoder was
fed in each window (prompt, then every chosen token); `ReplayDraft` is a Whisper-shaped network
that holds, per row, the tokens it has been fed by position, and whose "logits" put all the mass
on the token that followed that exact prefix in the recording (end-of-text after the last). It
owns no weights and runs no matrix product; the only work per drafted token is the loop's own
(the draft's logit rules on a vocabulary-sized vector, Python bookkeeping).

Used by `bench_distilled.py --oracle`; batch size 1, temperature 0 (a sampled run has no fixed
next token to know).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

import torch
from torch import Tensor, nn

from specwhisper.kv_cache import AudioKV, KVCache
from specwhisper.loading import SpeechModel
from specwhisper.speculative import Assistant, DraftLengthController


@contextmanager
def record_fed_tokens(model: SpeechModel) -> Iterator[list[list[int]]]:
    """Inside the block, every window the main decoder decodes (batch 1) appends the tokens it was fed
    to the yielded list: a fresh cache starts a new sequence."""
    decoder = model.network.decoder
    sequences: list[list[int]] = []
    original = decoder.forward

    def forward(tokens: Tensor, audio_kv: AudioKV, cache: KVCache) -> Tensor:
        if tokens.shape[0] != 1:
            raise ValueError("record_fed_tokens follows one window at a time (batch size 1)")
        if cache.lengths[0] == 0:
            sequences.append([])
        sequences[-1][cache.lengths[0]:] = tokens[0].tolist()  # a rollback overwrites
        return original(tokens, audio_kv, cache)

    decoder.forward = forward  # this instance only, for the duration of the block
    try:
        yield sequences
    finally:
        del decoder.forward


def next_token_table(sequences: list[list[int]], eot: int) -> dict[tuple[int, ...], int]:
    """{fed prefix: the token the main model chose after it}, end-of-text after each whole sequence."""
    table: dict[tuple[int, ...], int] = {}
    for sequence in sequences:
        for end in range(1, len(sequence)):
            table[tuple(sequence[:end])] = sequence[end]
        table[tuple(sequence)] = eot
    return table


class _ReplayDecoder(nn.Module):
    """Holds each row's fed tokens by position; `logits` replays the recorded next token."""

    def __init__(self, main: SpeechModel, table: dict[tuple[int, ...], int]):
        super().__init__()
        self.token_embedding = main.network.decoder.token_embedding  # device and dtype for the loop
        self.table = table
        self.n_vocab = main.dims.n_vocab
        self.fed: list[list[int]] = []

    def audio_kv(self, audio_features: Tensor) -> AudioKV:
        return AudioKV(keys=[audio_features], values=[audio_features])  # never read

    def forward(self, tokens: Tensor, audio_kv: AudioKV, cache: KVCache) -> Tensor:
        """tokens (B, T) at the cache's lengths -> (B, T, 1): each position's predicted next token id."""
        if len(self.fed) != cache.batch_size or all(n == 0 for n in cache.lengths):
            self.fed = [[] for _ in range(cache.batch_size)]
        out = torch.empty(tokens.shape[0], tokens.shape[1], 1)
        for row, (start, fed) in enumerate(zip(cache.lengths, self.fed)):
            del fed[start:]  # rolled back past here
            for i, token in enumerate(tokens[row].tolist()):
                fed.append(token)
                out[row, i, 0] = self.table.get(tuple(fed), -1)
        cache.advance(tokens.shape[1])
        return out

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., 1) predicted ids -> (..., V): 0 at the predicted token, -inf elsewhere (an unknown
        prefix, -1, gets all zeros: its draft is token 0 and will be rejected)."""
        ids = hidden[..., 0].long()
        out = torch.full((*ids.shape, self.n_vocab), float("-inf"))
        known = ids >= 0
        out[~known] = 0.0
        out[known, ids[known]] = 0.0
        return out


class ReplayDraft(nn.Module):
    """The Whisper-shaped network the speculative loop drives: the main model's encoder (so no
    second encoder pass), a one-layer, one-slot cache for the lengths, and `_ReplayDecoder`."""

    def __init__(self, main: SpeechModel, table: dict[tuple[int, ...], int]):
        super().__init__()
        self.dims = replace(main.dims, n_text_layer=1, n_text_state=1, n_text_head=1)
        self.encoder = main.network.encoder
        self.decoder = _ReplayDecoder(main, table)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return KVCache.allocate(n_layer=1, batch_size=batch_size, n_head=1, max_len=max_len or self.dims.n_text_ctx,
                                head_dim=1, dtype=torch.float32, device="cpu")


def oracle_assistant(main: SpeechModel, sequences: list[list[int]], draft_length: int | None = None) -> Assistant:
    """An assistant whose drafts are the main model's recorded greedy choices. γ: constant `draft_length`,
    or by default chosen by the adaptive controller as for any draft (it learns α = 1 and a near-zero
    draft cost, and drafts up to its max_gamma)."""
    network = ReplayDraft(main, next_token_table(sequences, main.tokenizer.eot))
    model = SpeechModel(network=network, tokenizer=main.tokenizer, name="oracle", folder=main.folder,
                        suppress_tokens=list(main.suppress_tokens),
                        begin_suppress_tokens=list(main.begin_suppress_tokens))
    controller = DraftLengthController() if draft_length is None else \
        DraftLengthController(gamma=draft_length, adaptive=False)
    return Assistant(model=model, kind="shared-encoder", controller_template=controller)
