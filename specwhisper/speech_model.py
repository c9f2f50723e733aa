"""`SpeechModel`: a Whisper network with what it needs to turn audio into text."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .tokenizer import Tokenizer
from .transcription import transcribe as transcribe_function

if TYPE_CHECKING:
    from .draft import DraftNetwork
    from .model import ModelDims, Whisper


@dataclass
class SpeechModel:
    """A network (a `Whisper`, or a distilled draft's `DraftNetwork` built around one), its tokenizer,
    where its weights came from, and the tokens its decoding rules suppress."""

    network: Whisper | DraftNetwork
    tokenizer: Tokenizer
    name: str
    folder: Path
    suppress_tokens: list[int]
    begin_suppress_tokens: list[int]
    # (layer, head) pairs of cross-attention that follow the speech (word timestamps); None: not given
    alignment_heads: list[tuple[int, int]] | None = None

    @property
    def dims(self) -> ModelDims:
        return self.network.dims

    @property
    def device(self) -> torch.device:
        return self.network.decoder.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.network.decoder.token_embedding.weight.dtype

    @property
    def multilingual(self) -> bool:
        return self.tokenizer.multilingual

    # A path or 16 kHz samples in, a `Transcription` out: `specwhisper.transcription.transcribe`.
    transcribe = transcribe_function
