"""Training windows for `specwhisper distill`: audio files in, window specs out, rendered on demand.

`plan_windows` stretches a few minutes of audio into many windows (<= 30 s): speed perturbation
(resampling: tempo and pitch together), volume, white noise at a random SNR, random crops (which
cut words in half, as a long-form window boundary does), and same-language clips concatenated
into full 30-s windows (what long-form decoding sees). Each window also gets a decoding mode:
timestamps or not, previous text or not. Files are split into train and validation *before*
augmentation, so no variant of a validation clip is ever trained on.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from .. import audio as audio_io
from ..errors import SpecWhisperError

AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".webm", ".aac"}
WINDOW_SECONDS = audio_io.CHUNK_LENGTH  # 30 s: the encoder's window
MAX_WINDOW_SECONDS = 29.5  # concatenations stay inside one window, with room for a closing timestamp
CONCAT_GAP_SECONDS = (0.2, 0.6)  # silence between concatenated clips


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


def long_form_specs(files: list[AudioFile], timestamps: bool = True, previous_text: bool = True) -> list[WindowSpec]:
    """Consecutive 30-s windows of each recording, each (after the first) prompted with the previous
    window's transcript: what long-form decoding feeds the decoder, without augmentation."""
    specs = []
    for f in files:
        for n, start in enumerate(np.arange(0.0, f.seconds - 1.0, WINDOW_SECONDS)):
            specs.append(WindowSpec((f.path,), f.language, crop=(float(start), WINDOW_SECONDS),
                                    timestamps=timestamps, previous_text=previous_text and n > 0))
    return specs
