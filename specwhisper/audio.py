"""Audio in, log-mel spectrogram out: the front end every Whisper model shares.

- `load_audio` reads a file into 16 kHz mono float32. WAV is parsed here (no
  dependency); anything else is decoded in-process by PyAV, whose wheels carry
  FFmpeg's libraries: the same decoders and resampler as the ffmpeg command
  openai-whisper runs, so the same samples, with no ffmpeg program installed.
- `resample` is a windowed-sinc polyphase resampler, so WAVs recorded at
  8/22.05/44.1/48 kHz need no decoder library either.
- `log_mel_spectrogram` reproduces Whisper's features; `log_mel_padded_audio`
  and `log_mel_windows` / `mel_window` are the two ways Whisper front ends pad
  a recording to 30-second windows (they differ on the frames after the speech).
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import SpecWhisperError

SAMPLE_RATE = 16000  # Hz, the only rate Whisper models see
N_FFT = 400  # samples in an STFT window (25 ms)
HOP_LENGTH = 160  # samples between STFT frames (10 ms)
CHUNK_LENGTH = 30  # seconds of audio in one encoder window
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30-s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a 30-s window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames per second (10 ms each)

LOG_MEL_FLOOR = 1e-10  # mel power below this is clamped before log10 (-100 dB)
LOG_MEL_DYNAMIC_RANGE = 8.0  # log10 units (80 dB) kept below the loudest bin

# Frames per STFT pass: a 1-hour file is 360k frames, and its full complex STFT
# would be ~580 MB; 30 s at a time keeps the transient under 5 MB.
STFT_CHUNK_FRAMES = N_FRAMES

# Resampler design (see `resample`): flat to 95% of the lower Nyquist frequency,
# at least 100 dB down from the lower Nyquist frequency on.
RESAMPLE_PASSBAND = 0.95  # fraction of the lower Nyquist frequency kept flat
RESAMPLE_STOPBAND_DB = 100.0  # attenuation at and above the lower Nyquist frequency
RESAMPLE_MIN_PHASES = 64  # outputs per polyphase block (columns of the matrix product)
RESAMPLE_MAX_TABLE = 1 << 24  # floats in a polyphase table before falling back to direct evaluation
RESAMPLE_FINE_PHASES = 1024  # kernel samples per input sample when phases are interpolated
RESAMPLE_BLOCK_FLOATS = 1 << 22  # input taps gathered per pass (16 MB of float32 temporaries)

WAV_DECODE_BLOCK = 1 << 20  # sample frames converted to float per pass

# WAVE format codes (the `fmt ` chunk's first field, or an EXTENSIBLE subformat's).
WAVE_FORMAT_PCM = 0x0001
WAVE_FORMAT_IEEE_FLOAT = 0x0003
WAVE_FORMAT_EXTENSIBLE = 0xFFFE


class AudioError(SpecWhisperError, ValueError):
    """A file that cannot be turned into audio samples; the message is one line
    naming the file and the problem, fit to print as is."""


def _audio_error(path: str | os.PathLike, problem: str) -> AudioError:
    one_line = " ".join(str(problem).split())  # FFmpeg and OS messages may hold newlines
    return AudioError(f"cannot load audio '{os.fspath(path)}': {one_line}")


class _UnsupportedWavEncoding(Exception):
    """A well-formed WAV whose sample encoding (ADPCM, A-law, ...) we do not decode natively."""


# --------------------------------------------------------------------------- loading


def load_audio(path: str | os.PathLike, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file as mono float32 samples at `sr` Hz, shape (n_samples,).

    A RIFF/WAVE file (PCM 8/16/24/32-bit, IEEE float 32/64, EXTENSIBLE too) is
    parsed natively: channels are averaged, then `resample` converts the rate.
    Any other file, or a WAV in an encoding we do not parse, is decoded by PyAV
    (FFmpeg's libraries: the samples openai-whisper's `ffmpeg ... -ac 1 -ar 16000`
    command gives, bit for bit).
    Integer PCM is scaled so full scale is [-1, 1): int16 `x` becomes `x / 32768`.

    Raises AudioError (one line, naming the file) for anything that yields no audio.
    """
    if sr <= 0:
        raise ValueError(f"sample rate must be positive, got {sr}")
    if not os.path.exists(path):
        raise _audio_error(path, "no such file")
    if os.path.isdir(path):
        raise _audio_error(path, "is a directory, not an audio file")
    try:
        with open(path, "rb") as f:
            magic = f.read(12)
    except OSError as err:
        raise _audio_error(path, err.strerror or str(err)) from None
    if len(magic) == 0:
        raise _audio_error(path, "file is empty (0 bytes)")

    is_wav = magic[:4] in (b"RIFF", b"RF64") and magic[8:12] == b"WAVE"
    if is_wav:
        try:
            audio, file_sr = _read_wav(path)
        except _UnsupportedWavEncoding as err:
            audio = _decode_with_av(path, sr, why=f"WAV encoding {err} is not decoded natively")
        else:
            if file_sr != sr:
                audio = resample(audio, file_sr, sr)
    else:
        named_wav = Path(path).suffix.lower() in (".wav", ".wave")
        why = "named .wav but has no RIFF/WAVE header" if named_wav else "not a WAV file"
        audio = _decode_with_av(path, sr, why=why)

    return check_samples(audio, path, sr)


def check_samples(audio: np.ndarray, source: str | os.PathLike, sr: int = SAMPLE_RATE) -> np.ndarray:
    """`audio` if it is a non-empty 1-D array of finite samples, else AudioError naming `source`.

    NaN or infinite samples (a float WAV can hold them) are refused rather than cleaned: each one turns
    the log-mel frames around it into NaN, and no choice of replacement value is the recording's.
    """
    if audio.ndim != 1:
        raise _audio_error(source, f"expected mono samples of shape (n,), got shape {audio.shape}")
    if audio.size == 0:
        raise _audio_error(source, "contains no audio samples")
    finite = np.isfinite(audio)
    if not finite.all():
        first = int(np.argmin(finite))
        raise _audio_error(source, f"holds {audio.size - int(finite.sum())} NaN or infinite samples "
                                   f"(the first at {first / sr:.2f} s)")
    return audio


def _decode_with_av(path: str | os.PathLike, sr: int, why: str) -> np.ndarray:
    """Decode the first audio stream of any container FFmpeg knows to mono int16 at `sr` Hz, as float32.

    libswresample downmixes and resamples with the defaults the ffmpeg program uses, so the samples equal
    `ffmpeg -i FILE -f s16le -ac 1 -ar SR -` (tests/test_audio.py checks it where ffmpeg is installed).
    `why` (why the file is not read natively) leads the error message when decoding fails.
    """
    try:
        import av
    except ImportError:
        raise _audio_error(path, f"{why}, and decoding it needs PyAV (pip install av)") from None
    chunks = []
    try:
        with av.open(os.fspath(path), metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise _audio_error(path, f"{why}, and it holds no audio stream")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=sr)
            for frame in container.decode(container.streams.audio[0]):
                chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]  # the resampler's tail
    except av.error.FFmpegError as err:
        problem = (getattr(err, "strerror", None) or str(err)).rstrip(".")
        raise _audio_error(path, f"{why}, and FFmpeg could not decode it: {problem}") from None
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    return samples.astype(np.float32) / 32768.0


def _read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Parse a RIFF/WAVE (or RF64) file. Returns (mono float32 samples, sample rate).

    Chunks other than `fmt `, `data` (and RF64's `ds64`) are skipped. A `data`
    size that runs past the end of the file (a WAV streamed to a pipe, or a cut
    download) is clamped to the bytes actually present.
    """
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        is_rf64 = f.read(4) == b"RF64"
        fmt = None  # raw `fmt ` body
        data_offset = data_size = None
        rf64_data_size = None
        pos = 12
        while pos + 8 <= file_size:
            f.seek(pos)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            body = pos + 8
            if chunk_id == b"fmt ":
                fmt = f.read(min(chunk_size, 40))
                if len(fmt) < 16 or chunk_size < 16:
                    raise _audio_error(path, f"corrupt WAV: the fmt chunk is cut short "
                                             f"({len(fmt)} of at least 16 bytes)")
            elif chunk_id == b"ds64" and is_rf64:
                ds64 = f.read(24)
                if len(ds64) == 24:
                    rf64_data_size = struct.unpack("<QQQ", ds64)[1]
            elif chunk_id == b"data":
                size = chunk_size
                if is_rf64 and chunk_size == 0xFFFFFFFF and rf64_data_size is not None:
                    size = rf64_data_size
                data_offset, data_size = body, min(size, file_size - body)
                if fmt is not None:
                    break
            pos = body + chunk_size + (chunk_size & 1)  # chunks are word aligned

        if fmt is None:
            raise _audio_error(path, "corrupt or truncated WAV: no fmt chunk")
        if data_offset is None:
            raise _audio_error(path, "corrupt or truncated WAV: no data chunk")

        format_code, channels, sample_rate, _, block_align, bits = struct.unpack("<HHIIHH", fmt[:16])
        if format_code == WAVE_FORMAT_EXTENSIBLE:
            if len(fmt) < 26:
                raise _audio_error(path, "corrupt WAV: EXTENSIBLE fmt chunk without a subformat")
            format_code = struct.unpack("<H", fmt[24:26])[0]  # first bytes of the subformat GUID
        if channels == 0 or sample_rate == 0 or block_align == 0 or block_align % channels:
            raise _audio_error(path, f"corrupt WAV header: {channels} channels, {sample_rate} Hz, "
                                     f"{block_align}-byte frames")
        width = block_align // channels  # bytes per sample; may exceed bits/8 for padded containers
        if format_code == WAVE_FORMAT_PCM and width in (1, 2, 3, 4):
            encoding = ("pcm", width)
        elif format_code == WAVE_FORMAT_IEEE_FLOAT and width in (4, 8):
            encoding = ("float", width)
        else:
            raise _UnsupportedWavEncoding(f"0x{format_code:04x} with {bits}-bit samples")

        n_frames = data_size // block_align
        f.seek(data_offset)
        raw = f.read(n_frames * block_align)
    n_frames = len(raw) // block_align

    # Convert in blocks so a long stereo file never exists as (frames, channels) float32.
    mono = np.empty(n_frames, dtype=np.float32)
    frame_bytes = np.frombuffer(raw, dtype=np.uint8, count=n_frames * block_align)
    frame_bytes = frame_bytes.reshape(n_frames, block_align)
    for start in range(0, n_frames, WAV_DECODE_BLOCK):
        block = frame_bytes[start:start + WAV_DECODE_BLOCK]
        samples = _decode_samples(block.reshape(-1, width), encoding)  # (frames * channels,)
        samples = samples.reshape(-1, channels)
        mono[start:start + len(block)] = samples[:, 0] if channels == 1 else samples.mean(axis=1)
    return mono, sample_rate


def _decode_samples(sample_bytes: np.ndarray, encoding: tuple[str, int]) -> np.ndarray:
    """(n, width) little-endian sample bytes -> (n,) float32, integer full scale = 1.0."""
    kind, width = encoding
    flat = np.ascontiguousarray(sample_bytes).reshape(-1)  # viewable as wider types
    if kind == "float":
        return flat.view("<f4" if width == 4 else "<f8").astype(np.float32)
    if width == 1:  # 8-bit WAV is unsigned with 128 as zero
        return (flat.astype(np.float32) - 128.0) / 128.0
    if width == 2:
        return flat.view("<i2").astype(np.float32) / 32768.0
    if width == 3:
        # Place the 3 bytes in the top of an int32 so the sign comes for free.
        widened = np.zeros((len(sample_bytes), 4), dtype=np.uint8)
        widened[:, 1:] = sample_bytes
        return widened.view("<i4").reshape(-1).astype(np.float32) / 2147483648.0
    return flat.view("<i4").astype(np.float32) / 2147483648.0


# --------------------------------------------------------------------------- resampling


def resample(audio: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Band-limited resampling of mono float32 `audio` (n,) from `orig_sr` to `new_sr` Hz.

    Output sample n sits at input time n * orig_sr / new_sr (the first samples
    align, as in ffmpeg); there are ceil(n * new_sr / orig_sr) of them.

    The interpolation kernel is a Kaiser-windowed sinc, designed with Kaiser's
    formulas for a transition band from RESAMPLE_PASSBAND (95%) of the lower
    Nyquist frequency to the lower Nyquist frequency itself, with
    RESAMPLE_STOPBAND_DB (100 dB) rejection there and beyond, in the spirit of
    soxr's high-quality presets; for 16 kHz output the kernel spans 16 ms of
    input. On speech it matches ffmpeg's default resampler (then rounded to
    int16) to ~3e-4 of the signal's RMS; the residue is mostly the int16
    rounding and ffmpeg's gentler roll-off near 8 kHz.

    With a rational ratio orig_sr/new_sr = down/up in lowest terms the kernel
    has only `up` distinct phases; they are tabulated once and applied with a
    matrix product per block of output (polyphase). For awkward ratios whose
    table would be huge (44101 Hz), each output's weights are interpolated from
    a finely sampled kernel instead. Beyond both ends the input counts as zeros.
    """
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"resample expects mono audio of shape (n,), got {audio.shape}")
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} and {new_sr}")
    if orig_sr == new_sr or audio.size == 0:
        return audio.copy()

    g = math.gcd(orig_sr, new_sr)
    up, down = new_sr // g, orig_sr // g
    n_out = -(-audio.size * up // down)  # ceil
    kernel, half_width = _resampling_kernel(orig_sr, new_sr)

    # A block of `up` outputs is one row of a matrix product. With few phases
    # (48 kHz -> 16 kHz has one) that product degenerates to matrix-vector, so
    # several periods are grouped into one block to hand the BLAS a real matrix.
    group = max(1, RESAMPLE_MIN_PHASES // up)
    if group * up * (group * down + 2 * half_width + 2) > RESAMPLE_MAX_TABLE:
        group = 1
    up, down = up * group, down * group  # same ratio, `group` periods per block

    lo = -math.ceil(half_width)  # first input offset any phase touches, relative to block start
    hi = math.floor((up - 1) * down / up + half_width)  # last one
    taps = hi - lo + 1
    pad_left = -lo
    n_blocks = -(-n_out // up)  # a block = `up` outputs, starting `down` inputs after the previous
    # (+ 2: the direct path below may touch up to two samples past the last block's taps.)
    padded = np.zeros(pad_left + (n_blocks - 1) * down + taps + 2, dtype=np.float32)
    padded[pad_left:pad_left + audio.size] = audio
    if up * taps <= RESAMPLE_MAX_TABLE:
        out = _resample_polyphase(padded, kernel, up, down, lo, hi, n_blocks)
    else:
        out = _resample_interpolated(padded, kernel, half_width, up, down, pad_left, n_out)
    return out[:n_out]


def _resampling_kernel(orig_sr: int, new_sr: int):
    """The Kaiser-windowed sinc of `resample` and its half width in input samples. kernel(t): the impulse
    response at offsets t (input samples), float64, unit gain at DC."""
    nyquist = min(orig_sr, new_sr) / 2
    transition_hz = (1.0 - RESAMPLE_PASSBAND) * nyquist
    cutoff = (1.0 + RESAMPLE_PASSBAND) / 2 * nyquist / orig_sr  # cycles per input sample
    # Kaiser: taps ~ (A - 7.95) / (2.285 * transition in radians per sample); beta from A.
    n_taps = (RESAMPLE_STOPBAND_DB - 7.95) / (2.285 * 2 * math.pi * transition_hz / orig_sr)
    half_width = n_taps / 2
    beta = 0.1102 * (RESAMPLE_STOPBAND_DB - 8.7)

    def kernel(t: np.ndarray) -> np.ndarray:
        inside = np.clip(1.0 - (t / half_width) ** 2, 0.0, None)
        window = np.i0(beta * np.sqrt(inside)) / np.i0(beta) * (np.abs(t) <= half_width)
        return 2 * cutoff * np.sinc(2 * cutoff * t) * window

    return kernel, half_width


def _resample_polyphase(padded: np.ndarray, kernel, up: int, down: int, lo: int, hi: int, n_blocks: int
                        ) -> np.ndarray:
    """Every output from a table of the kernel's `up` phases, a matrix product per pass of blocks."""
    taps = hi - lo + 1
    # table[i, j]: weight of input (block start + lo + i) for output phase j,
    # whose time is j * down / up input samples after the block start.
    offsets = np.arange(lo, hi + 1, dtype=np.float64)
    phase_times = np.arange(up, dtype=np.float64) * down / up
    table = kernel(phase_times[None, :] - offsets[:, None]).astype(np.float32)  # (taps, up)
    out = np.empty(n_blocks * up, dtype=np.float32)
    stride = padded.strides[0]
    per_pass = max(1, RESAMPLE_BLOCK_FLOATS // taps)
    for b0 in range(0, n_blocks, per_pass):
        b1 = min(b0 + per_pass, n_blocks)
        frames = np.lib.stride_tricks.as_strided(
            padded[b0 * down:], shape=(b1 - b0, taps), strides=(down * stride, stride))
        out[b0 * up:b1 * up] = (frames @ table).reshape(-1)  # (blocks, up) -> flat
    return out


def _resample_interpolated(padded: np.ndarray, kernel, half_width: float, up: int, down: int, pad_left: int,
                           n_out: int) -> np.ndarray:
    """For ratios with too many distinct phases to tabulate exactly (e.g. 44101 Hz): the kernel tabulated
    at RESAMPLE_FINE_PHASES fractional offsets per input sample, interpolated linearly between
    neighbours (error ~1e-6 of full scale)."""
    reach = math.ceil(half_width)
    span = np.arange(2 * reach + 2)  # inputs floor(t) - reach .. floor(t) + reach + 1
    fine = np.arange(RESAMPLE_FINE_PHASES + 1, dtype=np.float64) / RESAMPLE_FINE_PHASES
    fine_table = kernel(fine[:, None] + reach - span[None, :]).astype(np.float32)  # (P + 1, span)
    out = np.empty(n_out, dtype=np.float32)
    per_pass = max(1, RESAMPLE_BLOCK_FLOATS // (4 * span.size))
    for n0 in range(0, n_out, per_pass):
        n = np.arange(n0, min(n0 + per_pass, n_out), dtype=np.int64)
        whole, part = np.divmod(n * down, up)  # output time = whole + part / up input samples
        position = part * RESAMPLE_FINE_PHASES / up
        row = position.astype(np.int64)
        blend = (position - row).astype(np.float32)[:, None]
        weights = fine_table[row] * (1 - blend) + fine_table[row + 1] * blend  # (block, span)
        index = (whole - reach + pad_left)[:, None] + span[None, :]
        out[n0:n0 + n.size] = np.einsum("ij,ij->i", padded[index], weights)
    return out


# --------------------------------------------------------------------------- padding


def pad_or_trim(array: np.ndarray | torch.Tensor, length: int = N_SAMPLES, *, axis: int = -1):
    """Zero-pad or cut `array` along `axis` to exactly `length` (numpy or torch, same type back)."""
    size = array.shape[axis]
    if torch.is_tensor(array):
        if size > length:
            return array.narrow(axis, 0, length)
        if size < length:
            dim = axis % array.dim()
            pads = [0, 0] * (array.dim() - 1 - dim) + [0, length - size]  # F.pad lists the last dim first
            return F.pad(array, pads)
        return array
    if size > length:
        return np.take(array, np.arange(length), axis=axis)
    if size < length:
        pads = [(0, 0)] * array.ndim
        pads[axis] = (0, length - size)
        return np.pad(array, pads)
    return array


# --------------------------------------------------------------------------- mel features

_MEL_FILTER_CACHE: dict[tuple[int, str], torch.Tensor] = {}

# Slaney's mel scale (Auditory Toolbox): linear below 1 kHz, logarithmic above.
SLANEY_HZ_PER_MEL = 200.0 / 3  # slope of the linear part
SLANEY_BREAK_HZ = 1000.0  # where the scale turns logarithmic
SLANEY_LOG_STEP = math.log(6.4) / 27  # natural-log Hz per mel above the break


def _hz_to_slaney_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    break_mel = SLANEY_BREAK_HZ / SLANEY_HZ_PER_MEL
    log_part = break_mel + np.log(np.maximum(hz, SLANEY_BREAK_HZ) / SLANEY_BREAK_HZ) / SLANEY_LOG_STEP
    return np.where(hz < SLANEY_BREAK_HZ, hz / SLANEY_HZ_PER_MEL, log_part)


def _slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    break_mel = SLANEY_BREAK_HZ / SLANEY_HZ_PER_MEL
    log_part = SLANEY_BREAK_HZ * np.exp(SLANEY_LOG_STEP * (mel - break_mel))
    return np.where(mel < break_mel, mel * SLANEY_HZ_PER_MEL, log_part)


def mel_filters(n_mels: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Slaney mel filterbank, float32 (n_mels, N_FFT // 2 + 1), cached per (n_mels, device).

    Triangles with corners at n_mels + 2 points equally spaced in Slaney mel
    from 0 Hz to the Nyquist frequency (8 kHz), each scaled to unit area
    (2 / its width in Hz) so wide high bands do not dominate. This is what
    librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels) computes and what
    openai-whisper ships as mel_filters.npz (80 bins up to v2, 128 for large-v3).
    """
    key = (n_mels, str(torch.device(device) if device is not None else torch.device("cpu")))
    if key not in _MEL_FILTER_CACHE:
        fft_hz = np.arange(N_FFT // 2 + 1) * SAMPLE_RATE / N_FFT  # (201,) bin centres, 0 .. 8000 Hz
        edges_mel = np.linspace(0.0, _hz_to_slaney_mel(SAMPLE_RATE / 2), n_mels + 2)
        edges_hz = _slaney_mel_to_hz(edges_mel)  # (n_mels + 2,)
        left, centre, right = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
        rising = (fft_hz[None, :] - left) / (centre - left)
        falling = (right - fft_hz[None, :]) / (right - centre)
        triangles = np.maximum(0.0, np.minimum(rising, falling))  # (n_mels, 201), peak 1
        filters = triangles * (2.0 / (right - left))
        _MEL_FILTER_CACHE[key] = torch.from_numpy(filters.astype(np.float32)).to(key[1])
    return _MEL_FILTER_CACHE[key]


def log_mel_spectrogram(audio: np.ndarray | torch.Tensor, n_mels: int = 80, padding: int = 0,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Whisper's log-mel features of mono 16 kHz `audio` (n_samples,) -> float32 (n_mels, n_frames).

    `padding` zero samples are appended first; n_frames = (n_samples + padding) // HOP_LENGTH.
    Steps, as in openai-whisper: |STFT|^2 with a periodic 400-sample Hann window,
    hop 160, the signal reflect-padded by 200 samples at both ends (center=True),
    the last frame dropped; mel filterbank; log10 of max(mel, 1e-10); values more
    than 8 (80 dB) below the loudest are raised to it; finally (x + 4) / 4, which
    puts typical speech roughly in [-1, 1].

    The STFT runs STFT_CHUNK_FRAMES frames at a time, so memory is the output plus
    a few MB even for hour-long audio; each frame sees exactly the samples it would
    in one big torch.stft call.
    """
    if not torch.is_tensor(audio):
        audio = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    audio = audio.to(device=device if device is not None else audio.device, dtype=torch.float32)
    if audio.dim() != 1:
        raise ValueError(f"expected mono audio of shape (n_samples,), got {tuple(audio.shape)}")
    if padding > 0:
        audio = F.pad(audio, (0, padding))
    n_samples = audio.shape[0]
    if n_samples <= N_FFT // 2:
        raise ValueError(f"need more than {N_FFT // 2} samples for a spectrogram, got {n_samples}")

    # center=True: frame i is centred on sample i * HOP_LENGTH of the reflect-padded signal.
    padded = F.pad(audio[None, None], (N_FFT // 2, N_FFT // 2), mode="reflect")[0, 0]
    n_frames = n_samples // HOP_LENGTH  # torch.stft gives one more; Whisper drops it
    window = torch.hann_window(N_FFT, device=audio.device)  # periodic, as torch defaults
    filters = mel_filters(n_mels, audio.device)  # (n_mels, 201)

    mel = torch.empty(n_mels, n_frames, dtype=torch.float32, device=audio.device)
    for start in range(0, n_frames, STFT_CHUNK_FRAMES):
        stop = min(start + STFT_CHUNK_FRAMES, n_frames)
        segment = padded[start * HOP_LENGTH:(stop - 1) * HOP_LENGTH + N_FFT]
        stft = torch.stft(segment, N_FFT, HOP_LENGTH, window=window, center=False,
                          return_complex=True)  # (201, stop - start)
        mel[:, start:stop] = filters @ (stft.abs() ** 2)

    log_spec = mel.clamp_(min=LOG_MEL_FLOOR).log10_()
    log_spec = torch.maximum(log_spec, log_spec.max() - LOG_MEL_DYNAMIC_RANGE)
    return (log_spec + 4.0) / 4.0


def log_mel_padded_audio(audio: np.ndarray | torch.Tensor, n_mels: int = 80,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """One 30-s window, (n_mels, N_FRAMES): pad or trim the *audio* to 30 s, then log-mel.

    This is the convention of transformers' WhisperFeatureExtractor and of
    openai-whisper's `decode` on a short clip (`log_mel_spectrogram(pad_or_trim(audio))`).
    The frames after the speech are the log-mel of digital silence, floored at
    the clip's max - 8, not zeros.
    """
    return log_mel_spectrogram(pad_or_trim(audio, N_SAMPLES), n_mels, device=device)


def log_mel_windows(audio: np.ndarray | torch.Tensor, n_mels: int = 80,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, int]:
    """Whole-recording log-mel for sliding 30-s windows: (mel (n_mels, n_frames), content_frames).

    This is the convention of openai-whisper's `transcribe` and of faster-whisper:
    the log-mel of the recording with 30 s of zero samples appended (so a window
    may start anywhere in the speech), and content_frames = n_samples // HOP_LENGTH,
    the frames that hold speech. Cut windows from it with `mel_window`.
    """
    mel = log_mel_spectrogram(audio, n_mels, padding=N_SAMPLES, device=device)
    return mel, int(audio.shape[-1]) // HOP_LENGTH


def mel_window(mel: torch.Tensor, content_frames: int, seek: int) -> torch.Tensor:
    """The 30-s window starting at frame `seek` of `log_mel_windows` output -> (n_mels, N_FRAMES).

    Takes min(N_FRAMES, content_frames - seek) frames and zero-pads the *log-mel*
    to N_FRAMES, as openai-whisper's `transcribe` does: past the end of the
    speech the model sees 0.0, not the log-mel of silence that
    `log_mel_padded_audio` would give, so the two conventions disagree on those
    frames (and hence, occasionally, on the transcript).
    """
    # seek == content_frames is allowed (an all-zero window) so that audio shorter
    # than one hop (content_frames == 0) still has a first window.
    if not 0 <= seek <= content_frames:
        raise ValueError(f"seek {seek} is outside the {content_frames} content frames")
    segment = mel[:, seek:seek + min(N_FRAMES, content_frames - seek)]
    return pad_or_trim(segment, N_FRAMES)


def first_window_mel(samples: np.ndarray, n_mels: int = 80) -> torch.Tensor:
    """(n_mels, 3000) features of the first 30 s, as `log_mel_windows` and `mel_window` cut them."""
    mel, content_frames = log_mel_windows(samples, n_mels=n_mels)
    return mel_window(mel, content_frames, 0)
