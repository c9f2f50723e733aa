"""Decoding a batch of 30-s windows, built from small functions with explicit state.

The pieces, each usable alone:
  - `LogitRules`: which tokens may come next given the tokens so far (suppressed tokens, blank
    suppression at the start, Whisper's timestamp rules). A pure function of (logits, generated
    tokens): speculative verification applies it at every drafted position with its own prefix.
  - `detect_language`, `resolve_languages`, `build_prompts`: what each row is prompted with.
  - `WindowBatch`: a batch of windows ready to decode (audio K/V, prompts, rules, options).
  - `forward_ragged`: one decoder pass in which every row feeds its own number of tokens.
  - `begin_window`: prefill the prompts and decide each row's first token; `decide` one token
    (rules, then the argmax or a sample, then recorded in the row's `RowProgress`).
  - `autoregressive_decode`: one token per main-model pass until end-of-text or the context is
    full; at temperature 0 the reference speculative decoding (specwhisper.speculative) equals.
  - `step_logits` / `settle_logprobs`: greedy choices on the CPU come from an fp16 screen of the
    output projection, exactly (specwhisper.screening); log-probabilities are computed exactly
    for the whole window at its end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .checks import check_search_options
from .kv_cache import AudioKV, KVCache
from .screening import ScreenedRow

if TYPE_CHECKING:
    from .model import Whisper
    from .tokenizer import Tokenizer

NEG_INF = float("-inf")
PAD_TOKEN = 0  # what short rows of a ragged pass are padded with (rolled back, never seen)


@dataclass(frozen=True)
class DecodingOptions:
    task: str = "transcribe"  # or "translate" (to English)
    language: str | None = None  # None: detect from the audio (multilingual models)
    timestamps: bool = False  # predict segment timestamps (Whisper's timestamp mode)
    suppress_blank: bool = True  # no space or end-of-text as the first token
    max_initial_timestamp: float = 1.0  # seconds: the first timestamp may not be later
    max_new_tokens: int | None = None  # None: until the decoder's context (448 tokens) is full
    temperature: float = 0.0  # 0: greedy; above 0: sample from softmax(logits / temperature)
    # openai-whisper's search options (specwhisper.beam_search), each for one kind of temperature:
    beam_size: int | None = None  # at temperature 0: beam search with this many beams (None: greedy)
    patience: float | None = None  # beam search ends once round(beam_size * patience) hypotheses have (None: 1)
    length_penalty: float | None = None  # ranking: None divides summed log-probs by length; α by ((5+len)/6)^α
    best_of: int | None = None  # above temperature 0: sample this many per window, keep the best ranked

    def __post_init__(self):
        check_search_options(self.beam_size, self.patience, self.length_penalty, self.best_of)


def synchronize(device: torch.device | None) -> None:
    """Wait for `device`'s queued work before a clock is read: a CUDA launch returns before its kernel
    runs. A no-op off CUDA, where the work is done when the call returns."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class DecodeStats:
    """Counts and times of one decode call; speculative decoding fills the draft fields."""

    generated_tokens: int = 0
    main_passes: int = 0  # decoder forward passes of the main model after the prompt
    drafted: int = 0  # every draft verified (free ones included)
    accepted: int = 0
    rejections: int = 0  # speculative: rounds in which the main model rejected a draft
    free_drafted: int = 0  # drafts that cost nothing to make (specwhisper.drafters.FreeDrafter)
    free_accepted: int = 0
    encoder_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    accepted_per_round: list[int] = field(default_factory=list)  # speculative: drafts accepted in each round
    gammas: list[int] = field(default_factory=list)  # speculative: γ chosen for each round
    windows: list[dict] = field(default_factory=list)  # one record per decode call (`window_record`)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def position_acceptance(self) -> float:
        """α, the chance that a drafted position passes once every one before it did: positions after a
        rejection were never tried, so accepted / drafted would understate it."""
        judged = self.accepted + self.rejections
        return self.accepted / judged if judged else 0.0

    @property
    def tokens_per_main_pass(self) -> float:
        return self.generated_tokens / self.main_passes if self.main_passes else 0.0

    def add(self, other: "DecodeStats") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def acceptance_histogram(self) -> dict[int, int]:
        """{drafts accepted in a round: number of rounds}."""
        counts: dict[int, int] = {}
        for n in self.accepted_per_round:
            counts[n] = counts.get(n, 0) + 1
        return dict(sorted(counts.items()))

    def as_dict(self) -> dict:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__
               if name not in ("accepted_per_round", "gammas", "windows")}
        out["acceptance_histogram"] = self.acceptance_histogram()
        out["mean_gamma"] = sum(self.gammas) / len(self.gammas) if self.gammas else 0.0
        out["acceptance_rate"] = self.acceptance_rate
        out["position_acceptance"] = self.position_acceptance
        out["tokens_per_main_pass"] = self.tokens_per_main_pass
        return out


@dataclass
class WindowResult:
    """One decoded window (one batch row)."""

    tokens: list[int]  # generated tokens: text and timestamps, no prompt, no end-of-text
    language: str | None
    avg_logprob: float
    no_speech_prob: float
    finished: bool  # ended with end-of-text (False: ran into the context limit)
    language_probs: dict[str, float] | None = None
    draft_mask: list[bool] | None = None  # speculative: True where the token came from an accepted draft
    audio_kv: AudioKV | None = None  # this row's cross-attention K/V, kept only for word timestamps
    sum_logprob: float = 0.0  # of the tokens and the end-of-text (what best-of and beam search rank by)


class LogitRules:
    """The constraints Whisper puts on the next token, as a function of the tokens generated so far."""

    def __init__(self, tokenizer: Tokenizer, suppress_tokens: list[int], begin_suppress_tokens: list[int],
                 options: DecodingOptions, n_vocab: int):
        self.tokenizer = tokenizer
        self.timestamps = options.timestamps
        suppress = set(t for t in suppress_tokens if 0 <= t < n_vocab)
        if options.timestamps:
            suppress.add(tokenizer.no_timestamps)
        self.suppress = torch.tensor(sorted(suppress), dtype=torch.long)
        self.begin_suppress = torch.tensor(
            sorted(set(begin_suppress_tokens) if options.suppress_blank else set()), dtype=torch.long)
        self.timestamp_begin = tokenizer.timestamp_begin
        self.eot = tokenizer.eot
        self.max_initial_timestamp_index = round(options.max_initial_timestamp / 0.02) \
            if options.max_initial_timestamp is not None else None

    def apply(self, logits: Tensor, generated: list[int], screen: ScreenedRow | None = None) -> Tensor:
        """Mask, in place, the tokens that may not follow `generated`. logits: (V,) float.
        screen: set when `logits` are screened (within screen.bound of the exact ones); the
        timestamp rule is then still decided as on the exact logits."""
        logits[self.suppress.to(logits.device)] = NEG_INF
        if not generated and len(self.begin_suppress):
            logits[self.begin_suppress.to(logits.device)] = NEG_INF
        if self.timestamps:
            self._timestamp_rules(logits, generated, screen)
        return logits

    def _timestamp_rules(self, logits: Tensor, generated: list[int], screen: ScreenedRow | None) -> None:
        ts = self.timestamp_begin
        last_was_ts = len(generated) >= 1 and generated[-1] >= ts
        penultimate_was_ts = len(generated) < 2 or generated[-2] >= ts
        if last_was_ts:
            if penultimate_was_ts:  # a pair of timestamps closed a segment: text must follow
                logits[ts:] = NEG_INF
            else:  # a segment's text ended: only a timestamp or end-of-text
                logits[:self.eot] = NEG_INF
        timestamps = [t for t in generated if t >= ts]
        if timestamps:
            # Timestamps never go backwards; a segment's end may equal its start only right after it.
            floor = timestamps[-1] if (last_was_ts and not penultimate_was_ts) else timestamps[-1] + 1
            logits[ts:floor] = NEG_INF
        if not generated:
            logits[:ts] = NEG_INF  # a timestamped transcript starts with a timestamp
            if self.max_initial_timestamp_index is not None:
                logits[ts + self.max_initial_timestamp_index + 1:] = NEG_INF
        if self._timestamps_outweigh_text(logits, screen):
            logits[:ts] = NEG_INF  # all timestamps together outweigh the best text token

    def _timestamps_outweigh_text(self, logits: Tensor, screen: ScreenedRow | None) -> bool:
        ts = self.timestamp_begin
        if screen is not None:
            # Every screened logit is within `bound` of the exact one, so the log-sum-exp of the
            # timestamps and the best text logit each are too: a margin over 2 bounds is decided.
            margin = float(torch.logsumexp(logits[ts:], dim=-1) - logits[:ts].max())
            if abs(margin) > 2 * screen.bound:
                return margin > 0
            exact = screen.exact_row()
            exact[logits == NEG_INF] = NEG_INF  # the masks applied so far
            logits = exact
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        return bool(torch.logsumexp(logprobs[ts:], dim=-1) > logprobs[:ts].max())


def detect_language(model: Whisper, tokenizer: Tokenizer, audio_kv: AudioKV) -> list[dict[str, float]]:
    """Per row: probability of each language token right after start-of-transcript."""
    if not tokenizer.multilingual:
        return [{"en": 1.0} for _ in range(audio_kv.batch_size)]
    cache = model.new_cache(audio_kv.batch_size, max_len=1)
    sot = torch.full((audio_kv.batch_size, 1), tokenizer.sot, dtype=torch.long, device=audio_kv.keys[0].device)
    logits = model.decoder.logits(model.decoder(sot, audio_kv, cache))[:, 0].float()  # (B, V)
    ids = torch.tensor(tokenizer.language_token_ids, device=logits.device)
    probs = torch.softmax(logits[:, ids], dim=-1)  # only language tokens compete
    return [dict(zip(tokenizer.language_codes, row.tolist())) for row in probs]


def forward_ragged(decoder, audio_kv: AudioKV, cache: KVCache, blocks: list[list[int]], **inputs) -> Tensor:
    """One decoder pass in which row b feeds `blocks[b]` (lengths may differ, empty allowed) at its length.

    Short rows are padded, then the cache rolls back to each row's real length: the padded slots
    become stale entries that no later query can see, so what they hold does not matter. `decoder`: a
    TextDecoder or a DraftDecoder; `inputs` go to it (a feature draft's `features`). Returns (B, T, C).
    """
    longest = max(len(block) for block in blocks)
    starts = list(cache.lengths)
    padded = torch.tensor([block + [PAD_TOKEN] * (longest - len(block)) for block in blocks], dtype=torch.long,
                          device=audio_kv.keys[0].device)  # (B, T)
    hidden = decoder(padded, audio_kv, cache, **inputs)
    cache.rollback([start + len(block) for start, block in zip(starts, blocks)])
    return hidden


def prefill(model: Whisper, audio_kv: AudioKV, prompts: list[list[int]], cache: KVCache) -> tuple[Tensor, Tensor]:
    """Run each row's prompt into an empty cache. Returns the float logits (B, V) after each row's last
    prompt token, and the hidden states (B, T, C) of every prompt position (no-speech detection reads
    the start-of-transcript one)."""
    hidden = forward_ragged(model.decoder, audio_kv, cache, prompts)  # (B, T, C)
    rows = torch.arange(len(prompts), device=hidden.device)
    last = torch.tensor([len(p) - 1 for p in prompts], device=hidden.device)
    return model.decoder.logits(hidden[rows, last]).float(), hidden


def no_speech_probs(model: Whisper, tokenizer: Tokenizer, prompt_hidden: Tensor, prompts: list[list[int]]
                    ) -> list[float]:
    """Probability of <|nocaptions|> at each row's start-of-transcript position."""
    probs = []
    for row, prompt in enumerate(prompts):
        sot_index = prompt.index(tokenizer.sot)
        logits = model.decoder.logits(prompt_hidden[row, sot_index]).float()
        probs.append(torch.softmax(logits, dim=-1)[tokenizer.no_speech].item())
    return probs


def build_prompts(tokenizer: Tokenizer, options: DecodingOptions, languages: list[str | None],
                  previous_tokens: list[list[int]] | None = None) -> list[list[int]]:
    """Per row: [<|startofprev|> previous text...] <|startoftranscript|> <|lang|> <|task|> [<|notimestamps|>]."""
    prompts = []
    for row, language in enumerate(languages):
        prompt = tokenizer.sot_sequence(language, options.task, options.timestamps)
        previous = previous_tokens[row] if previous_tokens else None
        if previous:
            prompt = [tokenizer.sot_prev] + previous + prompt
        prompts.append(prompt)
    return prompts


def resolve_languages(model: Whisper, tokenizer: Tokenizer, audio_kv: AudioKV, language: str | None
                      ) -> tuple[list[str | None], list[dict[str, float] | None]]:
    """The language of every row: the one given, or the most probable one."""
    if not tokenizer.multilingual:
        if language not in (None, "en"):
            raise ValueError(f"this model is English-only; cannot transcribe language {language!r}")
        return ["en"] * audio_kv.batch_size, [None] * audio_kv.batch_size
    if language is not None:
        tokenizer.language_token(language)  # validates the code with a clear error
        return [language] * audio_kv.batch_size, [None] * audio_kv.batch_size
    probs = detect_language(model, tokenizer, audio_kv)
    return [max(p, key=p.get) for p in probs], probs


def choose_token(logits: Tensor, temperature: float, generator: torch.Generator | None,
                 screen: ScreenedRow | None = None) -> int:
    """The next token from filtered logits (V,): argmax at temperature 0, else a sample.
    screen: `logits` are screened; the argmax is then refined to the exact one."""
    if temperature == 0:
        return screen.argmax(logits) if screen is not None else int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class RowProgress:
    """One row's decided tokens, the sum of their log-probabilities, and whether it is done."""

    budget: int  # tokens this row may generate (the rest of the 448-token context, or max_new_tokens)
    eot: int
    tokens: list[int] = field(default_factory=list)
    from_draft: list[bool] = field(default_factory=list)
    sum_logprob: float = 0.0
    finished: bool = False
    ended_with_eot: bool = False
    last_drafted: bool = False  # the latest decided token was an accepted draft (end-of-text included)
    # Tokens decided from screened logits: their hidden states and how many tokens preceded each.
    # Their log-probabilities are added by `settle_logprobs`.
    unscored_hidden: list[Tensor] = field(default_factory=list)
    unscored_at: list[int] = field(default_factory=list)

    def commit(self, token: int, filtered_logits: Tensor | None, drafted: bool = False,
               screen: ScreenedRow | None = None, logprob: float | None = None) -> None:
        """Record the decided next token; end-of-text or a spent budget finishes the row.
        screen: the logits were screened, so the log-probability is left to `settle_logprobs`.
        logprob: the token's log-probability, computed where it was chosen (then no logits are passed)."""
        self.last_drafted = drafted
        if logprob is not None:
            self.sum_logprob += logprob
        elif screen is not None:
            self.unscored_hidden.append(screen.hidden)
            self.unscored_at.append(len(self.tokens))
        else:
            self.sum_logprob += float(torch.log_softmax(filtered_logits, dim=-1)[token])
        if token == self.eot:
            self.finished = self.ended_with_eot = True
            return
        self.tokens.append(token)
        self.from_draft.append(drafted)
        if len(self.tokens) >= self.budget:
            self.finished = True

    def result(self, no_speech_prob: float, with_draft_mask: bool = False) -> WindowResult:
        assert not self.unscored_at, "settle_logprobs first"
        n_scored = len(self.tokens) + (1 if self.ended_with_eot else 0)  # end-of-text's log-prob counts too
        return WindowResult(tokens=self.tokens, language=None, avg_logprob=self.sum_logprob / max(n_scored, 1),
                            no_speech_prob=no_speech_prob, finished=self.ended_with_eot,
                            draft_mask=self.from_draft if with_draft_mask else None, sum_logprob=self.sum_logprob)


def step_logits(model: Whisper, hidden: Tensor, options: DecodingOptions) -> tuple[Tensor, list[ScreenedRow] | None]:
    """hidden (N, C) -> float logits (N, V) to choose the next tokens from, and a ScreenedRow per row
    when they are screened (greedy with a screen installed); None when they are exact (no screen,
    or sampling, which needs every probability)."""
    head = model.decoder.screened_head
    if head is None or options.temperature > 0:
        return model.decoder.logits(hidden).float(), None
    logits, bounds = head.screen(hidden)
    return logits, [ScreenedRow(head, h, b) for h, b in zip(hidden, bounds)]


def settle_logprobs(model: Whisper, rules: LogitRules, rows: list[RowProgress]) -> None:
    """Add the exact log-probabilities of the tokens chosen from screened logits: one fp32 pass of
    the output projection over each row's stored hidden states, then the same rules as when chosen."""
    for progress in rows:
        if not progress.unscored_at:
            continue
        logits = model.decoder.logits(torch.stack(progress.unscored_hidden)).float()  # (K, V)
        decided = progress.tokens + ([progress.eot] if progress.ended_with_eot else [])
        for row_logits, at in zip(logits, progress.unscored_at):
            filtered = rules.apply(row_logits, progress.tokens[:at])
            progress.sum_logprob += float(torch.log_softmax(filtered, dim=-1)[decided[at]])
        progress.unscored_hidden.clear()
        progress.unscored_at.clear()


@dataclass(frozen=True)
class WindowBatch:
    """A batch of 30-s windows ready to decode, one per row: everything that stays fixed while it is."""

    mel: Tensor  # (B, n_mels, 3000)
    audio_features: Tensor  # (B, n_audio_ctx, n_audio_state): the encoder's output
    audio_kv: AudioKV  # the decoder's cross-attention K/V of those features
    prompts: list[list[int]]  # per row: [<|startofprev|> previous...] <|startoftranscript|> ...
    languages: list[str | None]
    rules: LogitRules
    options: DecodingOptions
    generator: torch.Generator | None = None  # sampling's random numbers (None: PyTorch's global ones)
    hints: list[list[int]] | None = None  # per row: tokens it will likely decode first (free drafts)


@dataclass
class DecodeState:
    """What changes while a batch of windows is decoded: the cache and each row's progress."""

    cache: KVCache
    rows: list[RowProgress]
    no_speech: list[float]  # per row: probability of <|nocaptions|> after the prompt
    prompt_hidden: Tensor  # (B, T, C): the decoder's hidden states over the (padded) prompts


def decide(row: RowProgress, logits: Tensor, window: WindowBatch, screen: ScreenedRow | None = None) -> int:
    """The next token of a row from one position's float logits (V,): Whisper's rules given the row's
    tokens, then the argmax (or a sample), recorded in `row`. screen: the logits are screened."""
    filtered = window.rules.apply(logits, row.tokens, screen)
    token = choose_token(filtered, window.options.temperature, window.generator, screen)
    row.commit(token, filtered, screen=screen)
    return token


def begin_window(model: Whisper, tokenizer: Tokenizer, window: WindowBatch) -> DecodeState:
    """A fresh cache holding every row's prompt, and each row's first token, decided from the prompt's
    exact logits."""
    cache = model.new_cache(len(window.prompts))
    logits, prompt_hidden = prefill(model, window.audio_kv, window.prompts, cache)
    rows = [RowProgress(budget=token_budget(model, len(p), window.options), eot=tokenizer.eot) for p in window.prompts]
    for row, row_logits in zip(rows, logits):
        decide(row, row_logits, window)
    return DecodeState(cache, rows, no_speech_probs(model, tokenizer, prompt_hidden, window.prompts), prompt_hidden)


def end_window(model: Whisper, window: WindowBatch, state: DecodeState, stats: DecodeStats,
               with_draft_mask: bool = False) -> list[WindowResult]:
    """Every row's result, its log-probabilities settled."""
    settle_logprobs(model, window.rules, state.rows)
    stats.generated_tokens += sum(len(row.tokens) for row in state.rows)
    return [row.result(p, with_draft_mask) for row, p in zip(state.rows, state.no_speech)]


def window_record(stats: DecodeStats) -> dict:
    """A summary of one decode call's statistics (`stats` fresh for that call), for per-window plots."""
    return {"tokens": stats.generated_tokens, "passes": stats.main_passes, "drafted": stats.drafted,
            "accepted": stats.accepted, "free_drafted": stats.free_drafted, "free_accepted": stats.free_accepted,
            "mean_gamma": sum(stats.gammas) / len(stats.gammas) if stats.gammas else 0.0,
            "encoder_seconds": stats.encoder_seconds, "prefill_seconds": stats.prefill_seconds,
            "decode_seconds": stats.decode_seconds, "draft_seconds": stats.draft_seconds,
            "verify_seconds": stats.verify_seconds}


def autoregressive_decode(model: Whisper, tokenizer: Tokenizer, window: WindowBatch,
                          stats: DecodeStats | None = None) -> list[WindowResult]:
    """One main-model pass per token, for a batch of windows. At temperature 0 this is plain greedy
    decoding: the reference speculative decoding must reproduce token for token."""
    stats = stats if stats is not None else DecodeStats()
    device = model.decoder.token_embedding.weight.device
    synchronize(device)
    started = time.perf_counter()
    state = begin_window(model, tokenizer, window)
    synchronize(device)
    stats.prefill_seconds += time.perf_counter() - started
    started = time.perf_counter()
    while not all(row.finished for row in state.rows):
        blocks = [[] if row.finished else [row.tokens[-1]] for row in state.rows]  # finished rows feed nothing
        hidden = forward_ragged(model.decoder, window.audio_kv, state.cache, blocks)[:, -1]  # (B, C)
        logits, screens = step_logits(model, hidden, window.options)
        stats.main_passes += 1
        for r, row in enumerate(state.rows):
            if not row.finished:
                decide(row, logits[r], window, screens[r] if screens else None)
    results = end_window(model, window, state, stats)
    synchronize(device)
    stats.decode_seconds += time.perf_counter() - started
    return results


def token_budget(model: Whisper, prompt_len: int, options: DecodingOptions) -> int:
    """How many tokens a row may generate: until the 448-token context is full, or max_new_tokens."""
    room = model.dims.n_text_ctx - prompt_len
    return min(room, options.max_new_tokens) if options.max_new_tokens else room
