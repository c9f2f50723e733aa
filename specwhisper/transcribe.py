"""Audio in, text out: features, encoder, and a decoding strategy for the first 30-s window.

Features follow openai-whisper's `transcribe` and faster-whisper: the log-mel of the
whole recording (with 30 s of zero samples appended before the STFT), cut into a
3000-frame window whose tail past the audio is zero-padded in the *log-mel*. So a
clip alone and the same clip inside a longer file see the same features.
(transformers and openai-whisper's `decode` instead pad the *audio* to 30 s and then
compute the log-mel: `audio.log_mel_padded_audio`, used by the parity tests.)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import audio as audio_io
from .decoding import (DecodeStats, DecodingOptions, LogitRules, WindowResult, build_prompts, autoregressive_decode,
                       resolve_languages)
from .loading import SpeechModel


@dataclass(frozen=True)
class Transcription:
    text: str
    tokens: list[int]  # generated tokens (text and timestamps), without prompt and end-of-text
    language: str | None
    audio_seconds: float
    truncated: bool  # the audio was longer than the one 30-s window decoded
    stats: DecodeStats
    timings: dict[str, float] = field(default_factory=dict)  # seconds: load_audio, log_mel, encoder, decode
    language_probs: dict[str, float] | None = None
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    draft_mask: list[bool] | None = None


def first_window_mel(model: SpeechModel, samples: np.ndarray) -> torch.Tensor:
    """(n_mels, 3000) features of the first 30 s, openai-whisper `transcribe` convention."""
    mel, content_frames = audio_io.log_mel_windows(samples, n_mels=model.dims.n_mels)
    return audio_io.mel_window(mel, content_frames, 0)


def encode_audio(model: SpeechModel, mel: torch.Tensor):
    """mel: (B, n_mels, 3000) -> the decoder's cross-attention K/V and the encoder output."""
    with torch.inference_mode():
        features = model.network.encoder(mel.to(model.device, model.dtype))
        return model.network.decoder.audio_kv(features), features


def decode_window(model: SpeechModel, mel: torch.Tensor, options: DecodingOptions, assistant=None,
                  stats: DecodeStats | None = None) -> list[WindowResult]:
    """Decode a batch of mel windows (B, n_mels, 3000) greedily, or speculatively when an assistant is given."""
    stats = stats if stats is not None else DecodeStats()
    started = time.perf_counter()
    audio_kv, features = encode_audio(model, mel)
    stats.encoder_seconds += time.perf_counter() - started
    with torch.inference_mode():
        languages, language_probs = resolve_languages(model.network, model.tokenizer, audio_kv, options.language)
        prompts = build_prompts(model.tokenizer, options, languages)
        rules = LogitRules(model.tokenizer, model.suppress_tokens, model.begin_suppress_tokens, options,
                           model.dims.n_vocab)
        if assistant is None:
            results = autoregressive_decode(model.network, model.tokenizer, audio_kv, rules, prompts, options, stats)
        else:
            from .speculative import speculative_decode

            results = speculative_decode(model, assistant, mel, audio_kv, features, rules, prompts, languages,
                                         options, stats)
    for result, language, probs in zip(results, languages, language_probs):
        result.language = language
        result.language_probs = probs
    return results


def transcribe(model: SpeechModel, audio: str | os.PathLike | np.ndarray, language: str | None = None,
               task: str = "transcribe", timestamps: bool = False, assistant=None, **decode_options) -> Transcription:
    """Transcribe the first 30-s window of a recording (longer audio is cut; `truncated` says so)."""
    if task not in ("transcribe", "translate"):
        raise ValueError(f"task must be 'transcribe' or 'translate', not {task!r}")
    timings = {}
    started = time.perf_counter()
    samples = audio if isinstance(audio, np.ndarray) else audio_io.load_audio(audio)
    timings["load_audio"] = time.perf_counter() - started
    started = time.perf_counter()
    mel = first_window_mel(model, samples)
    timings["log_mel"] = time.perf_counter() - started
    options = DecodingOptions(task=task, language=language, timestamps=timestamps, **decode_options)
    stats = DecodeStats()
    result = decode_window(model, mel[None], options, assistant=assistant, stats=stats)[0]
    timings["encoder"] = stats.encoder_seconds
    timings["decode"] = stats.prefill_seconds + stats.decode_seconds + stats.draft_seconds + stats.verify_seconds
    decode = model.tokenizer.decode_with_timestamps if timestamps else model.tokenizer.decode
    return Transcription(
        text=decode(result.tokens).strip(), tokens=result.tokens, language=result.language,
        audio_seconds=len(samples) / audio_io.SAMPLE_RATE, truncated=len(samples) > audio_io.N_SAMPLES,
        stats=stats, timings=timings, language_probs=result.language_probs, avg_logprob=result.avg_logprob,
        no_speech_prob=result.no_speech_prob, draft_mask=result.draft_mask)
