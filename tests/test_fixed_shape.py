"""The fixed-shape (GPU) decoding path, checked on the CPU: specwhisper.fixed_shape.

- the static cache writes at device-side lengths;
- Whisper's rules on the device mask what `LogitRules` masks, position by position;
- the premise: a position gets the same bits (torch.equal) as row i of a fixed-shape verify pass and
  as the only real row of a fixed-shape greedy step, on base and on an fp32 random model;
- speculative decoding on fixed shapes (the main model as its own draft, a 2-layer draft) equals
  greedy on fixed shapes token for token on real speech, and both equal the everyday CPU path;
- one host read (a sync on a GPU) per greedy step and per speculative round, counted;
- the main step compiles with torch.compile(fullgraph=True) and does not recompile across positions:
  the proxy for "capturable as a CUDA graph" on a machine without one.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import read_manifest
from random_models import make_random_model
from specwhisper import attention, audio, fixed_shape
from specwhisper.assistants import make_assistant
from specwhisper.decoding import (DecodeStats, DecodingOptions, LogitRules, WindowBatch, autoregressive_decode,
                                  build_prompts)
from specwhisper.device_rules import DeviceRules, row_summary
from specwhisper.fixed_shape import (CapturedStep, FixedDecoder, begin_fixed, block_and_steps, decodes_on_fixed_shapes,
                                     first_layers, fixed_greedy_step, fixed_shape_decode, fixed_speculative_round,
                                     main_step, set_fixed_shapes)
from specwhisper.host_reads import count_host_reads
from specwhisper.kv_cache import AudioKV, KVCache, StaticKVCache
from specwhisper.transcription import encode_audio

ROOT = Path(__file__).resolve().parents[1]
original_upload = fixed_shape.upload
TEXT = " The history of the art of printing, the most important of all the arts"


def window_of(model, clips: list[str], timestamps: bool = True) -> WindowBatch:
    mel = torch.stack([audio.first_window_mel(audio.load_audio(clip), model.dims.n_mels) for clip in clips])
    options = DecodingOptions(language="en", timestamps=timestamps)
    audio_kv, features = encode_audio(model, mel)
    rules = LogitRules(model.tokenizer, model.suppress_tokens, model.begin_suppress_tokens, options,
                       model.dims.n_vocab)
    languages = ["en"] * len(clips)
    return WindowBatch(mel, features, audio_kv, build_prompts(model.tokenizer, options, languages), languages,
                       rules, options)


@pytest.fixture(scope="module")
def dev_clips():
    return [row["path"] for row in read_manifest("dev")[:3]]


# ----------------------------------------------------------------------------- the static cache

def test_the_static_cache_writes_where_the_device_lengths_say():
    static = StaticKVCache.allocate(n_layer=1, batch_size=2, n_head=2, context=6, rows_per_pass=3, head_dim=4,
                                    dtype=torch.float32, device="cpu")
    everyday = KVCache.allocate(n_layer=1, batch_size=2, n_head=2, max_len=9, head_dim=4, dtype=torch.float32,
                                device="cpu")
    static.set_lengths(torch.tensor([1, 4]))
    everyday.rollback([0, 0])
    everyday.lengths = [1, 4]
    # Row 1's third token lands on slot 6, past the 6-position context: its embedding index stays at 5.
    assert static.positions(3).tolist() == [[1, 2, 3], [4, 5, 5]]
    k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    static.write(0, k, v)
    everyday.write(0, k, v)
    assert torch.equal(static.keys, everyday.keys) and torch.equal(static.values, everyday.values)
    # The pass's mask: the query at slot p sees slots 0 .. p, the mask `attention` builds for a ragged pass.
    assert torch.equal(static.pass_mask(), attention.causal_cache_mask(torch.tensor([1, 4]), 3, 9))
    static.advance(3)
    assert static.lengths.tolist() == [4, 7]
    assert static.uniform_length() is None and not static.computes_positions_alone()
    assert everyday.pass_mask() is None


# ----------------------------------------------------------------------------- the rules on the device

def random_history(rng: random.Random, ts: int, eot: int, n: int) -> list[int]:
    """Text and timestamp tokens in Whisper's patterns (pairs, text-then-timestamp, ...), rising in time."""
    tokens, time = [], ts
    for _ in range(n):
        if rng.random() < 0.4:
            time += rng.randrange(0, 5)
            tokens.append(time)
        else:
            tokens.append(rng.randrange(0, eot))
    return tokens


@pytest.mark.parametrize("timestamps", [True, False])
def test_the_device_rules_mask_what_logit_rules_mask(base_model, timestamps):
    tokenizer, n_vocab = base_model.tokenizer, base_model.dims.n_vocab
    options = DecodingOptions(language="en", timestamps=timestamps)
    rules = LogitRules(tokenizer, base_model.suppress_tokens, base_model.begin_suppress_tokens, options, n_vocab)
    device_rules = DeviceRules(rules, n_vocab, torch.device("cpu"))
    rng = random.Random(5)
    generator = torch.Generator().manual_seed(5)
    ts, eot = tokenizer.timestamp_begin, tokenizer.eot
    n_checked = 0
    for trial in range(40):
        histories = [random_history(rng, ts, eot, rng.choice([0, 1, 2, 3, 7])) for _ in range(3)]
        drafts = [random_history(rng, ts + 30, eot, 4) for _ in range(3)]
        block = torch.tensor([[h[-1] if h else 0] + d for h, d in zip(histories, drafts)])  # (3, 5)
        # Timestamps well ahead in the logits half the time, so the probability rule fires both ways.
        logits = torch.randn(3, 5, n_vocab, generator=generator) * 3
        if trial % 2:
            logits[..., ts:] += 6
        summary = torch.tensor([row_summary(rules, h) for h in histories])
        on_device = device_rules.apply(logits.clone(), block, summary)
        for b, (history, row_drafts) in enumerate(zip(histories, drafts)):
            for t in range(5):
                expected = rules.apply(logits[b, t].clone(), history + row_drafts[:t])
                assert torch.equal(on_device[b, t], expected), (trial, b, t)
                n_checked += 1
    assert n_checked == 600


# ----------------------------------------------------------------------------- the premise, in bits

@pytest.fixture(scope="module")
def base_window(base_model):
    samples = audio.load_audio(read_manifest("long")[0]["path"])
    audio_kv, _ = encode_audio(base_model, audio.first_window_mel(samples, base_model.dims.n_mels)[None])
    return audio_kv


def prompts_starting_apart(tokenizer, rows: int) -> list[list[int]]:
    previous = tokenizer.encode(TEXT * 2)
    prompt = tokenizer.sot_sequence("en", "transcribe", True)
    return [prompt if row == 0 else [tokenizer.sot_prev] + previous[:5 * row] + prompt for row in range(rows)]


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("rows", [1, 3])
def test_fixed_shape_passes_give_base_the_same_bits_in_a_verify_pass_and_in_steps(base_model, base_window,
                                                                                  backend, rows):
    tokenizer = base_model.tokenizer
    audio_kv = AudioKV([k.expand(rows, -1, -1, -1).contiguous() for k in base_window.keys],
                       [v.expand(rows, -1, -1, -1).contiguous() for v in base_window.values])
    block = tokenizer.encode(TEXT)[:7]
    with torch.inference_mode(), attention.use_attention_backend(backend):
        together, one_by_one = block_and_steps(base_model.network.decoder, audio_kv,
                                               prompts_starting_apart(tokenizer, rows), block)
    assert together.shape == one_by_one.shape == (rows, 7, base_model.dims.n_text_state)
    assert torch.equal(together, one_by_one)


def test_fixed_shape_passes_give_an_fp32_model_the_same_bits(tmp_path):
    model = make_random_model(tmp_path / "m", seed=3, n_text_state=288, n_text_head=4, n_audio_state=288,
                              n_audio_head=4)
    audio_kv = model.network.decoder.audio_kv(torch.randn(2, model.dims.n_audio_ctx, 288,
                                                          generator=torch.Generator().manual_seed(0)))
    with torch.inference_mode():
        together, one_by_one = block_and_steps(model.network.decoder, audio_kv,
                                               prompts_starting_apart(model.tokenizer, 2), [300, 11, 4000, 50364, 7])
    assert torch.equal(together, one_by_one)


# ----------------------------------------------------------------------------- greedy = speculative, real speech

def test_fixed_shape_speculative_equals_fixed_shape_greedy_and_the_everyday_path(base_model, dev_clips):
    network, tokenizer = base_model.network, base_model.tokenizer
    stats = {"self": DecodeStats(), "noisy audio": DecodeStats(), "2 layers": DecodeStats()}
    with torch.inference_mode():
        window = window_of(base_model, dev_clips)  # 3 windows in one batch: rows finish apart
        everyday = autoregressive_decode(network, tokenizer, window)
        greedy = fixed_shape_decode(network, tokenizer, window)
        noise = torch.randn(window.audio_features.shape, generator=torch.Generator().manual_seed(0))
        two_layers = first_layers(network.decoder, 2)
        drafts = {"self": (network.decoder, window.audio_kv),  # agrees with every draft
                  "noisy audio": (network.decoder, network.decoder.audio_kv(window.audio_features + noise)),
                  "2 layers": (two_layers, two_layers.audio_kv(window.audio_features))}  # agrees with none
        speculative = {name: fixed_shape_decode(network, tokenizer, window, stats[name], draft=draft, gamma=3)
                       for name, draft in drafts.items()}
    for r, (reference, fixed) in enumerate(zip(everyday, greedy)):
        assert len(reference.tokens) > 5
        assert fixed.tokens == reference.tokens
        assert fixed.avg_logprob == pytest.approx(reference.avg_logprob, abs=1e-5)
        for name, results in speculative.items():
            assert results[r].tokens == fixed.tokens, name
            assert results[r].avg_logprob == fixed.avg_logprob, name
    # Drafts cut by end-of-text or a budget aside, the main model drafting for itself is always right; the
    # main model hearing noisy audio is right often, the first 2 layers never: both exercise the rollback.
    assert stats["self"].accepted >= 0.9 * stats["self"].drafted
    assert 0.5 * stats["noisy audio"].drafted < stats["noisy audio"].accepted < stats["noisy audio"].drafted
    assert stats["noisy audio"].rejections >= 3
    assert stats["2 layers"].accepted == 0 and stats["2 layers"].rejections > 20
    assert len(network.decoder.blocks) == 6  # the draft was cut from a copy


def test_transcribe_decodes_on_fixed_shapes_when_asked(base_model, dev_clips):
    plain = base_model.transcribe(dev_clips[1], language="en")
    set_fixed_shapes("on")
    try:
        fixed = base_model.transcribe(dev_clips[1], language="en")
        with_assistant = base_model.transcribe(dev_clips[1], language="en",
                                               assistant=make_assistant(base_model, base_model, draft_length=3))
    finally:
        set_fixed_shapes(None)
    assert fixed.text == plain.text == with_assistant.text
    assert fixed.tokens == plain.tokens == with_assistant.tokens
    assert with_assistant.stats.accepted > 0


def test_a_warm_up_run_before_capture_changes_nothing(base_model, dev_clips, monkeypatch):
    """On CUDA each step runs once before its graph is captured; that run must be undone completely. Here
    every step is rehearsed (run and undone) before it runs: the transcripts must not change."""
    network, tokenizer = base_model.network, base_model.tokenizer
    with torch.inference_mode():
        window = window_of(base_model, dev_clips[:2])
        noisy = network.decoder.audio_kv(window.audio_features + 1.0)
        plain = fixed_shape_decode(network, tokenizer, window, draft=(network.decoder, noisy), gamma=3)
        original_call = CapturedStep.__call__

        def rehearsed_call(self):
            self.rehearse()
            return original_call(self)

        monkeypatch.setattr(CapturedStep, "__call__", rehearsed_call)
        rehearsed = fixed_shape_decode(network, tokenizer, window, draft=(network.decoder, noisy), gamma=3)
    assert [r.tokens for r in rehearsed] == [p.tokens for p in plain]
    assert [r.draft_mask for r in rehearsed] == [p.draft_mask for p in plain]


def test_long_form_on_fixed_shapes_equals_the_everyday_path(base_model):
    """Windows after the first are prompted with the text before them: prompts of other lengths."""
    samples = audio.load_audio(read_manifest("long")[0]["path"])[:70 * 16000]
    plain = base_model.transcribe(samples, language="en")
    set_fixed_shapes("on")
    try:
        fixed = base_model.transcribe(samples, language="en",
                                      assistant=make_assistant(base_model, base_model, draft_length=4))
    finally:
        set_fixed_shapes(None)
    assert plain.windows >= 3
    assert fixed.tokens == plain.tokens and fixed.text == plain.text
    assert [s.start for s in fixed.segments] == [s.start for s in plain.segments]


def test_unknown_fixed_shape_modes_are_refused():
    with pytest.raises(ValueError, match="fixed-shape mode"):
        set_fixed_shapes("always")


def test_the_environment_variable_turns_fixed_shapes_on_and_off(base_model, dev_clips, monkeypatch):
    with torch.inference_mode():
        window = window_of(base_model, dev_clips[:1])
    assert not decodes_on_fixed_shapes(window, None)  # auto, on the CPU
    monkeypatch.setenv("SPECWHISPER_FIXED_SHAPES", "on")
    assert decodes_on_fixed_shapes(window, None)
    set_fixed_shapes("off")  # the API's setting wins
    try:
        assert not decodes_on_fixed_shapes(window, None)
    finally:
        set_fixed_shapes(None)
    monkeypatch.setenv("SPECWHISPER_FIXED_SHAPES", "sometimes")
    with pytest.raises(ValueError, match="SPECWHISPER_FIXED_SHAPES='sometimes'"):
        decodes_on_fixed_shapes(window, None)


def test_a_bad_fixed_shape_variable_is_one_line_from_the_cli():
    done = subprocess.run([sys.executable, "-m", "specwhisper", "transcribe", "demo", "--assistant", "none"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SPECWHISPER_FIXED_SHAPES": "sometimes"})
    assert done.returncode != 0
    assert "SPECWHISPER_FIXED_SHAPES='sometimes'" in done.stderr and "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- syncs

def test_one_host_read_per_greedy_step_and_per_speculative_round(base_model, dev_clips, monkeypatch):
    network = base_model.network
    uploads = []
    monkeypatch.setattr(fixed_shape, "upload", lambda target, values: (uploads.append(values),
                                                                        original_upload(target, values)))
    with torch.inference_mode():
        window = window_of(base_model, dev_clips[:2])
        session = begin_fixed(network, base_model.tokenizer, window, rows_per_pass=8)
        fixed_greedy_step(session)
        uploads.clear()
        with count_host_reads("cpu") as greedy_reads:
            for _ in range(6):
                fixed_greedy_step(session)
        assert uploads == []  # after the first step, each pass prepares the next one's inputs on the device
        session = begin_fixed(network, base_model.tokenizer, window, rows_per_pass=8,
                              draft=(first_layers(network.decoder, 2), window.audio_kv))
        with count_host_reads("cpu") as round_reads:
            accepted = [fixed_speculative_round(session, gamma=5) for _ in range(4)]
        with count_host_reads("cpu") as everyday_reads:
            stats = DecodeStats()
            autoregressive_decode(network, base_model.tokenizer, window, stats)
    assert dict(greedy_reads) == {"tolist": 6}
    assert dict(round_reads) == {"tolist": 4}
    assert all(len(row.tokens) >= 1 + 4 for row in session.state.rows) and len(accepted) == 4
    # The counter sees the everyday path's reads: several per token (what the fixed path removes).
    assert sum(everyday_reads.values()) > 3 * stats.main_passes


# ----------------------------------------------------------------------------- capturable: the compile proxy

def test_the_main_step_compiles_whole_and_does_not_recompile_across_positions(tmp_path):
    import torch._dynamo

    model = make_random_model(tmp_path / "m", seed=1, prepack=False)
    network, tokenizer = model.network, model.tokenizer
    options = DecodingOptions(language="en", timestamps=True)
    rules = LogitRules(tokenizer, model.suppress_tokens, model.begin_suppress_tokens, options, model.dims.n_vocab)
    device_rules = DeviceRules(rules, model.dims.n_vocab, torch.device("cpu"))
    prompt = tokenizer.sot_sequence("en", "transcribe", True)
    features = torch.randn(1, model.dims.n_audio_ctx, model.dims.n_audio_state, generator=torch.Generator().manual_seed(1))

    def fresh() -> tuple[FixedDecoder, torch.Tensor]:
        fixed = FixedDecoder.allocate(network.decoder, network.decoder.audio_kv(features), rows_per_pass=4)
        fixed.prefill([prompt])
        return fixed, torch.zeros(1, 4, dtype=torch.long)

    def inputs(fixed, summary, tokens, generated):
        fixed.tokens.copy_(torch.tensor([tokens + [0] * (4 - len(tokens))]))
        fixed.n_new.fill_(len(tokens))
        summary.copy_(torch.tensor([row_summary(rules, generated)]))

    budget = torch.tensor([100])
    steps = [([50364], [50364]), ([300], [50364, 300]), ([11, 4000, 50370], [50364, 300, 11]),
             ([4000], [50364, 300, 11, 4000]), ([50380, 9], [50364, 300, 11, 4000, 50380])]
    eager, compiled = [], []
    torch._dynamo.reset()
    with torch.inference_mode(), attention.use_attention_backend("torch"):
        fixed, summary = fresh()
        for tokens, generated in steps:
            inputs(fixed, summary, tokens, generated)
            eager.append((main_step(fixed, device_rules, summary, budget), fixed.cache.lengths.clone()))
        fixed, summary = fresh()
        step = torch.compile(lambda: main_step(fixed, device_rules, summary, budget), fullgraph=True, dynamic=False,
                             backend="aot_eager")
        with torch._dynamo.config.patch(error_on_recompile=True):
            for tokens, generated in steps:
                inputs(fixed, summary, tokens, generated)
                compiled.append((step(), fixed.cache.lengths.clone()))
    for (eager_out, eager_lengths), (compiled_out, compiled_lengths) in zip(eager, compiled):
        assert torch.equal(eager_lengths, compiled_lengths)
        n = eager_out.shape[1] // 2
        assert torch.equal(eager_out[:, :n], compiled_out[:, :n])  # the choices
        assert torch.equal(eager_out[:, -1], compiled_out[:, -1])  # drafts agreed
    assert [lengths.item() for _, lengths in eager][-1] > len(prompt) + 4


# ----------------------------------------------------------------------------- the device script

def test_gpu_check_runs_on_the_cpu():
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for heading in ("versions", "kernels against their references", "bits", "greedy against speculative",
                    "timings"):
        assert heading in out, out
    assert "FAIL" not in out, out
