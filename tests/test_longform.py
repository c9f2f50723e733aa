"""Long-form transcription: the seek loop on scripted decodes, then real models on real recordings.

The first half never touches a model: `split_window`, the fallback and silence rules and
the per-file state are fed hand-written token lists (a toy vocabulary where ids >= 1000 are
timestamps, <|0.00|> = 1000, one step = 0.02 s), and `run_files` runs with a stub decoder.
The second half uses tiny.en (and base for language detection) on ../shared/audio.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from specwhisper.decoding import WindowResult
from specwhisper.errors import SpecWhisperError
from specwhisper.longform import (FileTranscript, LongformOptions, compression_ratio, decode_with_fallback,
                                  is_silence, needs_fallback, run_files, split_window)

from conftest import AUDIO, REPO, read_manifest

TS = 1000  # toy <|0.00|>
EOT = 999


def ts(seconds: float) -> int:
    return TS + round(seconds / 0.02)


class ToyTokenizer:
    """Text tokens 0..998 decode to ' w<id>'; ids >= EOT (specials, timestamps) decode to nothing."""

    timestamp_begin = TS
    eot = EOT

    def decode(self, ids) -> str:
        return "".join(f" w{t}" for t in ids if t < EOT)


TOK = ToyTokenizer()
OPTIONS = LongformOptions()


def window_result(tokens, avg_logprob=-0.2, no_speech_prob=0.01, language="en", draft_mask=None) -> WindowResult:
    return WindowResult(tokens=list(tokens), language=language, avg_logprob=avg_logprob,
                        no_speech_prob=no_speech_prob, finished=True, draft_mask=draft_mask)


def new_file(content_frames=10_000, **kwargs) -> FileTranscript:
    return FileTranscript(index=0, mel=torch.zeros(4, content_frames + 3000), content_frames=content_frames,
                          language="en", **kwargs)


# --------------------------------------------------------------------------- split_window


def test_split_at_timestamp_pairs_and_seek_to_last_complete_segment():
    tokens = [ts(0), 1, 2, ts(2.5), ts(2.5), 3, ts(5.0), ts(5.0), 4, 5]  # the last segment is cut off
    pieces, advance = split_window(tokens, TS, 3000)
    assert [(p.start, p.end, p.tokens) for p in pieces] == [
        (0.0, 2.5, [ts(0), 1, 2, ts(2.5)]), (2.5, 5.0, [ts(2.5), 3, ts(5.0)])]
    assert advance == 500  # frames: 5.00 s, where the unfinished segment starts


def test_single_trailing_timestamp_keeps_last_segment_and_skips_the_window():
    tokens = [ts(0), 1, ts(2.5), ts(3.0), 2, ts(7.0)]  # text, then one timestamp: nothing more was said
    pieces, advance = split_window(tokens, TS, 3000)
    assert [(p.start, p.end) for p in pieces] == [(0.0, 2.5), (3.0, 7.0)]
    assert advance == 3000  # the whole window, not just to 7.00 s


def test_single_segment_without_a_pair_ends_at_its_timestamp():
    pieces, advance = split_window([ts(0.4), 1, 2, ts(9.0)], TS, 3000)
    assert [(p.start, p.end) for p in pieces] == [(0.0, 9.0)]
    assert advance == 3000


def test_no_timestamps_is_one_segment_of_the_whole_window():
    pieces, advance = split_window([1, 2, 3], TS, 1234)  # the file's last window: 12.34 s of audio
    assert [(p.start, p.end, p.tokens) for p in pieces] == [(0.0, 12.34, [1, 2, 3])]
    assert advance == 1234
    pieces, _ = split_window([ts(0), 1, 2], TS, 3000)  # only <|0.00|>: ends with the window
    assert pieces[0].end == 30.0


def test_window_ending_on_a_pair_seeks_to_the_pair():
    tokens = [ts(0), 1, ts(4.0), ts(4.0)]  # a segment opened with no text before end-of-text
    pieces, advance = split_window(tokens, TS, 3000)
    assert [(p.start, p.end) for p in pieces] == [(0.0, 4.0)]
    assert advance == 400


# --------------------------------------------------------------------------- fallback and silence


def test_compression_ratio_is_high_for_loops():
    assert compression_ratio("the cat sat on the mat") < 1.5
    assert compression_ratio("I'm sorry. " * 40) > 2.4
    assert compression_ratio("") == 0.0


def test_fallback_triggers():
    assert not needs_fallback(-0.3, 1.5, 0.1, OPTIONS)
    assert needs_fallback(-0.3, 3.0, 0.1, OPTIONS)  # repetitive
    assert needs_fallback(-1.5, 1.5, 0.1, OPTIONS)  # unsure
    assert not needs_fallback(-1.5, 3.0, 0.9, OPTIONS)  # silence: keep it, it will be skipped
    assert needs_fallback(-0.5, 3.0, 0.9, OPTIONS)  # a confident loop is not silence, whatever no-speech says
    off = LongformOptions(compression_ratio_threshold=None, logprob_threshold=None)
    assert not needs_fallback(-5.0, 10.0, 0.0, off)


def test_silence_needs_both_no_speech_and_low_confidence():
    assert is_silence(-1.5, 0.9, OPTIONS)
    assert not is_silence(-0.5, 0.9, OPTIONS)  # confident text despite the no-speech bet
    assert not is_silence(-1.5, 0.3, OPTIONS)
    assert not is_silence(-1.5, 0.9, LongformOptions(no_speech_threshold=None))


def scripted_decoder(script):
    """A DecodeFn answering each call from `script`: a function (temperature, row prompt) -> WindowResult."""
    calls = []

    def decode(mels, previous, languages, temperature, stats, hints):
        calls.append((mels.shape[0], [list(p) for p in previous], list(languages), temperature))
        stats.generated_tokens += mels.shape[0]
        return [script(temperature, prompt) for prompt in previous]

    return decode, calls


def test_fallback_redecodes_only_failed_rows_at_the_next_temperature():
    loop = [ts(0)] + [7] * 60 + [ts(20.0)]
    good = [ts(0), 1, 2, 3, ts(3.0)]

    def script(temperature, prompt):
        if prompt == [55]:  # row 1 loops at temperature 0, recovers at 0.2
            return window_result(loop if temperature == 0 else good)
        return window_result(good)

    decode, calls = scripted_decoder(script)
    files = [new_file(), new_file(history=[55])]
    outcomes = decode_with_fallback(decode, files, torch.zeros(2, 4, 3000), TOK, OPTIONS)
    assert [(n, t) for n, _, _, t in calls] == [(2, 0.0), (1, 0.2)]
    assert [t for _, t, _ in outcomes] == [0.0, 0.2]
    assert files[1].fallbacks == 1 and files[0].fallbacks == 0
    assert files[1].stats.generated_tokens == 3 and files[0].stats.generated_tokens == 2


def test_fallback_stops_at_the_last_temperature_and_keeps_that_result():
    decode, calls = scripted_decoder(lambda t, p: window_result([ts(0), 1, ts(1.0)], avg_logprob=-2.0))
    (result, temperature, _), = decode_with_fallback(decode, [new_file()], torch.zeros(1, 4, 3000), TOK, OPTIONS)
    assert [t for *_, t in calls] == list(OPTIONS.temperatures)
    assert temperature == 1.0


def test_silent_window_is_not_retried_and_is_skipped():
    decode, calls = scripted_decoder(lambda t, p: window_result([ts(0), 1, ts(1.0)], avg_logprob=-2.0,
                                                                no_speech_prob=0.95))
    f = new_file(content_frames=4000)
    outcomes = decode_with_fallback(decode, [f], torch.zeros(1, 4, 3000), TOK, OPTIONS)
    assert len(calls) == 1
    f.add_window(*outcomes[0], 3000, TOK, OPTIONS)
    assert f.seek == 3000 and f.segments == [] and f.tokens == []


# --------------------------------------------------------------------------- one file's state


def test_segments_are_placed_at_the_window_offset_and_feed_the_next_prompt():
    f = new_file()
    f.seek = 1500  # this window starts at 15 s
    f.add_window(window_result([ts(0), 1, ts(2.0), ts(2.0), 2, ts(4.0), ts(4.0), 3]), 0.0, 1.0, 3000, TOK, OPTIONS)
    assert [(s.start, s.end, s.text, s.seek) for s in f.segments] == [(15.0, 17.0, " w1", 1500), (17.0, 19.0, " w2", 1500)]
    assert f.seek == 1500 + 400
    assert f.tokens == [ts(0), 1, ts(2.0), ts(2.0), 2, ts(4.0)]  # the unfinished " w3" is decoded again later
    assert f.prompt(OPTIONS) == f.tokens


def test_prompt_resets_after_a_hot_window_or_without_conditioning():
    f = new_file()
    f.add_window(window_result([ts(0), 1, ts(2.0)]), 0.0, 1.0, 3000, TOK, OPTIONS)
    assert f.prompt(OPTIONS) == [ts(0), 1, ts(2.0)]
    f.add_window(window_result([ts(0), 2, ts(2.0)]), 0.6, 1.0, 3000, TOK, OPTIONS)  # sampled above 0.5
    assert f.prompt(OPTIONS) == []
    f.add_window(window_result([ts(0), 3, ts(2.0)]), 0.4, 1.0, 3000, TOK, OPTIONS)
    assert f.prompt(OPTIONS) == [ts(0), 3, ts(2.0)]
    assert [s.temperature for s in f.segments] == [0.0, 0.6, 0.4]

    independent = LongformOptions(condition_on_previous_text=False)
    g = new_file(initial_prompt=[42, 43])
    assert g.prompt(independent) == [42, 43]  # the initial prompt still leads the first window
    g.add_window(window_result([ts(0), 1, ts(2.0)]), 0.0, 1.0, 3000, TOK, independent)
    assert g.prompt(independent) == []
    assert g.tokens == [ts(0), 1, ts(2.0)]


def test_prompt_keeps_the_last_223_tokens():
    f = new_file()
    f.history = list(range(500))
    assert f.prompt(OPTIONS) == list(range(500 - 223, 500))


def test_empty_and_instant_segments_are_dropped_and_times_clipped_to_the_audio():
    f = new_file(content_frames=3500)
    f.seek = 3000  # the last window holds 5 s of audio
    tokens = [ts(0), ts(1.0), ts(1.0), 5, ts(1.0), ts(1.0), 6, ts(7.5)]  # "" at 0-1 s, " w5" instant, " w6" past the end
    f.add_window(window_result(tokens), 0.0, 1.0, 500, TOK, OPTIONS)
    assert [(s.start, s.end, s.text) for s in f.segments] == [(31.0, 35.0, " w6")]
    assert f.done


def test_language_is_fixed_by_the_first_window():
    f = new_file()
    f.language = None
    f.add_window(window_result([ts(0), 1, ts(1.0)], language="de"), 0.0, 1.0, 3000, TOK, OPTIONS)
    f.add_window(window_result([ts(0), 1, ts(1.0)], language="fr"), 0.0, 1.0, 3000, TOK, OPTIONS)
    assert f.language == "de"


# --------------------------------------------------------------------------- the loop with a stub decoder


def test_run_files_yields_in_order_with_errors_in_place_and_refills_the_batch():
    lengths = {"a": 9000, "b": 500, "c": 4000, "d": 6100}
    opened = []

    def open_file(index, name):
        if name == "bad":
            raise SpecWhisperError("cannot load audio 'bad': no such file")
        opened.append(name)
        return FileTranscript(index=index, mel=torch.zeros(4, lengths[name] + 3000), content_frames=lengths[name],
                              language="en")

    # every window: one segment of 10 s that ends with a lone timestamp -> seek moves 30 s
    decode, calls = scripted_decoder(lambda t, p: window_result([ts(0), 1, ts(10.0)]))
    out = list(run_files(["a", "bad", "b", "c", "d"], open_file, decode, TOK, OPTIONS, batch_size=2))
    assert [i for i, _ in out] == [0, 1, 2, 3, 4]
    assert isinstance(out[1][1], SpecWhisperError)
    windows = {name: -(-lengths[name] // 3000) for name in lengths}
    for (i, state), name in zip([out[0], out[2], out[3], out[4]], "abcd"):
        assert state.windows == windows[name] and len(state.segments) == windows[name]
        assert state.mel is None  # features released once done
    assert max(n for n, *_ in calls) == 2
    assert sum(n for n, *_ in calls) == sum(windows.values())


def test_run_files_handles_audio_shorter_than_a_frame():
    decode, calls = scripted_decoder(lambda t, p: window_result([ts(0), 1, ts(1.0)]))
    open_file = lambda i, s: FileTranscript(index=i, mel=torch.zeros(4, 3000), content_frames=0, language="en")
    (index, state), = run_files([None], open_file, decode, TOK, OPTIONS)
    assert state.segments == [] and calls == []


def test_an_hour_of_audio_is_transcribed_window_by_window_in_bounded_memory():
    """1 hour of synthetic audio through the real front end and the seek loop (with a stub decoder):
    the loop must not grow memory with the length of the file. Run in a fresh process to read its RSS."""
    script = textwrap.dedent("""
        import json, resource
        import numpy as np, torch
        from specwhisper.audio import log_mel_windows
        from specwhisper.decoding import WindowResult
        from specwhisper.longform import FileTranscript, LongformOptions, run_files

        TS = 50364  # a real vocabulary's <|0.00|>; the stub's text tokens are below it
        class Tokenizer:
            timestamp_begin = TS
            def decode(self, ids):
                return "".join(" w" for t in ids if t < TS)

        def peak_rss_mb():
            # VmHWM belongs to this process's own memory map, which exec made fresh. (ru_maxrss
            # would not do: it survives exec and so counts the pytest process this one forked from.)
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

        def rss_mb():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * resource.getpagesize() / 2**20

        hour = np.random.default_rng(0).standard_normal(3600 * 16000, dtype=np.float32)
        hour *= 0.01
        mel, content = log_mel_windows(hour, n_mels=80)
        del hour
        shapes = set()
        def decode(mels, previous, languages, temperature, stats, hints):
            shapes.add(tuple(mels.shape))
            # two complete 12-s segments and an unfinished third: seek moves 24 s per window
            tokens = [TS, 1, 2, TS + 600, TS + 600, 3, TS + 1200, TS + 1200, 4]
            return [WindowResult(tokens, "en", -0.2, 0.01, False) for _ in previous]
        state = FileTranscript(index=0, mel=mel, content_frames=content, language="en")
        del mel
        before = rss_mb()
        (_, state), = run_files([None], lambda i, s: state, decode, Tokenizer(), LongformOptions())
        print(json.dumps({"windows": state.windows, "segments": len(state.segments), "shapes": sorted(shapes),
                          "end": state.segments[-1].end, "growth_mb": rss_mb() - before,
                          "peak_mb": peak_rss_mb()}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["windows"] == 3600 // 24 and report["segments"] == 2 * 3600 // 24
    assert report["end"] == 3600.0
    assert report["shapes"] == [[1, 80, 3000]]  # one window at a time, never the whole file
    assert report["growth_mb"] < 50, report  # the loop keeps nothing per window (the log-mel alone is 115 MB)
    assert report["peak_mb"] < 2000, report  # the samples, the log-mel and the STFT's transients


# --------------------------------------------------------------------------- real models, real audio


@pytest.fixture
def one_thread():
    """Decoder steps are tiny ops: on a 2-core machine shared with other jobs, two OpenMP threads
    waiting on each other run them several times slower than one thread does. One thread keeps
    these tests' runtime steady (the results are checked the same way either way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lj_reference() -> tuple[str, float, str]:
    row = next(r for r in read_manifest("long") if r["file"].startswith("lj001_part1"))
    return row["path"], float(row["seconds"]), row["reference"]


def test_long_recording_end_to_end(tiny_en_model, one_thread):
    from specwhisper.normalizer import EnglishTextNormalizer, word_error_rate

    path, seconds, reference = lj_reference()
    result = tiny_en_model.transcribe(path)
    assert result.language == "en"
    assert abs(result.audio_seconds - seconds) < 0.01
    assert result.windows >= 9  # 253 s in windows of at most 30 s
    assert len(result.segments) > 20
    times = [t for s in result.segments for t in (s.start, s.end)]
    assert times == sorted(times) and times[0] >= 0 and times[-1] <= seconds
    assert all(s.end > s.start for s in result.segments)
    assert result.text == "".join(s.text for s in result.segments).strip()
    normalize = EnglishTextNormalizer()
    wer = word_error_rate([normalize(reference)], [normalize(result.text)])
    assert wer < 0.08, f"WER {wer:.3f}"
    assert result.stats.generated_tokens >= len(result.tokens)
    assert result.timings["total"] > 0


def clip(name: str) -> np.ndarray:
    from specwhisper.audio import load_audio

    if not (AUDIO / "dev" / name).is_file():
        pytest.skip(f"evaluation audio not found at {AUDIO / 'dev'}")
    return load_audio(AUDIO / "dev" / name)


def test_batched_equals_one_at_a_time(tiny_en_model, one_thread):
    """Three recordings (one of two windows) plus a missing file: batched rows give exactly the
    transcripts of decoding each recording alone, and the bad file's error stays in its place."""
    from specwhisper.transcription import transcribe_many

    joined = np.concatenate([clip("ls_1221-135766-0001.wav"), clip("ls_2412-153948-0000.flac"),
                             clip("ls_2412-153948-0001.flac")])  # ~39 s: two windows
    audios = [clip("jfk.flac"), joined, str(AUDIO / "dev" / "missing.wav"), clip("ls_1995-1837-0001.wav")]
    alone = list(transcribe_many(tiny_en_model, audios, batch_size=1))
    batched = list(transcribe_many(tiny_en_model, audios, batch_size=3))
    assert isinstance(alone[2], SpecWhisperError) and isinstance(batched[2], SpecWhisperError)
    assert alone[1].windows == 2
    for one, many in zip(alone, batched):
        if isinstance(one, SpecWhisperError):
            continue
        assert many.text == one.text
        assert [(s.start, s.end, s.tokens) for s in many.segments] == [(s.start, s.end, s.tokens) for s in one.segments]
    assert "ask not what your country can do for you" in alone[0].text.lower()


def test_language_detected_per_file_in_a_batch(base_model, one_thread):
    from specwhisper.transcription import transcribe_many

    rows = {r["language"]: r for r in read_manifest("multilingual")}
    audios = [rows["de"]["path"], rows["es"]["path"]]
    results = list(transcribe_many(base_model, audios, batch_size=2))
    assert [r.language for r in results] == ["de", "es"]
    assert results[0].language_probs["de"] > 0.5
    translated = base_model.transcribe(rows["de"]["path"], task="translate")
    assert translated.language == "de" and translated.text.isascii() and translated.text


def test_speculative_decoding_runs_in_every_window_and_its_stats_add_up(base_model, tiny_en_model, one_thread,
                                                                       monkeypatch):
    from specwhisper.assistants import make_assistant

    import specwhisper.transcription as transcribe_module

    # A constant γ: the adaptive controller may rightly stop drafting with tiny.en on this CPU, and it
    # carries that decision into the next window; this test is about every window being drafted for.
    assistant = make_assistant(base_model, tiny_en_model, draft_length=3)
    calls = []
    real_decode_window = transcribe_module.decode_window

    def recording_decode_window(model, mel, options, assistant=None, stats=None, **rows):
        results = real_decode_window(model, mel, options, assistant=assistant, stats=stats, **rows)
        calls.append((assistant, stats.drafted, stats.accepted, stats.main_passes))
        return results

    # (Not one clip repeated: text that repeats itself is what the compression-ratio check
    # rejects, and the windows would be sampled at temperature 1.)
    joined = np.concatenate([clip("ls_1221-135766-0001.wav"), clip("ls_2412-153948-0000.flac"),
                             clip("ls_2412-153948-0001.flac")])  # ~39 s: two windows
    greedy = base_model.transcribe(joined, language="en")
    monkeypatch.setattr(transcribe_module, "decode_window", recording_decode_window)
    fast = base_model.transcribe(joined, language="en", assistant=assistant)
    assert fast.windows == greedy.windows == len(calls) == 2 and fast.fallbacks == 0
    assert all(a is assistant for a, *_ in calls)
    assert [(s.start, s.end, s.tokens) for s in fast.segments] == [(s.start, s.end, s.tokens) for s in greedy.segments]
    assert fast.stats.drafted == sum(c[1] for c in calls) > 0
    assert fast.stats.accepted == sum(c[2] for c in calls)
    assert fast.stats.main_passes == sum(c[3] for c in calls) < greedy.stats.main_passes
    assert len(fast.draft_mask) == len(fast.tokens) and any(fast.draft_mask)


def test_without_timestamps_each_window_is_one_segment(tiny_en_model):
    result = tiny_en_model.transcribe(clip("jfk.flac"), timestamps=False)
    assert [(s.start, s.end) for s in result.segments] == [(0.0, 11.0)]
    assert "ask not what your country can do for you" in result.text.lower()
    assert all(t < tiny_en_model.tokenizer.eot for t in result.tokens)


@pytest.mark.parametrize("kind", ["silence", "tenth_of_a_second", "white_noise"])
def test_bad_audio_gives_little_text_and_no_crash(tiny_en_model, kind):
    rng = np.random.default_rng(0)
    samples = {"silence": np.zeros(5 * 16000, np.float32),
               "tenth_of_a_second": (0.1 * rng.standard_normal(1600)).astype(np.float32),
               "white_noise": (0.3 * rng.standard_normal(8 * 16000)).astype(np.float32)}[kind]
    result = tiny_en_model.transcribe(samples)
    assert len(result.text.split()) <= 3
    assert all(0 <= s.start <= s.end <= len(samples) / 16000 for s in result.segments)


def test_unsupported_language_is_a_clear_error(tiny_en_model, base_model):
    with pytest.raises(ValueError, match="English-only"):
        tiny_en_model.transcribe(np.zeros(16000, np.float32), language="de")
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        base_model.transcribe(np.zeros(16000, np.float32), language="xx")
    with pytest.raises(ValueError, match="translate"):
        tiny_en_model.transcribe(np.zeros(16000, np.float32), task="translate")


def test_cli_unsupported_language_is_one_line(tiny_en_model, capsys):
    from specwhisper.cli import main

    status = main(["transcribe", "--model", "tiny.en", "--device", "cpu", "--language", "xx", "demo"])
    out, err = capsys.readouterr()
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("specwhisper: error:")


def test_cli_writes_every_format_and_keeps_stdout_for_transcripts(tiny_en_model, tmp_path, capsys):
    from specwhisper.cli import main

    status = main(["transcribe", "--model", "tiny.en", "--device", "cpu", "--output_format", "all",
                   "--output_dir", str(tmp_path), "demo", str(tmp_path / "missing.wav")])
    out, err = capsys.readouterr()
    assert status == 1  # the missing file
    assert len(out.splitlines()) == 1  # the demo clip's transcript, nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json", "demo.srt", "demo.tsv", "demo.txt", "demo.vtt"]
    assert "wrote" in err and "missing.wav" in err
    with_times = main(["transcribe", "--model", "tiny.en", "--device", "cpu", "--timestamps", "demo"])
    out, _ = capsys.readouterr()
    assert with_times == 0 and out.startswith("[00:00:00.000 --> ")
