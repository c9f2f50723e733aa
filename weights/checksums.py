"""SHA-256 of files whose exact bytes are known in advance: the offline packages' files, the shipped drafts."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import WeightsError

CHUNK = 1 << 20  # streamed: a model.bin part is ~70 MB


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except OSError as err:
        raise WeightsError(f"{path}: cannot read ({err.strerror or type(err).__name__})") from None
    return digest.hexdigest()


def check_sha256(path: Path, expected: str, remedy: str) -> None:
    """Raise WeightsError (one line, naming the file and saying `remedy`) unless the file's SHA-256 is `expected`."""
    actual = file_sha256(path)
    if actual != expected:
        raise WeightsError(f"{path}: SHA-256 mismatch (expected {expected[:12]}..., got {actual[:12]}...): "
                           f"the file is corrupt or not the published one; {remedy}")
