"""The benchmark's oracle drafter (benchmarks/oracle.py): it must replay greedy exactly, or the
ceiling `bench_distilled.py --oracle` reports would be a ceiling of something else. It is also a
drafter written outside the package, driven by the loop through the `Drafter` interface alone."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO, read_manifest
from specwhisper import audio

sys.path.insert(0, str(REPO / "benchmarks"))
from oracle import GreedyRecorder, OracleDrafter, next_token_table  # noqa: E402


def test_next_token_table_maps_every_prefix_to_what_followed_and_ends_with_eot():
    table = next_token_table([[1, 2, 3], [1, 2, 4, 5]], eot=9)
    assert table[(1,)] == 2 and table[(1, 2, 3)] == 9 and table[(1, 2, 4)] == 5 and table[(1, 2, 4, 5)] == 9
    assert table[(1, 2)] == 4  # a prefix recorded twice keeps the later continuation


@pytest.mark.parametrize("folder,seconds", [("dev", 30), ("long", 40)])  # one window; two, prompted by the first
def test_the_oracle_draft_is_always_accepted_and_equals_greedy_on_real_speech(base_model, folder, seconds):
    samples = audio.load_audio(read_manifest(folder)[0]["path"])[: audio.SAMPLE_RATE * seconds]
    greedy = base_model.transcribe(samples, language="en", temperature=0.0)  # no sampled fallbacks
    recorder = GreedyRecorder()
    base_model.transcribe(samples, language="en", temperature=0.0, assistant=recorder)
    fed = recorder.sequences
    assert len(fed) == greedy.windows and all(fed)
    # A constant γ: the adaptive one answers to timing.
    oracle = OracleDrafter(fed, base_model.tokenizer.eot, draft_length=8)
    replayed = base_model.transcribe(samples, language="en", temperature=0.0, assistant=oracle)
    assert replayed.tokens == greedy.tokens
    assert replayed.stats.drafted > 0 and replayed.stats.accepted == replayed.stats.drafted
    # Every pass but a window's last takes all 8 drafts and the main model's own token.
    assert replayed.stats.main_passes <= greedy.stats.main_passes // 9 + 2 * greedy.windows
