"""Long-form WER on ../shared/audio/long: specwhisper's `transcribe` beside openai-whisper's, same weights.

    python benchmarks/bench_longform_wer.py --models base tiny.en
    python benchmarks/bench_longform_wer.py --openai-whisper-path /tmp/owhisper   # where `pip install --target` put it

Both sides decode whole ~4-min recordings the same way: 30-s windows advanced by seek in
timestamp mode, conditioned on the previous text, temperature fallback (0, 0.2, ... 1.0),
greedy at temperature 0, fp32 on the CPU, language fixed to English. openai-whisper gets
*our* converted safetensors: its `Whisper(ModelDimensions)` is built from our dims and
takes our state dict as is (the module names are openai's; the key sets are checked to
match exactly), and it loads the audio itself (ffmpeg). If openai-whisper is not
importable, only specwhisper's column is printed. Install it without letting pip swap
torch: `pip install --no-deps openai-whisper numba llvmlite more-itertools`.

WER is over the whole folder (word edits summed over files / reference words), after
Whisper's English normalizer on both sides. Also printed: wall time, windows and
fallbacks per run, and the real-time factor (audio seconds per wall second).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from common import print_table, read_manifest
from specwhisper import load_model
from specwhisper.normalizer import EnglishTextNormalizer, word_error_rate


def import_openai_whisper(path: str | None):
    if path:
        sys.path.insert(0, path)
    try:
        import whisper
        from whisper.model import ModelDimensions, Whisper
    except ImportError as err:
        print(f"openai-whisper not importable ({err}); printing specwhisper only", file=sys.stderr)
        return None
    return whisper, ModelDimensions, Whisper


def openai_model_from_ours(ours, openai):
    """openai-whisper's network holding the very tensors specwhisper loaded (fp32, CPU)."""
    _, ModelDimensions, Whisper = openai
    dims = ModelDimensions(**{name: getattr(ours.dims, name) for name in ModelDimensions.__dataclass_fields__})
    network = Whisper(dims)
    state = ours.network.state_dict()
    expected = set(network.state_dict())
    if expected != set(state):
        raise SystemExit(f"key sets differ: {sorted(expected ^ set(state))[:5]}")
    network.load_state_dict(state)
    return network.eval()


def run_specwhisper(model, rows, assistant=None):
    texts, windows, fallbacks = [], 0, 0
    started = time.perf_counter()
    for row in rows:
        result = model.transcribe(row["path"], language="en", assistant=assistant)
        texts.append(result.text)
        windows += result.windows
        fallbacks += result.fallbacks
    return texts, time.perf_counter() - started, f"{windows} windows, {fallbacks} fallbacks"


def run_openai(network, rows, openai):
    whisper = openai[0]
    texts, segments = [], 0
    started = time.perf_counter()
    for row in rows:
        result = whisper.transcribe(network, row["path"], language="en", fp16=False, verbose=None)
        texts.append(result["text"])
        segments += len(result["segments"])
    return texts, time.perf_counter() - started, f"{segments} segments"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["base", "tiny.en"])
    parser.add_argument("--folder", default="long")
    parser.add_argument("--openai-whisper-path", default=None, help="folder to import openai-whisper from")
    parser.add_argument("--assistant", default=None, help="also run specwhisper speculatively with this assistant")
    parser.add_argument("--show", action="store_true", help="print every hypothesis")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    rows = read_manifest(args.folder)
    audio_seconds = sum(float(r["seconds"]) for r in rows)
    normalize = EnglishTextNormalizer()
    references = [normalize(r["reference"]) for r in rows]
    openai = import_openai_whisper(args.openai_whisper_path)

    table = []

    def score(model_name: str, system: str, texts: list[str], seconds: float, note: str) -> float:
        wer = word_error_rate(references, [normalize(t) for t in texts])
        per_file = " ".join(f"{100 * word_error_rate([r], [normalize(t)]):.2f}" for r, t in zip(references, texts))
        table.append([model_name, system, f"{100 * wer:.2f}%", per_file, f"{seconds:.1f}",
                      f"{audio_seconds / seconds:.1f}x", note])
        if args.show:
            for row, text in zip(rows, texts):
                print(f"--- {model_name} {system} {row['file']}\n{text}\n")
        return wer

    for name in args.models:
        ours = load_model(name, device="cpu", dtype=torch.float32)
        texts, seconds, note = run_specwhisper(ours, rows)
        score(name, "specwhisper", texts, seconds, note)
        if args.assistant:
            from specwhisper.assistants import load_assistant

            assistant = load_assistant(ours, args.assistant)
            texts, seconds, note = run_specwhisper(ours, rows, assistant)
            score(name, f"specwhisper + {args.assistant}", texts, seconds, note)
        if openai is not None:
            plain = load_model(name, device="cpu", dtype=torch.float32, prepack=False)  # nn.Linear state dict
            network = openai_model_from_ours(plain, openai)
            texts, seconds, note = run_openai(network, rows, openai)
            score(name, "openai-whisper", texts, seconds, note)
            del plain, network

    print(f"Long-form WER on ../shared/audio/{args.folder}: {len(rows)} files, {audio_seconds:.0f} s "
          f"(English normalizer; CPU fp32, {torch.get_num_threads()} threads)")
    print_table(["model", "system", "WER", "per file", "wall s", "speed", "notes"], table)


if __name__ == "__main__":
    main()
