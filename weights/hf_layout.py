"""Read a Hugging Face-layout Whisper folder: the one path every checkpoint loads through.

A folder holds config.json, model.safetensors (or model-0000x-of-0000y.safetensors
with model.safetensors.index.json), generation_config.json and tokenizer.json.
Weights are read only through safetensors: nothing is unpickled.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import WeightsError
from ..model import ModelDims

# Hugging Face name -> this repo's module name (openai/whisper's naming).
HF_TO_OURS = [
    (r"^model\.encoder\.embed_positions\.weight$", "encoder.positional_embedding"),
    (r"^model\.decoder\.embed_positions\.weight$", "decoder.positional_embedding"),
    (r"^model\.decoder\.embed_tokens\.", "decoder.token_embedding."),
    (r"^model\.encoder\.layer_norm\.", "encoder.ln_post."),
    (r"^model\.decoder\.layer_norm\.", "decoder.ln."),
    (r"^model\.(encoder|decoder)\.layers\.", r"\1.blocks."),
    (r"^model\.encoder\.conv", "encoder.conv"),
    (r"\.self_attn_layer_norm\.", ".attn_ln."),
    (r"\.encoder_attn_layer_norm\.", ".cross_attn_ln."),
    (r"\.final_layer_norm\.", ".mlp_ln."),
    (r"\.self_attn\.", ".attn."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.q_proj\.", ".query."),
    (r"\.k_proj\.", ".key."),
    (r"\.v_proj\.", ".value."),
    (r"\.out_proj\.", ".out."),
    (r"\.fc1\.", ".mlp.0."),
    (r"\.fc2\.", ".mlp.2."),
]
TIED_OUTPUT = "proj_out.weight"  # the output projection, tied to the token embedding


def rename_hf_key(name: str) -> str:
    for pattern, replacement in HF_TO_OURS:
        name = re.sub(pattern, replacement, name)
    return name


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{path.parent}: no {path.name} (not a Hugging Face-layout Whisper folder)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{path}: invalid JSON ({err})") from None


def dims_from_config(config: dict, source: str) -> ModelDims:
    if config.get("model_type") not in ("whisper", None):
        raise WeightsError(f"{source}: model_type {config.get('model_type')!r} is not whisper")
    try:
        dims = ModelDims(
            n_mels=config["num_mel_bins"],
            n_audio_ctx=config["max_source_positions"],
            n_audio_state=config["d_model"],
            n_audio_head=config["encoder_attention_heads"],
            n_audio_layer=config["encoder_layers"],
            n_vocab=config["vocab_size"],
            n_text_ctx=config["max_target_positions"],
            n_text_state=config["d_model"],
            n_text_head=config["decoder_attention_heads"],
            n_text_layer=config["decoder_layers"],
        )
    except KeyError as err:
        raise WeightsError(f"{source}: config.json lacks {err.args[0]}") from None
    for ffn_key in ("encoder_ffn_dim", "decoder_ffn_dim"):
        if config.get(ffn_key, 4 * dims.n_audio_state) != 4 * dims.n_audio_state:
            raise WeightsError(f"{source}: {ffn_key}={config[ffn_key]} is not 4 x d_model, which Whisper requires")
    return dims


def safetensors_files(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise WeightsError(f"{index}: empty weight_map")
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise WeightsError(f"{folder}: missing shard {missing[0]} listed in model.safetensors.index.json")
        return [folder / s for s in shards]
    if (folder / "model.bin").is_file():
        raise WeightsError(f"{folder}: holds a CTranslate2 model.bin; convert it with "
                           "specwhisper.weights.ctranslate2.convert_ctranslate2 into a safetensors folder")
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise WeightsError(f"{folder}: only pickle weights (.bin/.pt) found; specwhisper loads safetensors only")
    raise WeightsError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder under this repo's names (the tied projection dropped)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in safetensors_files(folder):
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise WeightsError(f"{path}: cannot read safetensors ({first_line}); the file may be truncated or corrupt") from None
        for name, tensor in tensors.items():
            if name == TIED_OUTPUT:
                continue
            state[rename_hf_key(name)] = tensor
    return state
