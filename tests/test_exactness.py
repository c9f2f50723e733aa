"""Bit-exactness of the decoder across pass sizes: the ground speculative decoding stands on.

A verify pass runs the last decided token and γ drafts as one block; greedy decoding runs the
same tokens one step at a time. Speculative output equals greedy output token for token only if
every position gets the same bits either way: equal logits to the last bit, not merely close
ones (a near-tie between the two best tokens, ~1 in 1,000 tokens within 0.01 on real speech,
could otherwise go the other way). These tests compare hidden states with torch.equal after
the whole decoder, on the real base model (fp16-valued weights: fbgemm's fp16 GEMM) and on a
random-weight model (fp32 weights: oneDNN, its widest product sliced), in one row and in
batches whose rows start at different positions, with both exact attention paths: the CPU
decoder kernel (backend "auto") and SDPA one position at a time (backend "torch", where no C
compiler is found). With SDPA computing the whole block at once, base's verify passes differed
from its steps by up to 5e-4 in the hidden states.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from conftest import read_manifest
from random_models import make_random_model
from specwhisper import attention, audio
from specwhisper.decoding import prefill
from specwhisper.kv_cache import AudioKV
from specwhisper.prepack import PackedLinear
from specwhisper.transcription import encode_audio


def first_window_mel_of(model, samples):
    return audio.first_window_mel(samples, model.dims.n_mels)


def repeat_rows(audio_kv: AudioKV, batch: int) -> AudioKV:
    """One window's cross-attention K/V as the K/V of a batch of `batch` copies of it."""
    return AudioKV([k.expand(batch, -1, -1, -1).contiguous() for k in audio_kv.keys],
                   [v.expand(batch, -1, -1, -1).contiguous() for v in audio_kv.values])

TEXT = " The history of the art of printing, the most important of all the arts"


@pytest.fixture(params=["auto", "torch"], autouse=True)
def backend(request):
    """Every test runs with the CPU decoder kernel and with per-position SDPA."""
    if request.param == "auto" and attention.cpu_kernel_unavailable_reason() is not None:
        pytest.skip(f"CPU attention kernel unavailable: {attention.cpu_kernel_unavailable_reason()}")
    with attention.use_attention_backend(request.param):
        yield request.param


@pytest.fixture(scope="module")
def base_window(base_model):
    samples = audio.load_audio(read_manifest("long")[0]["path"])
    audio_kv, _ = encode_audio(base_model, first_window_mel_of(base_model, samples)[None])
    return base_model, audio_kv


@pytest.fixture(scope="module")
def sliced_random_model(tmp_path_factory):
    """fp32 random weights (no fp16 values: oneDNN), width 288: the MLP's second product is 1152 wide,
    past oneDNN's row-exact width, so it runs in slices."""
    model = make_random_model(tmp_path_factory.mktemp("wide") / "m", seed=3, n_text_state=288, n_text_head=4,
                              n_audio_state=288, n_audio_head=4)
    fc2 = model.network.decoder.blocks[0].mlp[2]
    assert isinstance(fc2, PackedLinear) and not fc2.half_weights and len(fc2.slices) > 1
    return model


def prompts_for(model, rows: int) -> list[list[int]]:
    """Prompts of different lengths (previous text of 0, 7, 14 ... tokens), so rows start apart."""
    tokenizer = model.tokenizer
    previous = tokenizer.encode(TEXT * 4)
    out = []
    for row in range(rows):
        prompt = tokenizer.sot_sequence("en" if model.multilingual else None, "transcribe", True)
        if row:
            prompt = [tokenizer.sot_prev] + previous[:7 * row] + prompt
        out.append(prompt)
    return out


def block_and_steps(model, audio_kv, prompts: list[list[int]], block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's hidden states for `block` after each row's prompt: one pass over the whole block,
    and one pass per token. Returns (B, T, C) twice."""
    network = model.network
    batch = len(prompts)
    if audio_kv.batch_size != batch:
        audio_kv = repeat_rows(audio_kv, batch)
    tokens = torch.tensor([block] * batch)
    with torch.inference_mode():
        cache = network.new_cache(batch)
        prefill(network, audio_kv, prompts, cache)
        lengths = list(cache.lengths)
        together = network.decoder(tokens, audio_kv, cache)
        cache.rollback(lengths)
        one_by_one = torch.cat([network.decoder(tokens[:, i:i + 1], audio_kv, cache) for i in range(len(block))], 1)
    return together, one_by_one


@pytest.mark.parametrize("positions", [2, 5, 13])
def test_a_verify_pass_gives_base_the_bits_of_single_steps(base_window, positions):
    model, audio_kv = base_window
    block = model.tokenizer.encode(TEXT)[:positions]
    together, one_by_one = block_and_steps(model, audio_kv, prompts_for(model, 1), block)
    assert torch.equal(together, one_by_one), f"max difference {(together - one_by_one).abs().max():.3g}"


def test_a_batch_whose_rows_start_apart_gives_base_the_bits_of_single_steps(base_window):
    model, audio_kv = base_window
    together, one_by_one = block_and_steps(model, audio_kv, prompts_for(model, 3), model.tokenizer.encode(TEXT)[:4])
    assert torch.equal(together, one_by_one), f"max difference {(together - one_by_one).abs().max():.3g}"


@pytest.mark.parametrize("positions", [3, 9])
def test_a_verify_pass_gives_an_fp32_model_the_bits_of_single_steps(sliced_random_model, positions):
    model = sliced_random_model
    torch.manual_seed(0)
    audio_kv, _ = encode_audio(model, torch.randn(1, 80, 3000))
    block = model.tokenizer.encode(TEXT)[:positions]
    for rows in (1, 2):
        together, one_by_one = block_and_steps(model, audio_kv, prompts_for(model, rows), block)
        assert torch.equal(together, one_by_one), f"max difference {(together - one_by_one).abs().max():.3g}"


def test_without_exact_attention_the_bits_differ(base_window, monkeypatch):
    """The check above can fail: SDPA over the whole block (what the decoder did before exactness)
    gives a verify pass other bits than single steps."""
    monkeypatch.setattr(attention, "positions_computed_alone", lambda enabled=True: nullcontext())
    model, audio_kv = base_window
    with attention.use_attention_backend("torch"):
        together, one_by_one = block_and_steps(model, audio_kv, prompts_for(model, 1),
                                               model.tokenizer.encode(TEXT)[:13])
    assert not torch.equal(together, one_by_one)
