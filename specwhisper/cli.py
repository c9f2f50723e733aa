"""`specwhisper transcribe FILE...` and `specwhisper distill ...`: one parser, one exit-status rule.

transcribe: stdout holds only the transcripts (one line per file, or one line per segment with
--timestamps), so a greedy run and a speculative run can be compared with `diff`. Subtitle and
JSON files are written only when --output_format or --output_dir asks. `transcribe demo` adds one
line on stderr: what speculative decoding did on the demo clip, against greedy decoding.
distill: trains a draft (specwhisper.distill) and prints the folder it saved it to.
Bad input ends with one line on stderr and a non-zero exit status, never a traceback; arguments
are checked before torch is imported and before any model is loaded (specwhisper.checks).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from importlib import resources

from . import __version__
from .checks import (check_assistant_for_beam_search, check_clip_timestamps, check_device_available,
                     check_device_name, check_dtype_name, check_language, check_model_name, check_search_options,
                     english_only_model)
from .errors import SpecWhisperError

EXIT_BAD_INPUT = 1
EXIT_USAGE = 2
# `auto`: free drafts and the distilled draft made for the model (shipped for base, or the user's own),
# where it pays: on the CPU with the C kernels built (docs/benchmarks.md); elsewhere plain greedy.
DEFAULT_ASSISTANT = "auto"
ASSISTANT_KEYWORDS = ("auto", "none", "free")


def demo_clip_path() -> str:
    return str(resources.files("specwhisper") / "assets" / "demo.wav")


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (not the usage block), exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"specwhisper: error: {message} (see {self.prog} --help)\n")


def str2bool(text: str) -> bool:
    values = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
    if text.lower() not in values:
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return values[text.lower()]


def optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def optional_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text}")
    return value


def thread_count(text: str) -> int | None:
    """openai-whisper's --threads: a whole number, 0 for torch's default."""
    return None if text.strip() in ("0", "None") else positive_int(text)


def optional_bool(text: str) -> bool | None:
    return None if text.lower() == "none" else str2bool(text)


def _flag(name: str) -> list[str]:
    """Both spellings of a multi-word flag: openai-whisper's --snake_case and --kebab-case."""
    return sorted({f"--{name}", f"--{name.replace('_', '-')}"}, key=lambda s: "_" not in s)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="specwhisper", description="Whisper speech recognition, made faster by exact speculative "
                    "decoding.")
    parser.add_argument("--version", action="version", version=f"specwhisper {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_transcribe_command(commands)
    add_transcribe_many_command(commands)
    add_distill_command(commands)
    return parser


def add_transcribe_command(commands) -> None:
    t = commands.add_parser(
        "transcribe", help="transcribe audio files of any length",
        description="Transcribe whole recordings in 30-s windows, as openai-whisper's transcribe does.")
    t.add_argument("files", nargs="+", metavar="FILE", help="audio files (WAV natively; FLAC, MP3, Ogg, M4A, WebM, video files' audio, ... "
                   "through FFmpeg's libraries, in-process); "
                   "'demo' is the bundled demo clip")
    add_decoding_flags(t)
    t.add_argument("--timestamps", action="store_true",
                   help="on stdout, one line per segment '[HH:MM:SS.mmm --> HH:MM:SS.mmm] text' instead of one "
                   "line per file")
    t.add_argument("--verbose", type=optional_bool, default=None, metavar="BOOL",
                   help="True: one line per segment with its times on stdout (as --timestamps); False or None: "
                   "one line per file (default: None)")
    t.add_argument("--threads", type=thread_count, default=None, metavar="N",
                   help="CPU threads for torch and the C kernels; 0: torch's default, one per core (default: 0)")
    t.add_argument(*_flag("output_format"), "-f", dest="output_format", default=None,
                   choices=["txt", "srt", "vtt", "json", "tsv", "all"], metavar="FORMAT",
                   help="write <stem>.<format> files: txt, srt, vtt, json, tsv or all (default: none; all when --output_dir "
                   "is given)")
    t.add_argument(*_flag("output_dir"), "-o", dest="output_dir", default=None, metavar="DIR",
                   help="folder for the output files (default: the current folder when --output_format is given)")
    t.add_argument("--stats", action="store_true", help="print decoding statistics on stderr")
    t.add_argument("--trace", action="store_true", help="print each transcript token by token on stderr, "
                   "marking drafted tokens and corrections")


def add_transcribe_many_command(commands) -> None:
    m = commands.add_parser(
        "transcribe-many", help="transcribe a folder or a list of files with Ray, on this machine or a cluster",
        description="Transcribe many files through Ray Data: each worker loads the model once and streams files "
        "through; per file the outputs `transcribe` writes, plus one results table (results.jsonl). Running the "
        "same command again skips the files already done. Needs the ray extra: pip install 'specwhisper[ray]'.")
    m.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a folder (searched recursively for audio files), a manifest (a text file with one audio path "
                   "per line; relative paths are relative to the manifest's folder) or an audio file; folders and "
                   "files may be URIs (s3://bucket/prefix, gs://..., file:///...)")
    m.add_argument(*_flag("output_dir"), "-o", dest="output_dir", required=True, metavar="DIR",
                   help="folder for the outputs, mirroring the sources' folders, and results.jsonl; on a cluster, "
                   "a folder every machine sees at this path")
    m.add_argument(*_flag("output_format"), "-f", dest="output_format", default="all",
                   choices=["txt", "srt", "vtt", "json", "tsv", "all"], metavar="FORMAT",
                   help="txt, srt, vtt, json, tsv or all (default: all)")
    m.add_argument("--ray-address", "--ray_address", dest="ray_address", default=None, metavar="ADDRESS",
                   help="join this Ray cluster (host:port of its head, or 'auto'); default: the cluster "
                   "$RAY_ADDRESS names or `ray start` began on this machine, else a new Ray instance here, sized to "
                   "its cores")
    m.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="Ray actors, each with its own copy of the model (default: the cluster's CPUs / "
                   "--threads-per-worker)")
    m.add_argument("--threads-per-worker", "--threads_per_worker", dest="threads_per_worker", type=positive_int,
                   default=1, metavar="T", help="CPUs each worker reserves and torch threads it runs (default: 1)")
    m.add_argument("--gpus-per-worker", "--gpus_per_worker", dest="gpus_per_worker", type=non_negative_float, default=0.0,
                   metavar="G", help="GPUs each worker reserves, with --device cuda; 0.5 puts two workers on a GPU "
                   "(default: 0)")
    m.add_argument("--retry-failed", "--retry_failed", dest="retry_failed", action="store_true",
                   help="also try again the files the results table records as failed (default: skip them too)")
    add_decoding_flags(m)


def add_decoding_flags(t) -> None:
    """What `transcribe` and `transcribe-many` share: the model, its assistant, and how windows are decoded."""
    t.add_argument("--model", default="base", help="model name (base, tiny.en, large-v3, ...), hub id or folder (default: base)")
    t.add_argument("--assistant", default=None,
                   help="assistant for speculative decoding: 'auto' (the distilled draft made for --model, when "
                   "there is one: see `specwhisper distill`), a model name, hub id or folder, a draft folder, "
                   "'free' (only drafts that cost nothing: a window's likely start, repeated phrases), or 'none' "
                   f"(plain greedy decoding; default: {DEFAULT_ASSISTANT}, which on a GPU or without a C compiler "
                   "is none). All but none add the free drafts.")
    t.add_argument("--draft-length", type=int, default=None, help="tokens drafted per main-model pass (speculative)")
    t.add_argument("--language", default=None, help="language code or name (en, de, german, ...); default: detect "
                   "on the first 30 s of each file")
    t.add_argument("--task", default="transcribe", choices=["transcribe", "translate"],
                   help="transcribe, or translate to English (default: transcribe)")
    t.add_argument(*_flag("without_timestamps"), dest="without_timestamps", action="store_true",
                   help="decode without timestamp tokens: each 30-s window becomes one segment (default: timestamp "
                   "mode, which splits the text into timed segments and seeks between windows as openai-whisper)")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    t.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: fp16 on cuda, fp32 on cpu; "
                   "fp16 on the CPU is ~5x slower)")
    t.add_argument(*_flag("batch_size"), dest="batch_size", type=positive_int, default=1, metavar="N",
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
    t.add_argument("--seed", type=optional_int, default=0, metavar="N",
                   help="sampling (temperature fallback, best-of) draws from this seed afresh for each window, by the "
                   "main model alone, so a transcript depends only on the file and the flags: not on the files "
                   "before it or the assistant; None: PyTorch's global random numbers, as openai-whisper, and "
                   "speculative sampling with an assistant (default: 0)")
    add_openai_whisper_flags(t)
    add_word_timestamp_flags(t)
    add_search_flags(t)
    add_vad_flags(t)


def add_search_flags(t) -> None:
    """openai-whisper's beam search and best-of (specwhisper.beam_search); greedy stays the default."""
    t.add_argument(*_flag("beam_size"), dest="beam_size", type=optional_int, default=None, metavar="N",
                   help="beams in beam search at temperature 0, without an assistant (default: None, greedy: "
                   "what speculative decoding reproduces exactly; openai-whisper's is 5)")
    t.add_argument("--patience", type=optional_float, default=None, metavar="F",
                   help="beam search ends once round(beam_size x patience) hypotheses have (default: None, 1.0)")
    t.add_argument(*_flag("length_penalty"), dest="length_penalty", type=optional_float, default=None, metavar="F",
                   help="rank beams and samples by summed log-probability over ((5 + length) / 6) ** F, F in [0, 1] "
                   "(default: None, over the length)")
    t.add_argument(*_flag("best_of"), dest="best_of", type=optional_int, default=None, metavar="N",
                   help="samples per window above temperature 0, the best ranked kept (default: None, one; "
                   "openai-whisper's is 5)")


def optional_count(text: str) -> int | None:
    return None if text.lower() == "none" else positive_int(text)


# Subtitle options that only apply to cues cut from words: openai-whisper refuses them without word timestamps.
WORD_SUBTITLE_FLAGS = ("highlight_words", "max_line_width", "max_line_count", "max_words_per_line")


def add_word_timestamp_flags(t) -> None:
    """openai-whisper's word timestamps and the subtitle options built on them."""
    from .tokenizer import APPEND_PUNCTUATIONS, PREPEND_PUNCTUATIONS

    t.add_argument(*_flag("word_timestamps"), dest="word_timestamps", type=str2bool, default=False, metavar="BOOL",
                   help="time every word from the cross-attention of the alignment heads; segments then start and "
                   "end with their words (default: False)")
    t.add_argument(*_flag("prepend_punctuations"), dest="prepend_punctuations", default=PREPEND_PUNCTUATIONS,
                   metavar="CHARS",
                   help=f"with word timestamps, these join the next word (default: {PREPEND_PUNCTUATIONS})")
    t.add_argument(*_flag("append_punctuations"), dest="append_punctuations", default=APPEND_PUNCTUATIONS,
                   metavar="CHARS",
                   help=f"with word timestamps, these join the previous word (default: {APPEND_PUNCTUATIONS})")
    t.add_argument(*_flag("highlight_words"), dest="highlight_words", type=str2bool, default=False, metavar="BOOL",
                   help="(needs --word_timestamps True) underline each word as it is spoken in srt and vtt")
    t.add_argument(*_flag("max_line_width"), dest="max_line_width", type=optional_count, default=None, metavar="N",
                   help="(needs --word_timestamps True) characters in a subtitle line before it breaks")
    t.add_argument(*_flag("max_line_count"), dest="max_line_count", type=optional_count, default=None, metavar="N",
                   help="(needs --word_timestamps True, with --max_line_width) lines in a subtitle cue")
    t.add_argument(*_flag("max_words_per_line"), dest="max_words_per_line", type=optional_count, default=None,
                   metavar="N", help="(needs --word_timestamps True, no effect with --max_line_width) words in a "
                   "subtitle cue")
    t.add_argument(*_flag("hallucination_silence_threshold"), dest="hallucination_silence_threshold",
                   type=optional_float, default=None, metavar="SECONDS",
                   help="(with --word_timestamps True) skip silences longer than this around segments that look "
                   "hallucinated (default: None)")


def check_word_arguments(args: argparse.Namespace) -> None:
    """The subtitle options need word timestamps (an error, as openai-whisper); useless pairs get a warning."""
    for name in WORD_SUBTITLE_FLAGS:
        if getattr(args, name) and not args.word_timestamps:
            raise ValueError(f"--{name} requires --word_timestamps True")
    if args.max_line_count and not args.max_line_width:
        say("specwhisper: warning: --max_line_count has no effect without --max_line_width")
    if args.max_words_per_line and args.max_line_width:
        say("specwhisper: warning: --max_words_per_line has no effect with --max_line_width")
    if args.hallucination_silence_threshold is not None and not args.word_timestamps:
        say("specwhisper: warning: --hallucination_silence_threshold has no effect without --word_timestamps True")


def subtitle_options(args: argparse.Namespace):
    from .outputs import SubtitleOptions

    return SubtitleOptions(max_line_width=args.max_line_width, max_line_count=args.max_line_count,
                           max_words_per_line=args.max_words_per_line, highlight_words=args.highlight_words)


def add_openai_whisper_flags(t) -> None:
    """The rest of openai-whisper's `whisper` command line, so that one runs unchanged as `specwhisper transcribe`."""
    t.add_argument(*_flag("suppress_tokens"), dest="suppress_tokens", default="-1", metavar="IDS",
                   help="comma-separated token ids never to write; -1: the model's non-speech tokens; '': none "
                   "(default: -1)")
    t.add_argument(*_flag("carry_initial_prompt"), dest="carry_initial_prompt", type=str2bool, default=False,
                   metavar="BOOL", help="start every window's prompt with --initial_prompt, not only the first's "
                   "(default: False)")
    t.add_argument("--fp16", type=str2bool, default=True, metavar="BOOL",
                   help="decode in float16 where that is the default (CUDA); False: float32 everywhere "
                   "(default: True; --dtype, if given, wins)")
    t.add_argument(*_flag("model_dir"), dest="model_dir", default=None, metavar="DIR",
                   help="where downloaded and converted models are kept (default: ~/.cache/specwhisper and "
                   "huggingface-hub's cache)")
    t.add_argument(*_flag("clip_timestamps"), dest="clip_timestamps", default="0", metavar="SECONDS",
                   help="comma-separated start,end,start,end,... seconds of the parts to transcribe; an odd "
                   "count runs the last part to the end of the file (default: 0, the whole file)")


def add_vad_flags(t) -> None:
    """faster-whisper's VAD filter and its parameters (whisper-ctranslate2's flag names)."""
    from .vad import VadOptions

    defaults = VadOptions()
    t.add_argument(*_flag("vad_filter"), dest="vad_filter", type=str2bool, default=False, metavar="BOOL",
                   help="skip what Silero VAD finds is not speech before the windows are cut; timestamps stay on "
                   "the recording's timeline (default: False)")
    for name, kind, help_text in (
            ("threshold", float, "a 32-ms chunk with this speech probability or more is speech"),
            ("neg_threshold", optional_float, "speech ends below this probability (None: threshold - 0.15)"),
            ("min_speech_duration_ms", int, "shorter speech is dropped"),
            ("max_speech_duration_s", float, "longer speech is split at a silence"),
            ("min_silence_duration_ms", int, "speech ends after this much silence"),
            ("speech_pad_ms", int, "added to both sides of each stretch of speech")):
        t.add_argument(*_flag(f"vad_{name}"), dest=f"vad_{name}", type=kind, default=getattr(defaults, name),
                       metavar="X", help=f"--vad_filter: {help_text} (default: {getattr(defaults, name)})")


def vad_options(args: argparse.Namespace):
    from .vad import VadOptions

    return VadOptions(**{name: getattr(args, f"vad_{name}") for name in VadOptions.__dataclass_fields__})


def add_distill_command(commands) -> None:
    d = commands.add_parser(
        "distill", help="distil a small draft from a model for speculative decoding",
        description="Distil a shallow decoder-only draft from a Whisper model, for exact speculative decoding.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--main", default="base", help="the main model: a name, hub id or folder")
    d.add_argument("--audio", nargs="+", required=True, metavar="DIR",
                   help="folders (searched recursively) or files of unlabelled audio to learn from")
    d.add_argument("--out", required=True, help="folder to write draft.json and draft.safetensors into")
    d.add_argument("--layers", type=int, default=2, help="decoder blocks in the draft")
    d.add_argument("--from-layers", type=int, nargs="+", default=None, metavar="L",
                   help="main decoder layers the blocks start from, one per block (default: spread from first to "
                   "last, e.g. 0 5 for 2 of base's 6)")
    d.add_argument("--head", choices=("full", "shortlist", "lowrank"), default="shortlist",
                   help="output head: the main model's tied projection, a shortlist of the tokens it emits, or a "
                   "low-rank factorisation")
    d.add_argument("--shortlist-size", type=int, default=8192, help="tokens in a shortlist head")
    d.add_argument("--rank", type=int, default=64, help="rank of a low-rank head")
    d.add_argument("--epochs", type=int, default=8, help="training epochs at most")
    d.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    d.add_argument("--batch-size", type=int, default=8, help="windows per optimizer step")
    d.add_argument("--ce-weight", type=float, default=0.5,
                   help="weight of cross-entropy on the teacher's greedy token, added to the KL")
    d.add_argument("--hidden-weight", type=float, default=0.0,
                   help="weight of matching the main model's final hidden states")
    d.add_argument("--features", action="store_true",
                   help="the draft also reads the main model's hidden state of the previous position, which "
                   "verification computes anyway (EAGLE-style): much higher agreement")
    d.add_argument("--feedback-weight", type=float, default=1.0,
                   help="with --features: weight of a second training pass fed the draft's own hidden states, as "
                   "when it drafts several tokens ahead")
    d.add_argument("--patience", type=int, default=2, help="epochs without improvement before stopping")
    d.add_argument("--val-fraction", type=float, default=0.15, help="fraction of the files held out for validation")
    d.add_argument("--speeds", type=float, nargs="*", default=[0.9, 1.1],
                   help="speed perturbations, one extra copy of each clip per value")
    d.add_argument("--crops", type=int, default=1, help="random crops per clip")
    d.add_argument("--concat-passes", type=int, default=2,
                   help="times each language's clips are packed into full 30-s windows")
    d.add_argument("--top-k", type=int, default=64, help="teacher log-probabilities kept per position")
    d.add_argument("--max-new-tokens", type=int, default=224, help="tokens the teacher may write per window")
    d.add_argument("--eval-audio", nargs="*", default=[], metavar="DIR",
                   help="recordings never trained on: report agreement on their consecutive 30-s windows")
    d.add_argument("--storage-dtype", choices=("float32", "float16", "int8-delta"), default="float32",
                   help="how the draft's tensors are saved: float32 (reloads bit-identically), float16, or "
                   "int8-delta (int8 changes from the main model's layers: 1/4 the size)")
    d.add_argument("--init", default=None, metavar="DRAFT",
                   help="start from this saved draft (its layers, head and features) instead of the main model's "
                   "layers: to adapt a draft to more or other audio")
    d.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    d.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    d.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's, one per core)")
    d.add_argument("--seed", type=int, default=0, help="seed of the split, the augmentation and training")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")


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


def check_transcribe_arguments(args: argparse.Namespace) -> None:
    """Everything that can be checked before torch is imported and a model loaded (ValueError: one line)."""
    args.device = check_device_name(args.device)
    args.dtype = check_dtype_name(args.dtype)
    check_model_name(args.model)
    check_language(args.language, args.task, english_only_model(args.model))
    if args.assistant is not None and args.assistant.lower() not in ASSISTANT_KEYWORDS:
        check_model_name(args.assistant)
    check_search_arguments(args)
    check_word_arguments(args)
    args.suppress_tokens = number_list("--suppress_tokens", args.suppress_tokens, int)
    args.clip_timestamps = number_list("--clip_timestamps", args.clip_timestamps, float)
    if args.clip_timestamps == [0.0]:
        args.clip_timestamps = None  # openai-whisper's default: the whole file
    if args.clip_timestamps is not None:
        check_clip_timestamps(args.clip_timestamps, "--clip_timestamps")
    if not args.fp16 and args.dtype is None:
        args.dtype = "float32"
    if getattr(args, "verbose", None):
        args.timestamps = True
    if args.model_dir is not None:  # before any name is resolved
        use_model_dir(args.model_dir)


def use_model_dir(model_dir: str) -> None:
    """--model_dir: where converted models and hub downloads are kept."""
    os.environ["SPECWHISPER_CACHE"] = os.path.join(model_dir, "specwhisper")
    os.environ["HF_HUB_CACHE"] = os.path.join(model_dir, "huggingface")


def check_search_arguments(args: argparse.Namespace) -> None:
    """--beam_size, --patience, --length_penalty, --best_of as openai-whisper takes them, and no named assistant
    with beam search."""
    check_assistant_for_beam_search(args.assistant, args.beam_size)
    if args.patience is not None and args.beam_size is None:
        say(f"specwhisper: warning: --patience {args.patience} has no effect without --beam_size")
        args.patience = None
    try:
        check_search_options(args.beam_size, args.patience, args.length_penalty, args.best_of)
    except ValueError as err:
        raise ValueError(f"--{err}") from None


def number_list(flag: str, text: str, kind: type) -> list:
    try:
        return [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text}: expected comma-separated {kind.__name__} values") from None


def prepare_torch(device: str | None, dtype: str | None, threads: int | None) -> None:
    """Import torch, check the device exists in this build and machine, set the threads; warn of slow dtypes."""
    import torch

    check_device_available(device)
    if threads is not None:
        torch.set_num_threads(threads)  # the C kernels read it too
    on_cpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    if on_cpu and dtype is not None and dtype not in ("float32", "fp32"):
        say(f"specwhisper: warning: --dtype {dtype} on the CPU is ~5x slower than float32 (the encoder's "
            "matmuls) and skips the exact fast path; float32 is the CPU default")


def run_transcribe(args: argparse.Namespace) -> int:
    check_transcribe_arguments(args)
    prepare_torch(args.device, args.dtype, args.threads)
    import torch

    with torch.no_grad():  # scoped, not set globally: main() is also called in-process (tests, scripts)
        return _transcribe_files(args)


def _transcribe_files(args: argparse.Namespace) -> int:
    from .decoding import DecodeStats
    from .outputs import output_formats, write_outputs
    from .transcription import transcribe_many

    formats = output_formats(args.output_format or "all") if (args.output_format or args.output_dir) else ()
    output_dir = args.output_dir or "."
    model, assistant = load_model_and_assistant(args.model, args.assistant, args.draft_length, args.beam_size,
                                                args.suppress_tokens, args.language, args.task, args.device,
                                                args.dtype)
    paths = [demo_clip_path() if path == "demo" else path for path in args.files]
    options = transcription_options(args)
    progress = _progress_bar()
    run_stats = DecodeStats()
    results = transcribe_many(model, paths, assistant=assistant, progress=progress, run_stats=run_stats, **options)
    status = 0
    transcripts = []
    try:
        for path, result in zip(paths, results):
            if isinstance(result, SpecWhisperError):
                _clear(progress)
                say(f"specwhisper: error: {result}")
                status = EXIT_BAD_INPUT
                continue
            _clear(progress)
            transcripts.append(result)
            _print_transcript(result, args.timestamps)
            _refresh(progress)
            if formats:
                written = write_outputs(result, path, output_dir, formats, subtitle_options(args))
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
    # The README's first command: what speculative decoding did (nothing to say about beam search).
    demo_as_in_readme = args.files == ["demo"] and args.assistant is None and args.beam_size is None
    if demo_as_in_readme and args.temperature == 0 and status == 0:  # greedy's tokens are comparable
        status = explain_demo(model, assistant, transcripts[0], options)
    return status


def load_model_and_assistant(model_name: str, assistant_choice: str | None, draft_length: int | None,
                             beam_size: int | None, suppress_tokens: list[int], language: str | None, task: str,
                             device: str | None, dtype: str | None):
    """The main model (its suppressed tokens as --suppress_tokens says) and the drafter --assistant names
    (None: plain decoding), as `transcribe` and every `transcribe-many` worker load them."""
    from .loading import load_model
    from .transcription import check_language as check_vocabulary_language

    model = load_model(model_name, device=device, dtype=dtype)
    check_vocabulary_language(model.tokenizer, language, task)  # where the name could not tell
    model = dataclasses.replace(model, suppress_tokens=suppressed_tokens(model, suppress_tokens))
    choice = "none" if beam_size is not None else (assistant_choice or DEFAULT_ASSISTANT)  # beam search: none
    return model, resolve_assistant(model, choice, draft_length, explicit=assistant_choice is not None)


def transcription_options(args: argparse.Namespace) -> dict:
    """The decoding flags -> `transcribe_many`'s keyword arguments."""
    options = dict(
        language=args.language, task=args.task, timestamps=not args.without_timestamps, batch_size=args.batch_size,
        temperature=fallback_temperatures(args.temperature, args.temperature_increment_on_fallback),
        compression_ratio_threshold=args.compression_ratio_threshold, logprob_threshold=args.logprob_threshold,
        no_speech_threshold=args.no_speech_threshold, condition_on_previous_text=args.condition_on_previous_text,
        initial_prompt=args.initial_prompt, carry_initial_prompt=args.carry_initial_prompt,
        clip_timestamps=args.clip_timestamps, vad_filter=args.vad_filter, vad_options=vad_options(args))
    options.update(word_timestamps=args.word_timestamps, prepend_punctuations=args.prepend_punctuations,
                   append_punctuations=args.append_punctuations,
                   hallucination_silence_threshold=args.hallucination_silence_threshold)
    options.update(beam_size=args.beam_size, patience=args.patience, length_penalty=args.length_penalty,
                   best_of=args.best_of, seed=args.seed)
    return options


def suppressed_tokens(model, ids: list[int]) -> list[int]:
    """--suppress_tokens as openai-whisper reads it: -1 stands for the model's own list (non-speech tokens)."""
    n_vocab = model.dims.n_vocab
    bad = [i for i in ids if i != -1 and not 0 <= i < n_vocab]
    if bad:
        raise ValueError(f"--suppress_tokens: {bad[0]} is not a token id of {model.name} (0 .. {n_vocab - 1})")
    own = list(model.suppress_tokens) if -1 in ids else []
    return sorted(set(own) | {i for i in ids if i != -1})


def explain_demo(model, assistant, shown, options: dict) -> int:
    """One line on stderr after the demo's transcript: what speculative decoding did, and its decoding time
    against greedy decoding's on the same clip (each the faster of two runs, after a warm-up)."""
    from .transcription import transcribe_many

    if assistant is None:
        say(f"specwhisper: speculative decoding is off here ({auto_unavailable_reason(model)}): greedy decoding only")
        return 0

    def run(drafter):
        result, = transcribe_many(model, [demo_clip_path()], assistant=drafter, **options)
        return result

    run(None)  # warm-up: greedy's first steps build what the shown run did not
    runs = {"greedy": [], "speculative": []}
    for _ in range(2):
        runs["speculative"].append(run(assistant))
        runs["greedy"].append(run(None))
    greedy, speculative = (min(runs[name], key=lambda r: r.timings["decode"]) for name in ("greedy", "speculative"))
    same = all(r.tokens == shown.tokens for r in runs["greedy"] + runs["speculative"])
    s = speculative.stats
    say(f"specwhisper: speculative decoding: {s.generated_tokens} tokens in {s.main_passes} passes of {model.name} "
        f"({s.tokens_per_main_pass:.1f} per pass; {s.accepted} of {s.drafted} drafted tokens accepted); decoding "
        f"took {speculative.timings['decode']:.2f} s against {greedy.timings['decode']:.2f} s greedy "
        f"({greedy.timings['decode'] / speculative.timings['decode']:.2f}x) after a "
        f"{speculative.timings['encoder']:.2f} s encoder pass; "
        + ("the same tokens as greedy" if same else "NOT the same tokens as greedy: a bug, please report it"))
    return 0 if same else EXIT_BAD_INPUT


def resolve_assistant(model, choice: str, draft_length: int | None, explicit: bool):
    """--assistant: None for 'none' (plain greedy decoding); otherwise free drafts (long-form hints, prompt
    lookup) around a model drafter: for 'auto' the draft made for this model, when there is one (said on
    stderr when the user asked for auto by name and there is none); for 'free' none; otherwise the named
    model or draft folder, checked."""
    from .assistants import load_assistant, resolve_auto_assistant
    from .drafters import FreeDrafter

    if choice.lower() == "none":
        return None
    if choice.lower() == "free":
        return FreeDrafter(None)
    if choice.lower() == "auto":
        reason = auto_unavailable_reason(model)
        if reason is not None:
            if explicit:
                say(f"specwhisper: --assistant auto: {reason}; decoding without an assistant")
            return None
        assistant = resolve_auto_assistant(model, draft_length=draft_length)
        if assistant is None and explicit:
            say(f"specwhisper: no distilled draft for {model.name} (make one with `specwhisper distill`); "
                "decoding with free drafts only")
        return FreeDrafter(assistant)
    return FreeDrafter(load_assistant(model, choice, draft_length=draft_length))


def auto_unavailable_reason(model) -> str | None:
    """Why `auto` decodes plainly on this machine: it was measured to pay on the CPU with the C kernels."""
    from . import attention
    from .kernels import cpu_draft

    if model.device.type != "cpu" or model.dtype.itemsize != 4:
        return f"not measured to pay on {model.device.type} in {str(model.dtype).removeprefix('torch.')}"
    if attention.cpu_kernel_unavailable_reason() is not None:
        return f"the CPU attention kernel is unavailable ({attention.cpu_kernel_unavailable_reason()})"
    if cpu_draft.load_library() is None:
        return "the draft's C kernel is unavailable"
    return None


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


def run_distill(args: argparse.Namespace, argv: list[str]) -> int:
    from pathlib import Path

    args.device = check_device_name(args.device)
    check_model_name(args.main)
    missing = [path for path in [*args.audio, *args.eval_audio] if not Path(path).exists()]
    if missing:
        raise ValueError(f"{missing[0]}: no such file or folder")
    prepare_torch(args.device, None, args.threads)
    import torch

    from .distill import DistillOptions, distill
    from .distill.data import AugmentOptions
    from .distill.train import TrainOptions
    from .loading import load_model

    torch.manual_seed(args.seed)
    # fp32 everywhere: the draft trains in the main model's dtype, and fp16 training is unstable.
    main_model = load_model(args.main, device=args.device, dtype="float32")
    options = DistillOptions(
        layers=args.layers, from_layers=tuple(args.from_layers) if args.from_layers else None, head=args.head,
        shortlist_size=args.shortlist_size, rank=args.rank, val_fraction=args.val_fraction, top_k=args.top_k,
        max_new_tokens=args.max_new_tokens, storage_dtype=args.storage_dtype, features=args.features, init=args.init,
        augment=AugmentOptions(speeds=tuple(args.speeds), crops=args.crops, concat_passes=args.concat_passes),
        train=TrainOptions(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, ce_weight=args.ce_weight,
                           hidden_weight=args.hidden_weight, feedback_weight=args.feedback_weight,
                           patience=args.patience, seed=args.seed))
    distill(main_model, args.audio, args.out, options, resume=args.resume, progress=not args.no_progress,
            eval_audio=args.eval_audio, command="specwhisper " + " ".join(argv), log=say)
    print(args.out)
    return 0


def run_transcribe_many(args: argparse.Namespace) -> int:
    """The flags checked as `transcribe` checks them, before Ray starts; then the job, then its summary line."""
    check_transcribe_arguments(args)
    from .cluster import settings_from_args, transcribe_files

    try:  # lists the files, then checks the model and its assistant, before Ray starts (all one-line errors)
        summary = transcribe_files(args.sources, args.output_dir, settings_from_args(args),
                                   ray_address=args.ray_address, workers=args.workers, retry_failed=args.retry_failed)
    except KeyboardInterrupt:
        say("specwhisper: interrupted; the results table keeps every file done: the same command again goes on")
        return 130
    say(f"specwhisper: {summary.line()}")
    return EXIT_BAD_INPUT if summary.failed or summary.skipped_failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "transcribe":
            return run_transcribe(args)
        if args.command == "transcribe-many":
            return run_transcribe_many(args)
        if args.command == "distill":
            return run_distill(args, argv)
    except (SpecWhisperError, ValueError) as err:
        say(f"specwhisper: error: {err}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
