"""The teacher pass: the main model transcribes every training window once, exactly as decoding will.

Stored per window in the specwhisper cache (`cache_dir()/distill/teacher`, safetensors), reused by
every later run on the same audio:
  the encoder output, fp16                  1500 x 512 x 2 B  = 1.5 MB (base)
  prompt + greedy tokens, int32             ~0.5 kB
  top-k log-probabilities per position,     k=64: 64 x (2 + 4) B = 384 B per token
    (fp16 values, int32 ids), after the logit rules; the full distribution would be
    51,865 x 2 B = 104 kB per token, 270x more for mass the draft never needs
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .. import audio as audio_io
from ..decoding import (DecodingOptions, LogitRules, WindowBatch, autoregressive_decode, build_prompts, forward_ragged,
                        resolve_languages)
from ..draft_files import fingerprint
from ..longform import LongformOptions
from ..weights.resolve import cache_dir
from .data import WindowSpec, render
from .progress import progress_bar

if TYPE_CHECKING:
    from ..speech_model import SpeechModel

TOP_K = 64  # teacher log-probabilities kept per position (see the module docstring for the size)
MAX_NEW_TOKENS = 224  # per window: what `transcribe` allows (half the 448-token context)
MAX_PROMPT_TOKENS = LongformOptions.max_prompt_tokens  # previous text in a prompt, as in long-form decoding
TEACHER_FORMAT = 3  # 2: previous text keeps its timestamp tokens; 3: safetensors files
TENSOR_FIELDS = ("tokens", "targets", "topk_ids", "topk_logprobs", "features", "hidden")


@dataclass
class TeacherWindow:
    """The main model's reading of one window: what the draft learns from."""

    spec: WindowSpec
    language: str
    tokens: Tensor  # (T,) int32: prompt + greedy tokens (no end-of-text)
    first_target: int  # position whose output predicts the first generated token (= prompt length - 1)
    targets: Tensor  # (N,) int32: the greedy tokens, then end-of-text when the window ended with it
    topk_ids: Tensor  # (N, k) int32, after the logit rules
    topk_logprobs: Tensor  # (N, k) fp16
    features: Tensor  # (n_audio_ctx, n_audio_state) fp16: the encoder output
    seconds: float = 0.0  # audio in the window
    hidden: Tensor | None = None  # (N, C) fp16: the main model's final hidden state (after its LayerNorm)
    # (T, C) fp16: that hidden state at every position of `tokens` (prompt too), which a feature
    # draft reads; computed in memory by `fill_hidden`, never stored in the teacher cache.
    context: Tensor | None = None

    @property
    def n_targets(self) -> int:
        return len(self.targets)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.first_target + 1:].tolist()


def teacher_dir(main: SpeechModel) -> Path:
    """Per main model (by fingerprint): teacher outputs are only valid for the weights that made them."""
    digest = hashlib.sha1(json.dumps([round(v, 4) for v in fingerprint(main.network)]).encode()).hexdigest()[:12]
    return cache_dir() / "distill" / "teacher" / f"{Path(str(main.name)).name}-{digest}"


def teacher_pass(main: SpeechModel, specs: list[WindowSpec], folder: Path | None = None, top_k: int = TOP_K,
                 max_new_tokens: int = MAX_NEW_TOKENS, chains: list[str] | None = None, batch_size: int = 8,
                 progress: bool = True, label: str = "teacher") -> list[TeacherWindow]:
    """The main model's greedy transcript and top-k log-probabilities for every window (cached on disk).

    A window with `previous_text` is prompted with the transcript of the nearest earlier window of
    its chain (`chains[i]`; default: its language; give the file for long-form windows). Windows
    are decoded `batch_size` at a time: on a CPU a decoder step of 8 rows costs about what one does.
    """
    folder = folder or teacher_dir(main)
    folder.mkdir(parents=True, exist_ok=True)
    chains = chains or [spec.language or "" for spec in specs]
    paths = [folder / f"{spec.key()}-{max_new_tokens}.safetensors" for spec in specs]
    windows: list[TeacherWindow | None] = [_read_teacher(path, spec, top_k) for path, spec in zip(paths, specs)]
    bar = progress_bar(len(specs), label, progress)
    bar.update(sum(w is not None for w in windows))

    # The nearest earlier window of the same chain, per window (fixed, so found once).
    predecessor = [next((j for j in range(i - 1, -1, -1) if chains[j] == chains[i]), None) for i in range(len(specs))]

    def previous_text(i: int) -> list[int]:
        j = predecessor[i]
        if not specs[i].previous_text or j is None:
            return []
        # Text and timestamps, as long-form decoding keeps them in its history.
        return windows[j].generated[-MAX_PROMPT_TOKENS:]

    while any(w is None for w in windows):
        # The next batch: pending windows of one decoding mode whose prompt text is already known.
        batch: list[int] = []
        for i, window in enumerate(windows):
            if len(batch) == batch_size:
                break
            if window is not None or (batch and specs[i].timestamps != specs[batch[0]].timestamps):
                continue
            j = predecessor[i]
            if specs[i].previous_text and j is not None and windows[j] is None:
                continue
            batch.append(i)
        for i, window in zip(batch, _teach_batch(main, [specs[i] for i in batch], [previous_text(i) for i in batch],
                                                 top_k, max_new_tokens)):
            windows[i] = window
            _write_teacher(paths[i], window, top_k)
        bar.update(len(batch))
    bar.close()
    return windows


def _write_teacher(path: Path, window: TeacherWindow, top_k: int) -> None:
    """One window's teacher outputs as safetensors (no pickle), written under a temporary name first."""
    from safetensors.torch import save_file

    tensors = {name: getattr(window, name).contiguous() for name in TENSOR_FIELDS if getattr(window, name) is not None}
    info = {"format": TEACHER_FORMAT, "top_k": top_k, "spec": asdict(window.spec), "language": window.language,
            "first_target": window.first_target, "seconds": window.seconds}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"info": json.dumps(info)})
    tmp.replace(path)


def _read_teacher(path: Path, spec: WindowSpec, top_k: int) -> TeacherWindow | None:
    """A cached window, or None when it is missing, unreadable, or of another format or top-k."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads((f.metadata() or {}).get("info", "{}"))
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception:  # noqa: BLE001 - a half-written or foreign file: recompute it
        return None
    if info.get("format") != TEACHER_FORMAT or info.get("top_k") != top_k:
        return None
    return TeacherWindow(spec=spec, language=info["language"], first_target=info["first_target"],
                         seconds=info["seconds"], hidden=tensors.get("hidden"),
                         **{name: tensors[name] for name in TENSOR_FIELDS if name != "hidden"})


def _teach_batch(main: SpeechModel, specs: list[WindowSpec], previous: list[list[int]], top_k: int,
                 max_new_tokens: int) -> list[TeacherWindow]:
    """Decode windows of one timestamp mode together, then read the distribution at every position."""
    network, tokenizer = main.network, main.tokenizer
    samples = [render(spec) for spec in specs]
    mels = torch.stack([audio_io.first_window_mel(s, main.dims.n_mels) for s in samples])  # (B, n_mels, 3000)
    options = DecodingOptions(timestamps=specs[0].timestamps, max_new_tokens=max_new_tokens)
    rules = rules_for(main, options.timestamps)
    with torch.inference_mode():
        features = network.encoder(mels.to(main.device, main.dtype))  # (B, S, C)
        audio_kv = network.decoder.audio_kv(features)
        languages = [spec.language if tokenizer.multilingual else "en" for spec in specs]
        if None in languages:
            detected = resolve_languages(network, tokenizer, audio_kv, None)[0]
            languages = [given or guess for given, guess in zip(languages, detected)]
        prompts = build_prompts(tokenizer, options, languages, previous)
        window = WindowBatch(mels, features, audio_kv, prompts, languages, rules, options)
        results = autoregressive_decode(network, tokenizer, window)
        # One teacher-forced pass gives the distribution at every position (what verification sees).
        sequences = [p + r.tokens for p, r in zip(prompts, results)]
        hidden = forward_ragged(network.decoder, audio_kv, network.new_cache(len(specs)), sequences)  # (B, T, C)
        windows = []
        for row, (spec, prompt, result) in enumerate(zip(specs, prompts, results)):
            targets = result.tokens + ([tokenizer.eot] if result.finished else [])
            first = len(prompt) - 1
            at_targets = hidden[row, first:first + len(targets)]  # (N, C)
            ids, logprobs = _top_k(network.decoder.logits(at_targets).float(), rules, result.tokens, top_k)
            windows.append(TeacherWindow(
                spec=spec, language=languages[row], tokens=torch.tensor(sequences[row], dtype=torch.int32),
                first_target=first, targets=torch.tensor(targets, dtype=torch.int32), topk_ids=ids,
                topk_logprobs=logprobs, features=features[row].half().cpu(),
                seconds=len(samples[row]) / audio_io.SAMPLE_RATE, hidden=at_targets.half().cpu()))
    return windows


def _top_k(logits: Tensor, rules: LogitRules, generated: list[int], k: int) -> tuple[Tensor, Tensor]:
    """logits (N, V) at the positions predicting generated[0..N) -> the k best ids (N, k) int32 and their
    log-probabilities (N, k) fp16, after the logit rules (in place)."""
    ids, logprobs = [], []
    for j, row_logits in enumerate(logits):
        values, index = torch.log_softmax(rules.apply(row_logits, generated[:j]), dim=-1).topk(k)
        ids.append(index)
        logprobs.append(values)
    return torch.stack(ids).to(torch.int32).cpu(), torch.stack(logprobs).half().cpu()


def fill_hidden(main: SpeechModel, windows: list[TeacherWindow], batch_size: int = 8, context: bool = False) -> None:
    """Give windows the main model's final hidden states at their target positions (`hidden`) and,
    with `context`, at every position (`context`), from their stored encoder output: a decoder pass,
    no encoder and no decoding."""
    missing = [w for w in windows if w.hidden is None or (context and w.context is None)]
    network = main.network
    with torch.inference_mode():
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            features = torch.stack([w.features for w in chunk]).to(main.device, main.dtype)  # (B, S, C)
            hidden = forward_ragged(network.decoder, network.decoder.audio_kv(features), network.new_cache(len(chunk)),
                                    [w.tokens.tolist() for w in chunk])  # (B, T, C)
            for row, w in enumerate(chunk):
                w.hidden = hidden[row, w.first_target:w.first_target + w.n_targets].half().cpu()
                if context:
                    w.context = hidden[row, :len(w.tokens)].half().cpu()


def rules_for(main: SpeechModel, timestamps: bool) -> LogitRules:
    return LogitRules(main.tokenizer, main.suppress_tokens, main.begin_suppress_tokens,
                      DecodingOptions(timestamps=timestamps), main.dims.n_vocab)
