"""Beam search and best-of, as openai-whisper's `decode` does them (specwhisper.beam_search).

On toy log-probabilities (a fixed function of the prefix, no model): the search against exhaustive
enumeration where the beam is wide enough to hold every prefix, each step's selection against brute
force over every extension, patience and the length penalty. On random-weight models: beam 1 equals
greedy, a reordered KV cache gives the logits of its prefixes recomputed from scratch, best-of keeps
its best-ranked sample, and the long-form fallback uses beam search at temperature 0 and best-of
above it. On base and the 40 dev clips: beam 5 against openai-whisper's beam 5
(tests/data/beam5_base_dev.json, written by scripts/make_beam_reference.py).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import read_manifest
from specwhisper import audio, beam_search
from specwhisper.beam_search import Hypothesis, rank, search, select
from specwhisper.cli import main
from specwhisper.decoding import DecodeStats, DecodingOptions
from specwhisper.transcription import decode_window, transcribe_many

REFERENCE = Path(__file__).parent / "data" / "beam5_base_dev.json"
NEG_INF = float("-inf")


# ---------------------------------------------------------------- toy log-probabilities


def toy_logprobs(prefix: tuple[int, ...], vocab: int, real: int, seed: int, max_len: int = 1000) -> torch.Tensor:
    """(vocab,) log-probabilities after `prefix`, a fixed function of it: tokens 0 .. real-1 and
    end-of-text (the last token) possible, the rest impossible (-inf); only end-of-text after max_len."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + hash(prefix) % 1_000_003)
    logits = 2.0 * torch.randn(vocab, generator=generator)
    logits[real:vocab - 1] = NEG_INF
    if len(prefix) >= max_len:
        logits[:vocab - 1] = NEG_INF
    return torch.log_softmax(logits, dim=-1)


def toy_search(vocab: int, real: int, seed: int, beam_size: int, patience: float | None, budget: int,
               max_len: int = 1000):
    def step(beams, sources):
        return torch.stack([toy_logprobs(tuple(b), vocab, real, seed, max_len) for b in beams])

    first = toy_logprobs((), vocab, real, seed, max_len)[None]
    return search(first, step, beam_size, patience, budget, eot=vocab - 1)


def sequence_logprob(tokens: tuple[int, ...], vocab: int, real: int, seed: int, max_len: int) -> float:
    """Summed log-probability of tokens then end-of-text, recomputed from scratch in float64."""
    return sum(float(toy_logprobs(tokens[:i], vocab, real, seed, max_len)[token])
               for i, token in enumerate((*tokens, vocab - 1)))


def penalized(sum_logprob: float, length: int, length_penalty: float | None) -> float:
    """openai-whisper's MaximumLikelihoodRanker score, written out."""
    return sum_logprob / (max(length, 1) if length_penalty is None else ((5 + length) / 6) ** length_penalty)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("length_penalty", [None, 0.0, 0.6, 1.0])
def test_a_beam_wide_enough_for_every_prefix_finds_the_exhaustive_best(seed, length_penalty):
    """Two real tokens and end-of-text, at most 3 real tokens: 9 beams outnumber the 8 longest prefixes, so
    no prefix is dropped and every ending ranks above a kept (impossible) beam; with patience enough to
    collect them all, the search must return the best of all 15 sequences by the ranking rule."""
    vocab, real, max_len = 11, 2, 3
    candidates = toy_search(vocab, real, seed, beam_size=9, patience=100, budget=max_len + 1, max_len=max_len)
    chosen = candidates[rank(candidates, length_penalty)]
    everything = [tokens for n in range(max_len + 1) for tokens in itertools.product(range(real), repeat=n)]
    finished = {h.tokens for h in candidates if h.finished and h.sum_logprob > NEG_INF}
    assert finished == set(everything)

    def score(tokens):
        return penalized(sequence_logprob(tokens, vocab, real, seed, max_len), len(tokens), length_penalty)

    best = max(everything, key=score)
    assert chosen.tokens == best and chosen.finished
    assert chosen.sum_logprob == pytest.approx(sequence_logprob(best, vocab, real, seed, max_len), abs=1e-4)


@pytest.mark.parametrize("seed", range(20))
def test_each_step_keeps_the_best_extensions(seed):
    """Against brute force over every (beam, token): the next beams are the beam_size best extensions not
    ending in end-of-text, and the finished ones are exactly the end-of-text extensions scoring above
    the last beam kept."""
    generator = torch.Generator().manual_seed(seed)
    n_beams, vocab, beam_size, eot = 3, 12, 3, 11
    beams = [[int(t)] for t in torch.randperm(eot, generator=generator)[:n_beams]]
    scores = (-5 * torch.rand(n_beams, generator=generator)).tolist()
    logprobs = torch.log_softmax(3 * torch.randn(n_beams, vocab, generator=generator), dim=-1)
    kept, kept_scores, sources, finished = select(beams, scores, logprobs, beam_size, eot)
    extensions = sorted(((float(scores[b]) + float(logprobs[b, t]), b, t) for b in range(n_beams)
                         for t in range(vocab)), reverse=True)
    expected = [(b, t) for _, b, t in extensions if t != eot][:beam_size]
    assert [(s, beam[-1]) for s, beam in zip(sources, kept)] == expected
    assert kept == [beams[b] + [t] for b, t in expected]
    floor = kept_scores[-1]
    assert sorted(finished) == sorted(tuple(beams[b]) for total, b, t in extensions if t == eot and total > floor)
    assert all(math.isclose(s, total, abs_tol=1e-5) for s, (total, _, _) in
               zip(kept_scores, [e for e in extensions if e[2] != eot]))


def test_identical_beams_give_each_candidate_once():
    """The first step's beams are copies of one prompt: a token is a candidate once, not once per copy."""
    logprobs = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]] * 3), dim=-1)
    kept, _, _, finished = select([[], [], []], [0.0, 0.0, 0.0], logprobs, 3, eot=4)
    assert kept == [[0], [1], [2]] and not finished


def test_patience_sets_how_many_hypotheses_end_the_search():
    """max_candidates = round(beam_size * patience) finished hypotheses end it (Python's rounding); fewer
    than beam_size are topped up with the best unfinished beams. More patience keeps searching the same
    beams, so its finished set holds the smaller one's and its pick ranks at least as high."""
    vocab, real, beam_size = 12, 6, 4
    differ = 0
    for seed in range(12):
        runs = {p: toy_search(vocab, real, seed, beam_size, p, budget=400) for p in (0.5, 1.0, 2.0)}
        finished = {p: [h for h in c if h.finished] for p, c in runs.items()}
        assert [len(finished[p]) for p in (0.5, 1.0, 2.0)] == [2, 4, 8]  # round(2.0) = 2, 4, 8
        assert len(runs[0.5]) == beam_size and sum(not h.finished for h in runs[0.5]) == 2
        assert finished[1.0] == finished[2.0][:4] and finished[0.5] == finished[1.0][:2]
        picks = {p: c[rank(c, None)] for p, c in runs.items()}
        assert penalized(picks[2.0].sum_logprob, len(picks[2.0].tokens), None) >= \
            penalized(picks[1.0].sum_logprob, len(picks[1.0].tokens), None)
        differ += picks[2.0] != picks[1.0]
    assert differ > 0  # patience changed the result somewhere


def test_length_penalty_ranks_as_specified():
    short = Hypothesis((1, 2), -2.0, True)
    long = Hypothesis((1, 2, 3, 4, 5, 6), -3.0, True)
    candidates = [short, long]
    assert rank(candidates, None) == 1  # -2/2 = -1.0 < -3/6 = -0.5
    assert rank(candidates, 0.0) == 0  # no penalty at all: -2 > -3
    assert rank(candidates, 1.0) == 1  # -2/(7/6) = -1.714 < -3/(11/6) = -1.636
    # α = 0.5: 4 tokens divide by (9/6) ** 0.5 = 1.2247, 1 token by 1: the boundary is at -1.2247.
    assert rank([Hypothesis((1,) * 4, -1.20, True), Hypothesis((1,), -1.0, True)], 0.5) == 0
    assert rank([Hypothesis((1,) * 4, -1.25, True), Hypothesis((1,), -1.0, True)], 0.5) == 1
    assert rank([Hypothesis((), -0.5, True), short], None) == 0  # a bare end-of-text counts as length 1
    assert rank([short, Hypothesis((3, 4), -2.0, True)], None) == 0  # the first of equals


# ---------------------------------------------------------------- random-weight models


@pytest.fixture(scope="module")
def random_mels():
    torch.manual_seed(5)
    return torch.randn(2, 80, 3000)


def decode(model, mels, **options):
    stats = DecodeStats()
    results = decode_window(model, mels, DecodingOptions(max_new_tokens=30, **options), stats=stats)
    return results, stats


@pytest.mark.parametrize("timestamps", [False, True])
def test_one_beam_is_greedy(random_main, random_mels, timestamps):
    greedy, _ = decode(random_main, random_mels, timestamps=timestamps)
    beam, stats = decode(random_main, random_mels, timestamps=timestamps, beam_size=1)
    assert [r.tokens for r in beam] == [r.tokens for r in greedy]
    assert [r.sum_logprob for r in beam] == pytest.approx([r.sum_logprob for r in greedy], abs=1e-3)
    assert stats.main_passes == sum(len(r.tokens) - (not r.finished) for r in beam)


def test_beams_keep_to_greedys_rules(random_main, random_mels):
    results, _ = decode(random_main, random_mels, timestamps=True, beam_size=4)
    tokenizer = random_main.tokenizer
    for result in results:
        assert result.tokens[0] >= tokenizer.timestamp_begin  # a timestamped window starts with a timestamp
        assert not set(result.tokens) & set(random_main.suppress_tokens)


def run(model, audio_kv, cache, tokens):
    hidden = model.network.decoder(torch.tensor(tokens), audio_kv, cache)
    return model.network.decoder.logits(hidden)  # (B, T, V)


@torch.inference_mode()
def test_reordered_cache_gives_the_logits_of_its_prefixes_from_scratch(random_main, random_mels):
    """Rows copied, dropped, duplicated and the batch resized: the next step's logits equal those of the
    reordered prefixes run through a fresh cache. The audio K/V of one window repeated as stride-0 views
    serve every row."""
    network = random_main.network
    audio_kv = network.decoder.audio_kv(network.encoder(random_mels[:1]))
    prefixes = [[50257, 50362, 400, 401, 402], [50257, 50362, 500, 501, 502], [50257, 50362, 600, 601, 602]]
    for sources, last in (([2, 0, 0], [7, 8, 9]), ([1, 1, 2, 0, 2], [7, 8, 9, 10, 11]), ([0, 1, 2], [7, 8, 9])):
        cache = network.new_cache(3)
        run(random_main, audio_kv.repeat_rows(3), cache, prefixes)
        cache.reorder(sources)
        assert cache.lengths == [5] * len(sources)
        stepped = run(random_main, audio_kv.repeat_rows(len(sources)), cache, [[t] for t in last])[:, -1]
        fresh = run(random_main, audio_kv.repeat_rows(len(sources)), network.new_cache(len(sources)),
                    [prefixes[s] + [t] for s, t in zip(sources, last)])[:, -1]
        torch.testing.assert_close(stepped, fresh, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_reorder_carries_each_rows_length(random_main, random_mels):
    network = random_main.network
    audio_kv = network.decoder.audio_kv(network.encoder(random_mels[:1])).repeat_rows(2)
    cache = network.new_cache(2)
    run(random_main, audio_kv, cache, [[50257, 50362, 400, 401], [50257, 50362, 500, 501]])
    cache.rollback([2, 4])
    cache.reorder([1, 0])
    assert cache.lengths == [4, 2]
    stepped = run(random_main, audio_kv, cache, [[7], [8]])[:, -1]
    fresh = [run(random_main, audio_kv, network.new_cache(2), [p, p])[0, -1]
             for p in ([50257, 50362, 500, 501, 7], [50257, 50362, 8])]
    torch.testing.assert_close(stepped, torch.stack(fresh), atol=1e-4, rtol=1e-4)
    keys = cache.keys.data_ptr()
    cache.reorder([0, 1])
    assert cache.keys.data_ptr() == keys and cache.lengths == [5, 3]  # the identity copies nothing


@pytest.mark.parametrize("backend", ["torch", "auto", "triton"])
def test_one_windows_audio_kv_repeated_as_views_serves_every_attention_path(backend):
    """Beams share their window's cross-attention K/V as stride-0 views (`repeat_rows`): SDPA, the CPU C
    kernel ("auto" on the CPU) and the Triton kernel (interpreted here) read them as they read copies."""
    from specwhisper import attention
    from specwhisper.kv_cache import repeat_rows

    if backend == "triton":
        pytest.importorskip("triton")
    generator = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, 2, 150, 64, generator=generator) for _ in range(2))
    q = torch.randn(3, 2, 1, 64, generator=generator)
    with attention.use_attention_backend(backend):
        views = attention.cross_attention(q, repeat_rows(k, 3), repeat_rows(v, 3))
        copies = attention.cross_attention(q, k.repeat(3, 1, 1, 1), v.repeat(3, 1, 1, 1))
    assert repeat_rows(k, 3).stride(0) == 0
    torch.testing.assert_close(views, copies, atol=1e-5, rtol=1e-5)


def test_best_of_keeps_the_best_ranked_sample(random_main, random_mels, monkeypatch):
    samples = []

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        samples.extend(out)
        return out

    original = beam_search.autoregressive_decode
    monkeypatch.setattr(beam_search, "autoregressive_decode", recording)
    for length_penalty in (None, 1.0):
        samples.clear()
        torch.manual_seed(0)
        results, _ = decode(random_main, random_mels, temperature=1.0, best_of=4, length_penalty=length_penalty)
        assert len(samples) == 8 and len({tuple(s.tokens) for s in samples}) > 2  # 4 different samples a window
        for window, result in enumerate(results):
            group = samples[4 * window:4 * window + 4]
            scores = [penalized(s.sum_logprob, len(s.tokens), length_penalty) for s in group]
            assert result is group[scores.index(max(scores))]


def test_each_option_at_its_own_temperature(random_main, random_mels, monkeypatch):
    greedy, _ = decode(random_main, random_mels[:1])
    unused_best_of, _ = decode(random_main, random_mels[:1], best_of=5)  # best_of is for sampling
    assert unused_best_of[0].tokens == greedy[0].tokens
    calls = []

    def recorder(name, original):
        def recorded(*args):
            window = args[2] if name == "beam_search_decode" else args[0]
            calls.append((name, window.options.temperature))
            return original(*args)
        return recorded

    for name in ("beam_search_decode", "best_of_decode"):
        monkeypatch.setattr(beam_search, name, recorder(name, getattr(beam_search, name)))
    # A log-probability threshold of 0 fails every window, so every temperature is tried, as in the
    # long-form fallback; no window passes as silence.
    samples = torch.full((16000 * 3,), 0.01).numpy()
    result, = transcribe_many(random_main, [samples], language="en", temperature=(0.0, 0.5, 1.0), beam_size=2,
                              best_of=3, logprob_threshold=0.0, no_speech_threshold=None, max_new_tokens=10)
    assert calls == [("beam_search_decode", 0.0), ("best_of_decode", 0.5), ("best_of_decode", 1.0)]
    assert result.fallbacks == 2


@pytest.mark.parametrize("flags, fragment", [
    (["--assistant", "free", "--beam_size", "5"], "beam search runs without an assistant"),
    (["--beam_size", "0"], "--beam_size 0"),
    (["--best_of", "-1"], "--best_of -1"),
    (["--beam_size", "2", "--patience", "0.2"], "--patience 0.2"),
    (["--length_penalty", "1.5"], "--length_penalty 1.5"),
])
def test_bad_search_flags_are_one_line_before_anything_loads(flags, fragment, capsys):
    status = main(["transcribe", "demo", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert status != 0 and len(err) == 1 and err[0].startswith("specwhisper: error:") and fragment in err[0], err


def test_patience_without_beams_is_a_warning_on_the_command_line(capsys):
    """openai-whisper's command line always has beams (5 by default), so its --patience alone is taken,
    said to do nothing, and dropped; --assistant auto steps aside for beam search."""
    from specwhisper.cli import build_parser, check_transcribe_arguments

    args = build_parser().parse_args(["transcribe", "talk.wav", "--patience", "2", "--best_of", "None"])
    check_transcribe_arguments(args)
    assert args.patience is None and args.best_of is None
    assert "--patience 2.0 has no effect without --beam_size" in capsys.readouterr().err
    args = build_parser().parse_args(["transcribe", "talk.wav", "--assistant", "auto", "--beam-size", "3"])
    check_transcribe_arguments(args)
    assert args.beam_size == 3


def test_search_options_are_checked_in_the_api_too():
    with pytest.raises(ValueError, match="patience needs beam_size"):
        DecodingOptions(patience=1.0)
    with pytest.raises(ValueError, match="length_penalty"):
        DecodingOptions(beam_size=5, length_penalty=-0.1)


# ---------------------------------------------------------------- base against openai-whisper


def test_beam5_on_base_agrees_with_openai_whisper(base_model):
    """One 30-s window per dev clip, its audio padded to 30 s before the log-mel (openai-whisper's `decode`
    on a short clip), English, timestamp mode, 224 tokens at most, fp32 on the CPU: beam-5 transcripts
    identical to openai-whisper's on at least 95 % of the clips."""
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} missing: run scripts/make_beam_reference.py")
    reference = {clip["file"]: clip for clip in json.loads(REFERENCE.read_text(encoding="utf-8"))["clips"]}
    rows = read_manifest("dev")
    assert sorted(r["file"] for r in rows) == sorted(reference)
    same_tokens, same_text, differ = 0, 0, []
    options = DecodingOptions(language="en", timestamps=True, beam_size=5, max_new_tokens=224)
    for row in rows:
        mel = audio.log_mel_padded_audio(audio.load_audio(row["path"]), base_model.dims.n_mels)
        result, = decode_window(base_model, mel[None], options)
        expected = reference[row["file"]]["beam5"]
        same_tokens += result.tokens == expected["tokens"]
        text = base_model.tokenizer.decode([t for t in result.tokens if t < base_model.tokenizer.timestamp_begin])
        same_text += text.strip() == expected["text"]
        if result.tokens != expected["tokens"]:
            differ.append(row["file"])
    print(f"beam 5 on base: {same_tokens}/{len(rows)} clips token for token as openai-whisper, {same_text} "
          f"with the same text; differ: {differ}")
    assert same_text >= 0.95 * len(rows), differ
    assert same_tokens >= 0.95 * len(rows), differ
