"""Checks of what the user asked for that need no model: run before anything is loaded.

Each failure is a ValueError whose message is the one line the CLI prints. `check_device_available`
imports torch (it asks the build what it supports); the others import neither torch nor a model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .tokenizer import TASKS, resolve_language_code
from .weights.registry import HUB_IDS

DTYPE_NAMES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")
_DEVICE = re.compile(r"(cpu|cuda|mps)(:\d+)?")
# The English-only vocabulary has one token less than the multilingual one (no language tokens).
ENGLISH_ONLY_VOCAB = 51864


def check_device_name(device: str | None) -> str | None:
    if device is None or _DEVICE.fullmatch(device.lower()):
        return device.lower() if device else None
    raise ValueError(f"--device {device}: unknown device; use cpu, cuda, cuda:N or mps")


def check_dtype_name(dtype: str | None) -> str | None:
    if dtype is None or dtype.lower() in DTYPE_NAMES:
        return dtype.lower() if dtype else None
    raise ValueError(f"--dtype {dtype}: unknown dtype; use {', '.join(DTYPE_NAMES)}")


def check_model_name(name: str) -> None:
    """A folder, a known name or something shaped like a hub id (owner/name); whether the hub has it is
    only known when it is asked."""
    path = Path(name).expanduser()
    if path.is_dir() or name in HUB_IDS or _looks_like_hub_id(name):
        return
    if path.exists():
        raise ValueError(f"{name}: expected a model folder (config.json + model.safetensors), got a file")
    raise ValueError(f"{name}: not a folder, a known model name ({', '.join(sorted(HUB_IDS))}) or a hub id "
                     "(owner/name)")


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))


def english_only_model(name: str) -> bool | None:
    """True or False where the name or the folder's config.json says which vocabulary the model has; None
    where only the loaded model can tell (a hub id)."""
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            vocab = json.loads((path / "config.json").read_text(encoding="utf-8")).get("vocab_size")
        except (OSError, ValueError):
            return None  # loading the folder reports what is wrong with it
        return None if vocab is None else vocab == ENGLISH_ONLY_VOCAB
    if name in HUB_IDS:
        return HUB_IDS[name].endswith(".en")
    return None


def check_language(language: str | None, task: str, english_only: bool | None) -> None:
    if task not in TASKS:
        raise ValueError(f"--task {task}: use one of {', '.join(TASKS)}")
    code = None if language is None else resolve_language_code(language)
    if english_only and code not in (None, "en"):
        raise ValueError(f"--language {language}: this model is English-only")
    if english_only and task == "translate":
        raise ValueError("--task translate: this model is English-only and cannot translate")


def check_device_available(device: str | None) -> None:
    """Whether this torch build and machine have the device (imports torch, loads nothing)."""
    import torch

    if device is None or device == "cpu":
        return
    kind, _, index = device.partition(":")
    if kind == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ValueError(f"--device {device}: this PyTorch is a CPU-only build (torch {torch.__version__}); "
                             "install a CUDA build or use --device cpu")
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"--device {device}: no CUDA GPU is visible")
        if index and int(index) >= count:
            raise ValueError(f"--device {device}: there are {count} CUDA GPUs (cuda:0 .. cuda:{count - 1})")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS (Apple GPU) is not available here")


def check_search_options(beam_size: int | None, patience: float | None, length_penalty: float | None,
                         best_of: int | None) -> None:
    """openai-whisper's rules for beam search and best-of (its `DecodingTask._verify_options`)."""
    for name, value in (("beam_size", beam_size), ("best_of", best_of)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} {value}: expected a whole number of at least 1, or None")
    if patience is not None:
        if beam_size is None:
            raise ValueError(f"patience {patience}: patience needs beam_size")
        if not patience > 0 or round(beam_size * patience) < 1:
            raise ValueError(f"patience {patience}: beam_size x patience must round to at least 1")
    if length_penalty is not None and not 0 <= length_penalty <= 1:
        raise ValueError(f"length_penalty {length_penalty}: expected a value between 0 and 1, or None")


def check_assistant_for_beam_search(assistant: str | None, beam_size: int | None) -> None:
    """An assistant named by the user cannot serve beam search; the default (auto) or none just steps aside."""
    if beam_size is not None and assistant is not None and assistant.lower() not in ("auto", "none"):
        raise ValueError(f"--assistant {assistant} with --beam_size: speculative decoding serves greedy and "
                         "sampling; beam search runs without an assistant")


def check_clip_timestamps(seconds: list[float], name: str) -> list[float]:
    """openai-whisper's clip_timestamps: start,end,start,... seconds, each clip after the one before."""
    in_order = all(b > a if i % 2 == 0 else b >= a for i, (a, b) in enumerate(zip(seconds, seconds[1:])))
    if not seconds or seconds[0] < 0 or not in_order:
        raise ValueError(f"{name} {','.join(map(str, seconds))}: expected seconds start,end,start,end,... in order")
    return seconds
