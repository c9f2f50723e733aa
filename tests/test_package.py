"""What a user gets from `pip install` and `import specwhisper`: the requirements, the API's names."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

from packaging.requirements import Requirement

# Importing specwhisper and its CLI module stays cheap: torch (~2 s) is imported on first use.
LIGHT_IMPORT = ("import sys, specwhisper, specwhisper.cli\n"
                "print('torch' in sys.modules, callable(specwhisper.transcribe), specwhisper.__version__)\n")


def test_required_dependencies_hold_nothing_gpu_only():
    """`pip show specwhisper` on a CPU machine: no triton, no nvidia-*/cuda-* packages (triton is the gpu extra)."""
    required = [Requirement(r) for r in importlib.metadata.requires("specwhisper") if "extra ==" not in r]
    names = {r.name.lower() for r in required}
    assert names == {"torch", "numpy", "tiktoken", "regex", "safetensors", "huggingface-hub", "av"}, names
    extras = importlib.metadata.metadata("specwhisper").get_all("Provides-Extra")
    assert "gpu" in extras and any(r.startswith("triton") and 'extra == "gpu"' in r
                                   for r in importlib.metadata.requires("specwhisper"))


def test_import_is_light_and_transcribe_is_the_function():
    done = subprocess.run([sys.executable, "-c", LIGHT_IMPORT], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True", importlib.metadata.version("specwhisper")], done.stdout


def test_api_names():
    import specwhisper
    import specwhisper.transcription as transcription

    assert specwhisper.transcribe is transcription.transcribe
    assert specwhisper.Transcription is transcription.Transcription
    from specwhisper.loading import load_model

    assert specwhisper.load_model is load_model
