"""Turn what the user typed (a folder, a known name, a hub id) into a local Hugging Face-layout folder."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from ..errors import ModelNotFoundError, WeightsError
from .checksums import check_sha256
from .ctranslate2 import convert_ctranslate2
from .registry import HUB_IDS, OFFLINE_PACKAGES, OfflinePackage

# Files a Whisper checkpoint needs; everything else on the hub (pickles, ONNX, flax) is skipped.
HUB_PATTERNS = ["config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
                "model.safetensors.index.json", "tokenizer.json"]


def cache_dir() -> Path:
    """Where converted checkpoints go: $SPECWHISPER_CACHE, else ~/.cache/specwhisper (never the repo)."""
    root = os.environ.get("SPECWHISPER_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "specwhisper"
    return Path(root)


def package_file(import_name: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / relative


def offline_folder(name: str, package: OfflinePackage) -> Path | None:
    """The converted folder for an installed offline package (converting on first use), or None if not installed."""
    parts = [package_file(mod, rel) for mod, rel in package.model_bin_parts]
    tokenizer = package_file(*package.tokenizer)
    if any(p is None for p in parts) or tokenizer is None:
        return None
    ct2_config = package_file(*package.ct2_config)
    # The stamp records which source files the conversion came from, so an upgraded package reconverts.
    stamp = {"name": name, "sources": [[str(p), p.stat().st_size, int(p.stat().st_mtime)] for p in parts if p.is_file()]}
    out = cache_dir() / "converted" / name
    stamp_file = out / "source.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return out
    remedy = f"reinstall: pip install --force-reinstall {' '.join(package.pip_names)}"
    check_package_files(package, remedy)
    try:
        convert_ctranslate2(parts, tokenizer, ct2_config, out)
    except WeightsError as err:
        raise WeightsError(f"{err}; {remedy}") from None
    stamp_file.write_text(json.dumps(stamp))
    return out


def check_package_files(package: OfflinePackage, remedy: str) -> None:
    """Refuse, before anything is converted or written, an installed file whose bytes are not the published ones."""
    for module, relative in package.files():
        path = package_file(module, relative)
        if path is not None and path.is_file():  # a missing file is the converter's to report
            check_sha256(path, package.sha256[module, relative], remedy)


def download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface-hub is a runtime dependency
        raise ModelNotFoundError(f"{repo_id}: huggingface-hub is not installed (pip install huggingface-hub)") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{repo_id}: no such model on the Hugging Face hub") from None
    except (LocalEntryNotFoundError, OSError) as err:
        hint = _offline_hint(repo_id)
        raise ModelNotFoundError(f"{repo_id}: not in the local cache and the hub is unreachable ({type(err).__name__}); {hint}") from None
    except Exception as err:  # the hub client raises many kinds of HTTP errors
        raise ModelNotFoundError(f"{repo_id}: download failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def _offline_hint(requested: str) -> str:
    offline = [n for n in OFFLINE_PACKAGES if requested in (n, HUB_IDS.get(n))]
    if offline:
        return f"install the offline copy: pip install {' '.join(OFFLINE_PACKAGES[offline[0]].pip_names)}"
    return "pass a local folder with config.json + model.safetensors, or use one of the offline models: " + \
        ", ".join(OFFLINE_PACKAGES)


def resolve_model_folder(name_or_path: str | os.PathLike) -> Path:
    """A local folder for a path, a known name ('base', 'tiny.en', 'large-v3', ...) or a hub id ('openai/whisper-small')."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise WeightsError(f"{path}: expected a model folder (config.json + model.safetensors), got a file")
    if text in OFFLINE_PACKAGES:
        folder = offline_folder(text, OFFLINE_PACKAGES[text])
        if folder is not None:
            return folder
    if text in HUB_IDS:
        return download_from_hub(HUB_IDS[text])
    if "/" in text and not text.startswith((".", "/")) and text.count("/") == 1:
        return download_from_hub(text)
    known = ", ".join(sorted(HUB_IDS))
    raise ModelNotFoundError(f"{text}: not a folder, a known model name ({known}) or a hub id (owner/name)")
