"""Progress bars for the long steps of `specwhisper distill`: tqdm on a terminal, nothing elsewhere."""

from __future__ import annotations

import sys


def progress_bar(total: int, label: str, enabled: bool):
    """A tqdm bar on a terminal; elsewhere a stand-in that prints nothing."""
    if enabled and sys.stderr.isatty():
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=label, unit="it", leave=False, dynamic_ncols=True)
        except ImportError:
            pass
    return NoBar()


class NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass
