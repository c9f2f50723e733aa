"""Fixed-shape decoding: the GPU path, whose passes can be captured as CUDA graphs.

After the prompt every main-model pass, a greedy step as much as a verify pass, runs `rows_per_pass`
query rows per batch row (a greedy step's one token padded) against the whole preallocated
`StaticKVCache` under a mask, at positions read from the device. So:
  - a position gets the same bits whether it is a greedy step's only token or a verify pass's k-th:
    cuBLAS and the attention kernels choose their algorithm by shape, and the shape never changes;
  - no launch argument depends on a length, so a pass is captured once and replayed at every position
    (`CapturedStep`: on CUDA a graph, elsewhere the same function run eagerly);
  - Whisper's rules, the argmax and the accept decisions run on the device (`DeviceRules`), and the host
    reads back one small tensor per greedy step or speculative round (`read_back`), nothing else.
On the CPU the everyday path (specwhisper.decoding) stays faster; this one runs there for tests and
for `benchmarks/gpu_check.py --device cpu`. docs/gpu.md has the design and what is still unmeasured.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

from .decoding import (PAD_TOKEN, DecodeState, DecodeStats, RowProgress, WindowBatch, WindowResult, decide,
                       end_window, no_speech_probs, synchronize, token_budget)
from .device_rules import SUMMARY_FIELDS, DeviceRules, row_summary
from .kv_cache import AudioKV, StaticKVCache

if TYPE_CHECKING:
    from .model import Whisper
    from .tokenizer import Tokenizer

DEFAULT_ROWS_PER_PASS = 8  # a verify pass of up to 7 drafts; every main pass has this many rows
DEFAULT_GAMMA = 4  # drafts per round where the assistant's controller would adapt γ (not yet tuned on a GPU)


def read_back(packed: Tensor) -> list[list[float]]:
    """The one device-to-host copy of a greedy step or a speculative round (a sync on a GPU)."""
    return packed.tolist()


def upload(target: Tensor, values: list) -> None:
    """Host values into a device buffer without waiting for the device (pinned memory, asynchronous copy)."""
    source = torch.tensor(values, dtype=target.dtype, pin_memory=target.is_cuda)
    target.copy_(source, non_blocking=True)


class CapturedStep:
    """`step()` on fixed buffers: on CUDA captured once as a graph and replayed, elsewhere run eagerly.

    The function must read its inputs from, and write its outputs to, tensors that outlive it: a replay
    reruns the recorded kernels on the same addresses. `moves`: the tensors the step changes besides
    K/V slots it will write again (lengths, its own next inputs); the warm-up run before the capture
    is undone on them, so the first replay starts where the warm-up did.
    """

    def __init__(self, step: Callable[[], Tensor], use_graph: bool, moves: list[Tensor]):
        self.step, self.use_graph, self.moves = step, use_graph, moves
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: Tensor | None = None

    def __call__(self) -> Tensor:
        if not self.use_graph:
            return self.step()
        if self.graph is None:
            # Warm up on a side stream (Triton compiles, the allocator's pools fill), then record.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.rehearse()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = self.step()
        self.graph.replay()
        return self.output

    def rehearse(self) -> None:
        """Run the step once and undo what it moved: the warm-up."""
        saved = [tensor.clone() for tensor in self.moves]
        self.step()
        for tensor, before in zip(self.moves, saved):
            tensor.copy_(before)


@dataclass
class FixedDecoder:
    """One decoder's fixed-shape passes: its static cache and input buffers (a pass reads nothing else)."""

    decoder: nn.Module  # a TextDecoder: forward(tokens, audio_kv, cache), logits(hidden)
    audio_kv: AudioKV  # this window's cross-attention K/V, in buffers that stay put across windows
    cache: StaticKVCache
    tokens: Tensor  # (B, T): each row's tokens for the next pass, padded
    n_new: Tensor  # (B,): how many of them are real (0 for a finished row)
    starts: Tensor  # (B,): the lengths before the latest pass

    @classmethod
    def allocate(cls, decoder: nn.Module, audio_kv: AudioKV, rows_per_pass: int) -> "FixedDecoder":
        like = audio_kv.keys[0]
        batch, n_head, _, head_dim = like.shape
        cache = StaticKVCache.allocate(len(decoder.blocks), batch, n_head, decoder.positional_embedding.shape[0],
                                       rows_per_pass, head_dim, like.dtype, like.device)
        buffers = AudioKV([torch.empty_like(k) for k in audio_kv.keys], [torch.empty_like(v) for v in audio_kv.values])
        fixed = cls(decoder, buffers, cache, torch.full((batch, rows_per_pass), PAD_TOKEN, device=like.device),
                    torch.zeros(batch, dtype=torch.long, device=like.device),
                    torch.zeros(batch, dtype=torch.long, device=like.device))
        fixed.load_window(audio_kv)
        return fixed

    def load_window(self, audio_kv: AudioKV) -> None:
        """A new window's audio K/V copied into the buffers the captured passes read."""
        for buffer, source in zip(self.audio_kv.keys + self.audio_kv.values, audio_kv.keys + audio_kv.values):
            buffer.copy_(source)

    def prefill(self, prompts: list[list[int]]) -> Tensor:
        """Each row's prompt into the emptied cache, eagerly (its length varies). Returns hidden (B, T, C)."""
        longest = max(len(p) for p in prompts)
        tokens = torch.tensor([p + [PAD_TOKEN] * (longest - len(p)) for p in prompts], device=self.tokens.device)
        upload(self.cache.lengths, [0] * len(prompts))
        hidden = self.decoder(tokens, self.audio_kv, self.cache)  # (B, T, C)
        upload(self.cache.lengths, [len(p) for p in prompts])
        return hidden

    def run(self) -> Tensor:
        """One fixed-shape pass over `tokens`; the lengths then count only the real ones. (B, T, C)."""
        self.starts.copy_(self.cache.lengths)
        hidden = self.decoder(self.tokens, self.audio_kv, self.cache)
        self.cache.lengths.copy_(self.starts + self.n_new)
        return hidden


# ----------------------------------------------------------------------------- the captured steps

def main_step(main: FixedDecoder, rules: DeviceRules, summary: Tensor, budget: Tensor) -> Tensor:
    """A main-model pass with its decisions, all on the device. Returns (B, 2T + 1) float64 packed for
    `read_back`: the choice at each position, its log-probability, and how many drafts agree with the
    choices (the block's tokens after the first are drafts); the cache keeps the last decided token and them.
    budget (B,): the tokens each row may generate; a row that reaches it or end-of-text stops."""
    hidden = main.run()  # (B, T, C)
    masked = rules.apply(main.decoder.logits(hidden).float(), main.tokens, summary)  # (B, T, V)
    choices = masked.argmax(dim=-1)  # (B, T)
    logprobs = torch.log_softmax(masked, dim=-1).gather(-1, choices[..., None])[..., 0]  # (B, T)
    n_drafts = (main.n_new - 1).clamp(min=0)  # (B,)
    drafts = main.tokens[:, 1:]  # (B, T-1)
    counted = torch.arange(drafts.shape[1], device=drafts.device) < n_drafts[:, None]
    n_agree = ((choices[:, :-1] == drafts) & counted).long().cumprod(dim=1).sum(dim=1)  # (B,)
    kept = torch.where(main.n_new > 0, 1 + n_agree, 0)
    main.cache.lengths.copy_(main.starts + kept)
    packed = torch.cat([choices.double(), logprobs.double(), n_agree.double()[:, None]], dim=1)
    # The next greedy step's inputs, so greedy decoding uploads nothing (a speculative round uploads its own).
    following = choices.gather(1, n_agree[:, None])[:, 0]  # (B,): the token after the last kept one
    rules.advance(summary, following)
    going_on = (main.n_new > 0) & (following != rules.eot) & (summary[:, 0] < budget)
    main.tokens.fill_(PAD_TOKEN)
    main.tokens[:, 0] = following
    main.n_new.copy_(going_on.long())
    return packed


def draft_step(draft: FixedDecoder, rules: DeviceRules, summary: Tensor) -> Tensor:
    """A draft pass: the next token after each row's last real token (B,), under the main model's rules (a
    draft they forbid would be rejected), which becomes its next input. summary: the rows' `row_summary`
    with the drafts so far, advanced here."""
    hidden = draft.run()  # (B, T, C)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, (draft.n_new - 1).clamp(min=0)]  # (B, C)
    logits = draft.decoder.logits(last).float()[:, None]  # (B, 1, V): one position, after the summary's tokens
    proposed = rules.apply(logits, draft.tokens[:, :1], summary)[:, 0].argmax(dim=-1)  # (B,)
    rules.advance(summary, proposed)
    draft.tokens.fill_(PAD_TOKEN)
    draft.tokens[:, 0] = proposed
    draft.n_new.fill_(1)
    return proposed


# ----------------------------------------------------------------------------- greedy and speculative

@dataclass
class Passes:
    """The buffers and captured steps of one main decoder (and draft) at one batch size and rules' shape:
    made once, then reused by every window (its audio K/V and rules copied into the buffers)."""

    main: FixedDecoder
    rules: DeviceRules
    summary: Tensor  # (B, SUMMARY_FIELDS): `row_summary` of each row, uploaded or advanced before each main pass
    budget: Tensor  # (B,): the tokens each row may generate, uploaded once per window
    main_pass: CapturedStep
    draft: FixedDecoder | None = None
    draft_summary: Tensor | None = None  # (B, SUMMARY_FIELDS): `summary` advanced by each draft
    draft_pass: CapturedStep | None = None
    drafted: Tensor | None = None  # (B, rows_per_pass - 1): the latest round's drafts


MAX_KEPT_PASSES = 4  # (main, draft, batch size, rules) combinations kept with their graphs
_kept_passes: dict[tuple, Passes] = {}


def passes_for(decoder: nn.Module, window: WindowBatch, rows_per_pass: int, draft: tuple[nn.Module, AudioKV] | None,
               use_graphs: bool) -> Passes:
    """This window's passes: those kept from an earlier window of the same shapes, loaded, or new ones."""
    audio_kv, rules = window.audio_kv, window.rules
    key = (id(decoder), None if draft is None else id(draft[0]), audio_kv.batch_size, rows_per_pass, use_graphs,
           rules.timestamps, rules.max_initial_timestamp_index, audio_kv.keys[0].dtype, audio_kv.keys[0].device)
    passes = _kept_passes.pop(key, None)
    if passes is None:
        passes = new_passes(decoder, window, rows_per_pass, draft, use_graphs)
    else:
        passes.main.load_window(audio_kv)
        passes.rules.load(rules)
        if draft is not None:
            passes.draft.load_window(draft[1])
    _kept_passes[key] = passes  # the most recent last
    while len(_kept_passes) > MAX_KEPT_PASSES:
        del _kept_passes[next(iter(_kept_passes))]
    return passes


def new_passes(decoder: nn.Module, window: WindowBatch, rows_per_pass: int, draft: tuple[nn.Module, AudioKV] | None,
               use_graphs: bool) -> Passes:
    device, batch = window.audio_kv.keys[0].device, window.audio_kv.batch_size
    main = FixedDecoder.allocate(decoder, window.audio_kv, rows_per_pass)
    rules = DeviceRules(window.rules, decoder.token_embedding.weight.shape[0], device)
    summary = torch.zeros(batch, SUMMARY_FIELDS, dtype=torch.long, device=device)
    budget = torch.zeros(batch, dtype=torch.long, device=device)
    passes = Passes(main, rules, summary, budget, CapturedStep(
        lambda: main_step(main, rules, summary, budget), use_graphs,
        moves=[main.cache.lengths, main.tokens, main.n_new, summary]))
    if draft is not None:
        passes.draft = FixedDecoder.allocate(draft[0], draft[1], rows_per_pass=2)  # a catch-up token + the last
        passes.draft_summary = draft_summary = torch.zeros_like(summary)
        draft_decoder = passes.draft
        passes.draft_pass = CapturedStep(lambda: draft_step(draft_decoder, rules, draft_summary), use_graphs,
                                         moves=[draft_decoder.cache.lengths, draft_decoder.tokens, draft_decoder.n_new,
                                                draft_summary])
        passes.drafted = torch.zeros(batch, rows_per_pass - 1, dtype=torch.long, device=device)
    return passes


@dataclass
class FixedSession:
    """A window batch being decoded on fixed shapes: the rows' progress and the passes' state."""

    window: WindowBatch
    state: DecodeState
    passes: Passes
    prompt_lengths: list[int]
    draft_lengths: list[int]  # host copy: what the draft cache holds per row
    inputs_on_device: bool = False  # the next greedy step's inputs were prepared by the last main pass

    @property
    def main(self) -> FixedDecoder:
        return self.passes.main


def begin_fixed(model: Whisper, tokenizer: Tokenizer, window: WindowBatch, rows_per_pass: int,
                draft: tuple[nn.Module, AudioKV] | None = None, use_graphs: bool | None = None) -> FixedSession:
    """Prefill the prompts and decide each row's first token (eagerly, host rules: once per window)."""
    device = window.audio_kv.keys[0].device
    use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
    passes = passes_for(model.decoder, window, rows_per_pass, draft, use_graphs)
    hidden = passes.main.prefill(window.prompts)  # (B, T, C)
    rows_index = torch.arange(len(window.prompts), device=device)
    last = torch.tensor([len(p) - 1 for p in window.prompts], device=device)
    logits = model.decoder.logits(hidden[rows_index, last]).float()  # (B, V)
    rows = [RowProgress(budget=token_budget(model, len(p), window.options), eot=tokenizer.eot) for p in window.prompts]
    for row, row_logits in zip(rows, logits):
        decide(row, row_logits, window)
    state = DecodeState(passes.main.cache, rows, no_speech_probs(model, tokenizer, hidden, window.prompts), hidden)
    if draft is not None:
        passes.draft.prefill(window.prompts)
    upload(passes.budget, [row.budget for row in rows])
    prompt_lengths = [len(p) for p in window.prompts]
    return FixedSession(window, state, passes, prompt_lengths, list(prompt_lengths))


def upload_main_inputs(session: FixedSession, drafts_per_row: list[int]) -> None:
    """Each active row's last decided token (its drafts, if any, are already in place on the device)."""
    rows, main = session.state.rows, session.main
    upload(main.tokens[:, 0], [PAD_TOKEN if row.finished else row.tokens[-1] for row in rows])
    upload(main.n_new, [0 if row.finished else 1 + n for row, n in zip(rows, drafts_per_row)])
    upload(session.passes.summary, [row_summary(session.window.rules, row.tokens) for row in rows])


def commit_choices(session: FixedSession, packed: list[list[float]]) -> list[int | None]:
    """Commit each active row's accepted drafts (equal to the choices before the first disagreement) and
    the main model's next token; returns how many drafts each row accepted (None: finished before)."""
    accepted = []
    positions = session.main.tokens.shape[1]
    for row, values in zip(session.state.rows, packed):
        if row.finished:
            accepted.append(None)
            continue
        choices, logprobs, n_agree = values[:positions], values[positions:2 * positions], int(values[-1])
        for i in range(n_agree + 1):
            row.commit(int(choices[i]), None, drafted=i < n_agree, logprob=logprobs[i])
            if row.finished:
                break
        accepted.append(n_agree)
    return accepted


def fixed_greedy_step(session: FixedSession) -> None:
    """One greedy token per active row: one captured pass, one read back, and after the first step
    nothing uploaded (each pass prepares the next one's inputs)."""
    if not session.inputs_on_device:
        session.main.tokens[:, 1:].fill_(PAD_TOKEN)
        upload_main_inputs(session, [0] * len(session.state.rows))
        session.inputs_on_device = True
    commit_choices(session, read_back(session.passes.main_pass()))


def fixed_speculative_round(session: FixedSession, gamma: int) -> list[tuple[int, int] | None]:
    """γ draft steps, one verify pass, the accept decisions on the device, one read back. Returns per row
    (drafts verified, drafts accepted), None for a row finished before."""
    rows, passes = session.state.rows, session.passes
    main, draft = passes.main, passes.draft
    room = [0 if row.finished else min(gamma, row.budget - len(row.tokens)) for row in rows]
    catch_up = [row.tokens[length - prompt:] if not row.finished else []
                for row, length, prompt in zip(rows, session.draft_lengths, session.prompt_lengths)]
    upload(draft.tokens, [block + [PAD_TOKEN] * (2 - len(block)) for block in catch_up])  # 1 or 2 tokens
    upload(draft.n_new, [len(block) for block in catch_up])
    upload(draft.cache.lengths, session.draft_lengths)
    upload_main_inputs(session, room)
    passes.draft_summary.copy_(passes.summary)
    for k in range(gamma):
        passes.drafted[:, k] = passes.draft_pass()
    main.tokens[:, 1:].fill_(PAD_TOKEN)
    main.tokens[:, 1:gamma + 1] = passes.drafted[:, :gamma]
    accepted = commit_choices(session, read_back(passes.main_pass()))
    verified = [None if n is None else (n_drafts, n) for n, n_drafts in zip(accepted, room)]
    for r, (row, block) in enumerate(zip(rows, catch_up)):
        # The draft cache holds the catch-up and γ - 1 drafts; keep what the accepted text shares.
        session.draft_lengths[r] = min(session.draft_lengths[r] + len(block) + gamma - 1,
                                       session.prompt_lengths[r] + len(row.tokens) - 1)
    return verified


def fixed_shape_decode(model: Whisper, tokenizer: Tokenizer, window: WindowBatch, stats: DecodeStats | None = None,
                       draft: tuple[nn.Module, AudioKV] | None = None, gamma: int = DEFAULT_GAMMA,
                       rows_per_pass: int = DEFAULT_ROWS_PER_PASS, use_graphs: bool | None = None
                       ) -> list[WindowResult]:
    """Greedy decoding of a window batch on fixed shapes; speculative with `draft` (a decoder and its audio
    K/V for this window), whose output then equals this function's without it, token for token."""
    if window.options.temperature > 0:
        raise ValueError("fixed-shape decoding is greedy (temperature 0)")
    if draft is not None and not 1 <= gamma < rows_per_pass:
        raise ValueError(f"gamma must be from 1 to rows_per_pass - 1 = {rows_per_pass - 1}, got {gamma}")
    stats = stats if stats is not None else DecodeStats()
    device = window.audio_kv.keys[0].device
    synchronize(device)
    started = time.perf_counter()
    session = begin_fixed(model, tokenizer, window, rows_per_pass, draft, use_graphs)
    synchronize(device)
    stats.prefill_seconds += time.perf_counter() - started
    started = time.perf_counter()
    rows = session.state.rows
    while not all(row.finished for row in rows):
        stats.main_passes += 1
        if draft is None:
            fixed_greedy_step(session)
            continue
        stats.gammas.append(gamma)
        for verified in fixed_speculative_round(session, gamma):
            if verified is not None:
                n_drafts, n_accepted = verified
                stats.drafted += n_drafts
                stats.accepted += n_accepted
                stats.rejections += n_accepted < n_drafts
                stats.accepted_per_round.append(n_accepted)
    results = end_window(model, window, session.state, stats, with_draft_mask=draft is not None)
    stats.decode_seconds += time.perf_counter() - started  # the host's last read waited for the device
    return results


# ----------------------------------------------------------------------------- when transcription uses it

FIXED_SHAPE_MODES = ("auto", "on", "off")
_mode: str | None = None  # set by `set_fixed_shapes`; None: the SPECWHISPER_FIXED_SHAPES variable, or "auto"


def set_fixed_shapes(mode: str | None) -> None:
    """"auto" (default): greedy windows on CUDA decode here; "on": everywhere (the CPU too: tests); "off": never.
    None: back to the SPECWHISPER_FIXED_SHAPES environment variable (how the CLI and Ray workers are told)."""
    global _mode
    if mode is not None and mode not in FIXED_SHAPE_MODES:
        raise ValueError(f"unknown fixed-shape mode {mode!r}; expected one of {FIXED_SHAPE_MODES}")
    _mode = mode


def fixed_shapes_mode() -> str:
    mode = _mode or os.environ.get("SPECWHISPER_FIXED_SHAPES", "auto")
    if mode not in FIXED_SHAPE_MODES:
        raise ValueError(f"SPECWHISPER_FIXED_SHAPES={mode!r}: expected one of {', '.join(FIXED_SHAPE_MODES)}")
    return mode


def draft_network(assistant) -> nn.Module | None:
    """The decoder a fixed-shape round can step: a same-vocabulary Whisper assistant's (None: any other drafter,
    which then runs the everyday speculative loop)."""
    from .drafters import ModelDrafter
    if type(assistant) is not ModelDrafter:  # cross-tokenizer, distilled and free drafts draft on the host
        return None
    return assistant.model.network


def decodes_on_fixed_shapes(window: WindowBatch, assistant) -> bool:
    """Whether `transcription` sends this window batch here: greedy, and an assistant (if any) it can step."""
    mode = fixed_shapes_mode()
    if mode == "off" or window.options.temperature > 0:
        return False
    if mode == "auto" and window.audio_kv.keys[0].device.type != "cuda":
        return False
    return assistant is None or draft_network(assistant) is not None


def decode_on_fixed_shapes(model: Whisper, tokenizer: Tokenizer, window: WindowBatch, assistant,
                           stats: DecodeStats) -> list[WindowResult]:
    """`fixed_shape_decode` for a window batch from transcription, with the assistant's network as the draft."""
    if assistant is None:
        return fixed_shape_decode(model, tokenizer, window, stats)
    network = draft_network(assistant)
    features = window.audio_features if assistant.shares_encoder else \
        network.encoder(window.mel.to(window.audio_features.device, window.audio_features.dtype))
    controller = assistant.controller
    gamma = min(DEFAULT_GAMMA if controller.adaptive else controller.gamma, DEFAULT_ROWS_PER_PASS - 1)
    return fixed_shape_decode(model, tokenizer, window, stats, draft=(network.decoder, network.decoder.audio_kv(features)),
                              gamma=gamma)


def block_and_steps(decoder: nn.Module, audio_kv: AudioKV, prompts: list[list[int]], block: list[int],
                    rows_per_pass: int = DEFAULT_ROWS_PER_PASS) -> tuple[Tensor, Tensor]:
    """The premise of fixed-shape exactness, measured: hidden states (B, len(block), C) of `block` after each
    row's prompt, from one fixed-shape pass holding the whole block (a verify pass) and from one fixed-shape
    pass per token (greedy steps). Equal bits mean a verify pass reproduces greedy steps here."""
    fixed = FixedDecoder.allocate(decoder, audio_kv, rows_per_pass)
    batch, n = len(prompts), len(block)
    fixed.prefill(prompts)
    lengths = fixed.cache.lengths.clone()
    fixed.tokens[:, :n] = torch.tensor(block, device=fixed.tokens.device)
    fixed.n_new.fill_(n)
    together = fixed.run()[:, :n]
    steps = []
    for token in block:
        fixed.cache.set_lengths(lengths)
        fixed.tokens.fill_(PAD_TOKEN)
        fixed.tokens[:, 0] = token
        fixed.n_new.fill_(1)
        steps.append(fixed.run()[:, :1])
        lengths = lengths + 1
    return together, torch.cat(steps, dim=1).reshape(batch, n, -1)


def first_layers(decoder: nn.Module, n_layers: int) -> nn.Module:
    """The decoder cut to its first n_layers blocks, sharing their weights: a draft that costs nothing to
    make and agrees with the decoder often, not always (the checks' drafts)."""
    draft = copy.copy(decoder)
    draft._modules = dict(decoder._modules)  # copy.copy shares the module dict: cutting it would cut the decoder
    draft.blocks = nn.ModuleList(decoder.blocks[:n_layers])
    return draft
