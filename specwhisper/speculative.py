"""Speculative decoding: an assistant drafts, the main model verifies several tokens per pass.

One round, for every row of a batch of audio windows:
  1. `sync_assistant`: bring the assistant's cache to exactly the accepted text (roll
     back to the longest common prefix, feed the rest in one pass).
  2. `draft`: the assistant proposes γ tokens, one cheap step each.
  3. verify: the main model runs its last accepted token plus the γ drafts in one
     pass (γ+1 positions, causal inside the block) against its cache.
  4. `greedy_accept` (or `sample_accept` at temperature > 0): keep the longest
     agreeing prefix plus the main model's own next token; roll the main cache back
     past the rejected drafts. The result is the main model's output, token for
     token (greedy) or in distribution (sampling).

Assistant kinds (`load_assistant` picks one):
  - same vocabulary, own encoder (e.g. whisper-tiny drafting for whisper-base);
  - same vocabulary, shared encoder (distil-whisper for its teacher: the encoder is a
    frozen copy, verified tensor by tensor before it is shared);
  - cross-tokenizer (e.g. tiny.en, English-only vocabulary, drafting for multilingual
    base): drafts are turned into text and re-tokenized for the main model, and the
    assistant is re-synced to the re-tokenized accepted text after every round.
  - a distilled draft (`specwhisper.draft`, made by `specwhisper distill`): a few decoder
    blocks sharing the main model's encoder module and embeddings. With `features` it
    also reads the main model's hidden state of the previous position: the loop keeps the
    hidden states the prefill and every verify pass computed (`AssistantState.main_features`)
    and hands them to the draft when it syncs; while drafting ahead it feeds back its own.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .decoding import (DecodeStats, DecodingOptions, LogitRules, RowProgress, WindowResult, autoregressive_decode,
                       choose_token, no_speech_probs, prefill, settle_logprobs, start_rows, step_logits)
from .draft import draft_folder, draft_forward, find_draft, load_draft, uses_features
from .errors import IncompatibleAssistantError
from .kv_cache import AudioKV, KVCache
from .loading import SpeechModel, load_model
from .screening import ScreenedRow
from .tokenizer import Tokenizer


# ----------------------------------------------------------------------------- accept rules (pure)

def greedy_accept(main_choices: list[int], drafts: list[int]) -> int:
    """How many drafts agree with the main model's greedy choices at their positions.

    main_choices[i] is the main model's token after the accepted prefix plus drafts[:i];
    it may be shorter than drafts + 1 when the caller stopped at the first disagreement.
    """
    accepted = 0
    while accepted < len(drafts) and accepted < len(main_choices) and main_choices[accepted] == drafts[accepted]:
        accepted += 1
    return accepted


def sample_accept(p: Tensor, q: Tensor | None, draft: int, generator: torch.Generator | None) -> tuple[bool, int | None]:
    """Speculative sampling's rule for one drafted token.

    p: the main model's distribution (V,) at this position; q: the assistant's (V,), or None
    when the draft is a fixed proposal (a point mass on `draft`, as for cross-tokenizer drafts,
    whose distribution is over another vocabulary). Accept with probability min(1, p/q);
    otherwise return a replacement sampled from max(0, p - q), normalized. Either way the token
    that results is distributed exactly as p.
    """
    p_draft = float(p[draft])
    q_draft = 1.0 if q is None else float(q[draft])
    if q_draft > 0 and torch.rand((), generator=generator).item() < min(1.0, p_draft / q_draft):
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


# ----------------------------------------------------------------------------- draft length

@dataclass
class DraftLengthController:
    """Chooses γ, the number of tokens drafted per main-model pass.

    constant: always `gamma`. adaptive: estimate the acceptance rate α and the costs of a
    draft step and of a verify pass as they are measured, then pick the γ that maximizes
    expected tokens per second, E[tokens] / (γ·t_draft + t_verify(γ+1)), with
    E[tokens] = (1 - α^(γ+1)) / (1 - α). γ = 0 (no drafting, one token per pass) wins when
    drafts don't pay; then drafting is re-probed with γ = 1 every `probe_every` tokens.
    """

    gamma: int = 4
    adaptive: bool = True
    max_gamma: int = 12
    probe_every: int = 32
    acceptance: float = 0.7  # running estimate of α (per drafted token)
    draft_step_seconds: float | None = None
    verify_base_seconds: float | None = None  # cost of a pass, fixed part
    verify_per_token_seconds: float = 0.0  # and per extra position
    tokens_since_off: int = 0
    smoothing: float = 0.25
    acceptance_smoothing: float = 0.1
    # Near its optimum the rate is flat in γ (and measured with noise): take the longest γ within
    # this fraction of the best, since a longer draft also gains more when acceptance runs high.
    flat_optimum: float = 0.97
    # A round timed at more than this multiple of the current estimate counts as this multiple: on a
    # shared 2-core machine one descheduled round can take 10x its usual time, and at full weight it
    # switched drafting off for the next `probe_every` tokens. A real change of speed still comes
    # through, at most this factor per round.
    outlier_ratio: float = 2.0
    fit_smoothing: float = 0.1  # weight of each pass in the verify-cost fit (~10 passes)
    slope_ridge: float = 1.0  # positions²: how much spread in pass sizes outweighs the prior slope
    # An extra position's cost before the data says otherwise: ~15 % of a pass for base on the CPU, where
    # attention runs one position at a time after the prompt for exactness (attention.one_position_at_a_time).
    prior_slope_fraction: float = 0.15
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
               tokens: int, rejections: int | None = None, catch_up_seconds: float = 0.0) -> None:
        """One round's outcome. rejections: the rows whose drafts were cut by a rejected token (default:
        every row that drafted something and lost some of it, counted as one). catch_up_seconds: the
        part of draft_seconds spent feeding the assistant the tokens decided in rounds without drafts."""
        if not self.adaptive:
            return
        if catch_up_seconds > 0 and self.draft_step_seconds is not None:
            # A one-off cost (~probe_every tokens fed at once). Charged to the probe's one draft, it
            # read as a 10-20 ms draft step and kept drafting off window after window: count a usual
            # sync (about a draft step) in its place.
            draft_seconds += min(self.draft_step_seconds, catch_up_seconds) - catch_up_seconds
        if drafted == 0:
            self.tokens_since_off += tokens
            self._note_verify(verify_seconds, n_positions)
            return
        if rejections is None:
            rejections = int(accepted < drafted)
        # α is the chance that a drafted position passes given that every one before it did: the
        # positions after a rejection were never tried. accepted / drafted would count them as
        # failures and underestimate α by about a factor γ/E[tokens] (0.36 instead of 0.61 at γ=3
        # on the long recordings), which made the controller stop drafting when drafts paid.
        rate = accepted / max(accepted + rejections, 1)
        # α is smoothed more slowly than the costs: one round is only a handful of Bernoulli trials,
        # and a single rejection at 0.25 swung α from 0.7 to 0.5 and γ from 3 to 1 on real audio.
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
        # A pass costs base + per_token x (positions - 1): nearly flat on memory-bound hardware, but
        # on a CPU each extra position adds real work (attention, GELU, the output projection's
        # FLOPs). Both are fitted by exponentially weighted least squares over the passes seen, so
        # the estimate follows the machine (and its background load) as decoding goes on.
        # The slope is shrunk towards a prior (ridge) and capped: γ changes rarely, so most passes
        # have one size, and unshrunk a single slow pass among them fitted 6 ms per position (half a
        # pass) on the long recordings and switched drafting off for the next 32 tokens.
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


# ----------------------------------------------------------------------------- assistants

@dataclass
class TokenBridge:
    """Maps token sequences between two byte-level vocabularies through their bytes.

    Text tokens become bytes and are re-encoded; special tokens (end-of-text, timestamps)
    map by name. Used only when the vocabularies differ.
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


@dataclass
class Assistant:
    """A model that drafts for a main model, and how its tokens relate to the main model's."""

    model: SpeechModel
    kind: str  # "same-vocabulary", "shared-encoder" or "cross-tokenizer"
    controller_template: DraftLengthController = field(default_factory=DraftLengthController)
    # The adaptive controller's estimates at the end of the last window decoded, carried into the
    # next: costs and acceptance change little from one window to the next, and a controller that
    # starts from its prior every window spends its first rounds at a guessed γ (4, with α = 0.7)
    # and learns its costs from one or two noisy rounds (~50 rounds a window on the long recordings).
    learned_controller: DraftLengthController | None = field(default=None, repr=False)
    # Feature drafts: keep the cache entries the draft computed from its own hidden states while
    # drafting the tokens that were then accepted (False), or re-feed them with the main model's
    # (True, as EAGLE does). The draft was trained on both inputs and agrees as often with either
    # (76.3 % vs 76.6 % on ../shared/audio/long); keeping them makes the sync pass 1-2 tokens instead
    # of accepted + 1, and measured 6-8 % faster long-form with the same transcripts.
    refeed_accepted: bool = False

    @property
    def shares_encoder(self) -> bool:
        return self.kind == "shared-encoder"

    @property
    def cross_tokenizer(self) -> bool:
        return self.kind == "cross-tokenizer"

    def new_controller(self) -> DraftLengthController:
        t = self.controller_template
        learned = self.learned_controller
        if t.adaptive and learned is not None:
            return replace(learned, _fit_sums=list(learned._fit_sums), tokens_since_off=0)
        return DraftLengthController(gamma=t.gamma, adaptive=t.adaptive, max_gamma=t.max_gamma,
                                     probe_every=t.probe_every)

    def remember(self, controller: DraftLengthController) -> None:
        """Keep an adaptive controller's estimates for the next window (`new_controller`)."""
        if controller.adaptive:
            self.learned_controller = controller

    @property
    def reads_features(self) -> bool:
        """A distilled draft that reads the main model's hidden states (specwhisper.draft, features=True)."""
        return uses_features(self.model.network)

    def can_draft(self, language: str | None) -> bool:
        return self.model.tokenizer.multilingual or language in (None, "en")


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    if a is b:  # a distilled draft (specwhisper.draft) holds the main model's own tokenizer
        return True
    if a.n_vocab != b.n_vocab or a.eot != b.eot or a.timestamp_begin != b.timestamp_begin:
        return False
    return all(a.token_bytes(i) == b.token_bytes(i) for i in range(a.eot))


def encoders_match(main: SpeechModel, assistant: SpeechModel, atol: float = 1e-3) -> bool:
    """True when the assistant's encoder is the main model's, tensor for tensor (a distil-whisper student)."""
    if main.network.encoder is assistant.network.encoder:  # a distilled draft shares the module itself
        return True
    if main.dims.n_audio_state != assistant.dims.n_audio_state or main.dims.n_audio_layer != assistant.dims.n_audio_layer:
        return False
    ours, theirs = main.network.encoder.state_dict(), assistant.network.encoder.state_dict()
    if ours.keys() != theirs.keys():
        return False
    for name, tensor in ours.items():
        other = theirs[name]
        if tensor.shape != other.shape:
            return False
        if tensor.dtype != other.dtype or tensor.is_mkldnn or other.is_mkldnn:
            tensor, other = tensor.to_dense().float() if tensor.is_mkldnn else tensor.float(), \
                other.to_dense().float() if other.is_mkldnn else other.float()
        if not torch.allclose(tensor, other, atol=atol, rtol=0):
            return False
    return True


def make_assistant(main: SpeechModel, assistant: SpeechModel, draft_length: int | None = None) -> Assistant:
    """Decide how `assistant` can draft for `main`, or raise IncompatibleAssistantError (one line)."""
    if assistant.dims.n_mels != main.dims.n_mels:
        raise IncompatibleAssistantError(
            f"assistant {assistant.name} reads {assistant.dims.n_mels} mel bins but {main.name} reads {main.dims.n_mels}; "
            "pick an assistant of the same family (e.g. large-v3 with distil-large-v3)")
    if same_vocabulary(main.tokenizer, assistant.tokenizer):
        kind = "shared-encoder" if encoders_match(main, assistant) else "same-vocabulary"
    else:
        kind = "cross-tokenizer"
        if assistant.tokenizer.id_of_special("<|0.00|>") is None or main.tokenizer.id_of_special("<|0.00|>") is None:
            raise IncompatibleAssistantError(f"assistant {assistant.name}: its vocabulary has no timestamp tokens")
    controller = DraftLengthController(gamma=draft_length, adaptive=False) if draft_length else DraftLengthController()
    if draft_length is not None and draft_length < 1:
        raise IncompatibleAssistantError("--draft-length must be at least 1")
    return Assistant(model=assistant, kind=kind, controller_template=controller)


def load_assistant(main: SpeechModel, name_or_path: str, draft_length: int | None = None) -> Assistant:
    """Load an assistant on the main model's device and dtype and check it can draft for it.

    name_or_path: a model name, hub id or folder, or a distilled draft's folder (`specwhisper.draft`).
    """
    if draft_folder(name_or_path) is not None:
        return make_assistant(main, load_draft(main, name_or_path), draft_length)
    assistant = load_model(name_or_path, device=main.device, dtype=main.dtype)
    return make_assistant(main, assistant, draft_length)


def resolve_auto_assistant(main: SpeechModel, draft_length: int | None = None) -> Assistant | None:
    """`--assistant auto`: the distilled draft made for this main model (under the specwhisper cache,
    or shipped with the package), or None when there is none: then decode without an assistant."""
    folder = find_draft(main)
    return None if folder is None else make_assistant(main, load_draft(main, folder), draft_length)


# ----------------------------------------------------------------------------- the decoding loop

@dataclass
class AssistantState:
    """The assistant's cache and the tokens it holds, per row."""

    cache: KVCache
    fed: list[list[int]]  # per row: exactly the tokens whose K/V are in the cache
    prompts: list[list[int]]
    # Feature drafts only: the main model's hidden state at every decided position (B, n_ctx, C),
    # and per row how many cache slots were computed from those (the rest from the draft's own).
    main_features: Tensor | None = None
    exact: list[int] | None = None


def run_blocks(model: SpeechModel, audio_kv: AudioKV, cache: KVCache, blocks: list[list[int]], filler: int,
               features: Tensor | None = None) -> Tensor:
    """Feed each row its own block of tokens (lengths may differ, empty allowed) in one pass.

    Short rows are padded with `filler` and rolled back to their real length afterwards: the
    padded slots become stale cache entries no later query can see. Returns hidden states (B, T, C).
    features: (B, T, C), the main model's hidden state before each fed token (feature drafts only).
    """
    longest = max(len(b) for b in blocks)
    start = list(cache.lengths)
    padded = torch.tensor([b + [filler] * (longest - len(b)) for b in blocks], dtype=torch.long,
                          device=audio_kv.keys[0].device)
    if features is not None:
        hidden = draft_forward(model.network, padded, audio_kv, cache, features)
    else:
        hidden = model.network.decoder(padded, audio_kv, cache)  # (B, T, C)
    cache.rollback([s + len(b) for s, b in zip(start, blocks)])
    return hidden


def feed_rows(model: SpeechModel, audio_kv: AudioKV, cache: KVCache, blocks: list[list[int]], filler: int,
              features: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`run_blocks`, returning float logits (B, V) and hidden states (B, C) after each row's last real token."""
    hidden = run_blocks(model, audio_kv, cache, blocks, filler, features)
    device = hidden.device
    last = torch.tensor([max(len(b) - 1, 0) for b in blocks], device=device)
    rows = torch.arange(len(blocks), device=device)
    last_hidden = hidden[rows, last]  # (B, C)
    return model.network.decoder.logits(last_hidden).float(), last_hidden


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def sync_assistant(assistant: Assistant, state: AssistantState, audio_kv: AudioKV, targets: list[list[int] | None]
                   ) -> tuple[Tensor, Tensor]:
    """Make each active row's assistant context exactly `targets[row]`; return its next-token logits
    (B, V) and last hidden states (B, C).

    Rows whose target is None are inactive: fed nothing, logits ignored. The cache is rolled back
    to the longest common prefix of what it holds and the target; at least the last target token is
    re-fed so its logits are fresh. A feature draft with `Assistant.refeed_accepted` also re-feeds
    the slots it computed from its own hidden states while drafting, now with the main model's (as
    EAGLE does); by default it keeps them.
    """
    blocks, starts = [], []
    keep_lengths = list(state.cache.lengths)
    for row, target in enumerate(targets):
        if target is None:
            blocks.append([])
            starts.append(keep_lengths[row])
            continue
        keep = min(common_prefix_length(state.fed[row], target), len(target) - 1)
        if state.exact is not None:
            keep = min(keep, state.exact[row])
            state.exact[row] = len(target)
        blocks.append(target[keep:])
        starts.append(keep)
        state.fed[row] = target
        keep_lengths[row] = keep
    state.cache.rollback(keep_lengths)  # O(1): only the lengths move
    features = None
    if state.main_features is not None:
        features = block_features(state.main_features, starts, blocks)
    return feed_rows(assistant.model, audio_kv, state.cache, blocks, filler=assistant.model.tokenizer.eot,
                     features=features)


def block_features(main_features: Tensor, starts: list[int], blocks: list[list[int]]) -> Tensor:
    """The feature input of each block position: the main model's hidden state one position
    earlier (zeros before position 0). main_features (B, n_ctx, C) -> (B, T, C), zero-padded."""
    longest = max(len(b) for b in blocks)
    out = main_features.new_zeros(len(blocks), longest, main_features.shape[-1])
    for row, (start, block) in enumerate(zip(starts, blocks)):
        if not block:
            continue
        first = max(start - 1, 0)
        source = main_features[row, first:start - 1 + len(block)]
        out[row, len(block) - len(source):len(block)] = source
    return out


def draft(assistant: Assistant, state: AssistantState, audio_kv: AudioKV, logits: Tensor, rules: LogitRules,
          active: list[bool], gamma: int, temperature: float, generator: torch.Generator | None,
          last_hidden: Tensor | None = None) -> tuple[list[list[int]], list[list[Tensor]]]:
    """γ assistant tokens per active row, each a step after the last. Returns drafts and, when
    sampling, the assistant's distribution for each drafted token. last_hidden (B, C): the
    assistant's hidden state behind `logits`; a feature draft feeds it back as the feature of the
    token it drafts (the main model's is not known yet)."""
    eot = assistant.model.tokenizer.eot
    drafts: list[list[int]] = [[] for _ in active]
    dists: list[list[Tensor]] = [[] for _ in active]
    already = [state.fed[row][len(state.prompts[row]):] for row in range(len(active))]  # accepted text, as assistant tokens
    drafting = list(active)
    for step in range(gamma):
        for row in range(len(active)):
            if not drafting[row]:
                continue
            filtered = rules.apply(logits[row], already[row] + drafts[row])
            if temperature > 0:
                q = torch.softmax(filtered / temperature, dim=-1)
                token = int(torch.multinomial(q, 1, generator=generator))
                dists[row].append(q)
            else:
                token = int(filtered.argmax())
            drafts[row].append(token)
            if token == eot:
                drafting[row] = False
        if step == gamma - 1 or not any(drafting):
            break  # the last draft needs no assistant pass: its successor is the main model's job
        blocks = [[drafts[row][-1]] if drafting[row] else [] for row in range(len(active))]
        features = last_hidden[:, None] if state.main_features is not None else None  # (B, 1, C)
        logits, last_hidden = feed_rows(assistant.model, audio_kv, state.cache, blocks, filler=eot, features=features)
        for row in range(len(active)):
            if drafting[row]:
                state.fed[row] = state.fed[row] + [drafts[row][-1]]
    return drafts, dists


def assistant_audio_kv(assistant: Assistant, mel: Tensor, features: Tensor) -> AudioKV:
    """The assistant's cross-attention K/V: from the main model's encoder output when it shares the encoder."""
    network = assistant.model.network
    if assistant.shares_encoder:
        return network.decoder.audio_kv(features)
    return network.decoder.audio_kv(network.encoder(mel.to(assistant.model.device, assistant.model.dtype)))


def assistant_prompts(main_tokenizer: Tokenizer, assistant: Assistant, prompts: list[list[int]],
                      languages: list[str | None], options: DecodingOptions, to_assistant) -> list[list[int]]:
    """The assistant's own start sequence per row, with the main prompt's previous text carried over."""
    a_tokenizer = assistant.model.tokenizer
    a_prompts = []
    for prompt, language in zip(prompts, languages):
        sot_at = prompt.index(main_tokenizer.sot)
        previous = prompt[1:sot_at]  # the text after <|startofprev|>, if any
        a_prompt = a_tokenizer.sot_sequence(language if a_tokenizer.multilingual else None, options.task,
                                            options.timestamps)
        if previous:
            a_prompt = [a_tokenizer.sot_prev] + to_assistant(previous) + a_prompt
        a_prompts.append(a_prompt)
    return a_prompts


def verify_row(progress: RowProgress, logits: Tensor, drafts: list[int], rules: LogitRules,
               options: DecodingOptions, draft_dists: list[Tensor] | None, generator: torch.Generator | None,
               screens: list[ScreenedRow] | None = None) -> int:
    """Walk one row's verified positions: commit accepted drafts, then the main model's own token.

    logits: (T, V) for the row's last decided token and its drafts. draft_dists: the assistant's
    distribution per draft (sampling, same vocabulary), or None (greedy, or point-mass proposals).
    screens: per position, set when `logits` are screened (greedy on the CPU), as in greedy decoding.
    Returns how many drafts were accepted.
    """
    for i, drafted in enumerate(drafts):
        screen = screens[i] if screens else None
        filtered = rules.apply(logits[i], progress.tokens, screen)
        if options.temperature > 0:
            p = torch.softmax(filtered / options.temperature, dim=-1)
            ok, replacement = sample_accept(p, draft_dists[i] if draft_dists else None, drafted, generator)
        else:
            replacement = choose_token(filtered, 0.0, None, screen)
            ok = greedy_accept([replacement], [drafted]) == 1
        if not ok:
            progress.commit(replacement, filtered, screen=screen)
            return i
        progress.commit(drafted, filtered, drafted=True, screen=screen)
        if progress.finished:  # an accepted end-of-text, or the budget is spent
            return i + 1
    # Every draft passed: the main model's bonus token.
    screen = screens[len(drafts)] if screens else None
    filtered = rules.apply(logits[len(drafts)], progress.tokens, screen)
    progress.commit(choose_token(filtered, options.temperature, generator, screen), filtered, screen=screen)
    return len(drafts)


def speculative_decode(main: SpeechModel, assistant: Assistant, mel: Tensor, audio_kv: AudioKV, features: Tensor,
                       rules: LogitRules, prompts: list[list[int]], languages: list[str | None],
                       options: DecodingOptions, stats: DecodeStats, generator: torch.Generator | None = None
                       ) -> list[WindowResult]:
    """Decode a batch of windows with drafts from `assistant`; equals `autoregressive_decode`'s greedy output."""
    if not all(assistant.can_draft(lang) for lang in languages):
        warnings.warn(f"assistant {assistant.model.name} is English-only and the audio is in "
                      f"{', '.join(sorted(set(str(l) for l in languages)))}: decoding without an assistant",
                      stacklevel=2)
        return autoregressive_decode(main.network, main.tokenizer, audio_kv, rules, prompts, options, stats, generator)

    batch = len(prompts)
    tokenizer, a_tokenizer = main.tokenizer, assistant.model.tokenizer
    if assistant.cross_tokenizer:
        to_assistant = TokenBridge(tokenizer, a_tokenizer).convert
        to_main = lambda tokens: TokenBridge(a_tokenizer, tokenizer).convert(tokens, stop_at_unknown=True)  # noqa: E731
    else:
        to_assistant = to_main = list

    started = time.perf_counter()
    a_audio_kv = assistant_audio_kv(assistant, mel, features)
    stats.encoder_seconds += time.perf_counter() - started
    a_rules = LogitRules(a_tokenizer, assistant.model.suppress_tokens, assistant.model.begin_suppress_tokens,
                         options, assistant.model.dims.n_vocab)
    # With one vocabulary the assistant's prompt is the main model's, token for token, so a feature
    # draft's position j is the main model's position j.
    a_prompts = assistant_prompts(tokenizer, assistant, prompts, languages, options, to_assistant)
    state = AssistantState(cache=assistant.model.network.new_cache(batch), fed=[[] for _ in range(batch)],
                           prompts=a_prompts)
    a_context = assistant.model.dims.n_text_ctx

    main_cache = main.network.new_cache(batch)
    started = time.perf_counter()
    logits, prompt_hidden = prefill(main.network, audio_kv, prompts, main_cache)
    no_speech = no_speech_probs(main.network, tokenizer, prompt_hidden, prompts)
    if assistant.reads_features:
        state.main_features = prompt_hidden.new_zeros(batch, main.network.dims.n_text_ctx, prompt_hidden.shape[-1])
        for row, prompt in enumerate(prompts):
            state.main_features[row, :len(prompt)] = prompt_hidden[row, :len(prompt)]
        state.exact = [0] * batch if assistant.refeed_accepted else None
    stats.prefill_seconds += time.perf_counter() - started

    rows = start_rows(main.network, tokenizer, prompts, options)
    for row, progress in enumerate(rows):  # the first token comes from the prompt's logits
        filtered = rules.apply(logits[row], [])
        progress.commit(choose_token(filtered, options.temperature, generator), filtered)

    # The assistant reads its prompt (up to 224 tokens of previous text in long-form) here, once per
    # window: in the loop a sync then feeds only a round's few new tokens, and the controller's
    # draft cost is a round's, not a window's.
    started = time.perf_counter()
    prompt_targets = [p if len(p) <= a_context else None for p in a_prompts]
    if any(t is not None for t in prompt_targets):
        sync_assistant(assistant, state, a_audio_kv, prompt_targets)
    stats.prefill_seconds += time.perf_counter() - started

    controller = assistant.new_controller()
    synced_last_round = True  # the prompt was fed above
    while not all(p.finished for p in rows):
        # Draft: sync the assistant to each active row's accepted text, then γ assistant steps.
        gamma = controller.next_gamma()
        started = time.perf_counter()
        main_drafts: list[list[int]] = [[] for _ in range(batch)]
        draft_dists: list[list[Tensor]] = [[] for _ in range(batch)]
        catch_up_seconds = 0.0
        if gamma > 0:
            targets = [None if p.finished else a_prompts[r] + to_assistant(p.tokens) for r, p in enumerate(rows)]
            # A row whose assistant context would overflow (a cross-tokenizer assistant may need more
            # tokens for the same text) gets no drafts this round.
            targets = [t if t is not None and len(t) + gamma <= a_context else None for t in targets]
            drafting = [t is not None for t in targets]
            if any(drafting):
                sync_started = time.perf_counter()
                a_logits, a_hidden = sync_assistant(assistant, state, a_audio_kv, targets)
                if not synced_last_round:  # rounds without drafts came before: this sync catches up on them
                    catch_up_seconds = time.perf_counter() - sync_started
                a_drafts, a_dists = draft(assistant, state, a_audio_kv, a_logits, a_rules, drafting, gamma,
                                          options.temperature, generator, last_hidden=a_hidden)
                main_drafts = [to_main(d) for d in a_drafts]
                # Cross-tokenizer drafts are fixed proposals over the main vocabulary (point masses).
                if not assistant.cross_tokenizer:
                    draft_dists = a_dists
        draft_seconds = time.perf_counter() - started
        synced_last_round = gamma > 0 and any(drafting)

        # Verify: each active row's last decided token and its drafts, in one main-model pass.
        started = time.perf_counter()
        room = main.network.dims.n_text_ctx - max(main_cache.lengths)
        blocks = []
        for r, p in enumerate(rows):
            # A row may not draft past its token budget, nor the batch past the cache.
            main_drafts[r] = main_drafts[r][:max(0, min(p.budget - len(p.tokens), room - 1))]
            blocks.append([] if p.finished else [p.tokens[-1]] + main_drafts[r])
        starts = list(main_cache.lengths)
        verify_hidden = run_blocks(main, audio_kv, main_cache, blocks, filler=tokenizer.eot)  # (B, T, C)
        n_positions = verify_hidden.shape[1]
        # Greedy on the CPU: exact choices from an fp16 screen (specwhisper.screening), as in greedy decoding.
        flat_logits, flat_screens = step_logits(main.network, verify_hidden.reshape(-1, verify_hidden.shape[-1]),
                                                options)
        verify_logits = flat_logits.view(batch, n_positions, -1)  # (B*T, V) -> (B, T, V)
        screens = [flat_screens[r * n_positions:(r + 1) * n_positions] if flat_screens else None
                   for r in range(batch)]
        stats.main_passes += 1

        kept_lengths, n_drafted, n_accepted, n_tokens, n_rejections = [], 0, 0, 0, 0
        for r, p in enumerate(rows):
            if not blocks[r]:
                kept_lengths.append(starts[r])
                continue
            accepted = verify_row(p, verify_logits[r], main_drafts[r], rules, options,
                                  draft_dists[r] or None, generator, screens[r])
            # Keep the last decided token and the accepted drafts; forget the rejected ones.
            kept_lengths.append(starts[r] + 1 + accepted)
            if state.main_features is not None:  # the hidden states of the decided positions, for the draft
                state.main_features[r, starts[r]:starts[r] + 1 + accepted] = verify_hidden[r, :1 + accepted]
            n_drafted += len(main_drafts[r])
            n_accepted += accepted
            # Fewer accepted than drafted: a rejection, unless an accepted draft finished the row.
            n_rejections += int(accepted < len(main_drafts[r]) and not p.last_drafted)
            n_tokens += accepted + 1
            if main_drafts[r]:
                stats.accepted_per_round.append(accepted)
        main_cache.rollback(kept_lengths)
        verify_seconds = time.perf_counter() - started
        stats.drafted += n_drafted
        stats.accepted += n_accepted
        stats.rejections += n_rejections
        stats.draft_seconds += draft_seconds
        stats.verify_seconds += verify_seconds
        controller.update(n_drafted, n_accepted, draft_seconds, verify_seconds, max(len(b) for b in blocks), n_tokens,
                          rejections=n_rejections, catch_up_seconds=catch_up_seconds)

    assistant.remember(controller)
    started = time.perf_counter()
    settle_logprobs(main.network, rules, rows)
    stats.verify_seconds += time.perf_counter() - started
    stats.generated_tokens += sum(len(p.tokens) for p in rows)
    return [p.result(no_speech[r], with_draft_mask=True) for r, p in enumerate(rows)]
