"""Helpers shared by the benchmark scripts: the evaluation audio and a table printer."""

from __future__ import annotations

import csv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AUDIO = REPO.parent / "shared" / "audio"


def read_manifest(folder: str) -> list[dict]:
    manifest = AUDIO / folder / "manifest.tsv"
    if not manifest.is_file():
        raise SystemExit(f"evaluation audio not found at {manifest}")
    with manifest.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    for row in rows:
        row["path"] = str(AUDIO / folder / row["file"])
    return rows


def print_table(header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))
