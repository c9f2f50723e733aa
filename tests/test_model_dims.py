"""Model sizes are data: every released Whisper builds from its config.json alone.

Each network is built on the meta device (no memory, no weights) from the HF config
the checkpoint ships with, and its size is checked against the published parameter
count. The count is what the checkpoint stores: every parameter plus the encoder's
sinusoidal positions (a buffer here, a tensor in the file), the output projection
counted once since it is tied to the token embedding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specwhisper import audio
from specwhisper.decoding import DecodingOptions
from specwhisper.model import ModelDims, Whisper, sinusoids
from specwhisper.transcription import decode_window
from specwhisper.weights.hf_layout import dims_from_config

from random_models import english_tokenizer_json, make_random_model, random_whisper


def hf_config(d_model: int, heads: int, encoder_layers: int, decoder_layers: int, vocab_size: int = 51865,
              num_mel_bins: int = 80) -> dict:
    """The architecture fields of a Whisper config.json as the hub has them."""
    return {"model_type": "whisper", "d_model": d_model, "encoder_attention_heads": heads,
            "decoder_attention_heads": heads, "encoder_layers": encoder_layers, "decoder_layers": decoder_layers,
            "encoder_ffn_dim": 4 * d_model, "decoder_ffn_dim": 4 * d_model, "vocab_size": vocab_size,
            "num_mel_bins": num_mel_bins, "max_source_positions": 1500, "max_target_positions": 448}


# name -> (config, published size in millions of parameters).
# Sizes: the hub's safetensors parameter count for OpenAI's checkpoints (tiny 37.8M, base 72.6M,
# small 242M, medium 764M; the Whisper paper rounds these up to 39M, 74M, 244M, 769M), the paper's
# 1550M for large, and the model cards for turbo (809M) and distil-whisper (756M, 394M, 166M).
RELEASED = {
    "tiny": (hf_config(384, 6, 4, 4), 37.8),
    "tiny.en": (hf_config(384, 6, 4, 4, vocab_size=51864), 37.8),
    "base": (hf_config(512, 8, 6, 6), 72.6),
    "small": (hf_config(768, 12, 12, 12), 242),
    "medium": (hf_config(1024, 16, 24, 24), 764),
    "large-v2": (hf_config(1280, 20, 32, 32), 1550),
    "large-v3": (hf_config(1280, 20, 32, 32, vocab_size=51866, num_mel_bins=128), 1550),
    "large-v3-turbo": (hf_config(1280, 20, 32, 4, vocab_size=51866, num_mel_bins=128), 809),
    "distil-large-v2": (hf_config(1280, 20, 32, 2), 756),
    "distil-large-v3": (hf_config(1280, 20, 32, 2, vocab_size=51866, num_mel_bins=128), 756),
    "distil-medium.en": (hf_config(1024, 16, 24, 2, vocab_size=51864), 394),
    "distil-small.en": (hf_config(768, 12, 12, 4, vocab_size=51864), 166),  # four decoder layers, not two
}
TOLERANCE = 0.01  # published sizes are rounded to 3 significant digits at most


def stored_parameter_count(network: Whisper) -> int:
    return sum(p.numel() for p in network.parameters()) + network.encoder.positional_embedding.numel()


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_size_builds_from_config_with_published_parameter_count(name):
    config, published_millions = RELEASED[name]
    dims = dims_from_config(config, name)
    with torch.device("meta"):
        network = Whisper(dims)
    millions = stored_parameter_count(network) / 1e6
    assert abs(millions - published_millions) <= TOLERANCE * published_millions, \
        f"{name}: {millions:.1f}M parameters, published {published_millions}M"
    assert network.decoder.token_embedding.weight.shape == (config["vocab_size"], config["d_model"])
    assert network.encoder.conv1.weight.shape == (config["d_model"], config["num_mel_bins"], 3)
    assert len(network.encoder.blocks) == config["encoder_layers"]
    assert len(network.decoder.blocks) == config["decoder_layers"]
    assert dims.head_dim == 64  # every released size: d_model / heads


def test_sizes_differ_only_in_dims():
    """large-v3 differs from large-v2 by 48 mel-filter inputs and one token, nothing else."""
    count = {}
    for name in ("large-v2", "large-v3"):
        with torch.device("meta"):
            count[name] = stored_parameter_count(Whisper(dims_from_config(RELEASED[name][0], name)))
    d_model = 1280
    assert count["large-v3"] - count["large-v2"] == (128 - 80) * d_model * 3 + d_model


# ---- end to end on a small random model with large-v3's 128 mel bins --------------------------

def test_forward_with_128_mels_several_tokens_at_once_equals_one_at_a_time():
    dims = ModelDims(n_mels=128, n_audio_ctx=24, n_audio_state=64, n_audio_head=4, n_audio_layer=2, n_vocab=300,
                     n_text_ctx=16, n_text_state=64, n_text_head=4, n_text_layer=3)
    network = random_whisper(dims, seed=3)
    generator = torch.Generator().manual_seed(0)
    mel = torch.randn(2, 128, 2 * dims.n_audio_ctx, generator=generator)  # (B, n_mels, frames)
    tokens = torch.randint(0, dims.n_vocab, (2, 7), generator=generator)  # (B, T)
    with torch.inference_mode():
        features = network.encoder(mel)
        assert features.shape == (2, dims.n_audio_ctx, dims.n_audio_state)
        assert torch.isfinite(features).all()
        audio_kv = network.decoder.audio_kv(features)

        cache = network.new_cache(batch_size=2)
        prompt = network.decoder(tokens[:, :3], audio_kv, cache)  # 3 tokens in one pass
        rest = network.decoder(tokens[:, 3:], audio_kv, cache)  # then 4 more
        logits = network.decoder.logits(torch.cat([prompt, rest], dim=1))
        assert logits.shape == (2, 7, dims.n_vocab)

        stepwise_cache = network.new_cache(batch_size=2)
        stepwise = torch.cat([network.decoder.logits(network.decoder(tokens[:, i:i + 1], audio_kv, stepwise_cache))
                              for i in range(tokens.shape[1])], dim=1)
    torch.testing.assert_close(logits, stepwise, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits[0], logits[1])  # rows see different audio and tokens

    with pytest.raises(ValueError, match="mel frames"):
        network.encoder(mel[:, :, :-2])


def test_sinusoids_are_whisper_positions():
    positions = sinusoids(1500, 384)
    assert positions.shape == (1500, 384)
    torch.testing.assert_close(positions[0], torch.cat([torch.zeros(192), torch.ones(192)]))
    # The fastest channel turns by one radian per position.
    torch.testing.assert_close(positions[1, 0], torch.tensor(np.sin(1.0), dtype=torch.float32))


# ---- the random-weight models other tests build on -------------------------------------------

def test_random_model_greedy_decoding_is_not_degenerate(tmp_path):
    """Greedy decoding on a random model wanders through the vocabulary and depends on the audio."""
    model = make_random_model(tmp_path / "random", tokenizer_json=english_tokenizer_json(), seed=0)
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(16000 * 3).astype(np.float32) * 0.1,
             np.sin(np.arange(16000 * 2) * 2 * np.pi * 440 / 16000).astype(np.float32) * 0.3]
    mels = torch.stack([audio.log_mel_padded_audio(clip) for clip in clips])  # (2, 80, 3000)
    results = decode_window(model, mels, DecodingOptions(language="en", max_new_tokens=30))
    for result in results:
        assert len(result.tokens) >= 20  # no early end-of-text
        assert len(set(result.tokens)) >= 10, result.tokens
    assert results[0].tokens != results[1].tokens
