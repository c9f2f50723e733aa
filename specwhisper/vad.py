"""Voice activity detection: Silero VAD v6 in plain PyTorch, to skip non-speech before windows are cut.

The network (MIT, Silero Team) is small: an STFT as a strided convolution, four 1-D convolutions, an
LSTM cell carried from chunk to chunk, and a sigmoid, giving a speech probability per 512-sample
(32 ms) chunk seen with the 64 samples before it. Its v6 weights ship in `assets/vad/` (1.2 MB of
safetensors made by scripts/convert_silero_vad.py from the silero-vad package's ONNX file, checked
against a pinned SHA-256): no TorchScript, no onnxruntime, no torchaudio, no extra to install. The
convolutions run for all chunks at once; only the LSTM is sequential, as one `nn.LSTM` call.

`speech_chunks` turns the probabilities into speech regions with faster-whisper's parameters;
`SpeechMap` maps times on the speech-only audio back onto the recording's timeline. This module
imports no torch (the CLI reads `VadOptions` before torch is loaded); the network is in `vad_network`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources

import numpy as np

from .weights.checksums import check_sha256

SAMPLE_RATE = 16000
CHUNK = 512  # samples per speech probability (32 ms)
CONTEXT = 64  # samples of the previous chunk each chunk is seen with
WEIGHTS_SHA256 = "c19dc28ed3c7b16ad5864987677e3a2f9102f9b065a1a73ab299a3af394865b5"


@dataclass(frozen=True)
class VadOptions:
    """faster-whisper's `VadOptions` and defaults."""

    threshold: float = 0.5  # a chunk at or above this probability is speech
    neg_threshold: float | None = None  # speech ends below this (default: threshold - 0.15)
    min_speech_duration_ms: int = 0  # shorter speech regions are dropped
    max_speech_duration_s: float = math.inf  # longer regions are split at a silence
    min_silence_duration_ms: int = 2000  # a region ends after this much silence
    speech_pad_ms: int = 400  # added to both sides of each region


def weights_file():
    return resources.files("specwhisper") / "assets" / "vad" / "silero_vad_v6_16k.safetensors"


def load_vad():
    """The network (`specwhisper.vad_network.SileroVad`) with its shipped weights, checked."""
    from safetensors.torch import load_file

    from .vad_network import SileroVad

    path = weights_file()
    check_sha256(path, WEIGHTS_SHA256, "reinstall specwhisper")
    state = load_file(str(path))
    model = SileroVad()
    model.load_state_dict(state)
    return model.eval()


def speech_probabilities(model, audio: np.ndarray) -> np.ndarray:
    """One probability per 512-sample chunk of 16 kHz audio (the last chunk zero-padded)."""
    import torch

    n_chunks = -(-len(audio) // CHUNK)
    padded = np.zeros(CONTEXT + n_chunks * CHUNK, np.float32)
    padded[CONTEXT:CONTEXT + len(audio)] = audio
    samples = torch.from_numpy(padded)
    windows = samples.unfold(0, CONTEXT + CHUNK, CHUNK)  # (n_chunks, 576): each chunk after its context
    with torch.no_grad():
        return model(windows).numpy()


def speech_chunks(probabilities: np.ndarray, n_samples: int, options: VadOptions = VadOptions()
                  ) -> list[tuple[int, int]]:
    """Speech regions [(start, end) samples] from per-chunk probabilities, as Silero's and faster-whisper's
    `get_speech_timestamps`: hysteresis between the two thresholds, short silences bridged, short
    regions dropped, long ones split, then padded (meeting halfway where pads would overlap)."""
    rate = SAMPLE_RATE / 1000
    min_speech = options.min_speech_duration_ms * rate
    min_silence = options.min_silence_duration_ms * rate
    pad = int(options.speech_pad_ms * rate)
    max_speech = SAMPLE_RATE * options.max_speech_duration_s - CHUNK - 2 * pad
    neg_threshold = options.neg_threshold if options.neg_threshold is not None else max(options.threshold - 0.15, 0.01)
    regions: list[tuple[int, int]] = []
    start = silence_start = None
    for i, probability in enumerate(probabilities):
        sample = i * CHUNK
        if probability >= options.threshold:
            silence_start = None
            if start is None:
                start = sample
                continue
        if start is not None and sample - start > max_speech:
            regions.append((start, silence_start or sample))  # split where the silence began, if it did
            start = silence_start = None
            continue
        if start is not None and probability < neg_threshold:
            silence_start = sample if silence_start is None else silence_start
            if sample - silence_start >= min_silence:
                if silence_start - start > min_speech:
                    regions.append((start, silence_start))
                start = silence_start = None
    if start is not None and n_samples - start > min_speech:
        regions.append((start, n_samples))
    return pad_regions(regions, pad, n_samples)


def pad_regions(regions: list[tuple[int, int]], pad: int, n_samples: int) -> list[tuple[int, int]]:
    starts, ends = [s for s, _ in regions], [e for _, e in regions]
    for i in range(len(regions)):
        if i == 0:
            starts[i] = max(0, starts[i] - pad)
        if i + 1 < len(regions):
            gap = starts[i + 1] - ends[i]
            share = gap // 2 if gap < 2 * pad else pad
            ends[i] += share
            starts[i + 1] = max(0, starts[i + 1] - share)
        else:
            ends[i] = min(n_samples, ends[i] + pad)
    return list(zip(starts, ends))


@dataclass(frozen=True)
class SpeechMap:
    """Where each piece of the speech-only audio came from: times on it -> times on the recording."""

    regions: tuple[tuple[int, int], ...]  # (start, end) samples of the recording, in order

    def speech_only(self, audio: np.ndarray) -> np.ndarray:
        return np.concatenate([audio[s:e] for s, e in self.regions]) if self.regions else audio[:0]

    def original_time(self, seconds: float, is_end: bool = False) -> float:
        """A time on the speech-only audio -> on the recording (a region's end stays in that region)."""
        sample = seconds * SAMPLE_RATE
        offset = 0
        for start, end in self.regions:
            length = end - start
            if sample < offset + length or (is_end and sample <= offset + length):
                return round((start + sample - offset) / SAMPLE_RATE, 3)
            offset += length
        return round(self.regions[-1][1] / SAMPLE_RATE, 3) if self.regions else seconds
