"""openai-whisper's word timestamps on the dev clips, for tests/test_word_timing.py to compare against.

    pip install --target /tmp/owhisper --no-deps openai-whisper numba llvmlite more-itertools
    OMP_NUM_THREADS=1 python scripts/make_word_timing_reference.py --openai-whisper-path /tmp/owhisper

openai-whisper's network is built holding the very tensors specwhisper loaded (fp32, CPU), with the
alignment heads of the checkpoint's generation_config.json (checked against openai-whisper's own list
for the model), and runs `whisper.transcribe(network, samples, word_timestamps=True, language="en",
temperature=0.0, condition_on_previous_text=True, fp16=False)` on every clip of ../shared/audio/dev.
The samples are specwhisper.audio.load_audio's, bit-identical to what openai-whisper reads through the
ffmpeg program. Writes tests/data/word_timing_<model>_dev.json: per clip, its segments with their words.
"""

from __future__ import annotations

import argparse
import base64
import csv
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
AUDIO = REPO.parent / "shared" / "audio"


def dev_clips(folder: Path) -> list[tuple[str, Path]]:
    with (folder / "manifest.tsv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(row["file"], folder / row["file"]) for row in rows]


def heads_mask(heads: list[tuple[int, int]], n_layer: int, n_head: int) -> torch.Tensor:
    mask = torch.zeros(n_layer, n_head, dtype=torch.bool)  # (layers, heads), as openai-whisper keeps it
    for layer, head in heads:
        mask[layer, head] = True
    return mask


def openai_network(ours, whisper):
    """openai-whisper's Whisper holding specwhisper's tensors, with the checkpoint's alignment heads."""
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(**{name: getattr(ours.dims, name) for name in ModelDimensions.__dataclass_fields__})
    network = Whisper(dims)
    state = ours.network.state_dict()
    if set(state) != set(network.state_dict()):
        raise SystemExit(f"key sets differ: {sorted(set(state) ^ set(network.state_dict()))[:5]}")
    network.load_state_dict(state)
    mask = heads_mask(ours.alignment_heads, dims.n_text_layer, dims.n_text_head)
    published = whisper._ALIGNMENT_HEADS.get(ours.name)
    if published is not None:
        theirs = np.frombuffer(gzip.decompress(base64.b85decode(published)), dtype=bool).copy()
        if not np.array_equal(theirs.reshape(mask.shape), mask.numpy()):
            raise SystemExit(f"{ours.name}: generation_config.json's alignment heads differ from openai-whisper's")
    network.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)
    return network.eval()


def as_record(result: dict) -> dict:
    segments = [{"start": s["start"], "end": s["end"], "text": s["text"],
                 "words": [{"word": w["word"], "start": w["start"], "end": w["end"],
                            "probability": round(float(w["probability"]), 6)} for w in s["words"]]}
                for s in result["segments"]]
    return {"text": result["text"], "segments": segments}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--openai-whisper-path", default=None, help="folder to import openai-whisper from")
    parser.add_argument("--model", default="base")
    parser.add_argument("--audio", default=str(AUDIO / "dev"), help="folder with manifest.tsv")
    parser.add_argument("--out", default=None, help="default: tests/data/word_timing_<model>_dev.json")
    args = parser.parse_args()
    if args.openai_whisper_path:
        sys.path.insert(0, args.openai_whisper_path)
    import whisper

    from specwhisper import load_model
    from specwhisper.audio import load_audio

    torch.set_num_threads(1)
    ours = load_model(args.model, device="cpu", dtype=torch.float32, prepack=False)
    network = openai_network(ours, whisper)
    clips = {}
    started = time.perf_counter()
    for name, path in dev_clips(Path(args.audio)):
        result = whisper.transcribe(network, load_audio(str(path)), word_timestamps=True, language="en",
                                    temperature=0.0, condition_on_previous_text=True, fp16=False, verbose=None)
        clips[name] = as_record(result)
        print(f"{name}: {sum(len(s['words']) for s in clips[name]['segments'])} words", file=sys.stderr)
    out = Path(args.out or REPO / "tests" / "data" / f"word_timing_{args.model}_dev.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    reference = {"model": args.model, "openai_whisper": whisper.__version__,
                 "command": "python scripts/make_word_timing_reference.py", "clips": clips}
    out.write_text(json.dumps(reference, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out} ({len(clips)} clips, {time.perf_counter() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
