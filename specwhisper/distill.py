"""`specwhisper distill`: teach a shallow draft (`specwhisper.draft`) the main model's next token.

    specwhisper distill --main base --audio ../shared/audio/dev ../shared/audio/multilingual \\
                        --layers 2 --head shortlist --out drafts/base-2

Steps, each a function usable alone:
  1. `plan_windows`: audio files -> training windows (<= 30 s), stretched by augmentation:
     speed perturbation (resampling: tempo and pitch together), volume, white noise at a random
     SNR, random crops (which cut words in half, as a long-form window boundary does), and
     same-language clips concatenated into full 30-s windows (what long-form decoding sees).
     Each window is also given a decoding mode: timestamps or not, previous text or not.
     Files are split into train and validation *before* augmentation, so no variant of a
     validation clip is ever trained on.
  2. `teacher_pass`: the main model transcribes every window once, greedily, exactly as
     decoding will (Whisper's logit rules applied). Stored per window, in the specwhisper
     cache (`cache_dir()/distill/teacher`), reused by every later run on the same audio:
       the encoder output, fp16                  1500 x 512 x 2 B  = 1.5 MB (base)
       prompt + greedy tokens, int32             ~0.5 kB
       top-k log-probabilities per position,     k=64: 64 x (2 + 4) B = 384 B per token
         (fp16 values, int32 ids), after the logit rules; the full distribution would be
         51,865 x 2 B = 104 kB per token, 270x more for mass the draft never needs
  3. `train`: AdamW on the draft's own tensors only. Teacher forcing on the teacher's
     tokens with the stored encoder output (no encoder pass during training), loss =
     KL(teacher top-k || draft) + ce_weight x cross-entropy on the teacher's greedy token.
     Validation after each epoch reports the KL and the argmax agreement with the teacher
     (with the logit rules applied to the draft too: the expected acceptance rate per drafted
     token); early stopping on agreement; a checkpoint per epoch (`--resume` continues).
     With `init` (`--init DRAFT`) training starts from a saved draft instead of the main model's
     layers: to adapt a draft to new audio (a domain, more data) without starting over.
  4. `evaluate_agreement`: the same agreement on recordings never trained on (e.g.
     ../shared/audio/long cut into consecutive 30-s windows, each prompted with the previous
     window's transcript as long-form decoding does).

The teacher (the main model) is never modified: the draft's shared embeddings and encoder are
read through `.detach()` and only the draft's own parameters reach the optimizer.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import audio as audio_io
from .decoding import DecodingOptions, LogitRules, autoregressive_decode, build_prompts, resolve_languages
from .draft import (DraftConfig, ShortlistHead, build_draft_network, decode_all_positions, fingerprint,
                    head_log_probs, load_draft, load_own_state, new_config, own_parameters, own_state_dict,
                    read_config, save_draft, shift_features, spread_layers, uses_features, with_shortlist, wrap)
from .errors import SpecWhisperError
from .loading import SpeechModel, load_model
from .longform import LongformOptions
from .transcribe import first_window_mel
from .weights.resolve import cache_dir

AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".webm", ".aac"}
WINDOW_SECONDS = audio_io.CHUNK_LENGTH  # 30 s: the encoder's window
MAX_WINDOW_SECONDS = 29.5  # concatenations stay inside one window, with room for a closing timestamp
CONCAT_GAP_SECONDS = (0.2, 0.6)  # silence between concatenated clips
TOP_K = 64  # teacher log-probabilities kept per position (see the module docstring for the size)
MAX_NEW_TOKENS = 224  # per window: what `transcribe` allows (half the 448-token context)
MAX_PROMPT_TOKENS = LongformOptions.max_prompt_tokens  # previous text in a prompt, as in long-form decoding
TEACHER_FORMAT = 2  # 2: previous text keeps its timestamp tokens


# ----------------------------------------------------------------------------- 1. windows

@dataclass(frozen=True)
class WindowSpec:
    """One training window: how its audio is made from source files, and how the teacher decodes it."""

    sources: tuple[str, ...]  # files, concatenated in this order
    language: str | None  # None: the teacher detects it
    speed: float = 1.0  # > 1: faster and higher
    gain_db: float = 0.0
    noise_snr_db: float | None = None  # white noise at this signal-to-noise ratio
    crop: tuple[float, float] | None = None  # (start, length) in seconds of the (sped-up) audio
    timestamps: bool = False  # the teacher decodes in timestamp mode
    previous_text: bool = False  # the prompt carries the transcript of an earlier window (same language)
    seed: int = 0  # noise and gaps

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class AudioFile:
    path: str
    language: str | None
    seconds: float


def find_audio(paths: list[str | Path]) -> list[AudioFile]:
    """Audio files in these folders (recursively) or named directly, with their language when a
    manifest.tsv beside them has a `language` column (the evaluation-audio convention)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
        else:
            raise SpecWhisperError(f"{path}: no such file or folder")
    if not files:
        raise SpecWhisperError(f"no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) in {', '.join(map(str, paths))}")
    out = []
    for path in files:
        samples = load_samples(str(path))
        out.append(AudioFile(str(path), _manifest_languages(str(path.parent)).get(path.name),
                             len(samples) / audio_io.SAMPLE_RATE))
    return out


@lru_cache(maxsize=None)
def _manifest_languages(folder: str) -> dict[str, str]:
    manifest = Path(folder) / "manifest.tsv"
    if not manifest.is_file():
        return {}
    with manifest.open(encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return {row["file"]: row["language"] for row in rows if row.get("file") and row.get("language")}


@lru_cache(maxsize=64)
def load_samples(path: str) -> np.ndarray:
    return audio_io.load_audio(path)


def split_files(files: list[AudioFile], val_fraction: float, seed: int) -> tuple[list[AudioFile], list[AudioFile]]:
    """Train and validation files, split per language so every language appears in both when it can."""
    rng = random.Random(seed)
    train, val = [], []
    by_language: dict[str | None, list[AudioFile]] = {}
    for f in files:
        by_language.setdefault(f.language, []).append(f)
    for group in by_language.values():
        group = list(group)
        rng.shuffle(group)
        n_val = round(val_fraction * len(group)) if len(group) >= 2 else 0
        if val_fraction > 0 and n_val == 0 and len(group) >= 4:
            n_val = 1
        val += group[:n_val]
        train += group[n_val:]
    return train, val


@dataclass(frozen=True)
class AugmentOptions:
    speeds: tuple[float, ...] = (0.9, 1.1)  # one extra copy of every clip per speed
    crops: int = 1  # random crops per clip
    concat_passes: int = 2  # shuffles of each language's clips packed into full windows
    gain_db: tuple[float, float] = (-12.0, 6.0)
    noise_probability: float = 0.5
    snr_db: tuple[float, float] = (15.0, 40.0)
    # Long-form decoding (`transcribe`'s defaults) has timestamps on and every window after the first
    # prompted with the text so far: most windows should look like that.
    timestamps_probability: float = 0.7
    previous_text_probability: float = 0.7


def plan_windows(files: list[AudioFile], augment: AugmentOptions, seed: int) -> list[WindowSpec]:
    """Every window made from these files: the clips as they are, then their augmented variants."""
    rng = random.Random(seed)

    def mode(spec: WindowSpec, clean: bool = False) -> WindowSpec:
        noisy = not clean and rng.random() < augment.noise_probability
        return replace(spec, timestamps=rng.random() < augment.timestamps_probability,
                       previous_text=rng.random() < augment.previous_text_probability,
                       gain_db=0.0 if clean else rng.uniform(*augment.gain_db),
                       noise_snr_db=rng.uniform(*augment.snr_db) if noisy else None,
                       seed=rng.randrange(1 << 30))

    windows = []
    long_files = [f for f in files if f.seconds > MAX_WINDOW_SECONDS]
    for f in files:
        if f.seconds > MAX_WINDOW_SECONDS:  # long recordings: consecutive windows, like long-form decoding
            for start in np.arange(0.0, f.seconds - 1.0, WINDOW_SECONDS):
                windows.append(mode(WindowSpec((f.path,), f.language, crop=(float(start), WINDOW_SECONDS)),
                                    clean=True))
            continue
        windows.append(mode(WindowSpec((f.path,), f.language), clean=True))
        for speed in augment.speeds:
            windows.append(mode(WindowSpec((f.path,), f.language, speed=speed)))
        for _ in range(augment.crops):
            length = rng.uniform(0.4, 0.9) * f.seconds
            start = rng.uniform(0.0, f.seconds - length)
            windows.append(mode(WindowSpec((f.path,), f.language, crop=(start, length))))
    by_language: dict[str | None, list[AudioFile]] = {}
    for f in files:
        if f not in long_files:
            by_language.setdefault(f.language, []).append(f)
    for _ in range(augment.concat_passes):
        for language, group in by_language.items():
            group = list(group)
            rng.shuffle(group)
            packed: list[AudioFile] = []
            for f in group + [None]:
                total = sum(g.seconds + CONCAT_GAP_SECONDS[1] for g in packed)
                if f is None or total + f.seconds > MAX_WINDOW_SECONDS:
                    if len(packed) >= 2:
                        windows.append(mode(WindowSpec(tuple(g.path for g in packed), language)))
                    packed = []
                if f is not None:
                    packed.append(f)
    return windows


def render(spec: WindowSpec) -> np.ndarray:
    """The window's 16 kHz samples (at most 30 s)."""
    rng = np.random.default_rng(spec.seed)
    parts = []
    for i, path in enumerate(spec.sources):
        if i:
            gap = rng.uniform(*CONCAT_GAP_SECONDS)
            parts.append(np.zeros(int(gap * audio_io.SAMPLE_RATE), dtype=np.float32))
        parts.append(load_samples(path))
    samples = np.concatenate(parts) if len(parts) > 1 else parts[0]
    if spec.speed != 1.0:  # read as if recorded at speed x 16 kHz: shorter by 1/speed
        samples = audio_io.resample(samples, round(audio_io.SAMPLE_RATE * spec.speed), audio_io.SAMPLE_RATE)
    if spec.crop is not None:
        start, length = (round(s * audio_io.SAMPLE_RATE) for s in spec.crop)
        samples = samples[start:start + length]
    samples = samples[:audio_io.N_SAMPLES] * np.float32(10 ** (spec.gain_db / 20))
    if spec.noise_snr_db is not None:
        power = float(np.mean(samples ** 2)) + 1e-12
        noise = rng.standard_normal(len(samples)).astype(np.float32)
        samples = samples + noise * np.float32(math.sqrt(power / 10 ** (spec.noise_snr_db / 10)))
    return np.clip(samples, -1.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- 2. the teacher pass

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
    paths = [folder / f"{spec.key()}-{max_new_tokens}.pt" for spec in specs]
    windows: list[TeacherWindow | None] = [_read_teacher(path, spec, top_k) for path, spec in zip(paths, specs)]
    bar = _progress(len(specs), label, progress)
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
            tmp = paths[i].with_suffix(".tmp")
            torch.save({"format": TEACHER_FORMAT, "top_k": top_k, "spec": asdict(specs[i]), **_window_tensors(window)},
                       tmp)
            tmp.replace(paths[i])
        bar.update(len(batch))
    bar.close()
    return windows


def _window_tensors(w: TeacherWindow) -> dict:
    return {"language": w.language, "tokens": w.tokens, "first_target": w.first_target, "targets": w.targets,
            "topk_ids": w.topk_ids, "topk_logprobs": w.topk_logprobs, "features": w.features, "seconds": w.seconds,
            "hidden": w.hidden}


def _read_teacher(path: Path, spec: WindowSpec, top_k: int) -> TeacherWindow | None:
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a half-written or foreign file: recompute it
        return None
    if data.get("format") != TEACHER_FORMAT or data.get("top_k") != top_k:
        return None
    return TeacherWindow(spec=spec, hidden=data.get("hidden"),
                         **{k: data[k] for k in ("language", "tokens", "first_target", "targets", "topk_ids",
                                                 "topk_logprobs", "features", "seconds")})


def _teach_batch(main: SpeechModel, specs: list[WindowSpec], previous: list[list[int]], top_k: int,
                 max_new_tokens: int) -> list[TeacherWindow]:
    """Decode windows of one timestamp mode together, then read the distribution at every position."""
    network, tokenizer = main.network, main.tokenizer
    samples = [render(spec) for spec in specs]
    mels = torch.stack([first_window_mel(main, s) for s in samples]).to(main.device, main.dtype)  # (B, n_mels, 3000)
    options = DecodingOptions(timestamps=specs[0].timestamps, max_new_tokens=max_new_tokens)
    rules = _rules_for(main, options.timestamps)
    with torch.inference_mode():
        features = network.encoder(mels)  # (B, S, C)
        audio_kv = network.decoder.audio_kv(features)
        languages = [spec.language if tokenizer.multilingual else "en" for spec in specs]
        if None in languages:
            detected = resolve_languages(network, tokenizer, audio_kv, None)[0]
            languages = [given or guess for given, guess in zip(languages, detected)]
        prompts = build_prompts(tokenizer, options, languages, previous)
        results = autoregressive_decode(network, tokenizer, audio_kv, rules, prompts, options)
        # One teacher-forced pass gives the distribution at every position (what verification sees);
        # right-padding is harmless: a position sees only those before it.
        sequences = [p + r.tokens for p, r in zip(prompts, results)]
        longest = max(len(s) for s in sequences)
        padded = torch.tensor([s + [tokenizer.eot] * (longest - len(s)) for s in sequences], device=main.device)
        hidden = network.decoder(padded, audio_kv, network.new_cache(len(specs), max_len=longest))
        windows = []
        for row, (spec, prompt, result) in enumerate(zip(specs, prompts, results)):
            generated = result.tokens
            targets = generated + ([tokenizer.eot] if result.finished else [])
            first = len(prompt) - 1
            logits = network.decoder.logits(hidden[row, first:first + len(targets)]).float()  # (N, V)
            ids, logprobs = [], []
            for j in range(len(targets)):
                filtered = rules.apply(logits[j], generated[:j])
                values, index = torch.log_softmax(filtered, dim=-1).topk(top_k)
                ids.append(index)
                logprobs.append(values)
            windows.append(TeacherWindow(
                spec=spec, language=languages[row], tokens=torch.tensor(sequences[row], dtype=torch.int32),
                first_target=first, targets=torch.tensor(targets, dtype=torch.int32),
                topk_ids=torch.stack(ids).to(torch.int32).cpu(), topk_logprobs=torch.stack(logprobs).half().cpu(),
                features=features[row].half().cpu(), seconds=len(samples[row]) / audio_io.SAMPLE_RATE,
                hidden=hidden[row, first:first + len(targets)].half().cpu()))
    return windows


def fill_hidden(main: SpeechModel, windows: list[TeacherWindow], batch_size: int = 8, context: bool = False) -> None:
    """Give windows the main model's final hidden states at their target positions (`hidden`) and,
    with `context`, at every position (`context`), from their stored encoder output: a decoder pass,
    no encoder and no decoding."""
    missing = [w for w in windows if w.hidden is None or (context and w.context is None)]
    network = main.network
    with torch.inference_mode():
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            batch = make_batch(chunk, main.tokenizer.eot, main.device, main.dtype)
            longest = batch.tokens.shape[1]
            hidden = network.decoder(batch.tokens, network.decoder.audio_kv(batch.features),
                                     network.new_cache(len(chunk), max_len=longest))
            for row, w in enumerate(chunk):
                w.hidden = hidden[row, w.first_target:w.first_target + w.n_targets].half().cpu()
                if context:
                    w.context = hidden[row, :len(w.tokens)].half().cpu()


# ----------------------------------------------------------------------------- the shortlist

def choose_shortlist(tokenizer, windows: list[TeacherWindow], size: int) -> list[int]:
    """The `size` tokens the draft may propose: the main model's likeliest outputs, best first.

    Always end-of-text and every timestamp token (timestamp mode emits them constantly; they cost
    1,501 rows). Then the text tokens the teacher emitted, most frequent first. Then the remaining
    text tokens in id order: byte-pair merge order, a frequency prior for text never seen in
    training. With minutes of training audio the prior does most of the work: on
    ../shared/audio/long, 8192 tokens chosen this way cover 85 % of base's greedy tokens, and
    ranking by the teacher's whole top-k mass instead covered only 78 % (rare alternatives
    crowd out common tokens).
    """
    chosen = [tokenizer.eot] + list(range(tokenizer.timestamp_begin, tokenizer.n_vocab))
    if size <= len(chosen):
        raise ValueError(f"a shortlist needs more than {len(chosen)} tokens (end-of-text and the timestamps)")
    emitted = Counter(t for w in windows for t in w.targets.tolist() if t < tokenizer.eot)
    seen = set(chosen)
    for token in [t for t, _ in emitted.most_common()] + list(range(tokenizer.eot)):
        if len(chosen) >= size:
            break
        if token not in seen:
            chosen.append(token)
            seen.add(token)
    return chosen


def shortlist_coverage(ids: list[int] | Tensor, windows: list[TeacherWindow]) -> float:
    """Fraction of the teacher's greedy tokens the shortlist can propose."""
    allowed = set(int(i) for i in ids)
    targets = [t for w in windows for t in w.targets.tolist()]
    return sum(t in allowed for t in targets) / max(len(targets), 1)


# ----------------------------------------------------------------------------- 3. training

@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.01
    batch_size: int = 8  # windows per step
    ce_weight: float = 0.5  # cross-entropy on the teacher's greedy token, added to the KL
    hidden_weight: float = 0.0  # matching the main model's final hidden states, added too
    feedback_weight: float = 1.0  # feature drafts: the loss of a second pass fed the draft's own hidden states
    patience: int = 2  # epochs without a better validation agreement before stopping
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass
class EpochReport:
    epoch: int
    train_loss: float
    val_kl: float
    val_agreement: float
    seconds: float


@dataclass
class TrainResult:
    history: list[EpochReport] = field(default_factory=list)
    best_epoch: int = 0
    best_agreement: float = 0.0
    initial_agreement: float = 0.0
    initial_kl: float = 0.0

    @classmethod
    def from_dict(cls, data: dict) -> "TrainResult":
        return cls(history=[EpochReport(**e) for e in data["history"]],
                   **{k: v for k, v in data.items() if k != "history"})


@dataclass
class Batch:
    tokens: Tensor  # (B, T) long, right-padded
    features: Tensor  # (B, S, C)
    rows: Tensor  # (N,) batch row of each target position
    positions: Tensor  # (N,) its position
    targets: Tensor  # (N,) long
    topk_ids: Tensor  # (N, k) long
    topk_probs: Tensor  # (N, k) float, renormalized teacher probabilities
    hidden: Tensor | None  # (N, C) the main model's final hidden states, when every window has them
    first_targets: list[int]  # per row: the position whose output predicts the first generated token
    context_in: Tensor | None = None  # (B, T, C) a feature draft's input: the main model's hidden state one position back


def make_batch(windows: list[TeacherWindow], pad: int, device, dtype) -> Batch:
    longest = max(len(w.tokens) for w in windows)
    tokens = torch.full((len(windows), longest), pad, dtype=torch.long)
    rows, positions = [], []
    for r, w in enumerate(windows):
        tokens[r, :len(w.tokens)] = w.tokens.long()
        positions.append(torch.arange(w.first_target, w.first_target + w.n_targets))
        rows.append(torch.full((w.n_targets,), r))
    logprobs = torch.cat([w.topk_logprobs for w in windows]).float()
    return Batch(tokens=tokens.to(device), features=torch.stack([w.features for w in windows]).to(device, dtype),
                 rows=torch.cat(rows).to(device), positions=torch.cat(positions).to(device),
                 targets=torch.cat([w.targets for w in windows]).long().to(device),
                 topk_ids=torch.cat([w.topk_ids for w in windows]).long().to(device),
                 topk_probs=torch.softmax(logprobs, dim=-1).to(device),
                 hidden=torch.cat([w.hidden for w in windows]).to(device, torch.float32)
                 if all(w.hidden is not None for w in windows) else None,
                 first_targets=[w.first_target for w in windows],
                 context_in=_context_input(windows, longest, device, dtype))


def _context_input(windows: list[TeacherWindow], longest: int, device, dtype) -> Tensor | None:
    if not all(w.context is not None for w in windows):
        return None
    context = torch.zeros(len(windows), longest, windows[0].context.shape[-1])
    for r, w in enumerate(windows):
        context[r, :len(w.tokens)] = w.context.float()
    return shift_features(context).to(device, dtype)  # position t reads the hidden state of t - 1


def own_feedback_input(hidden: Tensor, batch: Batch) -> Tensor:
    """A feature draft's input when it drafts its second token and beyond: at generated positions
    its own previous hidden state stands in for the main model's (which verification has not
    computed yet); at prompt positions the main model's stays. hidden: (B, T, C) from a first pass."""
    own = shift_features(hidden.detach())
    generated = torch.arange(hidden.shape[1], device=hidden.device)[None] > \
        torch.tensor(batch.first_targets, device=hidden.device)[:, None]  # (B, T): t - 1 >= first target
    return torch.where(generated[..., None], own, batch.context_in)


def batch_loss(network, batch: Batch, ce_weight: float, hidden_weight: float = 0.0, feedback_weight: float = 0.0
               ) -> Tensor:
    """The training loss, with gradients.

    A feature draft is trained on the main model's hidden states (what its first drafted token sees)
    and, with feedback_weight, on a second pass fed its own (what later drafted tokens see)."""
    audio_kv = network.decoder.audio_kv(batch.features)
    context = batch.context_in if uses_features(network) else None
    if uses_features(network) and context is None:
        raise ValueError("a feature draft needs the main model's hidden states (fill_hidden(..., context=True))")
    hidden = decode_all_positions(network, batch.tokens, audio_kv, context)  # (B, T, C)
    loss, _ = _loss_terms(network, hidden[batch.rows, batch.positions], batch, ce_weight, hidden_weight)
    if context is not None and feedback_weight:
        fed_back = decode_all_positions(network, batch.tokens, audio_kv, own_feedback_input(hidden, batch))
        loss2, _ = _loss_terms(network, fed_back[batch.rows, batch.positions], batch, ce_weight, hidden_weight)
        loss = (loss + feedback_weight * loss2) / (1 + feedback_weight)
    return loss


def _rules_for(main: SpeechModel, timestamps: bool) -> LogitRules:
    return LogitRules(main.tokenizer, main.suppress_tokens, main.begin_suppress_tokens,
                      DecodingOptions(timestamps=timestamps), main.dims.n_vocab)


@torch.no_grad()
def validate(main: SpeechModel, network, windows: list[TeacherWindow], batch_size: int = 8
             ) -> tuple[float, float, dict]:
    """(mean KL, agreement, details) on these windows. Agreement applies the logit rules to the
    draft's logits at every position, as drafting does, and compares with the teacher's greedy token."""
    if not windows:
        return float("nan"), float("nan"), {}
    rules = {ts: _rules_for(main, ts) for ts in (False, True)}
    was_training = network.training
    network.eval()
    kl_sum, n, agree, agree_fed_back = 0.0, 0, 0, 0
    per_language: dict[str, list[int]] = {}
    features = uses_features(network)
    if features:
        fill_hidden(main, windows, context=True)

    def hits_of(hidden: Tensor, r: int, w: TeacherWindow) -> int:
        positions = torch.arange(w.first_target, w.first_target + w.n_targets, device=hidden.device)
        logits = network.decoder.logits(hidden[r, positions]).float()  # (N, V), -inf outside a shortlist
        generated = w.generated
        hits = 0
        for j, target in enumerate(w.targets.tolist()):
            filtered = rules[w.spec.timestamps].apply(logits[j], generated[:j])
            hits += int(filtered.argmax()) == target
        return hits

    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        batch = make_batch(chunk, main.tokenizer.eot, main.device, main.dtype)
        audio_kv = network.decoder.audio_kv(batch.features)
        hidden = decode_all_positions(network, batch.tokens, audio_kv, batch.context_in if features else None)
        _, kl = _loss_terms(network, hidden[batch.rows, batch.positions], batch, ce_weight=0.0)
        kl_sum += float(kl.sum())
        n += len(kl)
        fed_back = None
        if features:  # the second drafted token onwards: the draft's own hidden state fed back
            fed_back = decode_all_positions(network, batch.tokens, audio_kv, own_feedback_input(hidden, batch))
        for r, w in enumerate(chunk):
            hits = hits_of(hidden, r, w)
            agree += hits
            if fed_back is not None:
                agree_fed_back += hits_of(fed_back, r, w)
            counts = per_language.setdefault(w.language, [0, 0])
            counts[0] += hits
            counts[1] += w.n_targets
    network.train(was_training)
    details = {"positions": n, "per_language": {k: v[0] / max(v[1], 1) for k, v in sorted(per_language.items())}}
    if features:
        # Agreement with the main model's hidden states is the first drafted token's; fed back,
        # the later ones'. The score is their mean (γ ≈ 2-4 drafts a round mostly the latter).
        details["agreement_first"] = agree / max(n, 1)
        details["agreement_fed_back"] = agree_fed_back / max(n, 1)
        return kl_sum / max(n, 1), (agree + agree_fed_back) / max(2 * n, 1), details
    return kl_sum / max(n, 1), agree / max(n, 1), details


def _loss_terms(network, target_hidden: Tensor, batch: Batch, ce_weight: float, hidden_weight: float = 0.0
                ) -> tuple[Tensor, Tensor]:
    """KL(teacher top-k || draft) per position, plus ce_weight x cross-entropy on the greedy token,
    plus hidden_weight x the squared distance between the draft's and the main model's final hidden
    states relative to the latter's norm (a 512-number target per token instead of one distribution).

    A shortlist head can only score its own tokens: teacher mass outside it is dropped (the
    rest renormalized) and positions whose greedy token lies outside get no cross-entropy.
    """
    logq, short_ids = head_log_probs(network, target_hidden)
    teacher_ids, teacher_p, targets = batch.topk_ids, batch.topk_probs, batch.targets
    if short_ids is not None:
        slot = torch.full((network.dims.n_vocab,), -1, dtype=torch.long, device=logq.device)
        slot[short_ids] = torch.arange(len(short_ids), device=logq.device)
        teacher_ids, targets = slot[teacher_ids], slot[targets]
        teacher_p = teacher_p * (teacher_ids >= 0)
        teacher_p = teacher_p / teacher_p.sum(-1, keepdim=True).clamp_min(1e-12)
        teacher_ids = teacher_ids.clamp_min(0)
    kl = (teacher_p * (torch.log(teacher_p.clamp_min(1e-12)) - logq.gather(-1, teacher_ids))).sum(-1)  # (N,)
    valid = targets >= 0
    ce = -logq.gather(-1, targets.clamp_min(0)[:, None])[:, 0]
    loss = kl.mean() + ce_weight * (ce * valid).sum() / valid.sum().clamp_min(1)
    if hidden_weight and batch.hidden is not None:
        distance = (target_hidden.float() - batch.hidden).square().sum(-1) / batch.hidden.square().sum(-1)
        loss = loss + hidden_weight * distance.mean()
    return loss, kl.detach()


CHECKPOINT_FILE = "checkpoint.pt"


def train(main: SpeechModel, network, train_windows: list[TeacherWindow], val_windows: list[TeacherWindow],
          options: TrainOptions, checkpoint_dir: Path | None = None, resume: bool = False, progress: bool = True,
          on_best=None, log=print) -> TrainResult:
    """Train the draft's own parameters in place; at the end they hold the best validation epoch's values.

    checkpoint_dir: where `checkpoint.pt` (own weights, optimizer, epoch, history) is written after
    every epoch; with `resume`, training continues from it. on_best(network, result): called when
    validation agreement improves (e.g. to save the draft).
    """
    params = own_parameters(network)
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    steps_per_epoch = math.ceil(len(train_windows) / options.batch_size)
    total_steps = max(steps_per_epoch * options.epochs, 1)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine down to 10 %
        if step < options.warmup_steps:
            return (step + 1) / options.warmup_steps
        progress_ = (step - options.warmup_steps) / max(total_steps - options.warmup_steps, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress_, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    result = TrainResult()
    start_epoch, best_state, stale = 1, None, 0
    checkpoint = checkpoint_dir / CHECKPOINT_FILE if checkpoint_dir else None
    if resume and checkpoint is not None and checkpoint.is_file():
        # weights_only: tensors, numbers and plain containers only, never arbitrary objects.
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        load_own_state(network, saved["own_state"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        result = TrainResult.from_dict(saved["result"])
        best_state, stale, start_epoch = saved["best_state"], saved["stale"], saved["epoch"] + 1
        log(f"resumed from {checkpoint} after epoch {saved['epoch']} "
            f"(best agreement {100 * result.best_agreement:.1f}% at epoch {result.best_epoch})")
    else:
        result.initial_kl, result.initial_agreement, _ = validate(main, network, val_windows)
        log(f"before training: validation KL {result.initial_kl:.3f}, agreement {100 * result.initial_agreement:.1f}%")

    generator = random.Random(options.seed)
    for epoch in range(start_epoch, options.epochs + 1):
        generator.seed(options.seed * 1000 + epoch)  # the same order after a resume
        order = list(range(len(train_windows)))
        generator.shuffle(order)
        network.train()
        started, loss_sum, n_steps = time.perf_counter(), 0.0, 0
        bar = _progress(steps_per_epoch, f"epoch {epoch}/{options.epochs}", progress)
        for i in range(0, len(order), options.batch_size):
            batch = make_batch([train_windows[j] for j in order[i:i + options.batch_size]], main.tokenizer.eot,
                               main.device, main.dtype)
            loss = batch_loss(network, batch, options.ce_weight, options.hidden_weight, options.feedback_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach())
            n_steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / n_steps:.3f}")
        bar.close()
        network.eval()
        val_kl, val_agreement, details = validate(main, network, val_windows)
        report = EpochReport(epoch, loss_sum / max(n_steps, 1), val_kl, val_agreement, time.perf_counter() - started)
        result.history.append(report)
        improved = not val_windows or val_agreement > result.best_agreement
        per_language = " ".join(f"{k}:{100 * v:.0f}%" for k, v in details.get("per_language", {}).items())
        if "agreement_first" in details:
            per_language = (f"first draft {100 * details['agreement_first']:.1f}%, later drafts "
                            f"{100 * details['agreement_fed_back']:.1f}%; {per_language}")
        log(f"epoch {epoch}: train loss {report.train_loss:.3f} | validation KL {val_kl:.3f}, "
            f"agreement {100 * val_agreement:.1f}% ({per_language}) | {report.seconds:.0f} s"
            + (" | best" if improved else ""))
        if improved:
            result.best_epoch, result.best_agreement, stale = epoch, val_agreement, 0
            best_state = {k: v.detach().cpu().clone() for k, v in own_state_dict(network).items()}
            if on_best is not None:
                on_best(network, result)
        else:
            stale += 1
        if checkpoint is not None:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"own_state": {k: v.cpu() for k, v in own_state_dict(network).items()},
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "result": asdict(result),
                        "best_state": best_state, "stale": stale, "epoch": epoch}, tmp)
            tmp.replace(checkpoint)
        if val_windows and stale >= options.patience:
            log(f"early stop: no better agreement for {stale} epochs")
            break
    if best_state is not None:
        load_own_state(network, best_state)
    network.eval()
    return result


# ----------------------------------------------------------------------------- 4. evaluation on unseen audio

def long_form_specs(files: list[AudioFile], timestamps: bool = True, previous_text: bool = True) -> list[WindowSpec]:
    """Consecutive 30-s windows of each recording, each (after the first) prompted with the previous
    window's transcript: what long-form decoding feeds the decoder, without augmentation."""
    specs = []
    for f in files:
        for n, start in enumerate(np.arange(0.0, f.seconds - 1.0, WINDOW_SECONDS)):
            specs.append(WindowSpec((f.path,), f.language, crop=(float(start), WINDOW_SECONDS),
                                    timestamps=timestamps, previous_text=previous_text and n > 0))
    return specs


def evaluate_agreement(main: SpeechModel, network, paths: list[str | Path], timestamps: bool = True,
                       progress: bool = True) -> tuple[float, dict]:
    """Agreement of the draft with the main model's greedy tokens on recordings cut into 30-s windows."""
    files = find_audio(paths)
    specs = long_form_specs(files, timestamps=timestamps)
    windows = teacher_pass(main, specs, chains=[spec.sources[0] for spec in specs], progress=progress,
                           label="eval teacher")
    kl, agreement, details = validate(main, network, windows)
    details.update(kl=kl, windows=len(windows), tokens=sum(w.n_targets for w in windows),
                   audio_seconds=sum(w.seconds for w in windows))
    head = network.decoder.output_projection
    if isinstance(head, ShortlistHead):
        details["shortlist_coverage"] = shortlist_coverage(head.ids.tolist(), windows)
    return agreement, details


# ----------------------------------------------------------------------------- the whole recipe

@dataclass(frozen=True)
class DistillOptions:
    layers: int = 2
    from_layers: tuple[int, ...] | None = None  # main layers the blocks start from (sets `layers`); default: spread
    head: str = "shortlist"
    shortlist_size: int = 8192
    rank: int = 64
    val_fraction: float = 0.15
    top_k: int = TOP_K
    max_new_tokens: int = MAX_NEW_TOKENS  # per window, in the teacher pass
    storage_dtype: str = "float32"
    features: bool = False  # the draft reads the main model's hidden states (specwhisper.draft)
    # A saved draft to start from instead of the main model's layers; its layers, head and features
    # are kept (the options above for them are ignored), its shortlist is chosen again from the new audio.
    init: str | None = None
    augment: AugmentOptions = field(default_factory=AugmentOptions)
    train: TrainOptions = field(default_factory=TrainOptions)


def distill(main: SpeechModel, audio: list[str | Path], out: str | Path, options: DistillOptions = DistillOptions(),
            resume: bool = False, progress: bool = True, eval_audio: list[str | Path] | None = None,
            command: str | None = None, log=print) -> tuple[SpeechModel, DraftConfig, TrainResult]:
    """Distil a draft for `main` from unlabelled audio and save it to `out` (a folder).

    Returns the trained draft (a SpeechModel around `main`), its config and the training history.
    `out/checkpoint.pt` is kept for `resume`.
    """
    out = Path(out)
    torch.manual_seed(options.train.seed)
    if options.from_layers:
        if not all(0 <= layer < main.dims.n_text_layer for layer in options.from_layers):
            raise SpecWhisperError(f"--from-layers {' '.join(map(str, options.from_layers))}: {main.name} has "
                                   f"decoder layers 0 to {main.dims.n_text_layer - 1}")
        options = replace(options, layers=len(options.from_layers))
    start_network, init_config = None, None
    if options.init is not None:  # loaded and checked against `main` before the teacher pass, which can take an hour
        start_draft = load_draft(main, options.init, prepack=False)
        start_network, init_config = start_draft.network, read_config(start_draft.folder)
        options = replace(options, layers=init_config.n_layer, head=init_config.head, features=init_config.features,
                          shortlist_size=len(init_config.shortlist or ()) or options.shortlist_size,
                          rank=init_config.rank or options.rank)
    files = find_audio(audio)
    if not main.tokenizer.multilingual:
        skipped = [f for f in files if f.language not in (None, "en")]
        if skipped:
            log(f"{main.name} is English-only: skipping {len(skipped)} non-English files")
        files = [f for f in files if f.language in (None, "en")]
    train_files, val_files = split_files(files, options.val_fraction, options.train.seed)
    train_specs = plan_windows(train_files, options.augment, options.train.seed)
    val_specs = [replace(s, seed=s.seed + 1) for s in plan_windows(val_files, replace(options.augment, speeds=(),
                                                                                       crops=0), options.train.seed + 1)]
    train_seconds = sum(f.seconds for f in train_files)
    log(f"{len(files)} files ({sum(f.seconds for f in files) / 60:.1f} min): {len(train_files)} for training "
        f"({train_seconds / 60:.1f} min, {len(train_specs)} windows with augmentation), "
        f"{len(val_files)} for validation ({len(val_specs)} windows); languages: "
        f"{', '.join(sorted(set(str(f.language) for f in files)))}")
    started = time.perf_counter()
    teach = dict(top_k=options.top_k, max_new_tokens=options.max_new_tokens, progress=progress)
    train_windows = teacher_pass(main, train_specs, label="teacher (train)", **teach)
    val_windows = teacher_pass(main, val_specs, label="teacher (validation)", **teach)
    if options.train.hidden_weight or options.features:
        fill_hidden(main, train_windows, context=options.features)
    teacher_seconds = time.perf_counter() - started
    n_tokens = sum(w.n_targets for w in train_windows)
    log(f"teacher pass: {n_tokens} training tokens, {sum(w.n_targets for w in val_windows)} validation tokens, "
        f"{sum(w.seconds for w in train_windows) / 60:.1f} min of augmented audio ({teacher_seconds:.0f} s)")

    if init_config is not None:
        network = warm_start(main, start_network, init_config, options.init, train_windows, val_windows, log)
        init_layers = init_config.init_layers
    else:
        init_layers = options.from_layers or spread_layers(main.dims.n_text_layer, options.layers)
        shortlist = None
        if options.head == "shortlist":
            shortlist = choose_shortlist(main.tokenizer, train_windows, options.shortlist_size)
            log(f"shortlist: {len(shortlist)} tokens; {_coverage_line(shortlist, train_windows, val_windows)}")
        network = build_draft_network(main, init_layers, options.head, shortlist=shortlist, rank=options.rank,
                                      features=options.features)
        log(f"draft: {options.layers} layers from main layers {list(init_layers)}, {options.head} head"
            + (", reads the main model's hidden states" if options.features else ""))

    def config_for(result: TrainResult) -> DraftConfig:
        training = {
            "command": command, "audio": [str(a) for a in audio], "files": len(files),
            "train_files": len(train_files), "windows": len(train_windows),
            "validation_files": sorted(Path(f.path).name for f in val_files),
            "train_tokens": n_tokens, "augmented_minutes": round(sum(w.seconds for w in train_windows) / 60, 2),
            "epochs_run": len(result.history), "best_epoch": result.best_epoch,
            "validation_agreement": round(result.best_agreement, 4),
            "initial_validation_agreement": round(result.initial_agreement, 4),
            "validation_kl": round(result.history[result.best_epoch - 1].val_kl, 4) if result.best_epoch else None,
            "initial_validation_kl": round(result.initial_kl, 4),
            "options": {k: v for k, v in asdict(options).items()},
        }
        if init_config is not None:  # how the starting point was made, so the chain can be reproduced
            training["init"] = {"draft": str(options.init), "command": init_config.training.get("command"),
                                "eval": init_config.training.get("eval")}
        return new_config(main, network, init_layers, training)

    def save_best(net, result: TrainResult) -> None:
        save_draft(net, config_for(result), out, dtype=options.storage_dtype, main=main)

    started = time.perf_counter()
    result = train(main, network, train_windows, val_windows, options.train, checkpoint_dir=out, resume=resume,
                   progress=progress, on_best=save_best, log=log)
    log(f"training: {time.perf_counter() - started:.0f} s, best validation agreement "
        f"{100 * result.best_agreement:.1f}% (epoch {result.best_epoch}; {100 * result.initial_agreement:.1f}% "
        "before training)")
    config = config_for(result)
    if eval_audio:
        agreement, details = evaluate_agreement(main, network, eval_audio, progress=progress)
        config.training["eval"] = {"audio": [str(a) for a in eval_audio], "agreement": round(agreement, 4),
                                   **{k: v for k, v in details.items() if k != "per_language"}}
        log(f"agreement on {', '.join(map(str, eval_audio))} (never trained on): {100 * agreement:.1f}% over "
            f"{details['tokens']} tokens in {details['windows']} windows"
            + (f"; shortlist covers {100 * details['shortlist_coverage']:.1f}%" if "shortlist_coverage" in details
               else "")
            + (f"; first draft {100 * details['agreement_first']:.1f}%, later drafts "
               f"{100 * details['agreement_fed_back']:.1f}%" if "agreement_first" in details else ""))
    save_draft(network, config, out, dtype=options.storage_dtype, main=main)
    return wrap(main, network, name=f"{main.name}+draft{options.layers}", folder=out), config, result


def warm_start(main: SpeechModel, network, config: DraftConfig, source: str | Path,
               train_windows: list[TeacherWindow], val_windows: list[TeacherWindow], log=print):
    """The saved draft `network` (loaded unpacked, so trainable), ready to continue training (`distill --init`).

    A shortlist head's list is chosen again from the new teacher outputs, at the same size: more audio
    shows more of the tokens the main model emits, and a token outside the list can never be drafted.
    """
    head = network.decoder.output_projection
    kept = ""
    if isinstance(head, ShortlistHead):
        before = _coverage_line(head.ids.tolist(), train_windows, val_windows)
        shortlist = choose_shortlist(main.tokenizer, train_windows, len(head.ids))
        kept = f"; {len(set(shortlist) & set(head.ids.tolist()))} of its {len(head.ids)} shortlist tokens kept"
        with_shortlist(network, shortlist)
        log(f"shortlist chosen again: {_coverage_line(shortlist, train_windows, val_windows)} (was: {before})")
    log(f"draft: starting from {source} ({config.n_layer} layers from main layers {list(config.init_layers)}, "
        f"{config.head} head" + (", reads the main model's hidden states" if config.features else "") + kept + ")")
    return network


def _coverage_line(shortlist, train_windows: list[TeacherWindow], val_windows: list[TeacherWindow]) -> str:
    return (f"covers {100 * shortlist_coverage(shortlist, train_windows):.1f}% of training and "
            f"{100 * shortlist_coverage(shortlist, val_windows):.1f}% of validation greedy tokens")


# ----------------------------------------------------------------------------- CLI

def _progress(total: int, label: str, enabled: bool):
    """A tqdm bar on a terminal; elsewhere a stand-in that prints nothing."""
    if enabled and sys.stderr.isatty():
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=label, unit="it", leave=False, dynamic_ncols=True)
        except ImportError:
            pass
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specwhisper distill",
        description="Distil a shallow decoder-only draft from a Whisper model, for exact speculative decoding.")
    parser.add_argument("--main", default="base", help="the main model: a name, hub id or folder (default: base)")
    parser.add_argument("--audio", nargs="+", required=True, metavar="DIR",
                        help="folders (searched recursively) or files of unlabelled audio to learn from")
    parser.add_argument("--out", required=True, help="folder to write draft.json and draft.safetensors into")
    parser.add_argument("--layers", type=int, default=2, help="decoder blocks in the draft (default: 2)")
    parser.add_argument("--from-layers", type=int, nargs="+", default=None, metavar="L",
                        help="main decoder layers the blocks start from, one per block (default: spread from "
                             "first to last, e.g. 0 5 for 2 of base's 6)")
    parser.add_argument("--head", choices=("full", "shortlist", "lowrank"), default="shortlist",
                        help="output head: the main model's tied projection, a shortlist of the tokens it emits, "
                             "or a low-rank factorisation (default: shortlist)")
    parser.add_argument("--shortlist-size", type=int, default=8192, help="tokens in a shortlist head (default: 8192)")
    parser.add_argument("--rank", type=int, default=64, help="rank of a low-rank head (default: 64)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=8, help="windows per optimizer step")
    parser.add_argument("--ce-weight", type=float, default=0.5,
                        help="weight of cross-entropy on the teacher's greedy token, added to the KL (default: 0.5)")
    parser.add_argument("--hidden-weight", type=float, default=0.0,
                        help="weight of matching the main model's final hidden states (default: 0)")
    parser.add_argument("--features", action="store_true",
                        help="the draft also reads the main model's hidden state of the previous position, "
                        "which verification computes anyway (EAGLE-style): much higher agreement")
    parser.add_argument("--feedback-weight", type=float, default=1.0,
                        help="with --features: weight of a second training pass fed the draft's own hidden "
                        "states, as when it drafts several tokens ahead (default: 1)")
    parser.add_argument("--patience", type=int, default=2, help="epochs without improvement before stopping")
    parser.add_argument("--val-fraction", type=float, default=0.15,
                        help="fraction of the files held out for validation (default: 0.15)")
    parser.add_argument("--speeds", type=float, nargs="*", default=[0.9, 1.1],
                        help="speed perturbations, one extra copy of each clip per value (default: 0.9 1.1)")
    parser.add_argument("--crops", type=int, default=1, help="random crops per clip (default: 1)")
    parser.add_argument("--concat-passes", type=int, default=2,
                        help="times each language's clips are packed into full 30-s windows (default: 2)")
    parser.add_argument("--top-k", type=int, default=TOP_K, help="teacher log-probabilities kept per position")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                        help=f"tokens the teacher may write per window (default: {MAX_NEW_TOKENS})")
    parser.add_argument("--eval-audio", nargs="*", default=[], metavar="DIR",
                        help="recordings never trained on: report agreement on their consecutive 30-s windows")
    parser.add_argument("--storage-dtype", choices=("float32", "float16", "int8-delta"), default="float32",
                        help="how the draft's tensors are saved: float32 (reloads bit-identically), float16, or "
                             "int8-delta (int8 changes from the main model's layers: 1/4 the size; default: float32)")
    parser.add_argument("--init", default=None, metavar="DRAFT",
                        help="start from this saved draft (its layers, head and features) instead of the main "
                             "model's layers: to adapt a draft to more or other audio")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def distill_main(argv: list[str] | None = None) -> int:
    """`specwhisper distill ...`: returns the exit status (1 with a one-line message on a user error)."""
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        # fp32 everywhere: the draft trains in the main model's dtype, and fp16 training is unstable.
        main = load_model(args.main, device=args.device, dtype="float32")
        options = DistillOptions(
            layers=args.layers, from_layers=tuple(args.from_layers) if args.from_layers else None, head=args.head,
            shortlist_size=args.shortlist_size, rank=args.rank,
            val_fraction=args.val_fraction, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
            storage_dtype=args.storage_dtype, features=args.features, init=args.init,
            augment=AugmentOptions(speeds=tuple(args.speeds), crops=args.crops, concat_passes=args.concat_passes),
            train=TrainOptions(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, ce_weight=args.ce_weight,
                               hidden_weight=args.hidden_weight, feedback_weight=args.feedback_weight,
                               patience=args.patience, seed=args.seed))
        command = "specwhisper distill " + " ".join(sys.argv[1:] if argv is None else argv)
        distill(main, args.audio, args.out, options, resume=args.resume, progress=not args.no_progress,
                eval_audio=args.eval_audio, command=command,
                log=lambda line: print(line, file=sys.stderr, flush=True))
    except SpecWhisperError as err:
        print(f"specwhisper: error: {err}", file=sys.stderr)
        return 1
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(distill_main())
