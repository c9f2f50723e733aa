"""Long recordings: 30-s windows advanced by seek, the way openai-whisper's `transcribe` walks a file.

Per file, until `seek` passes the last frame of speech:
  1. cut the 3000-frame window at `seek` from the whole-file log-mel (`audio.mel_window`);
  2. decode it, prompted with the tokens of earlier windows (<|startofprev|> ...); while the
     result looks like a failure — too repetitive (zlib compression ratio of its text above
     2.4) or too unsure (average log-probability below -1) — decode it again at the next
     temperature, unless the window is silent (step 3);
  3. if the window is silent (no-speech probability above 0.6 *and* average log-probability
     not above -1), skip it whole; otherwise split its tokens into segments at pairs of
     adjacent timestamps and move `seek` to the end of the last complete segment (or past
     the whole window when its text ended with a lone timestamp: nothing more was said).

Several files advance together: each step decodes one window of every active file as one
row of a batch, so the files share the encoder and decoder passes. Each row has its own
prompt and language; rows are independent, so at temperature 0 a file's transcript does
not depend on its batch-mates.

The decisions (splitting, seeking, fallback, silence) are pure functions of token lists and
numbers. The model enters only through a `decode` callable, which tests replace with
scripted results.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from torch import Tensor

from .audio import FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES, SAMPLE_RATE, mel_window
from .decoding import DecodeStats, WindowResult
from .errors import SpecWhisperError
from .tokenizer import TIME_PRECISION
from .word_timing import WindowWords, Word, cut_hallucinations, last_word_end, place_words

SECONDS_PER_FRAME = HOP_LENGTH / SAMPLE_RATE  # 0.01 s per mel frame
FRAMES_PER_TIMESTAMP = round(TIME_PRECISION / SECONDS_PER_FRAME)  # 2: the encoder halves 3000 frames to 1500
PROMPT_RESET_TEMPERATURE = 0.5  # text sampled hotter than this is not fed to the next window


@dataclass(frozen=True)
class LongformOptions:
    """How windows are retried, skipped and chained (openai-whisper's `transcribe` defaults)."""

    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # tried in order while a window fails
    compression_ratio_threshold: float | None = 2.4  # above: a repetition loop, decode again
    logprob_threshold: float | None = -1.0  # average log-probability below: too unsure, decode again
    no_speech_threshold: float | None = 0.6  # <|nocaptions|> probability above (and unsure): silence
    condition_on_previous_text: bool = True  # prompt each window with the text before it
    max_prompt_tokens: int = 223  # previous tokens kept in a prompt: half the 448-token context, less one
    # With word timestamps: skip silences longer than this (seconds) around likely hallucinations (None: never)
    hallucination_silence_threshold: float | None = None
    carry_initial_prompt: bool = False  # every window's prompt starts with the initial prompt, not only the first


@dataclass(frozen=True)
class Segment:
    """A stretch of speech between two timestamps, with the statistics of the window decode it came from."""

    id: int
    seek: int  # mel frame (10 ms) where the window holding this segment started
    start: float  # seconds from the start of the recording
    end: float
    text: str  # as decoded: usually with a leading space
    tokens: list[int]  # text and timestamp tokens (timestamps relative to the window)
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[Word] | None = None  # with word timestamps (`specwhisper.word_timing`)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.words is None:
            del out["words"]
        return out


@dataclass(frozen=True)
class Piece:
    """A segment cut from one window's tokens; times in seconds from the window's start."""

    start: float
    end: float
    tokens: list[int]


class TextTokenizer(Protocol):
    timestamp_begin: int
    eot: int  # read only with word timestamps

    def decode(self, ids: Iterable[int]) -> str: ...


# (mel windows (B, n_mels, 3000), previous tokens per row, language per row (None: detect),
#  temperature, stats to add to, hints per row: tokens the window will likely decode first) -> a WindowResult per row
DecodeFn = Callable[[Tensor, list[list[int]], list["str | None"], float, DecodeStats, list[list[int]]],
                    list[WindowResult]]
# (a window's final result, the tokens of each of its complete segments, frames of audio in the window)
#  -> its words, timed from the window's start (word timestamps: `specwhisper.word_timing.window_words`)
AlignFn = Callable[[WindowResult, list[list[int]], int], WindowWords]


# --------------------------------------------------------------------------- pure decisions


def compression_ratio(text: str) -> float:
    """UTF-8 bytes of `text` over the bytes of their zlib compression: high for text stuck in a loop."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


def needs_fallback(avg_logprob: float, ratio: float, no_speech_prob: float, options: LongformOptions) -> bool:
    """Should this window be decoded again at the next temperature? Not if it will be skipped as silence."""
    if options.logprob_threshold is not None and avg_logprob < options.logprob_threshold and \
            options.no_speech_threshold is not None and no_speech_prob > options.no_speech_threshold:
        return False  # silence: low confidence is expected there, not a failure
    too_repetitive = options.compression_ratio_threshold is not None and ratio > options.compression_ratio_threshold
    too_unsure = options.logprob_threshold is not None and avg_logprob < options.logprob_threshold
    return too_repetitive or too_unsure


def is_silence(avg_logprob: float, no_speech_prob: float, options: LongformOptions) -> bool:
    """Skip the window: the model bets on no speech and is not confident about the text it wrote."""
    if options.no_speech_threshold is None or no_speech_prob <= options.no_speech_threshold:
        return False
    return options.logprob_threshold is None or avg_logprob <= options.logprob_threshold


def split_window(tokens: list[int], timestamp_begin: int, window_frames: int) -> tuple[list[Piece], int]:
    """Cut one window's tokens into segments. Returns them and how many frames `seek` moves on.

    In timestamp mode a window reads `<|t0|> text <|t1|><|t1|> text <|t2|> ...`: a pair of
    adjacent timestamps closes one segment and opens the next. After the last pair:
      - text then one timestamp (`... text <|t3|>`): the last segment is complete and nothing
        follows it in this window, so it is kept and seek moves past the whole window;
      - anything else (text cut off by the token budget, a bare opening timestamp): that tail
        is dropped, and seek moves to the end of the last complete segment, so the next
        window starts where the unfinished speech does.
    With no pair at all (no timestamps, or a single segment) the window is one segment that
    ends at its last timestamp if it has one after <|0.00|>, else at the window's end, and
    seek moves past the window. `window_frames` is the frames of speech in the window
    (3000, or fewer at the end of the file). Times are not clipped here.
    """
    is_time = [t >= timestamp_begin for t in tokens]
    window_seconds = window_frames * SECONDS_PER_FRAME
    cuts = [i for i in range(1, len(tokens)) if is_time[i - 1] and is_time[i]]
    if not cuts:
        times = [t - timestamp_begin for t in tokens if t >= timestamp_begin]
        end = times[-1] * TIME_PRECISION if times and times[-1] > 0 else window_seconds
        return [Piece(0.0, end, list(tokens))], window_frames

    ends_with_lone_timestamp = ends_with_text_then_timestamp(tokens, timestamp_begin)
    if ends_with_lone_timestamp:
        cuts.append(len(tokens))
    pieces = []
    begin = 0
    for cut in cuts:
        chunk = tokens[begin:cut]
        start = (chunk[0] - timestamp_begin) * TIME_PRECISION if is_time[begin] else 0.0
        pieces.append(Piece(start, (chunk[-1] - timestamp_begin) * TIME_PRECISION, list(chunk)))
        begin = cut
    if ends_with_lone_timestamp:
        return pieces, window_frames
    advance = (tokens[begin - 1] - timestamp_begin) * FRAMES_PER_TIMESTAMP
    # The timestamp rules make every complete segment end after <|0.00|>; a zero advance
    # would decode the same window forever, so treat it as "nothing usable here".
    return pieces, advance if advance > 0 else window_frames


def ends_with_text_then_timestamp(tokens: list[int], timestamp_begin: int) -> bool:
    """`... text <|t|>`: the window's last segment is complete and nothing was said after it."""
    return len(tokens) >= 2 and tokens[-2] < timestamp_begin <= tokens[-1]


def retimed_tail(tokens: list[int], n_kept: int, timestamp_begin: int, advance_frames: int) -> list[int]:
    """What a window decoded past its last complete segment (`tokens[n_kept:]`), with its timestamps moved
    to the next window, which starts `advance_frames` later, at that segment's end: the next window
    decodes the same speech again, so these are its likely first tokens (free drafts)."""
    shift = advance_frames // FRAMES_PER_TIMESTAMP
    return [max(t - shift, timestamp_begin) if t >= timestamp_begin else t for t in tokens[n_kept:]]


# --------------------------------------------------------------------------- one file's state


@dataclass(eq=False)
class FileTranscript:
    """One recording on its way through the windows: its features, where it is, what it said so far."""

    index: int  # position among the files of one run
    mel: Tensor | None  # (n_mels, content_frames + 3000) whole-file log-mel; released when done
    content_frames: int  # frames holding audio (10 ms each)
    language: str | None = None  # None until detected on the first window
    initial_prompt: list[int] = field(default_factory=list)  # text tokens given by the caller
    seek: int = 0  # first frame of the next window
    history: list[int] = field(default_factory=list)  # initial prompt, then every kept segment's tokens
    draft_mask: list[bool] = field(default_factory=list)  # per generated token in `history`: drafted?
    prompt_start: int = 0  # history before this index is never fed as a prompt again
    segments: list[Segment] = field(default_factory=list)
    language_probs: dict[str, float] | None = None
    stats: DecodeStats = field(default_factory=DecodeStats)  # of every decode call this file took part in
    windows: int = 0  # windows decoded (fallback retries not counted)
    fallbacks: int = 0  # re-decodes at a higher temperature
    info: dict[str, Any] = field(default_factory=dict)  # caller's bookkeeping (timings, duration)
    hint: list[int] = field(default_factory=list)  # the last window's re-timed unfinished tail (`retimed_tail`)
    clips: list[tuple[int, int]] | None = None  # (start, end) frames to transcribe, in order; None: all
    last_speech: float = 0.0  # word timestamps: seconds where the speech so far ended
    word_seconds: float = 0.0  # word timestamps: time spent aligning words

    def __post_init__(self):
        self.history = list(self.initial_prompt) + self.history
        clips = self.clips or [(0, self.content_frames)]
        self.clips = [(start, min(end, self.content_frames)) for start, end in clips if start < min(end, self.content_frames)]

    def _clip_end(self) -> int:
        """Move seek into the first clip not yet done (as openai-whisper's clip_timestamps); that clip's end."""
        for start, end in self.clips:
            if self.seek < end:
                self.seek = max(self.seek, start)
                return end
        return self.seek

    @property
    def done(self) -> bool:
        return all(self.seek >= end for _, end in self.clips)

    @property
    def tokens(self) -> list[int]:
        """Generated tokens of every kept segment (text and timestamps), in order."""
        return self.history[len(self.initial_prompt):]

    def window(self) -> tuple[Tensor, int]:
        """The next window's features (n_mels, 3000) and how many of its frames hold audio."""
        clip_end = self._clip_end()
        frames = min(clip_end - self.seek, N_FRAMES)
        return mel_window(self.mel, clip_end, self.seek), frames

    def prompt(self, options: LongformOptions) -> list[int]:
        """Tokens to condition the next window on (empty after a reset, but for a carried initial prompt)."""
        if not options.max_prompt_tokens:
            return []
        if not (options.carry_initial_prompt and self.initial_prompt):
            return self.history[self.prompt_start:][-options.max_prompt_tokens:]
        carried = self.initial_prompt[-options.max_prompt_tokens:]
        room = options.max_prompt_tokens - len(carried)
        since = self.history[max(self.prompt_start, len(self.initial_prompt)):]
        return carried + (since[-room:] if room > 0 else [])

    def add_window(self, result: WindowResult, temperature: float, ratio: float, window_frames: int,
                   tokenizer: TextTokenizer, options: LongformOptions, align: AlignFn | None = None) -> None:
        """Take in the final decode of the window at `seek`: keep its segments and move seek on.
        align: given, the segments get their words (and their times become the words')."""
        self.windows += 1
        self.hint = []
        if self.language is None:
            self.language, self.language_probs = result.language, result.language_probs
        if is_silence(result.avg_logprob, result.no_speech_prob, options):
            self.seek += window_frames
            return
        offset = self.seek * SECONDS_PER_FRAME
        window_seconds = window_frames * SECONDS_PER_FRAME
        pieces, advance = split_window(result.tokens, tokenizer.timestamp_begin, window_frames)
        # The model may put a timestamp past the end of the audio in the last window.
        bounds = [(round(offset + min(p.start, window_seconds), 3), round(offset + min(p.end, window_seconds), 3))
                  for p in pieces]
        advance = min(advance, window_frames)
        words = None
        if align is not None:
            words, bounds, advance = self._time_words(align, result, pieces, bounds, window_frames, tokenizer, options,
                                                      advance)
            if words is None:  # dropped whole: a likely hallucination after a long silence
                self.seek += advance
                return
            pieces = pieces[:len(words)]  # a likely hallucination cut off with what follows it
        mask = result.draft_mask or [False] * len(result.tokens)
        position = 0
        for index, (piece, (start, end)) in enumerate(zip(pieces, bounds)):
            piece_mask = mask[position:position + len(piece.tokens)]
            position += len(piece.tokens)
            text = tokenizer.decode(piece.tokens)
            if (piece.start == piece.end if words is None else start == end) or not text.strip():
                continue  # an instant, or no words: nothing to show and nothing to prompt with
            self.segments.append(Segment(
                id=len(self.segments), seek=self.seek, start=start, end=end,
                text=text, tokens=piece.tokens, temperature=temperature, avg_logprob=result.avg_logprob,
                compression_ratio=ratio, no_speech_prob=result.no_speech_prob,
                words=None if words is None else words[index]))
            self.history.extend(piece.tokens)
            self.draft_mask.extend(piece_mask)
        if advance < window_frames:
            self.hint = retimed_tail(result.tokens, position, tokenizer.timestamp_begin, advance)
        self.seek += advance
        if not options.condition_on_previous_text or temperature > PROMPT_RESET_TEMPERATURE:
            self.prompt_start = len(self.history)

    def _time_words(self, align: AlignFn, result: WindowResult, pieces: list[Piece], bounds: list[tuple[float, float]],
                    window_frames: int, tokenizer: TextTokenizer, options: LongformOptions, advance: int):
        """The words of the pieces, their (start, end) moved to their words, and seek's advance: to the last
        word's end unless the text ended with a lone timestamp (openai-whisper's rules, which may seek past the
        window). With options.hallucination_silence_threshold, likely hallucinations are cut off: fewer
        pieces' words come back, or None when the window is dropped whole."""
        started = time.perf_counter()
        timed = align(result, [p.tokens for p in pieces], window_frames)
        offset = self.seek * SECONDS_PER_FRAME
        words, bounds = place_words(timed, [(start, end, p.tokens) for (start, end), p in zip(bounds, pieces)],
                                    offset, self.last_speech, tokenizer.eot)
        self.word_seconds += time.perf_counter() - started
        lone_timestamp = ends_with_text_then_timestamp(result.tokens, tokenizer.timestamp_begin)
        speech_end = last_word_end(words, bounds)
        if not lone_timestamp and speech_end is not None and speech_end > offset:
            advance = max(round(speech_end * FRAMES_PER_SECOND) - self.seek, 1)
        if options.hallucination_silence_threshold is not None:
            cut = cut_hallucinations(words, bounds, self.seek, self.seek + advance, window_frames, self.content_frames,
                                     self.last_speech, options.hallucination_silence_threshold, lone_timestamp)
            if cut.dropped:
                return None, [], cut.seek - self.seek
            words, bounds, advance = words[:cut.kept], bounds[:cut.kept], max(cut.seek - self.seek, 1)
        speech_end = last_word_end(words, bounds)
        if speech_end is not None:
            self.last_speech = speech_end
        return words, bounds, advance


# --------------------------------------------------------------------------- the loop


def decode_with_fallback(decode: DecodeFn, files: list[FileTranscript], mels: Tensor, tokenizer: TextTokenizer,
                         options: LongformOptions, run_stats: DecodeStats | None = None
                         ) -> list[tuple[WindowResult, float, float]]:
    """Decode one window per file (rows of `mels`), retrying failed rows at the next temperature.

    Returns per row (final result, its temperature, its compression ratio). Only the rows that
    failed are decoded again, as a smaller batch. Hints: each file's re-timed tail first, then the
    failed attempt's tokens (what the retry will largely decode again).
    """
    prompts = [f.prompt(options) for f in files]
    hints = [f.hint for f in files]
    languages = [f.language for f in files]
    final: list[tuple[WindowResult, float, float] | None] = [None] * len(files)
    rows = list(range(len(files)))
    for attempt, temperature in enumerate(options.temperatures):
        stats = DecodeStats()
        picked = torch.tensor(rows) if len(rows) < len(files) else None
        results = decode(mels if picked is None else mels[picked], [prompts[r] for r in rows],
                         [languages[r] for r in rows], temperature, stats, [hints[r] for r in rows])
        for r in rows:
            files[r].stats.add(stats)
            files[r].fallbacks += attempt > 0
        if run_stats is not None:
            run_stats.add(stats)
        failed = []
        for r, result in zip(rows, results):
            ratio = compression_ratio(tokenizer.decode(result.tokens).strip())
            final[r] = (result, temperature, ratio)
            languages[r] = languages[r] or result.language  # detected once, kept for the retries
            hints[r] = result.tokens
            if needs_fallback(result.avg_logprob, ratio, result.no_speech_prob, options):
                failed.append(r)
        rows = failed
        if not rows:
            break
    return final


def step(files: list[FileTranscript], decode: DecodeFn, tokenizer: TextTokenizer, options: LongformOptions,
         run_stats: DecodeStats | None = None, align: AlignFn | None = None) -> None:
    """Decode the window at every file's seek as one batch, and move each file on (with word timestamps
    when `align` is given)."""
    windows = [f.window() for f in files]
    mels = torch.stack([w for w, _ in windows])  # (B, n_mels, 3000)
    outcomes = decode_with_fallback(decode, files, mels, tokenizer, options, run_stats)
    for f, (_, frames), (result, temperature, ratio) in zip(files, windows, outcomes):
        f.add_window(result, temperature, ratio, frames, tokenizer, options, align)


class Progress(Protocol):
    """What the loop needs of a progress bar (tqdm has it): a total that may grow, and updates."""

    total: float

    def update(self, n: float) -> Any: ...

    def refresh(self) -> Any: ...


def run_files(sources: Iterable, open_file: Callable[[int, Any], FileTranscript], decode: DecodeFn,
              tokenizer: TextTokenizer, options: LongformOptions, batch_size: int = 1,
              progress: Progress | None = None, run_stats: DecodeStats | None = None, align: AlignFn | None = None
              ) -> Iterator[tuple[int, FileTranscript | SpecWhisperError]]:
    """Transcribe many files, `batch_size` windows at a time; yields (index, result) in input order.
    align: given, every segment gets its words (word timestamps).

    A file is opened (audio loaded, log-mel computed) only when a batch slot frees up, and its
    features are released as soon as it is done, so memory holds at most `batch_size` files'
    features however many files there are. A file that cannot be opened yields its
    SpecWhisperError in its place, and the others go on.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    pending = iter(enumerate(sources))
    active: list[FileTranscript] = []
    finished: dict[int, FileTranscript | SpecWhisperError] = {}
    next_out = 0
    exhausted = False
    while True:
        while len(active) < batch_size and not exhausted:
            item = next(pending, None)
            if item is None:
                exhausted = True
                break
            index, source = item
            try:
                state = open_file(index, source)
            except SpecWhisperError as err:
                finished[index] = err
                continue
            if progress is not None:
                progress.total += state.content_frames * SECONDS_PER_FRAME
                progress.refresh()
            if state.done:  # shorter than one 10-ms frame: nothing to decode
                state.mel = None
                finished[index] = state
            else:
                active.append(state)
        while next_out in finished:
            yield next_out, finished.pop(next_out)
            next_out += 1
        if not active:
            if exhausted:
                return
            continue
        before = [f.seek for f in active]
        step(active, decode, tokenizer, options, run_stats, align)
        for f, seek in zip(active, before):
            if progress is not None:
                progress.update((min(f.seek, f.content_frames) - seek) * SECONDS_PER_FRAME)
            if f.done:
                f.mel = None
                finished[f.index] = f
        active = [f for f in active if not f.done]
