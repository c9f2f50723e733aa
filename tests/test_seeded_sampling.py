"""`seed` (`--seed`): windows that fall back to sampling draw from a generator seeded afresh per window and
temperature, by the main model alone, so a transcript depends only on the audio and the options: not on the
files before it in the process, the thread count or the assistant (what makes `transcribe-many`'s outputs
equal the single-process CLI's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from random_models import make_random_model_folder

from specwhisper.assistants import load_assistant
from specwhisper.drafters import FreeDrafter
from specwhisper.transcription import transcribe, transcribe_many

# Every window sampled (as a fallback would be); that the samples are random is checked by changing the seed.
OPTIONS = dict(language="en", temperature=0.7, no_speech_threshold=None)


@pytest.fixture(scope="module")
def audio() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    return ((0.1 * rng.standard_normal(16000 * 6)).astype(np.float32),
            (0.1 * rng.standard_normal(16000 * 3)).astype(np.float32))


def test_a_sampled_transcript_depends_only_on_the_audio(random_main, audio, tmp_path):
    clip, other = audio
    alone = transcribe(random_main, clip, **OPTIONS)
    assert len(alone.tokens) > 10

    torch.manual_seed(1234)  # the global generator somewhere else
    after_other = list(transcribe_many(random_main, [other, clip], batch_size=1, **OPTIONS))[1]
    assert after_other.tokens == alone.tokens

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = transcribe(random_main, clip, **OPTIONS)
    finally:
        torch.set_num_threads(threads)
    assert one_thread.tokens == alone.tokens

    draft = load_assistant(random_main, str(make_random_model_folder(tmp_path / "draft", seed=3)), draft_length=3)
    assisted = transcribe(random_main, clip, assistant=FreeDrafter(draft), **OPTIONS)
    assert assisted.tokens == alone.tokens

    assert transcribe(random_main, clip, seed=1, **OPTIONS).tokens != alone.tokens  # sampled, from the seed


def test_without_a_seed_sampling_uses_the_global_generator(random_main, audio):
    clip, _ = audio
    torch.manual_seed(0)
    first = transcribe(random_main, clip, seed=None, **OPTIONS)
    second = transcribe(random_main, clip, seed=None, **OPTIONS)
    torch.manual_seed(0)
    again = transcribe(random_main, clip, seed=None, **OPTIONS)
    assert first.tokens != second.tokens  # the generator moved on
    assert again.tokens == first.tokens
