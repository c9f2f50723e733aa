"""`load_model`: a name, hub id or folder in, a ready `SpeechModel` out."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import WeightsError
from .model import Whisper, sinusoids
from .prepack import prepack_available, prepack_linears
from .speech_model import SpeechModel
from .tokenizer import Tokenizer
from .weights.hf_layout import dims_from_config, load_state_dict, read_json
from .weights.resolve import resolve_model_folder


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # fp16 on GPUs (the T4 has no bf16); fp32 on the CPU, where fp16 matmuls are slow and inexact.
    return torch.float16 if device.type == "cuda" else torch.float32


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def load_network(folder: Path, device: torch.device, dtype: torch.dtype) -> tuple[Whisper, dict]:
    """Build the network from a Hugging Face-layout folder, checking every tensor's name and shape."""
    config = read_json(folder / "config.json")
    dims = dims_from_config(config, str(folder))
    state = load_state_dict(folder)
    with torch.device("meta"):
        network = Whisper(dims)
    expected = {name: tuple(t.shape) for name, t in network.state_dict().items()}
    # The encoder's sinusoidal positions are fixed; older conversions may omit them.
    if "encoder.positional_embedding" not in state:
        state["encoder.positional_embedding"] = sinusoids(dims.n_audio_ctx, dims.n_audio_state)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise WeightsError(f"{folder}: weights do not fit a Whisper model with {dims} ({detail})")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise WeightsError(f"{folder}: {name} has shape {tuple(state[name].shape)}, expected {shape}")
    network.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return network.to(device).eval(), config


def load_model(name_or_path: str | os.PathLike = "base", device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, prepack: bool = True) -> SpeechModel:
    """Load Whisper by name ('base', 'tiny.en', 'large-v3', ...), hub id, or local folder.

    device: 'cpu', 'cuda', ... (default: CUDA when available). dtype: float32 / float16 / bfloat16
    (default: fp16 on CUDA, fp32 on CPU). prepack: on the CPU in fp32, swap linear layers for
    oneDNN-prepacked ones (specwhisper.prepack); turn off to keep plain nn.Linear modules (e.g. to train).
    """
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or default_dtype(device)
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bfloat16 support (e.g. a T4): use float16")
    folder = resolve_model_folder(name_or_path)
    network, config = load_network(folder, device, dtype)
    if prepack and prepack_available(device, dtype):
        prepack_linears(network)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise WeightsError(f"{folder}: no tokenizer.json")
    tokenizer = Tokenizer.from_file(tokenizer_file)
    if tokenizer.n_vocab != network.dims.n_vocab:
        raise WeightsError(f"{folder}: tokenizer has {tokenizer.n_vocab} tokens but the model {network.dims.n_vocab}")
    generation = read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    suppress = generation.get("suppress_tokens", config.get("suppress_tokens"))
    if suppress is None:
        suppress = list(tokenizer.non_speech_tokens)
    begin_suppress = generation.get("begin_suppress_tokens", config.get("begin_suppress_tokens")) or \
        tokenizer.encode(" ") + [tokenizer.eot]
    heads = generation.get("alignment_heads") or None
    return SpeechModel(network=network, tokenizer=tokenizer, name=str(name_or_path), folder=folder,
                       suppress_tokens=list(suppress), begin_suppress_tokens=list(begin_suppress),
                       alignment_heads=[tuple(pair) for pair in heads] if heads else None)
