"""Transcripts to files: plain text, SRT and WebVTT subtitles, TSV, and JSON with every statistic.

Files are named after the input's stem (`talk.flac` -> `talk.srt`), as openai-whisper names them.
Each writer takes a `Transcription` and a text stream, so it can be tested without files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, TextIO

FORMATS = ("txt", "srt", "vtt", "tsv", "json")


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


def write_srt(result, file: TextIO) -> None:
    """SubRip: numbered cues from 1, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, a blank line after each."""
    for number, segment in enumerate(result.segments, start=1):
        start = format_timestamp(segment.start, decimal_marker=",")
        end = format_timestamp(segment.end, decimal_marker=",")
        print(f"{number}\n{start} --> {end}\n{_cue_text(segment.text)}\n", file=file)


def write_vtt(result, file: TextIO) -> None:
    """WebVTT: the `WEBVTT` header, then cues `HH:MM:SS.mmm --> HH:MM:SS.mmm`."""
    print("WEBVTT\n", file=file)
    for segment in result.segments:
        print(f"{format_timestamp(segment.start)} --> {format_timestamp(segment.end)}\n{_cue_text(segment.text)}\n",
              file=file)


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
                  formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """Write `result` as <output_dir>/<stem of audio_path>.<format> for each format; returns the paths."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stem = Path(audio_path).stem
    written = []
    for name in formats:
        path = folder / f"{stem}.{name}"
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            WRITERS[name](result, f)
        written.append(path)
    return written
