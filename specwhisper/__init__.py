"""specwhisper: Whisper in plain PyTorch, made faster by exact speculative decoding."""

from .loading import load_model
from .speech_model import SpeechModel
from .transcribe import Transcription, transcribe

__all__ = ["load_model", "transcribe", "SpeechModel", "Transcription"]
__version__ = "0.1.0"
