"""Errors a user can cause, each carrying a one-line message the CLI prints as is."""


class SpecWhisperError(Exception):
    """Base of every error that is the input's fault, not a bug."""


class WeightsError(SpecWhisperError):
    """A weights file or folder is missing, truncated, corrupt, or not a Whisper checkpoint."""


class ModelNotFoundError(SpecWhisperError):
    """A model name that is neither a folder, a known offline package, nor reachable on the hub."""


class IncompatibleAssistantError(SpecWhisperError):
    """An assistant that cannot draft for this main model (mel bins, vocabulary, language)."""
