"""Write tests/data/beam5_base_dev.json: openai-whisper's beam-5 (and greedy) decode of every dev clip.

    pip install --target /tmp/owhisper --no-deps openai-whisper numba llvmlite more-itertools
    OMP_NUM_THREADS=1 python scripts/make_beam_reference.py --openai-whisper-path /tmp/owhisper

One 30-s window per clip (the dev clips are 2-35 s; a longer one is cut to its first 30 s), decoded
by openai-whisper's `decode` with its `DecodingOptions(language="en", beam_size=5, temperature=0,
fp16=False)`: timestamp mode, 224 tokens at most, patience and length_penalty None. The samples are
specwhisper's (`specwhisper.audio.load_audio`); the log-mel is openai-whisper's own
(`log_mel_spectrogram(pad_or_trim(samples))`, the convention of specwhisper's
`audio.log_mel_padded_audio`). The network is openai-whisper's `Whisper` holding the tensors
specwhisper loads for base (benchmarks/bench_longform_wer.py `openai_model_from_ours`), fp32 on the
CPU. Greedy (beam_size None) is stored too: how often the two implementations agree without a search.
tests/test_beam_search.py decodes the same windows with specwhisper and compares.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import read_manifest  # noqa: E402
from bench_longform_wer import import_openai_whisper, openai_model_from_ours  # noqa: E402
from specwhisper import audio, load_model  # noqa: E402

OUT = REPO / "tests" / "data" / "beam5_base_dev.json"


def decode(whisper, network, mel, beam_size):
    options = whisper.DecodingOptions(language="en", beam_size=beam_size, temperature=0.0, fp16=False)
    result = whisper.decode(network, mel, options)
    return {"tokens": result.tokens, "text": result.text, "avg_logprob": result.avg_logprob}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--openai-whisper-path", default="/tmp/owhisper", help="folder to import openai-whisper from")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    openai = import_openai_whisper(args.openai_whisper_path)
    if openai is None:
        raise SystemExit("openai-whisper is needed")
    whisper = openai[0]
    network = openai_model_from_ours(load_model("base", device="cpu", dtype=torch.float32, prepack=False), openai)
    clips = []
    started = time.perf_counter()
    for row in read_manifest("dev"):
        samples = audio.load_audio(row["path"])
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(samples)))
        clips.append({"file": row["file"], "beam5": decode(whisper, network, mel, 5),
                      "greedy": decode(whisper, network, mel, None)})
        print(f"{row['file']}: {clips[-1]['beam5']['text']}", flush=True)
    from importlib.metadata import version

    settings = {"openai_whisper": version("openai-whisper"), "torch": torch.__version__, "model": "base",
                "decode": "whisper.decode(model, log_mel_spectrogram(pad_or_trim(samples)), DecodingOptions("
                          "language='en', beam_size=5 | None, temperature=0.0, fp16=False))",
                "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - started, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(as_json(settings, clips), encoding="utf-8")
    print(f"wrote {args.out}")


def as_json(settings: dict, clips: list[dict]) -> str:
    """One clip per line: a diff of a regenerated file shows which clips changed."""
    lines = ",\n".join(json.dumps(clip, ensure_ascii=False) for clip in clips)
    return f'{{"settings": {json.dumps(settings, ensure_ascii=False)},\n"clips": [\n{lines}\n]}}\n'


if __name__ == "__main__":
    main()
