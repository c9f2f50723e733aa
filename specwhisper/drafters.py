"""Drafters: whatever proposes tokens for the main model to verify (specwhisper.speculative).

The speculative loop talks to every drafter through the same calls, and never asks what kind it holds:

    prepare(window, prompt_hidden)  once per batch of windows: the audio, the prompts, the options
    sync(contexts)                  each round: each row's accepted tokens so far (main vocabulary)
    propose(gamma)                  up to γ tokens per row (main vocabulary), and their distributions;
                                    γ = 0 asks only for free drafts (those that cost nothing to make)
    verified(outcome)               after each verify pass: what the main model decided, with its hidden states
    can_draft(language)             whether it can draft for audio in this language at all

plus the γ policy every drafter carries (`controller`: specwhisper.controller).
Whatever a drafter proposes, verification keeps the output the main model's own; a drafter only
changes how many tokens each main pass decides.

Implementations:
  - `ModelDrafter`: a Whisper-shaped network with the main model's vocabulary, stepped on its own
    KV cache: an assistant model with its own encoder (tiny for base), or one reading the main
    model's encoder output (distil-whisper for its teacher; a distilled draft, specwhisper.draft);
  - `CrossTokenizerDrafter`: an assistant with another vocabulary (English-only tiny.en for
    multilingual base), bridged through the tokens' bytes (`TokenBridge`);
  - `DistilledDrafter`: a distilled draft (reading the main model's hidden states, when made so),
    drafting greedy rounds in C on the CPU;
  - `FreeDrafter`: drafts that cost nothing (long-form hints, prompt lookup), around any of the above;
  - `benchmarks/oracle.py` (a replay of greedy's tokens) and the tests' prompt-lookup drafter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .controller import DraftLengthController
from .decoding import LogitRules, forward_ragged
from .errors import IncompatibleAssistantError
from .kernels.cpu_draft import RuleState

if TYPE_CHECKING:
    from .decoding import WindowBatch
    from .speech_model import SpeechModel
    from .tokenizer import Tokenizer


@dataclass
class Drafts:
    """A round's proposals, per row, in the main model's vocabulary."""

    tokens: list[list[int]]
    # Sampling: per drafted token, the drafter's distribution over the main vocabulary (V,). None:
    # each draft is a fixed proposal (a point mass), as it is in greedy decoding.
    probs: list[list[Tensor]] | None = None
    free: list[bool] | None = None  # per row: its drafts cost nothing to make (FreeDrafter)

    @classmethod
    def none(cls, batch_size: int) -> "Drafts":
        return cls([[] for _ in range(batch_size)])

    def is_free(self, row: int) -> bool:
        return bool(self.free and self.free[row])


@dataclass(frozen=True)
class Verified:
    """What one verify pass decided, row by row."""

    tokens: list[list[int]]  # every token decided so far (the row's RowProgress.tokens)
    starts: list[int]  # cache position of the pass's first position (the last token decided before it)
    kept: list[int]  # how many of the pass's positions are now decided: 1 + accepted drafts (0: sat out)
    hidden: Tensor  # (B, T, C): the main model's final hidden state at each of the pass's positions


class Drafter:
    """The interface, with do-nothing defaults, and the γ policy: constant `draft_length`, or adaptive
    (its costs calibrated on the first window, its acceptance carried from window to window)."""

    kind = "custom"  # how it relates to the main model: "same-vocabulary", "shared-encoder", ...
    reads_features = False  # it reads the main model's hidden states

    def __init__(self, draft_length: int | None = None):
        if draft_length is not None and draft_length < 1:
            raise IncompatibleAssistantError("--draft-length must be at least 1")
        self.controller = DraftLengthController(gamma=draft_length, adaptive=False) if draft_length \
            else DraftLengthController()

    @property
    def name(self) -> str:
        return type(self).__name__

    def can_draft(self, language: str | None) -> bool:
        return True

    def prepare(self, window: WindowBatch, prompt_hidden: Tensor) -> None:
        """A new batch of windows. prompt_hidden (B, T, C): the main model's hidden states over the prompts."""

    def sync(self, contexts: list[list[int] | None]) -> None:
        """Per row, every token decided after the prompt (None: no drafts for this row this round)."""

    def propose(self, gamma: int) -> Drafts:
        raise NotImplementedError

    def verified(self, outcome: Verified) -> None:
        """What the verify pass decided (feature drafts keep the main model's hidden states)."""

    def model_drafter(self) -> Drafter | None:
        """The part of this drafter whose drafts cost time to make (what `calibrate` times)."""
        return self


class ModelDrafter(Drafter):
    """A Whisper-shaped network stepped on its own KV cache, drafting γ tokens one step after another.

    Its cache holds, per row, exactly the tokens in `fed`. Before drafting, it rolls back to the
    longest common prefix with the accepted text `sync` gave it and feeds the rest in one pass (not
    in rounds without drafts: the next round that drafts catches up), then drafts under the same rules
    as the main model (suppressed tokens, timestamp rules).
    """

    def __init__(self, model: SpeechModel, shares_encoder: bool, draft_length: int | None = None):
        super().__init__(draft_length)
        self.model = model
        self.shares_encoder = shares_encoder
        self.kind = "shared-encoder" if shares_encoder else "same-vocabulary"

    @property
    def name(self) -> str:
        return self.model.name

    def can_draft(self, language: str | None) -> bool:
        return self.model.tokenizer.multilingual or language in (None, "en")

    # One vocabulary: tokens pass as they are (CrossTokenizerDrafter bridges two).
    def to_own(self, tokens: list[int]) -> list[int]:
        return list(tokens)

    def to_main(self, tokens: list[int]) -> list[int]:
        return list(tokens)

    def own_prompts(self, window: WindowBatch) -> list[list[int]]:
        return [list(prompt) for prompt in window.prompts]

    def prepare(self, window: WindowBatch, prompt_hidden: Tensor) -> None:
        network, batch = self.model.network, len(window.prompts)
        encoded = window.audio_features if self.shares_encoder else \
            network.encoder(window.mel.to(self.model.device, self.model.dtype))
        self.audio_kv = network.decoder.audio_kv(encoded)
        self.rules = LogitRules(self.model.tokenizer, self.model.suppress_tokens, self.model.begin_suppress_tokens,
                                window.options, self.model.dims.n_vocab)
        self.temperature, self.generator = window.options.temperature, window.generator
        self.prompts = self.own_prompts(window)
        self.context = self.model.dims.n_text_ctx
        self.cache = network.new_cache(batch)
        self.fed: list[list[int]] = [[] for _ in range(batch)]
        self.contexts: list[list[int] | None] = [None] * batch
        self.last_hidden: Tensor | None = None  # (B, C) after each row's last fed token
        # The prompt (up to 224 tokens of previous text) is read here, once per window, so a round's
        # sync feeds only the round's few new tokens.
        self._sync_to([p if len(p) <= self.context else None for p in self.prompts])

    def sync(self, contexts: list[list[int] | None]) -> None:
        self.contexts = contexts

    def _catch_up(self) -> None:
        targets = [None if c is None else prompt + self.to_own(c) for prompt, c in zip(self.prompts, self.contexts)]
        self._sync_to([t if t is not None and len(t) <= self.context else None for t in targets])

    def _sync_to(self, targets: list[list[int] | None]) -> None:
        """Make each active row's cache hold exactly `targets[row]`, re-feeding at least its last token
        so that its next-token logits are fresh. Rows whose target is None are fed nothing."""
        blocks, starts = [], []
        kept = list(self.cache.lengths)
        for row, target in enumerate(targets):
            if target is not None:
                kept[row] = min(common_prefix_length(self.fed[row], target), len(target) - 1)
                self.fed[row] = target
            blocks.append([] if target is None else target[kept[row]:])
            starts.append(kept[row])
        self.cache.rollback(kept)  # O(1): only the lengths move
        self.active = [target is not None for target in targets]
        if any(self.active):
            self.last_hidden = self._feed(blocks, **self.sync_inputs(starts, blocks))

    def _feed(self, blocks: list[list[int]], **inputs) -> Tensor:
        """Feed each row its block; return the hidden state (B, C) after its last real token."""
        hidden = forward_ragged(self.model.network.decoder, self.audio_kv, self.cache, blocks, **inputs)
        rows = torch.arange(len(blocks), device=hidden.device)
        last = torch.tensor([max(len(b) - 1, 0) for b in blocks], device=hidden.device)
        return hidden[rows, last]  # (B, C)

    def sync_inputs(self, starts: list[int], blocks: list[list[int]]) -> dict:
        """Extra decoder inputs for the blocks a sync feeds (a feature draft's `features`)."""
        return {}

    def draft_inputs(self, last_hidden: Tensor) -> dict:
        """Extra decoder inputs for a drafted token fed back (a feature draft's `features`)."""
        return {}

    def propose(self, gamma: int) -> Drafts:
        eot, batch = self.model.tokenizer.eot, len(self.fed)
        if gamma == 0:
            return Drafts.none(batch)
        self._catch_up()
        # A row whose context would overflow (another vocabulary may need more tokens) drafts nothing.
        drafting = [active and len(fed) + gamma <= self.context for active, fed in zip(self.active, self.fed)]
        decided = [fed[len(prompt):] for fed, prompt in zip(self.fed, self.prompts)]  # accepted text, own tokens
        tokens: list[list[int]] = [[] for _ in range(batch)]
        probs: list[list[Tensor]] = [[] for _ in range(batch)]
        hidden = self.last_hidden
        for step in range(gamma):
            logits = self.model.network.decoder.logits(hidden).float()  # (B, V)
            for row in range(batch):
                if drafting[row]:
                    filtered = self.rules.apply(logits[row], decided[row] + tokens[row])
                    token, q = pick(filtered, self.temperature, self.generator)
                    tokens[row].append(token)
                    probs[row].append(q)
                    drafting[row] = token != eot
            if step == gamma - 1 or not any(drafting):
                break  # the last draft needs no pass of its own: its successor is the main model's job
            hidden = self._feed([[t[-1]] if d else [] for t, d in zip(tokens, drafting)], **self.draft_inputs(hidden))
            self.fed = [fed + [t[-1]] if d else fed for fed, t, d in zip(self.fed, tokens, drafting)]
        return Drafts([self.to_main(t) for t in tokens], probs if self.temperature > 0 else None)


def pick(filtered: Tensor, temperature: float, generator: torch.Generator | None) -> tuple[int, Tensor | None]:
    """A drafted token from filtered logits (V,): the argmax, or a sample and the distribution it came from."""
    if temperature == 0:
        return int(filtered.argmax()), None
    q = torch.softmax(filtered / temperature, dim=-1)
    return int(torch.multinomial(q, 1, generator=generator)), q


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class TokenBridge:
    """Maps token sequences between two byte-level vocabularies through their bytes.

    Text tokens become bytes and are re-encoded; special tokens (end-of-text, timestamps) map by
    name. Used only when the vocabularies differ.
    """

    source: Tokenizer
    target: Tokenizer

    def convert(self, tokens: list[int], stop_at_unknown: bool = False) -> list[int]:
        out: list[int] = []
        text = bytearray()
        for token in tokens:
            if token < self.source.eot:
                text += self.source.token_bytes(token)
                continue
            if text:
                out += self.target.encode_bytes(bytes(text))
                text.clear()
            mapped = self.target.id_of_special(self.source.special_name(token) or "")
            if mapped is None:
                if stop_at_unknown:
                    return out
                raise IncompatibleAssistantError(
                    f"token {self.source.special_name(token)} has no counterpart in the other vocabulary")
            out.append(mapped)
        if text:
            out += self.target.encode_bytes(bytes(text))
        return out


class CrossTokenizerDrafter(ModelDrafter):
    """An assistant with another vocabulary: the accepted text is re-tokenized for it every round, and
    its drafts are re-tokenized for the main model as fixed proposals (point masses: its distributions
    are over another vocabulary)."""

    def __init__(self, main_tokenizer: Tokenizer, model: SpeechModel, draft_length: int | None = None):
        super().__init__(model, shares_encoder=False, draft_length=draft_length)
        self.kind = "cross-tokenizer"
        self.into_own = TokenBridge(main_tokenizer, model.tokenizer)
        self.into_main = TokenBridge(model.tokenizer, main_tokenizer)

    def to_own(self, tokens: list[int]) -> list[int]:
        return self.into_own.convert(tokens)

    def to_main(self, tokens: list[int]) -> list[int]:
        return self.into_main.convert(tokens, stop_at_unknown=True)

    def own_prompts(self, window: WindowBatch) -> list[list[int]]:
        """Its own start sequence per row, with the main prompt's previous text re-tokenized."""
        tokenizer, prompts = self.model.tokenizer, []
        for prompt, language in zip(window.prompts, window.languages):
            previous = prompt[1:prompt.index(self.into_own.source.sot)]  # the text after <|startofprev|>, if any
            start = tokenizer.sot_sequence(language if tokenizer.multilingual else None, window.options.task,
                                           window.options.timestamps)
            prompts.append([tokenizer.sot_prev] + self.to_own(previous) + start if previous else start)
        return prompts

    def propose(self, gamma: int) -> Drafts:
        return Drafts(super().propose(gamma).tokens)


class DistilledDrafter(ModelDrafter):
    """A distilled draft (specwhisper.draft): the main model's encoder output and embeddings, a few blocks of
    its own. One that reads the main model's hidden states (EAGLE-style) keeps those the prefill and every
    verify pass computed and feeds them when it syncs; while drafting ahead it feeds back its own. On the
    CPU it drafts greedy rounds whole in C (kernels/cpu_draft.py): head, rules, argmax and steps."""

    def __init__(self, model: SpeechModel, draft_length: int | None = None):
        super().__init__(model, shares_encoder=True, draft_length=draft_length)

    @property
    def reads_features(self) -> bool:
        return self.model.network.decoder.reads_features

    def prepare(self, window: WindowBatch, prompt_hidden: Tensor) -> None:
        if self.reads_features:
            # The main model's hidden state at every decided position (B, n_ctx, C). One vocabulary: the
            # draft's position j is the main model's position j.
            self.main_features = prompt_hidden.new_zeros(len(window.prompts), self.model.dims.n_text_ctx,
                                                         prompt_hidden.shape[-1])
            for row, prompt in enumerate(window.prompts):
                self.main_features[row, :len(prompt)] = prompt_hidden[row, :len(prompt)]
        super().prepare(window, prompt_hidden)
        kernel, tokenizer = self.model.network.decoder.kernel, self.model.tokenizer
        self.fused = (kernel is not None and self.temperature == 0
                      and kernel.shortlist_layout(kernel.head_ids, tokenizer.eot, tokenizer.timestamp_begin,
                                                  self.model.dims.n_vocab))
        if self.fused:
            rules = self.rules
            kernel.set_rules(rules.suppress, rules.begin_suppress, rules.timestamps, tokenizer.timestamp_begin,
                             self.model.dims.n_vocab, rules.max_initial_timestamp_index)

    def propose(self, gamma: int) -> Drafts:
        if not self.fused or gamma == 0:
            return super().propose(gamma)
        self._catch_up()
        drafting = [active and len(fed) + gamma <= self.context for active, fed in zip(self.active, self.fed)]
        decided = [fed[len(prompt):] for fed, prompt in zip(self.fed, self.prompts)]
        cache = self.cache
        tokens = self.model.network.decoder.kernel.propose(
            gamma, drafting, self.last_hidden, list(cache.lengths), RuleState.of(decided, self.rules.timestamp_begin),
            cache.keys, cache.values, self.audio_kv.half().keys, self.audio_kv.half().values)
        # The kernel fed every draft but the last one into the cache.
        cache.extend([max(len(t) - 1, 0) for t in tokens])
        self.fed = [fed + t[:-1] for fed, t in zip(self.fed, tokens)]
        return Drafts(tokens)

    def verified(self, outcome: Verified) -> None:
        if self.reads_features:
            for row, (start, kept) in enumerate(zip(outcome.starts, outcome.kept)):
                self.main_features[row, start:start + kept] = outcome.hidden[row, :kept]

    def sync_inputs(self, starts: list[int], blocks: list[list[int]]) -> dict:
        """Each block position's feature: the main model's hidden state one position earlier (zeros
        before position 0), (B, T, C) zero-padded."""
        if not self.reads_features:
            return {}
        longest = max(len(b) for b in blocks)
        features = self.main_features.new_zeros(len(blocks), longest, self.main_features.shape[-1])
        for row, (start, block) in enumerate(zip(starts, blocks)):
            if block:
                source = self.main_features[row, max(start - 1, 0):start - 1 + len(block)]
                features[row, len(block) - len(source):len(block)] = source
        return {"features": features}

    def draft_inputs(self, last_hidden: Tensor) -> dict:
        # (B, 1, C): its own, the main model's is not known yet
        return {"features": last_hidden[:, None]} if self.reads_features else {}


class FreeDrafter(Drafter):
    """Drafts that cost nothing to make, and the wrapped drafter's where there are none.

    For each row, in order:
      - its hint (`WindowBatch.hints`): the tokens the window will likely decode first, from long-form
        decoding (the previous window's unfinished tail, re-timed; or the tokens of an attempt that
        failed and is decoded again at a higher temperature), for as long as the row's text follows it;
      - the wrapped drafter's γ tokens;
      - without one, prompt lookup: after the row's last `min_match` tokens, what followed their latest
        earlier occurrence in the prompt or the text so far (repeated names and phrases). A trained draft
        guesses better: on speech it is right ~3 times in 4, prompt lookup seldom.
    Free drafts are verified as far as the controller's estimate of their acceptance makes worth it
    (`DraftLengthController.free_length`), even in rounds where model drafting does not pay.
    """

    def __init__(self, inner: Drafter | None = None, min_match: int = 3, draft_length: int | None = None):
        super().__init__(draft_length)
        if inner is not None:
            self.controller = inner.controller  # one policy: the wrapped drafter's γ, and free lengths
        self.inner, self.min_match = inner, min_match
        self.inner_drafts = False  # the wrapped drafter drafts for the current window
        self.kind = f"free + {inner.kind}" if inner is not None else "free"

    @property
    def name(self) -> str:
        return f"free drafts + {self.inner.name}" if self.inner is not None else "free drafts"

    @property
    def reads_features(self) -> bool:
        return self.inner is not None and self.inner.reads_features

    def model_drafter(self) -> Drafter | None:
        return self.inner if self.inner_drafts else None

    def prepare(self, window: WindowBatch, prompt_hidden: Tensor) -> None:
        self.prompts = window.prompts
        self.hints = window.hints or [[] for _ in window.prompts]
        self.inner_drafts = self.inner is not None and all(self.inner.can_draft(lang) for lang in window.languages)
        if self.inner_drafts:
            self.inner.prepare(window, prompt_hidden)

    def sync(self, contexts: list[list[int] | None]) -> None:
        self.contexts = contexts
        if self.inner_drafts:
            self.inner.sync(contexts)

    def propose(self, gamma: int) -> Drafts:
        length = self.controller.free_length()
        free = [[] if c is None else self.free_drafts(row, c, length) for row, c in enumerate(self.contexts)]
        if not self.inner_drafts or gamma == 0 or all(free[r] or c is None for r, c in enumerate(self.contexts)):
            return Drafts(free, free=[bool(f) for f in free])
        if any(free):  # the wrapped drafter drafts only for the rows without free drafts
            self.inner.sync([None if f else c for f, c in zip(free, self.contexts)])
        model = self.inner.propose(gamma)
        tokens = [f or m for f, m in zip(free, model.tokens)]
        probs = None if model.probs is None else [[] if f else p for f, p in zip(free, model.probs)]
        return Drafts(tokens, probs, free=[bool(f) for f in free])

    def free_drafts(self, row: int, context: list[int], length: int) -> list[int]:
        hint = self.hints[row]
        if len(hint) > len(context) and hint[:len(context)] == context:
            return hint[len(context):len(context) + length]
        if self.inner_drafts:
            return []
        return prompt_lookup(self.prompts[row] + context, self.min_match, length)

    def verified(self, outcome: Verified) -> None:
        if self.inner_drafts:
            self.inner.verified(outcome)


def prompt_lookup(text: list[int], n: int, length: int) -> list[int]:
    """After the last n tokens of `text`, the (up to) `length` tokens that followed their latest earlier
    occurrence in it; none when they do not occur earlier."""
    if len(text) <= n:
        return []
    key = text[-n:]
    for start in range(len(text) - n - 1, -1, -1):
        if text[start:start + n] == key:
            return text[start + n:start + n + length]
    return []
