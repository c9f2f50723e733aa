"""Word-level timestamps from cross-attention, with openai-whisper's algorithm and heuristics.

For one window and the text it kept:
  1. one decoder pass over <|startoftranscript|> ... <|notimestamps|> text <|endoftext|> (no previous
     text, no timestamps), recording the pre-softmax cross-attention scores of the alignment heads
     (`alignment_heads`) and the probability of every text token;
  2. per head: softmax over the frames that hold audio, z-score over tokens, a width-7 median filter
     along time; then the mean over heads: a (tokens, frames) matrix of how much each token looks at
     each 20-ms encoder frame;
  3. `dtw` on its negation: the cheapest monotonic path, which gives each token the frame it starts at;
  4. tokens grouped into words (`Tokenizer.split_to_word_tokens`), a word spanning from its first
     token's frame to the next word's; overlong words at sentence ends shortened
     (`clamp_sentence_end_words`); punctuation merged into its neighbours (`merge_punctuations`);
  5. `place_words` hands the words to the window's segments and adjusts the first and last word of
     each against the segment's own timestamps (the long-form loop calls it).

The pass runs on the final tokens only, so greedy and speculative decoding give the same words and
times. docs/word-timestamps.md has the measured agreement with openai-whisper and the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .kv_cache import AudioKV
from .tokenizer import APPEND_PUNCTUATIONS, PREPEND_PUNCTUATIONS

SENTENCE_END_MARKS = ".。!！?？"
MEDIAN_FILTER_WIDTH = 7  # encoder frames (140 ms)
FRAMES_PER_SECOND = 50  # encoder frames: 3000 mel frames of 10 ms, halved by the stride-2 convolution
MAX_MEDIAN_DURATION = 0.7  # seconds: a window's median word duration is capped here
FRAMES_PER_MEL_SECOND = 100  # mel frames (10 ms): what `seek` counts
N_MEL_FRAMES = 3000  # mel frames in a 30-s window


@dataclass
class WordTiming:
    """A word while its times are being worked out (mutable: the heuristics move them)."""

    word: str
    tokens: list[int]
    start: float  # seconds
    end: float
    probability: float


@dataclass(frozen=True)
class Word:
    """A word of a segment, as in openai-whisper's `segments[i]["words"]`."""

    start: float  # seconds from the start of the recording
    end: float
    word: str  # with its leading space and any merged punctuation
    probability: float  # mean probability of its tokens in the alignment pass

    def as_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "word": self.word, "probability": self.probability}


@dataclass(frozen=True)
class WindowWords:
    """One window's words, times in seconds from the window's start, and its duration statistics."""

    words: list[WordTiming]
    median_duration: float
    max_duration: float


# --------------------------------------------------------------------------- pieces of the algorithm


def alignment_heads(model) -> list[tuple[int, int]]:
    """(layer, head) pairs whose cross-attention follows the speech: the checkpoint's list, else every
    head of the decoder's upper half (openai-whisper's default)."""
    if model.alignment_heads:
        return [(int(layer), int(head)) for layer, head in model.alignment_heads]
    dims = model.dims
    return [(layer, head) for layer in range(dims.n_text_layer // 2, dims.n_text_layer)
            for head in range(dims.n_text_head)]


def median_filter(x: Tensor, width: int) -> Tensor:
    """Median of each `width` neighbours along the last dimension, edges mirrored (reflect padding).
    Inputs no longer than width // 2 are returned as they are."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    rows = x.reshape(-1, 1, x.shape[-1])  # (rows, 1, F): F.pad's reflect mode wants a channel axis
    windows = F.pad(rows, (pad, pad), mode="reflect").unfold(-1, width, 1)  # (rows, 1, F, width)
    return windows.sort(dim=-1).values[..., pad].reshape(x.shape)


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic time warping: the cheapest path through `cost` (N, M) from (0, 0) to (N-1, M-1) moving one
    row, one column or both at a time. Returns its (row, column) indices, both of length N + M - 1 at most.

    Costs accumulate in float32 and ties prefer a move along the columns (time), then along the rows,
    exactly as openai-whisper's CPU version. Anti-diagonal i + j = d depends only on the two before it,
    so each is computed as one vector operation.
    """
    cost = np.asarray(cost, dtype=np.float64)
    n, m = cost.shape
    # Skewed layout: total[i + j, i] is the cheapest cost of reaching (i, j) in 1-based cell indices.
    total = np.full((n + m + 1, n + 1), np.inf, dtype=np.float32)
    step = np.full((n + m + 1, n + 1), -1, dtype=np.int8)  # 0: diagonal, 1: from the row above, 2: from the left
    total[0, 0] = 0
    for d in range(2, n + m + 1):
        lo, hi = max(1, d - m), min(n, d - 1)
        rows = np.arange(lo, hi + 1)
        diagonal, above, left = total[d - 2, lo - 1:hi], total[d - 1, lo - 1:hi], total[d - 1, lo:hi + 1]
        choice = np.where((diagonal < above) & (diagonal < left), 0,
                          np.where((above < diagonal) & (above < left), 1, 2))
        best = np.choose(choice, [diagonal, above, left])
        total[d, lo:hi + 1] = (cost[rows - 1, d - rows - 1] + best.astype(np.float64)).astype(np.float32)
        step[d, lo:hi + 1] = choice
    return _backtrace(step, n, m)


def _backtrace(step: np.ndarray, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Follow the recorded moves back from (n, m) to (0, 0) in `dtw`'s skewed layout."""
    i, j = n, m
    path = []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        move = 2 if i == 0 else 1 if j == 0 else step[i + j, i]
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    rows, columns = np.array(path[::-1], dtype=np.int64).reshape(-1, 2).T
    return rows, columns


def attention_pass(network, audio_kv: AudioKV, tokens: list[int], layers: list[int]
                   ) -> tuple[Tensor, dict[int, Tensor]]:
    """One decoder pass of `tokens` from position 0. Returns float logits (T, V) and, for each of `layers`,
    its cross-attention scores before the softmax (H, T, S), in fp32."""
    device = audio_kv.keys[0].device
    cache = network.new_cache(1, max_len=len(tokens))
    scores: dict[int, Tensor | None] = {layer: None for layer in layers}
    hidden = network.decoder(torch.tensor([tokens], device=device), audio_kv, cache, cross_scores=scores)
    logits = network.decoder.logits(hidden[0]).float()  # (T, V)
    return logits, {layer: s[0] for layer, s in scores.items()}


def token_frame_matrix(scores: dict[int, Tensor], heads: list[tuple[int, int]], n_frames: int,
                       width: int = MEDIAN_FILTER_WIDTH) -> Tensor:
    """How much each token attends each of the first `n_frames` encoder frames: (T, n_frames), the mean
    over the alignment heads of their weights, z-scored over tokens and median-filtered along time."""
    weights = torch.stack([scores[layer][head, :, :n_frames] for layer, head in heads]).float()  # (heads, T, F)
    weights = weights.softmax(dim=-1)
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    return median_filter((weights - mean) / std, width).mean(dim=0)


def token_start_times(matrix: Tensor) -> np.ndarray:
    """Per row of `matrix` (tokens, frames): the time in seconds at which the DTW path enters it."""
    rows, frames = dtw(-matrix.double().cpu().numpy())
    enters = np.diff(rows, prepend=-1).astype(bool)  # the path's first cell in each row
    return frames[enters] / FRAMES_PER_SECOND


def find_words(tokenizer, language: str, text_tokens: list[int], token_starts: np.ndarray,
               token_probs: list[float]) -> list[WordTiming]:
    """Words of `text_tokens`: each from its first token's start to the next word's start (the last to
    end-of-text's), with the mean probability of its tokens. token_starts: one per text token and one
    for end-of-text."""
    words, groups = tokenizer.split_to_word_tokens(text_tokens + [tokenizer.eot], language)
    if len(groups) <= 1:
        return []
    bounds = np.cumsum([0] + [len(g) for g in groups[:-1]])  # first token of every word, end-of-text's last
    return [WordTiming(word, group, float(token_starts[first]), float(token_starts[following]),
                       float(np.mean(token_probs[first:following])))
            for word, group, first, following in zip(words, groups, bounds[:-1], bounds[1:])]


def clamp_sentence_end_words(words: list[WordTiming]) -> tuple[float, float]:
    """Shorten words longer than twice the median that are, or follow, a sentence end (DTW tends to
    stretch them over the pause). Returns the median word duration (at most 0.7 s) and the longest
    allowed (twice that)."""
    durations = np.array([w.end - w.start for w in words])
    durations = durations[durations.nonzero()]
    median = min(MAX_MEDIAN_DURATION, float(np.median(durations))) if len(durations) else 0.0
    longest = median * 2
    if len(durations):
        for before, word in zip(words, words[1:]):
            if word.end - word.start > longest:
                # `in` on a string, as openai-whisper: "" and runs like "?？" count as marks too
                if word.word in SENTENCE_END_MARKS:
                    word.end = word.start + longest
                elif before.word in SENTENCE_END_MARKS:
                    word.start = word.end - longest
    return median, longest


def merge_punctuations(words: list[WordTiming], prepended: str, appended: str) -> None:
    """In place: a word that is only leading punctuation (after its space) joins the word after it, and
    one that is only trailing punctuation joins the word before it; the emptied words stay as "" with
    no tokens. Substring tests on the punctuation strings, as openai-whisper."""
    target = len(words) - 1
    for i in range(len(words) - 2, -1, -1):
        word = words[i]
        if word.word.startswith(" ") and word.word.strip() in prepended:
            _move_into(word, words[target], before=True)
        else:
            target = i
    target = 0
    for j in range(1, len(words)):
        word = words[j]
        if not words[target].word.endswith(" ") and word.word in appended:
            _move_into(word, words[target], before=False)
        else:
            target = j


def _move_into(source: WordTiming, target: WordTiming, before: bool) -> None:
    if before:
        target.word, target.tokens = source.word + target.word, source.tokens + target.tokens
    else:
        target.word, target.tokens = target.word + source.word, target.tokens + source.tokens
    source.word, source.tokens = "", []


# --------------------------------------------------------------------------- one window


def window_words(network, tokenizer, heads: list[tuple[int, int]], audio_kv: AudioKV, language: str, task: str,
                 segment_tokens: list[list[int]], n_mel_frames: int, prepend_punctuations: str = PREPEND_PUNCTUATIONS,
                 append_punctuations: str = APPEND_PUNCTUATIONS) -> WindowWords:
    """Words of one window's segments (their tokens, timestamps and all; `audio_kv` of this window alone,
    batch 1), timed in seconds from the window's start. n_mel_frames: 10-ms frames holding audio."""
    text_tokens = [t for tokens in segment_tokens for t in tokens if t < tokenizer.eot]
    words = _aligned_words(network, tokenizer, heads, audio_kv, language, task, text_tokens, n_mel_frames)
    median, longest = clamp_sentence_end_words(words)
    merge_punctuations(words, prepend_punctuations, append_punctuations)
    return WindowWords(words, median, longest)


def _aligned_words(network, tokenizer, heads, audio_kv, language, task, text_tokens, n_mel_frames):
    if not text_tokens:
        return []
    prompt = tokenizer.sot_sequence(language, task, timestamps=False)  # ends with <|notimestamps|>
    tokens = prompt + text_tokens + [tokenizer.eot]
    with torch.inference_mode():
        logits, scores = attention_pass(network, audio_kv, tokens, sorted({layer for layer, _ in heads}))
        first = len(prompt) - 1  # the position that predicts the first text token
        probs = logits[first:first + len(text_tokens), :tokenizer.eot].softmax(dim=-1)  # (N, text vocab)
        token_probs = probs[torch.arange(len(text_tokens)), torch.tensor(text_tokens)].tolist()
        matrix = token_frame_matrix(scores, heads, n_mel_frames // 2)[first:-1]  # (N + 1, F): text and end-of-text
    return find_words(tokenizer, language, text_tokens, token_start_times(matrix), token_probs)


def place_words(window: WindowWords, segments: list[tuple[float, float, list[int]]], time_offset: float,
                last_speech: float, eot: int) -> tuple[list[list[Word]], list[tuple[float, float]]]:
    """Hand a window's words to its segments, in order, by their text tokens, and reconcile both.

    segments: (start, end, tokens) each, times from the recording's start. Returns each segment's words
    (times from the recording's start, rounded to 10 ms) and each segment's (start, end) after adjustment
    (its first word's start and last word's end, unless a word ran far past the segment's own timestamp).
    last_speech: where the speech before this window ended (a first word far after it may be shortened).
    """
    words, bounds = [], []
    queue = iter(window.words)
    for start, end, tokens in segments:
        n_text = sum(1 for t in tokens if t < eot)
        placed, taken = [], 0
        while taken < n_text:
            timing = next(queue, None)
            if timing is None:
                break
            if timing.word:
                placed.append(WordTiming(timing.word, timing.tokens, round(time_offset + timing.start, 2),
                                         round(time_offset + timing.end, 2), timing.probability))
            taken += len(timing.tokens)
        if placed:
            _shorten_after_pause(placed, last_speech, window.median_duration, window.max_duration)
            start, end = _reconcile(placed, start, end, window.median_duration)
            last_speech = end
        words.append([Word(w.start, w.end, w.word, w.probability) for w in placed])
        bounds.append((start, end))
    return words, bounds


def last_word_end(words: list[list[Word]], bounds: list[tuple[float, float]]) -> float | None:
    """Where a window's speech ends: its last word's end, else its last segment's; None without segments."""
    ends = [segment_words[-1].end for segment_words in words if segment_words]
    return ends[-1] if ends else (bounds[-1][1] if bounds else None)


def _shorten_after_pause(words: list[WordTiming], last_speech: float, median: float, longest: float) -> None:
    """After a pause, DTW tends to stretch the first word (or two) back into it: cut them to the longest
    allowed duration."""
    first = words[0]
    long_first = first.end - first.start > longest
    long_pair = len(words) > 1 and words[1].end - first.start > longest * 2
    if not (first.end - last_speech > median * 4 and (long_first or long_pair)):
        return
    if len(words) > 1 and words[1].end - words[1].start > longest:
        # words[1].end / 2 is an absolute time halved: openai-whisper's rule, kept for agreement
        boundary = max(words[1].end / 2, words[1].end - longest)
        first.end = words[1].start = boundary
    first.start = max(0, first.end - longest)


def _reconcile(words: list[WordTiming], start: float, end: float, median: float) -> tuple[float, float]:
    """The segment's (start, end) from its words, except where a word overruns the segment's own
    timestamp by more than half a second: then the word is cut back to it instead."""
    first, last = words[0], words[-1]
    if start < first.end and start - 0.5 > first.start:
        first.start = max(0, min(first.end - median, start))
    else:
        start = first.start
    if end > last.start and end + 0.5 < last.end:
        last.end = max(last.start + median, end)
    else:
        end = last.end
    return start, end


# --------------------------------------------------------------------------- hallucinations around silence

PUNCTUATION = PREPEND_PUNCTUATIONS + APPEND_PUNCTUATIONS  # words that are only these do not count as speech
ANOMALY_WORDS = 8  # a segment is judged on its first 8 words


def word_anomaly_score(word: Word) -> float:
    """How unlike speech a word looks: improbable (< 0.15), too short (< 133 ms), or too long (> 2 s)."""
    duration = word.end - word.start
    score = 1.0 if word.probability < 0.15 else 0.0
    if duration < 0.133:
        score += (0.133 - duration) * 15
    if duration > 2.0:
        score += duration - 2.0
    return score


def is_anomaly(words: list[Word] | None) -> bool:
    """A segment whose first words mostly look unlike speech: a likely hallucination."""
    if not words:
        return False
    spoken = [w for w in words if w.word not in PUNCTUATION][:ANOMALY_WORDS]  # substring test, as openai-whisper
    score = sum(word_anomaly_score(w) for w in spoken)
    return score >= 3 or score + 0.01 >= len(spoken)


@dataclass(frozen=True)
class SilenceCut:
    """What `cut_hallucinations` decided for a window: segments kept, where the next window starts (mel
    frame), and whether the window is dropped whole (then nothing of it reaches the transcript or prompt)."""

    kept: int
    seek: int
    dropped: bool = False


def cut_hallucinations(words: list[list[Word]], bounds: list[tuple[float, float]], seek: int, seek_after: int,
                       window_frames: int, content_frames: int, last_speech: float, threshold: float,
                       ends_with_lone_timestamp: bool) -> SilenceCut:
    """openai-whisper's hallucination_silence_threshold: skip silences longer than `threshold` seconds
    around segments that look like hallucinations.

    words, bounds: the window's segments' words and (start, end), from `place_words`. seek: the window's
    first mel frame; seek_after: where the next window would start. A window whose last word leaves less
    than `threshold` of the 30-s window is passed whole; a suspect first segment after a long gap drops the
    window and seeks to its start; a suspect segment with silence (or suspects) on both sides is cut off
    with everything after it, and the next window starts at it (or past the audio, if that ends soon after).
    """
    offset = seek / FRAMES_PER_MEL_SECOND
    window_end = (seek + N_MEL_FRAMES) / FRAMES_PER_MEL_SECOND  # the full 30 s, as openai-whisper
    speech_end = last_word_end(words, bounds)
    if not ends_with_lone_timestamp and speech_end is not None and speech_end > offset:
        seek_after = round(speech_end * FRAMES_PER_MEL_SECOND) if window_end - speech_end > threshold \
            else seek + window_frames
    worded = [i for i, w in enumerate(words) if w]
    if worded and is_anomaly(words[worded[0]]):
        gap = bounds[worded[0]][0] - offset
        if gap > threshold:
            return SilenceCut(0, seek + round(gap * FRAMES_PER_MEL_SECOND), dropped=True)
    previous_end = last_speech
    for n, i in enumerate(worded):
        start, end = bounds[i]
        if is_anomaly(words[i]):
            following = worded[n + 1] if n + 1 < len(worded) else None
            next_start = words[following][0].start if following is not None \
                else offset + window_frames / FRAMES_PER_MEL_SECOND
            silence_before = start - previous_end > threshold or start < threshold or start - offset < 2.0
            silence_after = next_start - end > threshold or (following is not None and is_anomaly(words[following])) \
                or window_end - end < 2.0
            if silence_before and silence_after:
                resume = round(max(offset + 1, start) * FRAMES_PER_MEL_SECOND)
                if content_frames / FRAMES_PER_MEL_SECOND - end < threshold:
                    resume = content_frames
                return SilenceCut(i, resume)
        previous_end = end
    return SilenceCut(len(words), seek_after)
