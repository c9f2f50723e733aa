"""`specwhisper transcribe FILE...`: transcripts on stdout, everything else on stderr.

stdout holds only the transcripts (one line per file), so a greedy run and a
speculative run can be compared with `diff`. Bad input ends with one line on
stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources

from .errors import SpecWhisperError

EXIT_BAD_INPUT = 1
EXIT_USAGE = 2


def demo_clip_path() -> str:
    return str(resources.files("specwhisper") / "assets" / "demo.wav")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specwhisper", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("transcribe", help="transcribe audio files (the first 30 s of each)")
    t.add_argument("files", nargs="+", metavar="FILE", help="audio files (WAV natively; FLAC, MP3, ... through ffmpeg); "
                   "'demo' is the bundled demo clip")
    t.add_argument("--model", default="base", help="model name (base, tiny.en, large-v3, ...), hub id or folder (default: base)")
    t.add_argument("--assistant", default="none",
                   help="assistant model for speculative decoding: a name, hub id or folder, or 'none' (default: none)")
    t.add_argument("--language", default=None, help="language code (en, de, ...); default: detect")
    t.add_argument("--task", default="transcribe", choices=["transcribe", "translate"])
    t.add_argument("--timestamps", action="store_true", help="decode in timestamp mode and print the timestamp tokens")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    t.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: fp16 on cuda, fp32 on cpu)")
    t.add_argument("--stats", action="store_true", help="print decoding statistics on stderr")
    t.add_argument("--draft-length", type=int, default=None, help="tokens drafted per main-model pass (speculative)")
    t.add_argument("--trace", action="store_true", help="print each transcript token by token on stderr, "
                   "marking drafted tokens and corrections")
    return parser


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_transcribe(args: argparse.Namespace) -> int:
    import torch

    from .audio import AudioError, load_audio
    from .loading import load_model

    torch.set_grad_enabled(False)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    assistant = None
    if args.assistant and args.assistant.lower() != "none":
        from .speculative import load_assistant

        assistant = load_assistant(model, args.assistant, draft_length=args.draft_length)
    status = 0
    for path in args.files:
        path = demo_clip_path() if path == "demo" else path
        try:
            samples = load_audio(path)
            result = model.transcribe(samples, language=args.language, task=args.task, timestamps=args.timestamps,
                                      assistant=assistant)
        except (AudioError, SpecWhisperError) as err:
            say(f"specwhisper: error: {err}")
            status = EXIT_BAD_INPUT
            continue
        print(result.text, flush=True)
        if result.truncated:
            say(f"specwhisper: note: {path} is {result.audio_seconds:.1f} s long; only the first 30 s were transcribed "
                "(long-form transcription is not built yet)")
        if args.stats:
            from .report import format_stats

            say(format_stats(path, result))
        if args.trace:
            from .report import format_trace

            say(format_trace(model.tokenizer, result, color=sys.stderr.isatty()))
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "transcribe":
            return run_transcribe(args)
    except (SpecWhisperError, ValueError) as err:
        say(f"specwhisper: error: {err}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
