"""Audio files of the common formats, made in the tests from samples with PyAV's encoders (no ffmpeg program)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# name -> (file suffix, container format, audio codec, sample rate, with a video track)
FORMATS = {
    "flac": (".flac", "flac", "flac", 16000, False),
    "mp3": (".mp3", "mp3", "libmp3lame", 44100, False),
    "ogg_opus": (".ogg", "ogg", "libopus", 48000, False),
    "m4a_aac": (".m4a", "ipod", "aac", 44100, False),
    "webm_opus": (".webm", "webm", "libopus", 48000, False),
    "mp4_video": (".mp4", "mp4", "aac", 48000, True),  # a video file: its audio track is what is read
}


def _resample_linear(samples: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    """Good enough to make test input at another rate (the decoder under test resamples it back)."""
    n = int(round(len(samples) * new_rate / rate))
    return np.interp(np.arange(n) * rate / new_rate, np.arange(len(samples)), samples).astype(np.float32)


def write_audio(path: Path, samples: np.ndarray, fmt: str, rate: int = 16000) -> Path:
    """Encode mono float samples at `rate` into `path` as FORMATS[fmt] (stereo for the lossy ones, so
    the decoder's downmix is exercised too)."""
    _, container_format, codec, codec_rate, with_video = FORMATS[fmt]
    audio = _resample_linear(samples, rate, codec_rate) if codec_rate != rate else samples.astype(np.float32)
    layout = "mono" if codec == "flac" else "stereo"
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=codec_rate, layout=layout)
        if codec == "flac":
            stream.format = "s16"
        video = out.add_stream("mpeg4", rate=10) if with_video else None
        if video is not None:
            video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
            for i in range(int(len(audio) / codec_rate * 10)):
                frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i % 255, np.uint8), format="rgb24")
                frame.pts, frame.time_base = i, Fraction(1, 10)
                for packet in video.encode(frame):
                    out.mux(packet)
        planar = np.stack([audio] * (1 if layout == "mono" else 2))  # (channels, n)
        if codec == "flac":
            frame = av.AudioFrame.from_ndarray(
                (np.clip(audio, -1, 1) * 32767).astype(np.int16)[None, :], format="s16", layout="mono")
        else:
            frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=layout)
        frame.sample_rate = codec_rate
        frame.pts, frame.time_base = 0, Fraction(1, codec_rate)
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
        if video is not None:
            for packet in video.encode(None):
                out.mux(packet)
    return path
