"""Word timestamps: the pieces against brute force and hand-worked cases, then base on the dev clips
against openai-whisper's words (tests/data/word_timing_base_dev.json, made by
scripts/make_word_timing_reference.py), speculative against greedy, subtitles and the CLI."""

from __future__ import annotations

import io
import itertools
import json
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from specwhisper import cli
from specwhisper.audio import load_audio
from specwhisper.decoding import DecodeStats
from specwhisper.longform import Segment
from specwhisper.outputs import SubtitleOptions, subtitle_cues, write_srt, write_vtt
from specwhisper.word_timing import (SilenceCut, WindowWords, Word, WordTiming, clamp_sentence_end_words,
                                     cut_hallucinations, dtw, is_anomaly, median_filter, merge_punctuations,
                                     place_words, word_anomaly_score)

from conftest import read_manifest

REFERENCE = Path(__file__).parent / "data" / "word_timing_base_dev.json"
TOLERANCE = 0.02  # seconds: one encoder frame


# --------------------------------------------------------------------------- DTW and the median filter


def brute_force_paths(n: int, m: int):
    """Every monotonic path from (0, 0) to (n-1, m-1) with steps (1, 0), (0, 1), (1, 1)."""
    def extend(path):
        i, j = path[-1]
        if (i, j) == (n - 1, m - 1):
            yield path
            return
        for di, dj in ((1, 1), (1, 0), (0, 1)):
            if i + di < n and j + dj < m:
                yield from extend(path + [(i + di, j + dj)])
    yield from extend([(0, 0)])


@pytest.mark.parametrize("shape", [(1, 1), (1, 4), (4, 1), (2, 3), (3, 5), (4, 4), (5, 3)])
def test_dtw_finds_a_cheapest_monotonic_path(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        cost = rng.standard_normal(shape)
        rows, columns = dtw(cost)
        path = list(zip(rows.tolist(), columns.tolist()))
        assert path in list(brute_force_paths(*shape))
        best = min(sum(cost[i, j] for i, j in p) for p in brute_force_paths(*shape))
        assert sum(cost[i, j] for i, j in path) == pytest.approx(best, abs=1e-5)  # float32 accumulation


def test_dtw_breaks_ties_towards_time_then_tokens():
    # All paths cost 0: on a tie the move is along time, so read backwards from the end the path goes left
    # until the first column, and forwards the tokens advance at once: (0,0) (1,0) (1,1) (1,2).
    rows, columns = dtw(np.zeros((2, 3)))
    assert list(zip(rows.tolist(), columns.tolist())) == [(0, 0), (1, 0), (1, 1), (1, 2)]
    # A cheap diagonal wins over equal-cost detours.
    rows, columns = dtw(np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]))
    assert rows.tolist() == [0, 1, 2] and columns.tolist() == [0, 1, 2]
    # Tokens that hold a peak of attention each: row 0 on frames 0-1, row 1 on frames 2-4.
    attention = np.array([[1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0]])
    rows, columns = dtw(1 - attention)
    assert rows.tolist() == [0, 0, 1, 1, 1] and columns.tolist() == [0, 1, 2, 3, 4]
    # Negated, a zero-cost cell is as good as none, and the tie goes to the extra vertical step.
    rows, columns = dtw(-attention)
    assert rows.tolist() == [0, 0, 1, 1, 1, 1] and columns.tolist() == [0, 1, 1, 2, 3, 4]


def brute_median(x: np.ndarray, width: int) -> np.ndarray:
    pad = width // 2
    mirrored = np.concatenate([x[..., 1:pad + 1][..., ::-1], x, x[..., -pad - 1:-1][..., ::-1]], axis=-1)
    return np.stack([np.median(mirrored[..., i:i + width], axis=-1) for i in range(x.shape[-1])], axis=-1)


@pytest.mark.parametrize("shape", [(11,), (3, 4), (2, 5, 30), (4, 8)])
def test_median_filter_matches_a_reflecting_window_median(shape):
    x = torch.randn(shape)
    expected = brute_median(x.numpy().astype(np.float64), 7)
    assert np.allclose(median_filter(x, 7).numpy(), expected)
    assert torch.equal(median_filter(x[..., :3], 7), x[..., :3])  # too short to filter: unchanged


def test_median_filter_by_hand():
    x = torch.tensor([5.0, 1.0, 9.0, 2.0, 7.0])
    # width 3, mirrored edges: [1 5 1 9 2 7 2] -> medians of each 3
    assert median_filter(x, 3).tolist() == [1.0, 5.0, 2.0, 7.0, 2.0]


# --------------------------------------------------------------------------- words


def timing(word, start, end, tokens=None, probability=0.9):
    return WordTiming(word, tokens if tokens is not None else [len(word)], start, end, probability)


def test_punctuation_joins_its_neighbours():
    words = [timing(' "', 0, 1), timing("Hello", 1, 2), timing(",", 2, 3), timing(" world", 3, 4), timing(".", 4, 5),
             timing('"', 5, 6), timing(" (", 6, 7), timing(" yes", 7, 8), timing(")", 8, 9)]
    merge_punctuations(words, "\"'“¿([{-", "\"'.。,，!！?？:：”)]}、")
    assert [w.word for w in words] == ["", ' "Hello,', "", ' world."', "", "", "", " ( yes)", ""]
    assert words[1].tokens == [2, 5, 1] and words[3].start == 3 and words[7].start == 7


def test_long_words_at_sentence_ends_are_clamped():
    words = [timing(" a", 0.0, 0.2), timing(" b", 0.2, 0.4), timing(".", 0.4, 2.0), timing(" c", 2.0, 4.0),
             timing(" d", 4.0, 4.2)]
    median, longest = clamp_sentence_end_words(words)
    assert median == pytest.approx(0.2) and longest == pytest.approx(0.4)
    assert (words[2].start, words[2].end) == (0.4, pytest.approx(0.8))  # a mark: its end comes in
    assert (words[3].start, words[3].end) == (pytest.approx(3.6), 4.0)  # after a mark: its start moves up


def test_words_go_to_their_segments_and_set_their_bounds():
    window = WindowWords([timing(" one", 0.0, 0.4, [1]), timing(" two", 0.4, 0.8, [2, 3]),
                          timing(" three", 1.0, 1.5, [4])], median_duration=0.4, max_duration=0.8)
    segments = [(10.0, 10.9, [100, 1, 2, 3, 101]), (10.9, 11.6, [101, 4, 102])]  # 100+: timestamps (eot = 50)
    words, bounds = place_words(window, segments, time_offset=10.0, last_speech=9.9, eot=50)
    assert [[w.word for w in ws] for ws in words] == [[" one", " two"], [" three"]]
    assert words[1][0] == Word(11.0, 11.5, " three", 0.9)
    assert bounds == [(10.0, 10.8), (11.0, 11.5)]


def test_a_word_far_past_its_segment_end_is_cut_back():
    window = WindowWords([timing(" one", 0.0, 0.3), timing(" two", 0.3, 2.5)], median_duration=0.3, max_duration=0.6)
    words, bounds = place_words(window, [(0.0, 1.0, [1, 2])], time_offset=0.0, last_speech=0.0, eot=50)
    assert words[0][1].end == 1.0 and bounds == [(0.0, 1.0)]


class ToyTokenizer:
    timestamp_begin, eot = 1000, 999  # <|0.00|> = 1000, one step 0.02 s; text tokens decode to " w<id>"

    def decode(self, ids) -> str:
        return "".join(f" w{t}" for t in ids if t < self.eot)


def scripted_align(words):
    """An AlignFn that times the text tokens of a window as `words` says: (token, start, end) from the window start."""
    def align(result, segment_tokens, frames):
        return WindowWords([timing(f" w{t}", start, end, [t]) for t, start, end in words], 0.3, 0.6)
    return align


def test_long_form_seeks_to_the_last_word_unless_the_window_ended_with_a_lone_timestamp():
    from specwhisper.decoding import WindowResult
    from specwhisper.longform import FileTranscript, LongformOptions

    def run(tokens, words, seek=1000):
        f = FileTranscript(index=0, mel=torch.zeros(4, 9000), content_frames=6000, language="en", seek=seek)
        result = WindowResult(tokens=tokens, language="en", avg_logprob=-0.1, no_speech_prob=0.0, finished=True)
        f.add_window(result, 0.0, 1.0, 3000, ToyTokenizer(), LongformOptions(), scripted_align(words))
        return f

    # a cut-off tail: seek goes to the last word's end (14.2 s), not to the last timestamp pair (16 s)
    f = run([1000, 1, 2, 1200, 1200, 3, 1300, 1300, 4], [(1, 0.1, 0.5), (2, 0.5, 0.9), (3, 4.0, 4.2)])
    assert f.seek == 1420 and f.last_speech == 14.2
    assert [(s.start, s.end, [w.word for w in s.words]) for s in f.segments] == [
        (10.1, 10.9, [" w1", " w2"]), (14.0, 14.2, [" w3"])]
    # text then a lone timestamp: nothing more was said, the whole window is passed
    f = run([1000, 1, 2, 1200], [(1, 0.1, 0.5), (2, 0.5, 0.9)])
    assert f.seek == 4000 and f.last_speech == 10.9


def test_anomaly_scores_by_hand():
    assert word_anomaly_score(Word(0.0, 0.5, " fine", 0.9)) == 0
    assert word_anomaly_score(Word(0.0, 0.033, " uh", 0.1)) == pytest.approx(1 + 0.1 * 15)  # improbable and short
    assert word_anomaly_score(Word(0.0, 3.0, " so", 0.9)) == pytest.approx(1.0)  # a second over 2 s
    assert not is_anomaly([Word(0.0, 0.5, " fine", 0.9), Word(0.5, 0.8, ",", 0.01)])  # punctuation not judged
    assert not is_anomaly([Word(0.0, 0.5, " oh", 0.1), Word(0.5, 1.0, " fine", 0.9)])  # score 1 for 2 words
    assert is_anomaly([Word(0.0, 0.5, " oh", 0.1)])  # score 1 for 1 word
    assert not is_anomaly([])


def test_hallucinations_around_silence_are_cut():
    hello = [Word(10.0, 10.5, " Hello", 0.9), Word(10.5, 11.0, " there", 0.9)]
    thanks = [Word(20.0, 20.05, " Thanks", 0.1)]  # improbable and 50 ms long: a likely hallucination
    cut = partial(cut_hallucinations, seek=1000, seek_after=1100, window_frames=3000, content_frames=10_000,
                  last_speech=9.0, threshold=2.0, ends_with_lone_timestamp=False)
    # a suspect first segment 10 s into the window: the window is dropped, the next starts at the suspect
    assert cut([thanks], [(20.0, 20.05)]) == SilenceCut(0, 2000, dropped=True)
    # a suspect after 9 s of silence, with nothing after it: cut off, the next window starts at it
    assert cut([hello, thanks], [(10.0, 11.0), (20.0, 20.05)]) == SilenceCut(1, 2000)
    assert cut([hello, thanks], [(10.0, 11.0), (20.0, 20.05)], content_frames=2100) == SilenceCut(1, 2100)  # audio ends
    # nothing suspect: seek to the last word, or past the window when less than the threshold of it is left
    assert cut([hello], [(10.0, 11.0)]) == SilenceCut(1, 1100)
    late = [Word(38.5, 39.0, " late", 0.9)]
    assert cut([late], [(38.5, 39.0)]) == SilenceCut(1, 4000)


# --------------------------------------------------------------------------- against openai-whisper


def reference_clips() -> dict:
    return json.loads(REFERENCE.read_text(encoding="utf-8"))["clips"]


def dev_words(model, names, assistant=None, stats=None) -> dict[str, list[Word]]:
    paths = {row["file"]: row["path"] for row in read_manifest("dev")}
    out = {}
    for name in names:
        result = model.transcribe(load_audio(paths[name]), language="en", temperature=0.0, word_timestamps=True,
                                  assistant=assistant)
        out[name] = [w for segment in result.segments for w in segment.words]
        if stats is not None:
            stats.add(result.stats)
    return out


def test_words_agree_with_openai_whisper_on_the_dev_clips(base_model):
    """All 40 clips (~50 s with base on one thread): same words, times within 20 ms on >= 95 %."""
    reference = reference_clips()
    ours = dev_words(base_model, list(reference))
    errors, probability_gaps, different = [], [], []
    for name, clip in reference.items():
        theirs = [w for segment in clip["segments"] for w in segment["words"]]
        if [w.word for w in ours[name]] != [w["word"] for w in theirs]:
            different.append(name)
            continue
        for a, b in zip(ours[name], theirs):
            errors += [abs(a.start - b["start"]), abs(a.end - b["end"])]
            probability_gaps.append(abs(a.probability - b["probability"]))
    assert not different, f"word texts differ on {different}"
    share = np.mean(np.array(errors) <= TOLERANCE + 1e-9)
    print(f"\n{len(errors) // 2} words: {share:.2%} of start/end times within 20 ms of openai-whisper's; "
          f"max error {max(errors) * 1000:.0f} ms; max probability gap {max(probability_gaps):.1e}")
    assert share >= 0.95
    assert max(probability_gaps) < 1e-3


def test_speculative_gives_greedy_words_and_times(base_model):
    from specwhisper.assistants import resolve_auto_assistant
    from specwhisper.drafters import FreeDrafter

    assistant = FreeDrafter(resolve_auto_assistant(base_model))
    names = ["jfk.flac", "ls_1089-134686-0000.flac", "vctk_p225_023.wav", "librivox_sas01_0870.wav"]
    greedy = dev_words(base_model, names)
    stats = DecodeStats()
    speculative = dev_words(base_model, names, assistant, stats)
    assert stats.accepted > 0 and stats.main_passes < stats.generated_tokens  # drafts did the work
    assert speculative == greedy  # Word is a frozen dataclass: texts, times and probabilities equal


def test_greedy_output_is_unchanged_without_word_timestamps(base_model):
    path = next(row["path"] for row in read_manifest("dev") if row["file"] == "jfk.flac")
    plain = base_model.transcribe(path, language="en", temperature=0.0)
    timed = base_model.transcribe(path, language="en", temperature=0.0, word_timestamps=True)
    assert plain.tokens == timed.tokens
    assert all(s.words is None for s in plain.segments) and "words" not in plain.as_dict()["segments"][0]
    assert "word_timestamps" not in plain.timings
    assert timed.as_dict()["segments"][0]["words"][0] == timed.segments[0].words[0].as_dict()


# --------------------------------------------------------------------------- subtitles


def worded_segments() -> list[Segment]:
    spoken = [[(0.0, 0.5, " Hello"), (0.5, 1.0, " there,"), (1.0, 1.4, " my"), (1.5, 2.0, " friend.")],
              [(6.0, 6.4, " A"), (6.4, 7.0, " second"), (7.2, 8.0, " one.")]]
    return [Segment(id=i, seek=0, start=words[0][0], end=words[-1][1], text="".join(w for _, _, w in words), tokens=[],
                    temperature=0.0, avg_logprob=-0.1, compression_ratio=1.0, no_speech_prob=0.0,
                    words=[Word(s, e, w, 0.9) for s, e, w in words])
            for i, words in enumerate(spoken)]


def test_cues_follow_segments_by_default_and_break_by_width_count_and_words():
    segments = worded_segments()
    assert subtitle_cues(segments) == [(0.0, 2.0, "Hello there, my friend."), (6.0, 8.0, "A second one.")]
    assert subtitle_cues(segments, SubtitleOptions(max_line_width=12)) == [
        (0.0, 2.0, "Hello there,\nmy friend."), (6.0, 8.0, "A second\none.")]  # "A second one." is 13
    # width and count: cues ignore segments, break after max_line_count lines and at a 3-s pause
    assert subtitle_cues(segments, SubtitleOptions(max_line_width=14, max_line_count=2)) == [
        (0.0, 2.0, "Hello there,\nmy friend."), (6.0, 8.0, "A second one.")]
    assert subtitle_cues(segments, SubtitleOptions(max_line_width=12, max_line_count=1)) == [
        (0.0, 1.0, "Hello there,"), (1.0, 2.0, "my friend."), (6.0, 7.0, "A second"), (7.2, 8.0, "one.")]
    assert subtitle_cues(segments, SubtitleOptions(max_words_per_line=3)) == [
        (0.0, 1.4, "Hello there, my"), (1.5, 2.0, "friend."), (6.0, 8.0, "A second one.")]


def test_highlight_underlines_each_word_and_fills_gaps():
    cues = subtitle_cues(worded_segments()[:1], SubtitleOptions(highlight_words=True))
    assert cues == [(0.0, 0.5, "<u>Hello</u> there, my friend."), (0.5, 1.0, "Hello <u>there,</u> my friend."),
                    (1.0, 1.4, "Hello there, <u>my</u> friend."), (1.4, 1.5, "Hello there, my friend."),
                    (1.5, 2.0, "Hello there, my <u>friend.</u>")]


def test_srt_and_vtt_with_words():
    result = SimpleNamespace(segments=worded_segments())
    srt, vtt = io.StringIO(), io.StringIO()
    write_srt(result, srt, SubtitleOptions(max_line_width=12))
    write_vtt(result, vtt, SubtitleOptions(max_words_per_line=2))
    assert srt.getvalue() == ("1\n00:00:00,000 --> 00:00:02,000\nHello there,\nmy friend.\n\n"
                              "2\n00:00:06,000 --> 00:00:08,000\nA second\none.\n\n")
    assert vtt.getvalue().split("\n\n")[1:3] == ["00:00:00.000 --> 00:00:01.000\nHello there,",
                                                 "00:00:01.000 --> 00:00:02.000\nmy friend."]


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("flags", [["--highlight_words", "True"], ["--max-line-width", "40"],
                                   ["--max_line_count", "2"], ["--max_words_per_line", "3"]])
def test_subtitle_flags_need_word_timestamps(flags, capsys):
    status = cli.main(["transcribe", "missing.wav", *flags])
    err = capsys.readouterr().err
    assert status == cli.EXIT_BAD_INPUT
    assert err.count("\n") == 1 and f"--{flags[0].lstrip('-').replace('-', '_')} requires --word_timestamps True" in err


def test_word_flags_parse_in_both_spellings():
    spellings = itertools.product(["--word_timestamps", "--word-timestamps"], ["--max_line_width", "--max-line-width"])
    for words, width in spellings:
        args = cli.build_parser().parse_args(["transcribe", "a.wav", words, "True", width, "42"])
        assert args.word_timestamps is True and args.max_line_width == 42
