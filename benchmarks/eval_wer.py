"""WER of specwhisper's greedy transcripts on ../shared/audio/dev, after Whisper-style English normalization.

    python benchmarks/eval_wer.py --models base tiny.en
"""

from __future__ import annotations

import argparse

import torch

from common import print_table, read_manifest
from specwhisper import load_model
from specwhisper.normalizer import EnglishTextNormalizer, word_error_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["base", "tiny.en"])
    parser.add_argument("--folder", default="dev")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    rows = read_manifest(args.folder)
    normalize = EnglishTextNormalizer()
    table = []
    for name in args.models:
        model = load_model(name, device="cpu", dtype=torch.float32)
        hypotheses = [model.transcribe(r["path"], language="en").text for r in rows]
        references = [r["reference"] for r in rows]
        wer = word_error_rate([normalize(r) for r in references], [normalize(h) for h in hypotheses])
        table.append([name, len(rows), f"{100 * wer:.2f}%"])
    print(f"WER on ../shared/audio/{args.folder} (English normalizer, greedy, first 30 s of each clip)")
    print_table(["model", "clips", "WER"], table)


if __name__ == "__main__":
    main()
