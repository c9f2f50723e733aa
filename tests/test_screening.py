"""Greedy choices from the fp16 screen of the output projection are the exact ones.

The screen's error bound is checked against float64 logits (random weights, and base's
real hidden states on dev clips); screened decoding is compared with the full fp32
projection on real audio, with the real bound and with a bound inflated so that every
step takes the refinement paths; and a bound that is too small is shown to choose wrong.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import read_manifest
from specwhisper import audio
from specwhisper.decoding import DecodeStats, DecodingOptions, LogitRules
from specwhisper.screening import ScreenedHead, ScreenedRow, fp16_gemm_available
from specwhisper.assistants import resolve_auto_assistant
from specwhisper.transcription import decode_window


def first_window_mel_of(model, samples):
    return audio.first_window_mel(samples, model.dims.n_mels)

pytestmark = pytest.mark.skipif(not fp16_gemm_available(), reason="no fbgemm fp16 GEMM in this torch build")


def exact_logits(head: ScreenedHead, hidden: torch.Tensor) -> torch.Tensor:
    return hidden.double() @ head.weight.double().T  # (N, V) float64


def assert_bound_holds(head: ScreenedHead, hidden: torch.Tensor) -> float:
    """Every token's screened logit lies within its row's bound of the float64 one; returns the
    largest error as a fraction of the bound."""
    screened, bounds = head.screen(hidden)
    error = (exact_logits(head, hidden) - screened.double()).abs().amax(dim=-1)  # (N,)
    bounds = torch.tensor(bounds, dtype=torch.float64)
    assert (error <= bounds).all(), (error / bounds).max()
    return float((error / bounds).max())


def test_bound_holds_on_random_weights_including_outlier_channels():
    torch.manual_seed(0)
    weight = torch.randn(20000, 256) * 0.05
    weight[:5] *= 40  # a few rows far larger than the rest: the bound uses the largest
    head = ScreenedHead(weight)
    hidden = torch.randn(64, 256) * 3
    hidden[:, 7] *= 300  # LayerNorm gains make a few channels dominate real hidden states
    hidden[32:] *= 1e-3  # tiny rows too
    worst = assert_bound_holds(head, hidden)
    assert worst > 0.01  # not vacuous: real rounding errors reach a visible part of the bound


def test_screened_argmax_equals_the_exact_argmax_with_masks():
    torch.manual_seed(1)
    weight = torch.randn(5000, 128) * 0.1
    head = ScreenedHead(weight)
    for trial in range(50):
        hidden = torch.randn(128) * 20
        screened, (bound,) = head.screen(hidden[None])
        filtered = screened[0].clone()
        masked = torch.randperm(5000)[:2500]
        filtered[masked] = float("-inf")
        exact = exact_logits(head, hidden[None])[0]
        exact[masked] = float("-inf")
        assert ScreenedRow(head, hidden, bound).argmax(filtered) == int(exact.argmax())


def test_a_bound_too_small_would_choose_wrong():
    """Two tokens whose order fp16 rounding reverses: the real bound sends both to the exact
    dot product, which picks the exact winner; a zero bound trusts the screen and picks wrong."""
    width = 64
    hidden = torch.zeros(width)
    hidden[:2] = 1.0
    g = 0.09375  # an fp16 grid point; the spacing of the fp16 grid there is 2^-14
    spacing = 2.0 ** -14
    weight = torch.zeros(3, width)
    weight[0, :2] = torch.tensor([g + 0.51 * spacing, g])  # rounds up: screened 2g + 1.00 spacing, exact 2g + 0.51
    weight[1, :2] = torch.tensor([g + 0.49 * spacing, g + 0.1 * spacing])  # rounds down: screened 2g, exact 2g + 0.59
    head = ScreenedHead(weight)
    screened, (bound,) = head.screen(hidden[None])
    assert screened[0, 0] > screened[0, 1]
    assert int(exact_logits(head, hidden[None])[0].argmax()) == 1
    assert ScreenedRow(head, hidden, bound).argmax(screened[0].clone()) == 1
    assert ScreenedRow(head, hidden, 0.0).argmax(screened[0].clone()) == 0


# ---------------------------------------------------------------- base on real speech


@contextlib.contextmanager
def screen_set_to(model, head):
    decoder = model.network.decoder
    saved = decoder.screened_head
    decoder.screened_head = head
    try:
        yield
    finally:
        decoder.screened_head = saved


@pytest.fixture(scope="module")
def dev_mels(base_model):
    return [first_window_mel_of(base_model, audio.load_audio(r["path"]))[None] for r in read_manifest("dev")[:8]]


def decode(model, mel, assistant=None, **options):
    stats = DecodeStats()
    result = decode_window(model, mel, DecodingOptions(language="en", **options), assistant=assistant, stats=stats)[0]
    return result.tokens, result.avg_logprob


def test_bound_holds_on_base_hidden_states_of_real_speech(base_model, dev_mels):
    head = base_model.network.decoder.screened_head
    assert head is not None, "load_model installs the screen on the CPU in fp32"
    hidden_states = []
    decoder = base_model.network.decoder
    original = decoder.screened_head.screen

    def recording_screen(hidden):
        hidden_states.append(hidden.detach().clone())
        return original(hidden)

    head.screen = recording_screen
    try:
        for mel in dev_mels[:4]:
            decode(base_model, mel)
    finally:
        del head.screen
    hidden = torch.cat(hidden_states)
    assert len(hidden) > 50
    # These offline weights came from an fp16 file, so their fp16 copy is exact and only the
    # accumulation differs: the bound holds with a wide margin here (the random-weight test
    # above is where fp16 rounding of the weights is exercised).
    assert_bound_holds(head, hidden)
    _, bounds = head.screen(hidden)
    assert max(bounds) < 0.5  # tight enough that few tokens need the exact dot product


@pytest.mark.parametrize("timestamps", [False, True])
def test_screened_greedy_equals_the_full_projection_on_real_clips(base_model, dev_mels, timestamps):
    head = base_model.network.decoder.screened_head
    for mel in dev_mels:
        screened_tokens, screened_logprob = decode(base_model, mel, timestamps=timestamps)
        with screen_set_to(base_model, None):
            full_tokens, full_logprob = decode(base_model, mel, timestamps=timestamps)
        assert screened_tokens == full_tokens
        assert screened_logprob == pytest.approx(full_logprob, abs=1e-5)
    assert head is base_model.network.decoder.screened_head


@pytest.fixture()
def inflated_screen(base_model):
    """The real screen with a bound 300x too large: many candidates every step and every
    timestamp decision taken on the exact row, which must change nothing."""
    real = base_model.network.decoder.screened_head
    loose = ScreenedHead(real.weight)
    loose.l2_factor *= 300
    with screen_set_to(base_model, loose):
        yield loose


def test_refinement_paths_change_nothing_on_real_clips(base_model, dev_mels, inflated_screen):
    _, bounds = inflated_screen.screen(torch.randn(1, base_model.dims.n_text_state) * 20)
    assert bounds[0] > 5  # wide enough to exercise the exact paths
    for mel in dev_mels[:4]:
        loose = decode(base_model, mel, timestamps=True)
        with screen_set_to(base_model, None):
            full = decode(base_model, mel, timestamps=True)
        assert loose[0] == full[0]
        assert loose[1] == pytest.approx(full[1], abs=1e-5)


def test_speculative_with_screened_verification_equals_unscreened_greedy(base_model, dev_mels, inflated_screen):
    assistant = resolve_auto_assistant(base_model)  # the shipped distilled draft
    assert assistant is not None
    for mel in dev_mels[:3]:
        spec = decode(base_model, mel, assistant, timestamps=True)
        with screen_set_to(base_model, None):
            full = decode(base_model, mel, timestamps=True)
        assert spec[0] == full[0]
        assert spec[1] == pytest.approx(full[1], abs=1e-5)


def test_timestamp_rule_on_screened_logits_decides_as_on_exact_ones(base_model):
    """The margin test of the timestamp rule, at margins around the bound, against the exact rule."""
    tokenizer = base_model.tokenizer
    rules = LogitRules(tokenizer, base_model.suppress_tokens, base_model.begin_suppress_tokens,
                       DecodingOptions(language="en", timestamps=True), base_model.dims.n_vocab)
    head = base_model.network.decoder.screened_head
    torch.manual_seed(2)
    generated = [tokenizer.timestamp_begin, 400, 401]  # text after a timestamp: both kinds are allowed
    decided = 0
    for trial in range(40):
        hidden = torch.randn(base_model.dims.n_text_state) * 3
        screened, (bound,) = head.screen(hidden[None])
        screened = screened[0]
        # Shift the timestamp logits so that the rule's margin lands near the bound.
        ts = tokenizer.timestamp_begin
        margin = float(torch.logsumexp(screened[ts:], 0) - screened[:ts].max())
        shift = -margin + (trial - 20) * bound / 5
        hidden_exact = exact_logits(head, hidden[None])[0].float()
        hidden_exact[ts:] += shift
        screened[ts:] += shift

        class Shifted(ScreenedRow):
            def exact_row(self):
                return hidden_exact.clone()

        with_screen = rules.apply(screened.clone(), generated, Shifted(head, hidden, bound))
        exact = rules.apply(hidden_exact.clone(), generated)
        assert torch.isinf(with_screen[:ts]).all() == torch.isinf(exact[:ts]).all(), trial
        decided += int(torch.isinf(exact[:ts]).all())
    assert 0 < decided < 40  # both outcomes occurred
