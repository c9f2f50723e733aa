"""A whole model through the Triton kernels (interpreted on the CPU) decodes what the torch path decodes."""

import os

import pytest
import torch

from conftest import read_manifest
from specwhisper import attention, audio, load_model
from specwhisper.decoding import DecodingOptions
from specwhisper.transcription import decode_window

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"  # where the kernels run: the interpreter emulates them on the CPU

pytestmark = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                reason="Triton needs a CUDA device or TRITON_INTERPRET=1")


def first_window_mel_of(model, samples):
    return audio.first_window_mel(samples, model.dims.n_mels)


@pytest.fixture(scope="module")
def kernel_model(tiny_en_model):
    """tiny.en on DEVICE in its default dtype (loaded again there: a prepacked CPU model cannot move)."""
    return tiny_en_model if DEVICE == "cpu" else load_model(tiny_en_model.folder, device=DEVICE)


def test_triton_backend_gives_the_same_greedy_tokens_as_torch_on_a_real_clip(kernel_model):
    clip = next(r for r in read_manifest("dev") if r["file"] == "jfk.flac")["path"]
    mel = first_window_mel_of(kernel_model, audio.load_audio(clip))[None]
    options = DecodingOptions(max_new_tokens=12)  # the interpreter is slow: a dozen tokens make the point
    with attention.use_attention_backend("torch"):
        expected = decode_window(kernel_model, mel, options)[0].tokens
    attention.reset_backend_stats()
    with attention.use_attention_backend("triton"):
        got = decode_window(kernel_model, mel, options)[0].tokens
    assert attention.last_backend_used() == {"self": "triton", "cross": "triton", "encoder": "triton"}
    assert got == expected
    assert len(expected) == 12
