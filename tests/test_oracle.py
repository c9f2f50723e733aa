"""The benchmark's oracle draft (benchmarks/oracle.py): it must replay greedy exactly, or the
ceiling `bench_distilled.py --oracle` reports would be a ceiling of something else."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO, read_manifest
from specwhisper import audio

sys.path.insert(0, str(REPO / "benchmarks"))
from oracle import next_token_table, oracle_assistant, record_fed_tokens  # noqa: E402


def test_next_token_table_maps_every_prefix_to_what_followed_and_ends_with_eot():
    table = next_token_table([[1, 2, 3], [1, 2, 4, 5]], eot=9)
    assert table[(1,)] == 2 and table[(1, 2, 3)] == 9 and table[(1, 2, 4)] == 5 and table[(1, 2, 4, 5)] == 9
    assert table[(1, 2)] == 4  # a prefix recorded twice keeps the later continuation


@pytest.mark.parametrize("folder,seconds", [("dev", 30), ("long", 40)])  # one window; two, prompted by the first
def test_the_oracle_draft_is_always_accepted_and_equals_greedy_on_real_speech(base_model, folder, seconds):
    samples = audio.load_audio(read_manifest(folder)[0]["path"])[: audio.SAMPLE_RATE * seconds]
    with record_fed_tokens(base_model) as fed:
        greedy = base_model.transcribe(samples, language="en", temperature=0.0)  # no sampled fallbacks
    assert len(fed) == greedy.windows and all(fed)
    oracle = oracle_assistant(base_model, fed, draft_length=8)  # constant γ: the adaptive one answers to timing
    replayed = base_model.transcribe(samples, language="en", temperature=0.0, assistant=oracle)
    assert replayed.tokens == greedy.tokens
    assert replayed.stats.drafted > 0 and replayed.stats.accepted == replayed.stats.drafted
    # Every pass but a window's last takes all 8 drafts and the main model's own token.
    assert replayed.stats.main_passes <= greedy.stats.main_passes // 9 + 2 * greedy.windows


def test_recording_leaves_the_decoder_as_it_was(base_model):
    decoder = base_model.network.decoder
    with record_fed_tokens(base_model):
        assert "forward" in vars(decoder)
    assert "forward" not in vars(decoder)
