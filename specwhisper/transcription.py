"""Audio in, text out: whole recordings, window after window, one file or many at once.

Features follow openai-whisper's `transcribe` and faster-whisper: the log-mel of the
whole recording (with 30 s of zero samples appended before the STFT), cut into
3000-frame windows whose tail past the audio is zero-padded in the *log-mel*. So a
clip alone and the same clip inside a longer file see the same features.
(transformers and openai-whisper's `decode` instead pad the *audio* to 30 s and then
compute the log-mel: `audio.log_mel_padded_audio`, used by the parity tests.)

`decode_window` decodes a batch of windows (greedily, or speculatively with an
assistant); `specwhisper.longform` walks a recording window by window with it;
`transcribe` and `transcribe_many` put the two together.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
import torch

from . import audio as audio_io
from .beam_search import decode_as_asked, uses_beam_search
from .checks import check_clip_timestamps
from .decoding import (DecodeStats, DecodingOptions, LogitRules, WindowBatch, WindowResult, build_prompts,
                       resolve_languages, synchronize, window_record)
from .errors import SpecWhisperError
from .kv_cache import AudioKV
from .longform import FileTranscript, LongformOptions, Segment, run_files
from .tokenizer import APPEND_PUNCTUATIONS, PREPEND_PUNCTUATIONS, TASKS, Tokenizer
from .vad import SpeechMap, VadOptions, load_vad, speech_chunks, speech_probabilities
from .word_timing import alignment_heads, window_words

if TYPE_CHECKING:
    from .drafters import Drafter
    from .speech_model import SpeechModel

DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass(frozen=True)
class Transcription:
    """A whole recording's transcript."""

    text: str  # every segment's text, joined and stripped
    segments: list[Segment]
    language: str | None
    tokens: list[int]  # the segments' tokens in order (text and window-relative timestamps)
    audio_seconds: float
    stats: DecodeStats  # summed over the file's windows (in a batch: over the decode calls it shared)
    # seconds: load_audio, log_mel, encoder, decode, total (and word_timestamps, when asked for)
    timings: dict[str, float] = field(default_factory=dict)
    language_probs: dict[str, float] | None = None  # when detected: on the first window
    draft_mask: list[bool] | None = None  # per token: True where it came from an accepted draft
    windows: int = 0  # windows decoded
    fallbacks: int = 0  # windows decoded again at a higher temperature

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: text, language, segments, tokens, speculative statistics, timings."""
        return {"text": self.text, "language": self.language, "audio_seconds": self.audio_seconds,
                "segments": [s.as_dict() for s in self.segments], "tokens": self.tokens,
                "windows": self.windows, "fallbacks": self.fallbacks, "stats": self.stats.as_dict(),
                "timings": self.timings, "language_probs": self.language_probs}


def encode_audio(model: SpeechModel, mel: torch.Tensor):
    """mel: (B, n_mels, 3000) -> the decoder's cross-attention K/V and the encoder output."""
    with torch.inference_mode():
        features = model.network.encoder(mel.to(model.device, model.dtype))
        return model.network.decoder.audio_kv(features), features


def decode_window(model: SpeechModel, mel: torch.Tensor, options: DecodingOptions, assistant: Drafter | None = None,
                  stats: DecodeStats | None = None, previous_tokens: list[list[int]] | None = None,
                  languages: list[str | None] | None = None, hints: list[list[int]] | None = None,
                  keep_audio_kv: bool = False, generator: torch.Generator | None = None) -> list[WindowResult]:
    """Decode a batch of mel windows (B, n_mels, 3000) greedily, or speculatively when an assistant is given;
    by beam search at temperature 0 with options.beam_size, by best-of sampling above it with options.best_of.

    previous_tokens: per row, tokens of the text before this window to condition on (the
    prompt becomes <|startofprev|> previous... <|startoftranscript|> ...); empty or None: none.
    languages: per row, a language code, or None to detect it from that row's audio
    (default: `options.language` for every row).
    hints: per row, tokens the window will likely decode first (long-form's free drafts).
    keep_audio_kv: each result keeps its row's cross-attention K/V (`audio_kv`), for word timestamps.
    generator: the random numbers of sampling (temperature > 0), which is then done by the main model alone:
      speculative sampling's draws depend on how many tokens the controller drafts, which follows measured
      costs; None: PyTorch's global generator, and speculative sampling with an assistant.
    """
    call = DecodeStats()  # this call's alone, summarized in `windows`, then added to `stats`
    synchronize(model.device)
    started = time.perf_counter()
    audio_kv, features = encode_audio(model, mel)
    synchronize(model.device)
    call.encoder_seconds += time.perf_counter() - started
    with torch.inference_mode():
        languages, language_probs = _row_languages(model, audio_kv, options.language, languages)
        rules = LogitRules(model.tokenizer, model.suppress_tokens, model.begin_suppress_tokens, options,
                           model.dims.n_vocab)
        prompts = build_prompts(model.tokenizer, options, languages, previous_tokens)
        window = WindowBatch(mel, features, audio_kv, prompts, languages, rules, options, generator=generator,
                             hints=hints)
        if uses_beam_search(options):
            assistant = None  # speculative decoding serves greedy decoding and sampling, not beam search
        if generator is not None:
            assistant = None  # seeded samples must not depend on the drafts, whose number follows the clock
        if assistant is not None and not all(assistant.can_draft(language) for language in languages):
            warnings.warn(f"assistant {assistant.name} is English-only and the audio is in "
                          f"{', '.join(sorted(set(str(l) for l in languages)))}: decoding without an assistant",
                          stacklevel=2)
            assistant = None
        results = decode_as_asked(model.network, model.tokenizer, window, assistant, call)
    call.windows.append(window_record(call))
    if stats is not None:
        stats.add(call)
    for row, (result, language, probs) in enumerate(zip(results, languages, language_probs)):
        result.language = language
        result.language_probs = probs
        if keep_audio_kv:
            result.audio_kv = AudioKV([k[row:row + 1] for k in audio_kv.keys],
                                      [v[row:row + 1] for v in audio_kv.values])
    return results


def _row_languages(model: SpeechModel, audio_kv, default: str | None, wanted: list[str | None] | None):
    """Every row's language and, where detected, the language probabilities."""
    if wanted is None:
        return resolve_languages(model.network, model.tokenizer, audio_kv, default)
    if len(wanted) != audio_kv.batch_size:
        raise ValueError(f"{len(wanted)} languages for {audio_kv.batch_size} windows")
    detected, probs = [None] * len(wanted), [None] * len(wanted)
    if any(language is None for language in wanted):
        detected, probs = resolve_languages(model.network, model.tokenizer, audio_kv, None)
    languages = [language if language is not None else guess for language, guess in zip(wanted, detected)]
    probs = [p if language is None else None for language, p in zip(wanted, probs)]
    return languages, probs


def check_language(tokenizer: Tokenizer, language: str | None, task: str) -> str | None:
    """The language code to decode with (None: detect on the first window), or a ValueError
    naming what this model cannot do (unknown code, a non-English language on an English-only
    model, translation on an English-only model)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    if not tokenizer.multilingual:
        tokenizer.sot_sequence(language if language is not None else "en", task)  # raises if unusable
        return "en"
    if language is None:
        return None
    token = tokenizer.language_token(language)  # accepts names too ("german")
    return tokenizer.language_codes[tokenizer.language_token_ids.index(token)]


def transcribe(model: SpeechModel, audio: str | os.PathLike | np.ndarray, language: str | None = None,
               task: str = "transcribe", timestamps: bool = True, assistant: Drafter | None = None, *,
               temperature: float | tuple[float, ...] = DEFAULT_TEMPERATURES,
               compression_ratio_threshold: float | None = 2.4, logprob_threshold: float | None = -1.0,
               no_speech_threshold: float | None = 0.6, condition_on_previous_text: bool = True,
               initial_prompt: str | None = None, word_timestamps: bool = False,
               prepend_punctuations: str = PREPEND_PUNCTUATIONS, append_punctuations: str = APPEND_PUNCTUATIONS,
               hallucination_silence_threshold: float | None = None,
               beam_size: int | None = None, patience: float | None = None, length_penalty: float | None = None,
               best_of: int | None = None, seed: int | None = 0, progress=None, **decode_options) -> Transcription:
    """Transcribe (or translate to English) a whole recording: a path or 16 kHz mono float samples.

    language: a code or name; None detects it on the first 30 s and keeps it for the file.
    timestamps: decode in timestamp mode, which splits the text into timed segments (True, as
      openai-whisper's `transcribe`); False gives one segment per 30-s window.
    assistant: a drafter (`specwhisper.assistants.load_assistant`, or any `specwhisper.drafters.Drafter`);
      then every window is decoded speculatively and `stats` counts the drafts over the whole file.
    temperature: one value, or the values tried in turn while a window fails the thresholds
      (compression ratio above `compression_ratio_threshold`, average log-probability below
      `logprob_threshold`); a window whose no-speech probability is above `no_speech_threshold`
      and whose average log-probability is below `logprob_threshold` is skipped as silence.
    condition_on_previous_text: prompt each window with the text so far (reset after a window
      sampled above temperature 0.5). initial_prompt: text to prompt the first window with.
    word_timestamps: give every segment its `words` (start, end, word, probability), timed from the
      cross-attention of the model's alignment heads (`specwhisper.word_timing`); punctuation in
      `prepend_punctuations` joins the next word, in `append_punctuations` the previous one.
    hallucination_silence_threshold: with word timestamps, skip silences longer than this many seconds
      around segments that look hallucinated (openai-whisper's option; None: never).
    beam_size: beam search with this many beams at temperature 0 (None: greedy), ending once
      round(beam_size * patience) hypotheses have ended; best_of: samples per window above temperature 0,
      the best ranked kept; both rank by summed log-probability over the length, or over
      ((5 + length) / 6) ** length_penalty (openai-whisper's options; `specwhisper.beam_search`). Beam
      search runs without the assistant.
    seed: sampling (above temperature 0: fallbacks, best-of) draws from a generator seeded with this, afresh
      for each window and temperature, by the main model alone (not speculatively), so a transcript depends
      only on the recording and the options: not on the files before it, the process or the assistant;
      None: PyTorch's global generator (openai-whisper's way), and speculative sampling with an assistant.
    progress: a tqdm-like bar advanced by audio seconds, or None.
    decode_options: more `DecodingOptions` fields (max_new_tokens per window: 224 by default).
    """
    result = next(transcribe_many(
        model, [audio], language=language, task=task, timestamps=timestamps, assistant=assistant, batch_size=1,
        temperature=temperature, compression_ratio_threshold=compression_ratio_threshold,
        logprob_threshold=logprob_threshold, no_speech_threshold=no_speech_threshold,
        condition_on_previous_text=condition_on_previous_text, initial_prompt=initial_prompt,
        word_timestamps=word_timestamps, prepend_punctuations=prepend_punctuations,
        append_punctuations=append_punctuations, hallucination_silence_threshold=hallucination_silence_threshold,
        beam_size=beam_size, patience=patience,
        length_penalty=length_penalty, best_of=best_of, seed=seed, progress=progress, **decode_options))
    if isinstance(result, Exception):
        raise result
    return result


def transcribe_many(model: SpeechModel, audios: Iterable[str | os.PathLike | np.ndarray], language: str | None = None,
                    task: str = "transcribe", timestamps: bool = True, assistant: Drafter | None = None, *,
                    batch_size: int = 8,
                    temperature: float | tuple[float, ...] = DEFAULT_TEMPERATURES,
                    compression_ratio_threshold: float | None = 2.4, logprob_threshold: float | None = -1.0,
                    no_speech_threshold: float | None = 0.6, condition_on_previous_text: bool = True,
                    initial_prompt: str | None = None, carry_initial_prompt: bool = False,
                    clip_timestamps: Iterable[float] | None = None, vad_filter: bool = False,
                    vad_options: VadOptions | None = None, word_timestamps: bool = False,
                    prepend_punctuations: str = PREPEND_PUNCTUATIONS, append_punctuations: str = APPEND_PUNCTUATIONS,
                    hallucination_silence_threshold: float | None = None, seed: int | None = 0, progress=None,
                    run_stats: DecodeStats | None = None, **decode_options) -> Iterator[Transcription | SpecWhisperError]:
    """Transcribe many recordings, decoding windows of up to `batch_size` of them together.

    Yields, in input order, a Transcription per recording, or the SpecWhisperError (e.g. an
    AudioError) that stopped it. At temperature 0 each transcript equals what `transcribe`
    gives for that recording alone. Options as in `transcribe`; `run_stats` (if given) adds up
    every decode call of the run, whereas each result's `stats` counts the calls it took part in.
    carry_initial_prompt: every window's prompt starts with `initial_prompt` (else only the first's).
    clip_timestamps: seconds start, end, start, end, ... of the parts to transcribe in every file (an
    odd count: the last part runs to the end), as openai-whisper's; timestamps stay on the file's timeline.
    vad_filter: cut out what Silero VAD (`specwhisper.vad`, with `vad_options`) finds is not speech before
    the windows are cut, as faster-whisper's; timestamps are mapped back onto the file's timeline.
    word_timestamps, prepend_punctuations, append_punctuations, hallucination_silence_threshold, seed: as in
    `transcribe` (with batch_size > 1, a sampled window's random numbers are shared by the batch it is in).
    """
    tokenizer = model.tokenizer
    language = check_language(tokenizer, language, task)
    temperatures = (float(temperature),) if isinstance(temperature, (int, float)) else tuple(temperature)
    if not temperatures:
        raise ValueError("at least one temperature is needed")
    options = LongformOptions(
        temperatures=temperatures, compression_ratio_threshold=compression_ratio_threshold,
        logprob_threshold=logprob_threshold, no_speech_threshold=no_speech_threshold,
        condition_on_previous_text=condition_on_previous_text, carry_initial_prompt=carry_initial_prompt,
        max_prompt_tokens=model.dims.n_text_ctx // 2 - 1,
        hallucination_silence_threshold=hallucination_silence_threshold)
    clips = clip_frames(clip_timestamps)
    vad_model = load_vad() if vad_filter else None
    decode_options.setdefault("max_new_tokens", model.dims.n_text_ctx // 2)  # openai-whisper's sample_len
    base_options = DecodingOptions(task=task, language=None, timestamps=timestamps, **decode_options)
    prompt_tokens = tokenizer.encode(" " + initial_prompt.strip()) if initial_prompt else []

    def open_file(index: int, source) -> FileTranscript:
        started = time.perf_counter()
        samples = audio_io.check_samples(source, "the array of samples") if isinstance(source, np.ndarray) \
            else audio_io.load_audio(source)
        loaded = time.perf_counter()
        audio_seconds = len(samples) / audio_io.SAMPLE_RATE
        speech_map = None
        if vad_model is not None:
            speech_map = SpeechMap(tuple(speech_chunks(speech_probabilities(vad_model, samples), len(samples),
                                                       vad_options or VadOptions())))
            samples = speech_map.speech_only(samples)
        mel, content_frames = audio_io.log_mel_windows(samples, n_mels=model.dims.n_mels)
        done = time.perf_counter()
        info = {"audio_seconds": audio_seconds, "started": started, "speech_map": speech_map,
                "timings": {"load_audio": loaded - started, "log_mel": done - loaded}}
        return FileTranscript(index=index, mel=mel, content_frames=content_frames, language=language,
                              initial_prompt=prompt_tokens, info=info,
                              clips=[(start, end or content_frames) for start, end in clips] if clips else None)

    def decode(mels, previous, languages, temperature, stats, hints):
        return decode_window(model, mels, replace(base_options, temperature=temperature), assistant=assistant,
                             stats=stats, previous_tokens=previous, languages=languages, hints=hints,
                             keep_audio_kv=word_timestamps, generator=sampling_generator(seed, temperature, model.device))

    heads = alignment_heads(model) if word_timestamps else None

    def align(result: WindowResult, segment_tokens: list[list[int]], frames: int):
        return window_words(model.network, tokenizer, heads, result.audio_kv, result.language, task, segment_tokens,
                            frames, prepend_punctuations, append_punctuations)

    for _, state in run_files(audios, open_file, decode, tokenizer, options, batch_size, progress, run_stats,
                              align if word_timestamps else None):
        yield state if isinstance(state, SpecWhisperError) else _finish(tokenizer, state)


def sampling_generator(seed: int | None, temperature: float, device: torch.device) -> torch.Generator | None:
    """A window's random numbers at this temperature: the same whichever file, process or machine decodes it."""
    if seed is None or temperature == 0:
        return None
    return torch.Generator(device).manual_seed(seed * 1009 + round(temperature * 1000))  # one stream per temperature


def clip_frames(clip_timestamps: Iterable[float] | None) -> list[tuple[int, int | None]] | None:
    """Seconds [start, end, start, ...] -> frame (start, end) pairs, end None for 'to the end of the file'."""
    if clip_timestamps is None:
        return None
    seconds = check_clip_timestamps([float(t) for t in clip_timestamps], "clip_timestamps")
    frames = [round(t * audio_io.FRAMES_PER_SECOND) for t in seconds] + ([None] if len(seconds) % 2 else [])
    return list(zip(frames[::2], frames[1::2]))


def on_original_timeline(segment: Segment, speech_map: SpeechMap) -> Segment:
    """A segment (and its words, when it has them) timed on the speech-only audio -> on the recording's timeline."""
    words = getattr(segment, "words", None)
    if words:
        words = [replace(w, start=speech_map.original_time(w.start), end=speech_map.original_time(w.end, is_end=True))
                 for w in words]
        segment = replace(segment, words=words)
    return replace(segment, start=speech_map.original_time(segment.start),
                   end=speech_map.original_time(segment.end, is_end=True))


def _finish(tokenizer: Tokenizer, state: FileTranscript) -> Transcription:
    s = state.stats
    timings = dict(state.info["timings"])
    timings["encoder"] = s.encoder_seconds
    timings["decode"] = s.prefill_seconds + s.decode_seconds + s.draft_seconds + s.verify_seconds
    if state.word_seconds:
        timings["word_timestamps"] = state.word_seconds
    timings["total"] = time.perf_counter() - state.info["started"]
    tokens = state.tokens
    speech_map = state.info.get("speech_map")
    segments = state.segments if speech_map is None else [on_original_timeline(s, speech_map) for s in state.segments]
    return Transcription(
        text=tokenizer.decode(tokens).strip(), segments=segments, language=state.language, tokens=tokens,
        audio_seconds=state.info["audio_seconds"], stats=s, timings=timings, language_probs=state.language_probs,
        draft_mask=list(state.draft_mask), windows=state.windows,
        fallbacks=state.fallbacks)
