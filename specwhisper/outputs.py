"""Transcripts to files: plain text, SRT and WebVTT subtitles, TSV, and JSON with every statistic.

Files are named after the input's stem (`talk.flac` -> `talk.srt`), as openai-whisper names them.
Each writer takes a `Transcription` and a text stream, so it can be tested without files.
With word timestamps, subtitle cues are built from the words as openai-whisper's writers build them
(`SubtitleOptions`: lines cut by width, count or words; the spoken word underlined).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

FORMATS = ("txt", "srt", "vtt", "tsv", "json")
LONG_PAUSE = 3.0  # seconds between words that start a new cue when segments are not kept as cues


@dataclass(frozen=True)
class SubtitleOptions:
    """How srt/vtt cues are cut from word timestamps (openai-whisper's writer options; no effect without words)."""

    max_line_width: int | None = None  # characters in a line before it breaks; with it, cues ignore segments
    max_line_count: int | None = None  # lines in a cue (only with max_line_width)
    max_words_per_line: int | None = None  # words in a cue (no effect with max_line_width)
    highlight_words: bool = False  # a cue per word, that word underlined with <u>...</u>


def format_timestamp(seconds: float, decimal_marker: str = ".", always_include_hours: bool = True) -> str:
    """Seconds as HH:MM:SS.mmm (SRT wants ',' as the marker; WebVTT '.'); rounded to the millisecond."""
    if seconds < 0:
        raise ValueError(f"timestamps are never negative, got {seconds}")
    total_ms = round(seconds * 1000)
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole_seconds, ms = divmod(rest, 1000)
    clock = f"{minutes:02d}:{whole_seconds:02d}{decimal_marker}{ms:03d}"
    return f"{hours:02d}:{clock}" if always_include_hours or hours else clock


def _cue_text(text: str) -> str:
    # "-->" inside a cue would read as a timing line; a blank line would end the cue early.
    return " ".join(text.strip().replace("-->", "->").split())


def write_txt(result, file: TextIO) -> None:
    """One segment per line."""
    for segment in result.segments:
        print(segment.text.strip(), file=file)


def subtitle_cues(segments, options: SubtitleOptions | None = None) -> list[tuple[float, float, str]]:
    """(start, end, text) of every cue: one per segment, or, when the segments have words, cut from the words."""
    options = options or SubtitleOptions()
    if not segments or getattr(segments[0], "words", None) is None:
        return [(s.start, s.end, _cue_text(s.text)) for s in segments]
    cues = []
    for cue in word_cues(segments, options):
        cues.extend(_highlighted(cue) if options.highlight_words else
                    [(cue[0][0], cue[-1][1], "".join(text for _, _, text in cue))])
    return [(start, end, text.replace("-->", "->")) for start, end, text in cues]


def word_cues(segments, options: SubtitleOptions) -> list[list[tuple[float, float, str]]]:
    """The words of each cue as (start, end, text as shown): a line break is a "\n" before a word's text.

    openai-whisper's rules: a word goes on the current line while the line stays within max_line_width;
    otherwise it starts a new line, or a new cue once the cue has max_line_count lines. Without both
    max_line_width and max_line_count every segment (or every max_words_per_line words of one) is a cue;
    with both, cues ignore segments and also break at pauses over LONG_PAUSE seconds.
    """
    keep_segments = options.max_line_count is None or options.max_line_width is None
    width = options.max_line_width or 1000
    per_cue = options.max_words_per_line or 1000
    first_word = next((w for s in segments for w in s.words), None)
    last_start = first_word.start if first_word is not None else segments[0].start
    cues, cue, line_length, line_count = [], [], 0, 1
    for segment in segments:
        for chunk in range(0, len(segment.words), per_cue):
            for i, word in enumerate(segment.words[chunk:chunk + per_cue]):
                text = word.word
                long_pause = not keep_segments and word.start - last_start > LONG_PAUSE
                new_chunk = i == 0 and len(cue) > 0 and keep_segments
                if line_length > 0 and line_length + len(text) <= width and not long_pause and not new_chunk:
                    line_length += len(text)
                else:
                    text = text.strip()
                    full = options.max_line_count is not None and (long_pause or line_count >= options.max_line_count)
                    if (len(cue) > 0 and full) or new_chunk:
                        cues.append(cue)
                        cue, line_count = [], 1
                    elif line_length > 0:
                        line_count += 1
                        text = "\n" + text
                    line_length = len(text.strip())
                cue.append((word.start, word.end, text))
                last_start = word.start
    if cue:
        cues.append(cue)
    return cues


def _highlighted(cue: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """One cue per word with that word underlined, and the plain cue over any gap between words."""
    texts = [text for _, _, text in cue]
    plain = "".join(texts)
    out = []
    last = cue[0][0]
    for i, (start, end, _) in enumerate(cue):
        if round(last * 1000) != round(start * 1000):  # a gap that shows at millisecond resolution
            out.append((last, start, plain))
        out.append((start, end, "".join(_underline(t) if j == i else t for j, t in enumerate(texts))))
        last = end
    return out


def _underline(text: str) -> str:
    word = text.lstrip()
    return f"{text[:len(text) - len(word)]}<u>{word}</u>"


def write_srt(result, file: TextIO, options: SubtitleOptions | None = None) -> None:
    """SubRip: numbered cues from 1, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, a blank line after each."""
    for number, (start, end, text) in enumerate(subtitle_cues(result.segments, options), start=1):
        start, end = format_timestamp(start, decimal_marker=","), format_timestamp(end, decimal_marker=",")
        print(f"{number}\n{start} --> {end}\n{text}\n", file=file)


def write_vtt(result, file: TextIO, options: SubtitleOptions | None = None) -> None:
    """WebVTT: the `WEBVTT` header, then cues `HH:MM:SS.mmm --> HH:MM:SS.mmm`."""
    print("WEBVTT\n", file=file)
    for start, end, text in subtitle_cues(result.segments, options):
        print(f"{format_timestamp(start)} --> {format_timestamp(end)}\n{text}\n", file=file)


def write_tsv(result, file: TextIO) -> None:
    """`start`, `end` (integer milliseconds) and `text` columns, tab-separated, with a header row."""
    print("start\tend\ttext", file=file)
    for segment in result.segments:
        text = " ".join(segment.text.strip().split())  # tabs and newlines would break the columns
        print(f"{round(segment.start * 1000)}\t{round(segment.end * 1000)}\t{text}", file=file)


def write_json(result, file: TextIO) -> None:
    """Everything: text, language, segments with their statistics, tokens, speculative statistics, timings."""
    json.dump(result.as_dict(), file, ensure_ascii=False, indent=1)
    file.write("\n")


WRITERS: dict[str, Callable] = {"txt": write_txt, "srt": write_srt, "vtt": write_vtt, "tsv": write_tsv,
                                "json": write_json}


def output_formats(choice: str) -> tuple[str, ...]:
    """'all' or one format name -> the formats to write."""
    if choice == "all":
        return FORMATS
    if choice not in WRITERS:
        raise ValueError(f"unknown output format {choice!r}; choose one of {', '.join(FORMATS)} or all")
    return (choice,)


def write_outputs(result, audio_path: str | os.PathLike, output_dir: str | os.PathLike,
                  formats: tuple[str, ...] = FORMATS, subtitles: SubtitleOptions | None = None) -> list[Path]:
    """Write `result` as <output_dir>/<stem of audio_path>.<format> for each format; returns the paths.
    subtitles: how srt and vtt cues are cut from word timestamps."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stem = Path(audio_path).stem
    written = []
    for name in formats:
        path = folder / f"{stem}.{name}"
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            if name in ("srt", "vtt"):
                WRITERS[name](result, f, subtitles)
            else:
                WRITERS[name](result, f)
        written.append(path)
    return written
