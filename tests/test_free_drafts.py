"""Free drafts (specwhisper.drafters.FreeDrafter): tokens that cost nothing to propose.

Long-form decoding knows what a window will likely decode first (the previous window's unfinished
tail, re-timed; a failed attempt's tokens when a window is decoded again hotter), and text repeats
itself (prompt lookup). Whatever is proposed, the output stays greedy's, token for token.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import read_manifest
from specwhisper import audio
from specwhisper.assistants import resolve_auto_assistant
from specwhisper.decoding import DecodeStats, DecodingOptions, WindowResult
from specwhisper.drafters import FreeDrafter, prompt_lookup
from specwhisper.longform import FileTranscript, LongformOptions, decode_with_fallback, retimed_tail
from specwhisper.transcription import decode_window

TS = 50364  # <|0.00|> in the multilingual vocabulary


class Words:
    timestamp_begin = TS

    def decode(self, ids) -> str:
        return " ".join(str(i) for i in ids if i < TS)


def test_the_unfinished_tail_is_retimed_to_the_next_window():
    # <|0.00|> a b <|2.00|><|2.00|> c d <|4.00|><|4.00|> e f   (the last segment is cut off)
    tokens = [TS, 1, 2, TS + 100, TS + 100, 3, 4, TS + 200, TS + 200, 5, 6]
    # The next window starts at 4.00 s (400 frames later): the tail's <|4.00|> becomes <|0.00|>.
    assert retimed_tail(tokens, 8, TS, 400) == [TS, 5, 6]
    assert retimed_tail([TS, 1, TS + 50, TS + 50, 7, TS + 90], 3, TS, 100) == [TS, 7, TS + 40]


def test_a_window_s_unfinished_tail_becomes_the_next_window_s_hint_and_a_failure_its_retry_s():
    state = FileTranscript(index=0, mel=None, content_frames=6000, language="en")
    tokens = [TS, 1, 2, TS + 100, TS + 100, 3, 4, TS + 200, TS + 200, 5, 6]
    state.add_window(WindowResult(tokens, "en", -0.2, 0.01, False), 0.0, 1.0, 3000, Words(), LongformOptions())
    assert state.seek == 400 and state.hint == [TS, 5, 6]
    # The hint goes with the next window; a window that fails is retried with its own tokens as hints.
    seen = []
    looping = [TS] + [7] * 40 + [TS + 1000]  # compresses far too well: fails, retried hotter

    def decode(mels, previous, languages, temperature, stats, hints):
        seen.append((temperature, hints))
        return [WindowResult(looping if temperature == 0 else [TS, 8, TS + 100], "en", -0.2, 0.01, True)]

    decode_with_fallback(decode, [state], torch.zeros(1, 80, 3000), Words(), LongformOptions())
    assert seen == [(0.0, [[TS, 5, 6]]), (0.2, [looping])]


def test_prompt_lookup_continues_the_latest_earlier_occurrence():
    text = [1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 7, 1, 2, 3]
    assert prompt_lookup(text, 3, 2) == [4, 5]  # the latest earlier [1, 2, 3] was followed by 4 5
    assert prompt_lookup(text, 3, 10) == [4, 5, 7, 1, 2, 3]
    assert prompt_lookup([1, 2, 3, 4], 2, 5) == [] and prompt_lookup([1], 3, 2) == []


@pytest.fixture(scope="module")
def first_window(base_model):
    samples = audio.load_audio(read_manifest("long")[0]["path"])
    return audio.first_window_mel(samples, base_model.dims.n_mels)[None]


def decode(model, mel, assistant=None, hints=None, **options):
    stats = DecodeStats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = decode_window(model, mel, DecodingOptions(language="en", timestamps=True, **options),
                                assistant=assistant, stats=stats, hints=hints)
    return [r.tokens for r in results], stats


def test_a_right_hint_is_accepted_whole_and_a_wrong_one_changes_nothing(base_model, first_window):
    greedy, greedy_stats = decode(base_model, first_window)
    right, stats = decode(base_model, first_window, FreeDrafter(None), hints=greedy)
    assert right == greedy
    assert stats.free_drafted > 0 and stats.free_accepted == stats.free_drafted == stats.drafted  # none rejected
    assert stats.main_passes < greedy_stats.main_passes / 4  # up to 16 hinted tokens per pass
    wrong_hint = [greedy[0][:5] + [t + 1 if t < TS else t for t in greedy[0][5:]]]  # right for 5 tokens only
    wrong, stats = decode(base_model, first_window, FreeDrafter(None), hints=wrong_hint)
    # The first token comes from the prompt's logits; the hint's next 4 pass, the 5th is rejected, and
    # once the text left the hint it drafts nothing more.
    assert wrong == greedy and stats.free_accepted == 4 and stats.rejections == 1


def test_free_drafts_with_the_shipped_draft_equal_greedy_in_a_batch(base_model):
    rows = read_manifest("dev")[:3]
    mels = torch.stack([audio.first_window_mel(audio.load_audio(r["path"]), base_model.dims.n_mels) for r in rows])
    greedy, _ = decode(base_model, mels)
    hints = [greedy[0][:8], [], [7, 7, 7]]  # right for row 0, none for row 1, wrong for row 2
    drafter = FreeDrafter(resolve_auto_assistant(base_model, draft_length=3))
    spec, stats = decode(base_model, mels, drafter, hints=hints)
    assert spec == greedy
    # Row 0's first token comes from the prompt's logits, its next 7 from the hint; the draft drafted too.
    assert stats.free_accepted >= 7 and stats.drafted > stats.free_drafted


def test_long_form_with_free_drafts_equals_greedy(base_model):
    samples = audio.load_audio(read_manifest("long")[1]["path"])[: audio.SAMPLE_RATE * 70]
    greedy = base_model.transcribe(samples, language="en", temperature=0.0)
    free = base_model.transcribe(samples, language="en", temperature=0.0, assistant=FreeDrafter(None))
    assert free.tokens == greedy.tokens and free.windows == greedy.windows
