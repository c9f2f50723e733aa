"""Audio front end: WAV reading, resampling, errors, and log-mel parity with transformers.

Reference values come from code that shares nothing with specwhisper/audio.py:
transformers' mel filter bank and WhisperFeatureExtractor, a one-shot
torch.stft written out here, WAVs written here byte by byte, FFmpeg's own WAV parser and
resampler (through PyAV), and the ffmpeg program where it is installed.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import struct
import subprocess
import sys
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from audio_files import FORMATS, write_audio
from specwhisper import audio as audio_module
from specwhisper.audio import (
    FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, AudioError, load_audio,
    log_mel_padded_audio, log_mel_spectrogram, log_mel_windows, mel_filters, mel_window,
    pad_or_trim, resample,
)

REPO = Path(__file__).resolve().parents[1]
AUDIO_DIR = REPO.parent / "shared" / "audio"
DEV = AUDIO_DIR / "dev"
HAVE_FFMPEG = shutil.which("ffmpeg") is not None

needs_corpus = pytest.mark.skipif(not DEV.is_dir(), reason=f"evaluation audio not found at {DEV}")
needs_ffmpeg = pytest.mark.skipif(not HAVE_FFMPEG, reason="the ffmpeg program is not installed (only this "
                                  "cross-check of PyAV against it needs it)")

# What transformers' extractor and ours agree to. Both run the same float32
# torch.stft, so on CPU they agree bit for bit (max abs diff 0.0 when this was
# written); the margin absorbs BLAS differences on other machines.
LOG_MEL_ATOL = 1e-5


@functools.lru_cache(maxsize=None)
def dev_clip(name: str) -> np.ndarray:
    return load_audio(DEV / name)


def swr_decode(path: Path, sr: int = SAMPLE_RATE) -> np.ndarray:
    """FFmpeg's own parsing, downmix and resampling (libswresample, through PyAV), mono int16 at `sr`."""
    chunks = []
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=sr)
        for frame in container.decode(audio=0):
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.float32) / 32768.0


def ffmpeg_decode(path: Path, sr: int = SAMPLE_RATE) -> np.ndarray:
    """The ffmpeg program's mono int16 decode at `sr`, the way openai-whisper reads files."""
    out = subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-f", "s16le", "-ac", "1",
         "-acodec", "pcm_s16le", "-ar", str(sr), "-"],
        capture_output=True, check=True).stdout
    return np.frombuffer(out, np.int16).astype(np.float32) / 32768.0


# ----------------------------------------------------------------- WAV writers


def write_pcm_wav(path: Path, frames: np.ndarray, sample_rate: int, width: int) -> Path:
    """Integer PCM through the standard library. frames: (n, channels) ints in the width's range
    (unsigned 0..255 for 8-bit, signed otherwise)."""
    frames = np.asarray(frames, dtype=np.int64)
    frames = frames[:, None] if frames.ndim == 1 else frames  # (n, channels)
    if width == 1:
        raw = frames.astype(np.uint8).tobytes()
    elif width == 3:
        le = frames.astype("<i4").reshape(-1, 1).view(np.uint8)  # (n * ch, 4), little-endian
        raw = le[:, :3].tobytes()
    else:
        raw = frames.astype(f"<i{width}").tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(frames.shape[1])
        w.setsampwidth(width)
        w.setframerate(sample_rate)
        w.writeframes(raw)
    return path


def write_wav_bytes(path: Path, fmt: bytes, data: bytes, extra_chunks: bytes = b"",
                    data_size: int | None = None) -> Path:
    """A RIFF/WAVE file from a raw fmt body and sample bytes, assembled by hand."""
    size = len(data) if data_size is None else data_size
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + extra_chunks
    body += b"data" + struct.pack("<I", size) + data + (b"\0" if len(data) % 2 else b"")
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def fmt_chunk(format_code: int, channels: int, sample_rate: int, width: int) -> bytes:
    block_align = channels * width
    return struct.pack("<HHIIHH", format_code, channels, sample_rate, sample_rate * block_align,
                       block_align, 8 * width)


def fmt_extensible(subformat: int, channels: int, sample_rate: int, width: int,
                   valid_bits: int) -> bytes:
    guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"  # KSDATAFORMAT_SUBTYPE_*
    return (fmt_chunk(0xFFFE, channels, sample_rate, width)
            + struct.pack("<HHI", 22, valid_bits, 0) + struct.pack("<H", subformat) + guid_tail)


def tone(freq_hz: float, seconds: float, sample_rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return amplitude * np.sin(2 * np.pi * freq_hz * t)


def peak_hz_and_amplitude(x: np.ndarray, sample_rate: int) -> tuple[float, float]:
    """Frequency and amplitude of the strongest sinusoid (Hann-windowed FFT, edges dropped)."""
    x = x[sample_rate // 10:-sample_rate // 10]  # skip the zero-padded edges
    window = np.hanning(len(x))
    spectrum = np.abs(np.fft.rfft(x * window))
    k = int(np.argmax(spectrum))
    return k * sample_rate / len(x), 2 * spectrum[k] / window.sum()


# ----------------------------------------------------------------- mel filters


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_transformers(n_mels):
    audio_utils = pytest.importorskip("transformers.audio_utils")
    reference = audio_utils.mel_filter_bank(
        num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0, max_frequency=8000,
        sampling_rate=16000, norm="slaney", mel_scale="slaney")  # (201, n_mels)
    ours = mel_filters(n_mels)
    assert ours.shape == (n_mels, 201) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), reference.T, rtol=1e-6, atol=1e-9)
    assert mel_filters(n_mels) is ours  # cached


# ----------------------------------------------------------------- log-mel parity

PARITY_CLIPS = [
    "ls_1089-134686-0000.flac",  # LibriSpeech FLAC, 16 kHz
    "jfk.flac",  # 44.1 kHz stereo FLAC, resampled and downmixed by FFmpeg's libraries
    "vctk_p225_008.wav",  # 16 kHz WAV, read natively
]


@needs_corpus
@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("name", PARITY_CLIPS)
def test_log_mel_padded_audio_matches_transformers(name, n_mels):
    transformers = pytest.importorskip("transformers")
    audio = dev_clip(name)
    extractor = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    expected = extractor(audio, sampling_rate=16000, return_tensors="np").input_features[0]
    ours = log_mel_padded_audio(audio, n_mels)
    assert ours.shape == (n_mels, N_FRAMES) and ours.dtype == torch.float32
    assert np.abs(ours.numpy() - expected).max() < LOG_MEL_ATOL


def whisper_log_mel_one_shot(audio: np.ndarray, n_mels: int, padding: int) -> torch.Tensor:
    """Whisper's recipe in one torch.stft call, with transformers' filters: the reference
    for the chunked STFT in log_mel_spectrogram."""
    audio_utils = pytest.importorskip("transformers.audio_utils")
    filters = torch.from_numpy(audio_utils.mel_filter_bank(
        num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0, max_frequency=8000,
        sampling_rate=16000, norm="slaney", mel_scale="slaney").T.astype(np.float32))
    x = torch.nn.functional.pad(torch.from_numpy(audio), (0, padding))
    stft = torch.stft(x, 400, 160, window=torch.hann_window(400), return_complex=True)
    log_spec = (filters @ stft[:, :-1].abs() ** 2).clamp(min=1e-10).log10()
    return (torch.maximum(log_spec, log_spec.max() - 8.0) + 4.0) / 4.0


@needs_corpus
def test_log_mel_windows_equals_one_shot_stft():
    audio = dev_clip("librivox_sas01_0870.wav")  # 7 s + 30 s of padding: two STFT chunks
    mel, content_frames = log_mel_windows(audio)
    expected = whisper_log_mel_one_shot(audio, 80, padding=N_SAMPLES)
    assert content_frames == len(audio) // HOP_LENGTH
    assert mel.shape == expected.shape == (80, (len(audio) + N_SAMPLES) // HOP_LENGTH)
    assert (mel - expected).abs().max().item() < LOG_MEL_ATOL


def test_log_mel_spectrogram_shape_and_padding():
    audio = np.random.default_rng(0).standard_normal(12345).astype(np.float32) * 0.1
    mel = log_mel_spectrogram(audio, 128, padding=1000)
    assert mel.shape == (128, (12345 + 1000) // HOP_LENGTH) and mel.dtype == torch.float32
    assert torch.equal(mel, log_mel_spectrogram(torch.from_numpy(audio), 128, padding=1000))
    # The dynamic range is clipped to 8 log10 units, i.e. 2.0 after the (x + 4) / 4 scaling.
    assert mel.max() - mel.min() <= 2.0 + 1e-6


# ----------------------------------------------------------------- window conventions


@needs_corpus
def test_mel_window_zeros_past_content_and_differs_from_padded_audio():
    audio = dev_clip("vctk_p225_008.wav")  # 6.6 s
    mel, content_frames = log_mel_windows(audio)
    window = mel_window(mel, content_frames, seek=0)
    assert window.shape == (80, N_FRAMES)
    assert torch.equal(window[:, :content_frames], mel[:, :content_frames])
    assert torch.all(window[:, content_frames:] == 0)

    # transformers / openai-whisper `decode` pad the audio instead: the content
    # frames agree, but the tail is the log-mel of silence (the floor), not 0.
    padded = log_mel_padded_audio(audio)
    assert torch.allclose(padded[:, :content_frames], window[:, :content_frames], atol=1e-6)
    silence_floor = padded.min()
    assert torch.all(padded[:, content_frames + 2:] == silence_floor)
    assert silence_floor < -0.5  # so the conventions differ on every tail frame
    assert not torch.allclose(padded, window)


def test_mel_window_slides_through_a_long_recording():
    seconds = 45
    audio = tone(440.0, seconds, SAMPLE_RATE).astype(np.float32)
    mel, content_frames = log_mel_windows(audio)
    assert content_frames == seconds * FRAMES_PER_SECOND
    full = mel_window(mel, content_frames, seek=100)
    assert torch.equal(full, mel[:, 100:100 + N_FRAMES])  # fully inside: no padding at all
    last = mel_window(mel, content_frames, seek=N_FRAMES)
    tail = content_frames - N_FRAMES
    assert torch.equal(last[:, :tail], mel[:, N_FRAMES:content_frames])
    assert torch.all(last[:, tail:] == 0)
    assert torch.all(mel_window(mel, content_frames, seek=content_frames) == 0)
    with pytest.raises(ValueError):
        mel_window(mel, content_frames, seek=content_frames + 1)
    # Audio shorter than one hop has no content frames but still a (silent) first window.
    tiny_mel, tiny_frames = log_mel_windows(np.full(100, 0.1, np.float32))
    assert tiny_frames == 0 and torch.all(mel_window(tiny_mel, tiny_frames, 0) == 0)


def test_pad_or_trim_numpy_and_torch():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert pad_or_trim(x, 6).shape == (3, 6) and np.all(pad_or_trim(x, 6)[:, 4:] == 0)
    np.testing.assert_array_equal(pad_or_trim(x, 2), x[:, :2])
    np.testing.assert_array_equal(pad_or_trim(x, 5, axis=0)[:3], x)
    assert pad_or_trim(x, 5, axis=0).shape == (5, 4)
    t = torch.from_numpy(x)
    assert torch.equal(pad_or_trim(t, 2), t[:, :2])
    assert torch.equal(pad_or_trim(t, 6)[:, :4], t) and torch.all(pad_or_trim(t, 6)[:, 4:] == 0)
    assert pad_or_trim(t, 1, axis=0).shape == (1, 4) and pad_or_trim(t, 5, axis=0).shape == (5, 4)
    assert pad_or_trim(np.ones(7, np.float32)).shape == (N_SAMPLES,)


# ----------------------------------------------------------------- WAV reading


def test_wav_16bit_values(tmp_path):
    values = np.array([0, 1, -1, 32767, -32768, 1234, -4321])
    path = write_pcm_wav(tmp_path / "a.wav", values, SAMPLE_RATE, 2)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.shape == (len(values),)
    np.testing.assert_array_equal(audio, values.astype(np.float32) / 32768.0)


def test_wav_8bit_is_unsigned(tmp_path):
    path = write_pcm_wav(tmp_path / "a.wav", np.array([0, 128, 255, 64]), SAMPLE_RATE, 1)
    np.testing.assert_array_equal(load_audio(path), np.array([-1.0, 0.0, 127 / 128, -0.5], np.float32))


def test_wav_24bit_values(tmp_path):
    values = np.array([0, 1, -1, 2**23 - 1, -(2**23), 1234567, -7654321])
    path = write_pcm_wav(tmp_path / "a.wav", values, SAMPLE_RATE, 3)
    np.testing.assert_array_equal(load_audio(path), values.astype(np.float32) / 2**23)


def test_wav_32bit_int_values(tmp_path):
    values = np.array([0, 2**31 - 1, -(2**31), 123456789, -1])
    path = write_pcm_wav(tmp_path / "a.wav", values, SAMPLE_RATE, 4)
    np.testing.assert_allclose(load_audio(path), values / 2**31, rtol=0, atol=1e-7)


@pytest.mark.parametrize("dtype", ["<f4", "<f8"])
def test_wav_ieee_float(tmp_path, dtype):
    values = np.array([0.0, 0.5, -0.25, 1.0, -1.0, 1e-6])
    width = np.dtype(dtype).itemsize
    path = write_wav_bytes(tmp_path / "f.wav", fmt_chunk(3, 1, SAMPLE_RATE, width),
                           values.astype(dtype).tobytes())
    np.testing.assert_array_equal(load_audio(path), values.astype(np.float32))


def test_wav_extensible_float_and_24bit(tmp_path):
    values = np.array([0.125, -0.5, 0.75], dtype="<f4")
    path = write_wav_bytes(tmp_path / "ext_f.wav", fmt_extensible(3, 1, SAMPLE_RATE, 4, 32),
                           values.tobytes())
    np.testing.assert_array_equal(load_audio(path), values)
    ints = np.array([2**22, -(2**22), 5])
    raw = ints.astype("<i4").reshape(-1, 1).view(np.uint8)[:, :3].tobytes()
    path = write_wav_bytes(tmp_path / "ext_24.wav", fmt_extensible(1, 1, SAMPLE_RATE, 3, 24), raw)
    np.testing.assert_array_equal(load_audio(path), ints.astype(np.float32) / 2**23)


def test_wav_channels_are_averaged(tmp_path):
    left = np.array([1000, -2000, 30000, 0])
    right = np.array([3000, 2000, -30000, 7])
    path = write_pcm_wav(tmp_path / "st.wav", np.stack([left, right], axis=1), SAMPLE_RATE, 2)
    np.testing.assert_allclose(load_audio(path), (left + right) / 2 / 32768.0, atol=1e-7)
    six = np.arange(6 * 5).reshape(5, 6) * 100
    path = write_pcm_wav(tmp_path / "six.wav", six, SAMPLE_RATE, 2)
    np.testing.assert_allclose(load_audio(path), six.mean(axis=1) / 32768.0, atol=1e-7)


def test_wav_skips_unknown_chunks_and_clamps_streamed_size(tmp_path):
    values = np.array([100, -200, 300], dtype="<i2")
    odd_chunk = b"LIST" + struct.pack("<I", 5) + b"abcde" + b"\0"  # odd size: a pad byte follows
    path = write_wav_bytes(tmp_path / "list.wav", fmt_chunk(1, 1, SAMPLE_RATE, 2), values.tobytes(),
                           extra_chunks=odd_chunk)
    np.testing.assert_array_equal(load_audio(path), values / np.float32(32768))
    # A WAV streamed to a pipe never learns its length and says 0xFFFFFFFF.
    path = write_wav_bytes(tmp_path / "stream.wav", fmt_chunk(1, 1, SAMPLE_RATE, 2), values.tobytes(),
                           data_size=0xFFFFFFFF)
    np.testing.assert_array_equal(load_audio(path), values / np.float32(32768))


@pytest.mark.parametrize("sample_rate", [8000, 44100, 48000])
def test_wav_resampled_tone_keeps_frequency_and_amplitude(tmp_path, sample_rate):
    seconds, freq, amplitude = 2.0, 1000.0, 0.5
    samples = np.round(tone(freq, seconds, sample_rate, amplitude) * 32767)
    path = write_pcm_wav(tmp_path / "tone.wav", samples, sample_rate, 2)
    audio = load_audio(path)
    assert len(audio) == math.ceil(len(samples) * SAMPLE_RATE / sample_rate)
    peak_hz, peak_amplitude = peak_hz_and_amplitude(audio, SAMPLE_RATE)
    assert abs(peak_hz - freq) <= 1.0  # FFT bins are 0.6 Hz wide here
    assert abs(peak_amplitude - amplitude) / amplitude < 0.01
    # And sample by sample, away from the edges, against the ideal tone:
    ideal = tone(freq, len(audio) / SAMPLE_RATE, SAMPLE_RATE, amplitude)[: len(audio)]
    middle = slice(SAMPLE_RATE // 10, -SAMPLE_RATE // 10)
    assert np.abs(audio[middle] - ideal[middle]).max() < 1e-3  # int16 quantisation dominates


def test_resample_rejects_aliases_and_handles_odd_rates():
    # 9 kHz cannot exist at 16 kHz: it must vanish, not fold down to 7 kHz.
    alias = resample(tone(9000.0, 1.0, 44100).astype(np.float32), 44100, SAMPLE_RATE)
    assert np.sqrt(np.mean(alias[1600:-1600] ** 2)) < 1e-4
    # A rate with no small common factor with 16000 takes the interpolated-phase path.
    odd = resample(tone(1000.0, 1.0, 44101).astype(np.float32), 44101, SAMPLE_RATE)
    ideal = tone(1000.0, 1.0, SAMPLE_RATE)
    assert len(odd) == math.ceil(44101 * SAMPLE_RATE / 44101)
    assert np.abs(odd[1600:-1600] - ideal[1600:-1600]).max() < 1e-4


def test_load_audio_to_another_rate(tmp_path):
    samples = np.round(tone(500.0, 1.0, SAMPLE_RATE) * 32767)
    path = write_pcm_wav(tmp_path / "t.wav", samples, SAMPLE_RATE, 2)
    audio = load_audio(path, sr=8000)
    assert len(audio) == 8000
    assert abs(peak_hz_and_amplitude(audio, 8000)[0] - 500.0) <= 1.0


def test_resampler_agrees_with_ffmpeg(tmp_path):
    # Speech-band tones; FFmpeg's default filter rolls off earlier near 8 kHz, so stay below 6 kHz.
    sample_rate = 44100
    mix = sum(tone(f, 1.5, sample_rate, 0.15) for f in (220.0, 1000.0, 2500.0, 5900.0))
    stereo = np.stack([mix, 0.5 * mix], axis=1)
    path = write_pcm_wav(tmp_path / "mix.wav", np.round(stereo * 32767), sample_rate, 2)
    ours, theirs = load_audio(path), swr_decode(path)
    assert len(ours) == len(theirs)
    middle = slice(SAMPLE_RATE // 10, -SAMPLE_RATE // 10)
    error = np.sqrt(np.mean((ours[middle] - theirs[middle]) ** 2))
    assert error / np.sqrt(np.mean(theirs[middle] ** 2)) < 0.01  # ~3e-4 on real speech (jfk)


@needs_corpus
def test_native_wav_equals_ffmpeg_decode():
    path = DEV / "vctk_p225_008.wav"  # 16 kHz mono int16: no resampling on either side
    np.testing.assert_array_equal(load_audio(path), swr_decode(path))


@needs_corpus
@needs_ffmpeg
@pytest.mark.parametrize("name", ["jfk.flac", "ls_1089-134686-0000.flac"])
def test_in_process_decode_equals_the_ffmpeg_program(name):
    """What openai-whisper reads (`ffmpeg ... -ac 1 -ar 16000`), bit for bit, without the program."""
    np.testing.assert_array_equal(load_audio(DEV / name), ffmpeg_decode(DEV / name))


def test_wav_encoding_we_do_not_parse_goes_through_pyav(tmp_path):
    samples = np.round(tone(300.0, 0.5, SAMPLE_RATE) * 32767).astype(np.int16)
    pcm = write_pcm_wav(tmp_path / "pcm.wav", samples, SAMPLE_RATE, 2)
    mulaw = tmp_path / "mulaw.wav"
    with av.open(str(mulaw), "w", format="wav") as out:
        stream = out.add_stream("pcm_mulaw", rate=SAMPLE_RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    np.testing.assert_allclose(load_audio(mulaw), load_audio(pcm), atol=0.02)  # mu-law is 8-bit


@pytest.fixture
def no_ffmpeg_program(tmp_path, monkeypatch):
    """PATH without the ffmpeg program (a folder with python alone), as on a fresh machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")
    monkeypatch.setenv("PATH", str(bin_dir))
    assert shutil.which("ffmpeg") is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_common_formats_decode_without_the_ffmpeg_program(fmt, tmp_path, no_ffmpeg_program):
    """FLAC, MP3, Ogg/Opus, M4A/AAC, WebM/Opus and a video file's audio track, made here from speech (the
    demo clip): each decodes in-process to the same length and waveform, up to its codec's loss."""
    speech = load_audio(REPO / "specwhisper" / "assets" / "demo.wav")[:4 * SAMPLE_RATE]
    path = write_audio(tmp_path / f"speech{FORMATS[fmt][0]}", speech, fmt)
    decoded = load_audio(path)
    assert abs(len(decoded) - len(speech)) <= SAMPLE_RATE // 50, (len(decoded), len(speech))  # 20 ms: codec padding
    n = min(len(decoded), len(speech))
    correlation = np.dot(decoded[:n], speech[:n]) / np.linalg.norm(decoded[:n]) / np.linalg.norm(speech[:n])
    assert correlation > 0.99, correlation  # time-aligned (lossless: 1.0; these codecs: >= 0.999)


# ----------------------------------------------------------------- bad input


def assert_one_line_error(path: Path, *fragments: str) -> str:
    with pytest.raises(AudioError) as info:
        load_audio(path)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_error_missing_file(tmp_path):
    assert_one_line_error(tmp_path / "nope.wav", "no such file")


def test_error_empty_file(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    assert_one_line_error(tmp_path / "empty.wav", "empty")


def test_error_text_file_named_wav(tmp_path):
    (tmp_path / "notes.wav").write_text("this is not audio\n")
    assert_one_line_error(tmp_path / "notes.wav", "no RIFF/WAVE header")


def test_error_truncated_header(tmp_path):
    whole = write_pcm_wav(tmp_path / "whole.wav", np.zeros(100), SAMPLE_RATE, 2).read_bytes()
    (tmp_path / "cut.wav").write_bytes(whole[:30])  # inside the fmt chunk
    assert_one_line_error(tmp_path / "cut.wav", "fmt chunk")
    (tmp_path / "cut12.wav").write_bytes(whole[:12])  # RIFF/WAVE and nothing else
    assert_one_line_error(tmp_path / "cut12.wav", "no fmt chunk")


def test_error_zero_samples(tmp_path):
    path = write_pcm_wav(tmp_path / "zero.wav", np.zeros((0, 1)), SAMPLE_RATE, 2)
    assert_one_line_error(path, "no audio samples")


def test_error_garbage_non_wav(tmp_path):
    path = tmp_path / "noise.mp3"
    path.write_bytes(np.random.default_rng(1).bytes(4000))
    assert_one_line_error(path, "FFmpeg could not decode")


def test_error_without_pyav_says_how_to_get_it(tmp_path, monkeypatch):
    path = tmp_path / "speech.flac"
    path.write_bytes(b"fLaC" + bytes(100))
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    assert_one_line_error(path, "pip install av")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_samples_are_refused(tmp_path, bad):
    """A float WAV can hold NaN and inf: refused in one line, not decoded into noise (and so is an array)."""
    samples = tone(440.0, 0.5, SAMPLE_RATE).astype(np.float32)
    samples[1234] = bad
    path = write_wav_bytes(tmp_path / "float.wav", fmt_chunk(3, 1, SAMPLE_RATE, 4), samples.tobytes())
    assert_one_line_error(path, "1 NaN or infinite samples", "0.08 s")
    with pytest.raises(AudioError, match="NaN or infinite"):
        audio_module.check_samples(samples, "the array of samples")
