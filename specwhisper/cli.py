"""`specwhisper transcribe FILE...`: transcripts on stdout, everything else on stderr.

stdout holds only the transcripts (one line per file, or one line per segment with
--timestamps), so a greedy run and a speculative run can be compared with `diff`.
Subtitle and JSON files are written only when --output_format or --output_dir asks.
Bad input ends with one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources

from .errors import SpecWhisperError

EXIT_BAD_INPUT = 1
EXIT_USAGE = 2
# `auto` finds the distilled draft shipped for base (specwhisper/assets/drafts) or one the user
# made; with no draft for the model it decodes without an assistant (and says so only when
# --assistant auto was given explicitly). It is not the default: on the 2-core CPU this project is
# measured on, base's greedy step (9.6 ms, fp16-held block weights) and bit-exact verification
# (attention one position at a time) leave the shipped draft slower than plain greedy (0.88x on
# ../shared/audio/long, benchmarks/bench_distilled.py).
DEFAULT_ASSISTANT = "none"


def demo_clip_path() -> str:
    return str(resources.files("specwhisper") / "assets" / "demo.wav")


def str2bool(text: str) -> bool:
    values = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
    if text.lower() not in values:
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return values[text.lower()]


def optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _flag(name: str) -> list[str]:
    """Both spellings of a multi-word flag: openai-whisper's --snake_case and --kebab-case."""
    return sorted({f"--{name}", f"--{name.replace('_', '-')}"}, key=lambda s: "_" not in s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specwhisper", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    # Listed for --help; `main` hands `specwhisper distill ...` to specwhisper.distill's own parser.
    commands.add_parser("distill", add_help=False,
                        help="distil a small draft from a model for speculative decoding (see distill --help)")
    t = commands.add_parser(
        "transcribe", help="transcribe audio files of any length",
        description="Transcribe whole recordings in 30-s windows, as openai-whisper's transcribe does.")
    t.add_argument("files", nargs="+", metavar="FILE", help="audio files (WAV natively; FLAC, MP3, ... through ffmpeg); "
                   "'demo' is the bundled demo clip")
    t.add_argument("--model", default="base", help="model name (base, tiny.en, large-v3, ...), hub id or folder (default: base)")
    t.add_argument("--assistant", default=None,
                   help="assistant for speculative decoding: 'auto' (the distilled draft made for --model, when "
                   "there is one: see `specwhisper distill`), a model name, hub id or folder, a draft folder, or "
                   f"'none' (default: {DEFAULT_ASSISTANT})")
    t.add_argument("--language", default=None, help="language code or name (en, de, german, ...); default: detect "
                   "on the first 30 s of each file")
    t.add_argument("--task", default="transcribe", choices=["transcribe", "translate"],
                   help="transcribe, or translate to English (default: transcribe)")
    t.add_argument("--timestamps", action="store_true",
                   help="on stdout, one line per segment '[HH:MM:SS.mmm --> HH:MM:SS.mmm] text' instead of one "
                   "line per file")
    t.add_argument(*_flag("without_timestamps"), dest="without_timestamps", action="store_true",
                   help="decode without timestamp tokens: each 30-s window becomes one segment (default: timestamp "
                   "mode, which splits the text into timed segments and seeks between windows as openai-whisper)")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    t.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: fp16 on cuda, fp32 on cpu)")
    t.add_argument(*_flag("batch_size"), dest="batch_size", type=int, default=1, metavar="N",
                   help="decode windows of this many files together (default: 1)")
    t.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="temperature of the first decode of each window (default: 0)")
    t.add_argument(*_flag("temperature_increment_on_fallback"), dest="temperature_increment_on_fallback",
                   type=optional_float, default=0.2, metavar="T",
                   help="step up to 1.0 for re-decoding a window that fails a threshold below; None: no fallback "
                   "(default: 0.2)")
    t.add_argument(*_flag("compression_ratio_threshold"), dest="compression_ratio_threshold", type=optional_float,
                   default=2.4, metavar="X", help="a window whose text's zlib compression ratio is above this has failed "
                   "(default: 2.4)")
    t.add_argument(*_flag("logprob_threshold"), dest="logprob_threshold", type=optional_float, default=-1.0, metavar="X",
                   help="a window whose average token log-probability is below this has failed (default: -1)")
    t.add_argument(*_flag("no_speech_threshold"), dest="no_speech_threshold", type=optional_float, default=0.6, metavar="P",
                   help="a window whose no-speech probability is above this and that failed --logprob_threshold "
                   "is skipped as silence (default: 0.6)")
    t.add_argument(*_flag("condition_on_previous_text"), dest="condition_on_previous_text", type=str2bool,
                   default=True, metavar="BOOL",
                   help="prompt each window with the text before it, True or False (default: True)")
    t.add_argument(*_flag("initial_prompt"), dest="initial_prompt", default=None, metavar="TEXT",
                   help="text to prompt the first window with (spellings, names)")
    t.add_argument(*_flag("output_format"), "-f", dest="output_format", default=None,
                   choices=["txt", "srt", "vtt", "json", "tsv", "all"], metavar="FORMAT",
                   help="write <stem>.<format> files: txt, srt, vtt, json, tsv or all (default: none; all when --output_dir "
                   "is given)")
    t.add_argument(*_flag("output_dir"), "-o", dest="output_dir", default=None, metavar="DIR",
                   help="folder for the output files (default: the current folder when --output_format is given)")
    t.add_argument("--stats", action="store_true", help="print decoding statistics on stderr")
    t.add_argument("--draft-length", type=int, default=None, help="tokens drafted per main-model pass (speculative)")
    t.add_argument("--trace", action="store_true", help="print each transcript token by token on stderr, "
                   "marking drafted tokens and corrections")
    return parser


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fallback_temperatures(start: float, increment: float | None) -> tuple[float, ...]:
    """--temperature and --temperature_increment_on_fallback -> the temperatures to try, up to 1.0."""
    if increment is None or increment <= 0:
        return (start,)
    temperatures = []
    step = 0
    while start + step * increment <= 1.0 + 1e-6:
        temperatures.append(round(start + step * increment, 6))
        step += 1
    return tuple(temperatures) or (start,)


def run_transcribe(args: argparse.Namespace) -> int:
    import torch

    with torch.no_grad():  # scoped, not set globally: main() is also called in-process (tests, scripts)
        return _transcribe_files(args)


def _transcribe_files(args: argparse.Namespace) -> int:
    from .decoding import DecodeStats
    from .loading import load_model
    from .outputs import output_formats, write_outputs
    from .transcribe import check_language, transcribe_many

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    formats = output_formats(args.output_format or "all") if (args.output_format or args.output_dir) else ()
    output_dir = args.output_dir or "."
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    check_language(model.tokenizer, args.language, args.task)  # a bad code fails here, once, before any decoding
    assistant = resolve_assistant(model, args.assistant or DEFAULT_ASSISTANT, args.draft_length,
                                  explicit=args.assistant is not None)
    paths = [demo_clip_path() if path == "demo" else path for path in args.files]
    progress = _progress_bar()
    run_stats = DecodeStats()
    results = transcribe_many(
        model, paths, language=args.language, task=args.task, timestamps=not args.without_timestamps,
        assistant=assistant, batch_size=args.batch_size,
        temperature=fallback_temperatures(args.temperature, args.temperature_increment_on_fallback),
        compression_ratio_threshold=args.compression_ratio_threshold, logprob_threshold=args.logprob_threshold,
        no_speech_threshold=args.no_speech_threshold, condition_on_previous_text=args.condition_on_previous_text,
        initial_prompt=args.initial_prompt, progress=progress, run_stats=run_stats)
    status = 0
    try:
        for path, result in zip(paths, results):
            if isinstance(result, SpecWhisperError):
                _clear(progress)
                say(f"specwhisper: error: {result}")
                status = EXIT_BAD_INPUT
                continue
            _clear(progress)
            _print_transcript(result, args.timestamps)
            _refresh(progress)
            if formats:
                written = write_outputs(result, path, output_dir, formats)
                say(f"specwhisper: wrote {', '.join(str(p) for p in written)}")
            if args.stats:
                from .report import format_stats

                say(format_stats(path, result))
            if args.trace:
                from .report import format_trace

                say(format_trace(model.tokenizer, result, color=sys.stderr.isatty()))
    finally:
        if progress is not None:
            progress.close()
    if args.stats and args.batch_size > 1 and len(paths) > 1:
        from types import SimpleNamespace

        from .report import format_stats

        say("(in a batch, each file's statistics count the decode calls it shared with others)")
        say(format_stats("all files", SimpleNamespace(stats=run_stats)))
    return status


def resolve_assistant(model, choice: str, draft_length: int | None, explicit: bool):
    """--assistant: None for 'none'; for 'auto', the draft made for this model or None (said on stderr
    when the user asked for auto by name); otherwise the named model or draft folder, checked."""
    from .speculative import load_assistant, resolve_auto_assistant

    if choice.lower() == "none":
        return None
    if choice.lower() == "auto":
        assistant = resolve_auto_assistant(model, draft_length=draft_length)
        if assistant is None and explicit:
            say(f"specwhisper: no distilled draft for {model.name} (make one with `specwhisper distill`); "
                "decoding without an assistant")
        return assistant
    return load_assistant(model, choice, draft_length=draft_length)


def _print_transcript(result, timestamps: bool) -> None:
    if not timestamps:
        print(result.text, flush=True)
        return
    from .outputs import format_timestamp

    for segment in result.segments:
        print(f"[{format_timestamp(segment.start)} --> {format_timestamp(segment.end)}] {segment.text.strip()}",
              flush=True)


def _progress_bar():
    """A bar over audio seconds on stderr, only when stderr is a terminal (never in pipes or logs)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=0, unit="s", unit_scale=False, file=sys.stderr, dynamic_ncols=True, leave=False,
                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}]")


def _clear(progress) -> None:
    if progress is not None:
        progress.clear()


def _refresh(progress) -> None:
    if progress is not None:
        progress.refresh()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["distill"]:  # its own parser: specwhisper.distill
        from .distill import distill_main

        return distill_main(argv[1:])
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
