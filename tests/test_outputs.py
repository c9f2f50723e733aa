"""Output writers: each format parsed back by a small strict reader written here, not trusted by eye."""

from __future__ import annotations

import io
import json
import re

import pytest

from specwhisper.decoding import DecodeStats
from specwhisper.longform import Segment
from specwhisper.outputs import FORMATS, format_timestamp, output_formats, write_outputs, WRITERS
from specwhisper.transcription import Transcription

SRT_TIME = r"(\d{2}):([0-5]\d):([0-5]\d),(\d{3})"
VTT_TIME = r"(\d{2}):([0-5]\d):([0-5]\d)\.(\d{3})"


def make_result() -> Transcription:
    texts = [(0.0, 1.0, " Hello there."), (1.0, 2.5, " A --> arrow\nand\ta tab."), (61.5, 65.02, " One minute in."),
             (3725.123, 3729.9996, " Over an hour, ünïcödé.")]
    segments = [Segment(id=i, seek=0, start=start, end=end, text=text, tokens=[1, 2, 3], temperature=0.0,
                        avg_logprob=-0.25, compression_ratio=1.2, no_speech_prob=0.01)
                for i, (start, end, text) in enumerate(texts)]
    stats = DecodeStats(generated_tokens=12, main_passes=5, drafted=10, accepted=8)
    return Transcription(text="".join(s.text for s in segments).strip(), segments=segments, language="en",
                         tokens=[1, 2, 3] * 4, audio_seconds=3730.0, stats=stats, timings={"total": 1.5},
                         windows=125, fallbacks=1)


def render(name: str, result=None) -> str:
    f = io.StringIO()
    WRITERS[name](result or make_result(), f)
    return f.getvalue()


def seconds(match: re.Match, first: int) -> float:
    h, m, s, ms = (int(match.group(first + i)) for i in range(4))
    return h * 3600 + m * 60 + s + ms / 1000


def parse_cues(text: str, time_pattern: str, numbered: bool) -> list[tuple[float, float, str]]:
    """Cues of an SRT (numbered) or the body of a WebVTT file; fails on anything malformed."""
    assert text.endswith("\n\n"), "every cue ends with a blank line"
    cues = []
    for number, block in enumerate(text.strip("\n").split("\n\n"), start=1):
        lines = block.split("\n")
        if numbered:
            assert lines.pop(0) == str(number), f"cue {number} is misnumbered"
        match = re.fullmatch(f"{time_pattern} --> {time_pattern}", lines[0])
        assert match, f"bad timing line {lines[0]!r}"
        assert len(lines) == 2 and lines[1].strip() and "-->" not in lines[1], f"bad cue text {lines[1:]!r}"
        cues.append((seconds(match, 1), seconds(match, 5), lines[1]))
    return cues


def check_monotonic(cues):
    for start, end, _ in cues:
        assert start <= end
    starts = [c[0] for c in cues]
    assert starts == sorted(starts)
    assert all(a[1] <= b[0] for a, b in zip(cues, cues[1:]))


def test_srt_parses_back():
    cues = parse_cues(render("srt"), SRT_TIME, numbered=True)
    check_monotonic(cues)
    assert cues[0] == (0.0, 1.0, "Hello there.")
    assert cues[1][2] == "A -> arrow and a tab."
    assert cues[3][:2] == (3725.123, 3730.0)  # rounded to the millisecond, carrying into the seconds
    assert render("srt").splitlines()[1] == "00:00:00,000 --> 00:00:01,000"


def test_vtt_parses_back():
    text = render("vtt")
    assert text.startswith("WEBVTT\n\n")
    cues = parse_cues(text[len("WEBVTT\n\n"):], VTT_TIME, numbered=False)
    check_monotonic(cues)
    assert [c[:2] for c in cues] == [(0.0, 1.0), (1.0, 2.5), (61.5, 65.02), (3725.123, 3730.0)]
    assert cues[3][2] == "Over an hour, ünïcödé."


def test_txt_tsv_json():
    assert render("txt").splitlines()[0] == "Hello there."
    rows = [line.split("\t") for line in render("tsv").splitlines()]
    assert rows[0] == ["start", "end", "text"]
    assert all(len(r) == 3 for r in rows)
    assert rows[1:3] == [["0", "1000", "Hello there."], ["1000", "2500", "A --> arrow and a tab."]]
    data = json.loads(render("json"))
    assert data["language"] == "en" and data["windows"] == 125
    assert data["segments"][2]["start"] == 61.5 and data["segments"][2]["avg_logprob"] == -0.25
    assert set(data["segments"][0]) >= {"start", "end", "text", "tokens", "temperature", "avg_logprob",
                                        "compression_ratio", "no_speech_prob"}
    assert data["stats"]["acceptance_rate"] == 0.8 and data["stats"]["tokens_per_main_pass"] == 12 / 5
    assert data["tokens"] == [1, 2, 3] * 4


def test_empty_transcript_writes_valid_empty_files():
    empty = Transcription(text="", segments=[], language="en", tokens=[], audio_seconds=5.0, stats=DecodeStats())
    assert render("srt", empty) == ""
    assert render("vtt", empty) == "WEBVTT\n\n"
    assert render("tsv", empty) == "start\tend\ttext\n"
    assert json.loads(render("json", empty))["segments"] == []


@pytest.mark.parametrize("value, marker, expected", [
    (0.0, ",", "00:00:00,000"), (59.9996, ".", "00:01:00.000"), (3599.9999, ",", "01:00:00,000"),
    (36000 + 0.5, ".", "10:00:00.500"), (1.0004, ".", "00:00:01.000"), (1.0006, ".", "00:00:01.001"),
])
def test_format_timestamp(value, marker, expected):
    assert format_timestamp(value, decimal_marker=marker) == expected


def test_format_timestamp_rejects_negative_and_may_drop_hours():
    with pytest.raises(ValueError):
        format_timestamp(-0.5)
    assert format_timestamp(61.25, always_include_hours=False) == "01:01.250"


def test_write_outputs_names_files_after_the_input_stem(tmp_path):
    written = write_outputs(make_result(), "/some/where/talk.en.flac", tmp_path / "out", output_formats("all"))
    assert [p.name for p in written] == [f"talk.en.{name}" for name in FORMATS]
    assert all(p.read_text(encoding="utf-8") for p in written)
    assert output_formats("srt") == ("srt",)
    with pytest.raises(ValueError, match="unknown output format"):
        output_formats("docx")
