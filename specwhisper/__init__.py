"""specwhisper: Whisper in plain PyTorch, made faster by exact speculative decoding.

The names below are imported on first use, so `specwhisper.cli` can parse and check its arguments
before torch is imported (~2 s).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"
__all__ = ["load_model", "transcribe", "SpeechModel", "Transcription", "__version__"]

_EXPORTS = {"load_model": "loading", "transcribe": "transcription", "SpeechModel": "speech_model",
            "Transcription": "transcription"}

if TYPE_CHECKING:
    from .loading import load_model
    from .speech_model import SpeechModel
    from .transcription import Transcription, transcribe


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'specwhisper' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # cached: __getattr__ runs once per name
    return value
