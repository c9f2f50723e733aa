"""The distilled draft's C kernel (kernels/cpu_draft.c) against the PyTorch draft it stands in for.

The kernel rounds (int8 weights and activations, fp16 cross-attention K/V), so it is compared for
closeness, not bits: a draft's numbers only decide what is proposed. Its rules are checked by what
they must forbid, whatever the scores, and whole drafting rounds are checked to write the cache the
PyTorch step would.
"""

from __future__ import annotations

import pytest
import torch

from random_models import make_random_model
from specwhisper.decoding import DecodingOptions, LogitRules
from specwhisper.draft import build_draft_network
from specwhisper.kernels import cpu_draft
from specwhisper.kernels.cpu_draft import DraftKernel, RuleState

pytestmark = pytest.mark.skipif(cpu_draft.load_library() is None, reason="the draft's C kernel is unavailable here")


@pytest.fixture(scope="module")
def main_model(tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp("main") / "m", seed=31, n_text_layer=3)


@pytest.fixture(scope="module")
def draft(main_model):
    """A feature draft with a shortlist head in the kernel's layout (end-of-text, timestamps, text)."""
    tokenizer = main_model.tokenizer
    shortlist = [tokenizer.eot, *range(tokenizer.timestamp_begin, main_model.dims.n_vocab), *range(0, 20000, 3)]
    torch.manual_seed(0)
    network = build_draft_network(main_model, (0, 2), "shortlist", shortlist=shortlist, features=True)
    with torch.no_grad():
        network.decoder.fuse.weight.add_(0.05 * torch.randn_like(network.decoder.fuse.weight))
        network.decoder.output_projection.bias.normal_(0, 0.5)
    head = network.decoder.output_projection
    kernel = DraftKernel(network.decoder, network.dims.n_text_ctx, head.ids, head.rows, head.bias)
    return network, kernel


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def test_a_kernel_step_is_close_to_the_pytorch_step(draft):
    network, kernel = draft
    torch.manual_seed(1)
    audio_kv = network.decoder.audio_kv(torch.randn(2, 1500, 64))
    tokens = torch.randint(0, 20000, (2, 6))
    features = torch.randn(2, 6, 64)
    with torch.no_grad():
        reference = network.decoder(tokens, audio_kv, network.new_cache(2), features=features)  # (B, T, C)
        cache, steps = network.new_cache(2), []
        half = audio_kv.half()
        for t in range(6):
            positions = torch.tensor(cache.lengths)
            steps.append(kernel.step(tokens[:, t], positions, features[:, t], cache.keys, cache.values,
                                     half.keys, half.values))
            cache.extend([1, 1])
    fused = torch.stack(steps, dim=1)
    assert fused.shape == reference.shape
    assert cosine(fused, reference).min() > 0.995, cosine(fused, reference)


def test_the_kernel_s_rules_forbid_what_whisper_s_rules_forbid(main_model, draft):
    network, kernel = draft
    tokenizer = main_model.tokenizer
    ts, eot = tokenizer.timestamp_begin, tokenizer.eot
    rules = LogitRules(tokenizer, main_model.suppress_tokens, main_model.begin_suppress_tokens,
                       DecodingOptions(timestamps=True), main_model.dims.n_vocab)
    kernel.set_rules(rules.suppress, rules.begin_suppress, True, ts, main_model.dims.n_vocab,
                     rules.max_initial_timestamp_index)
    torch.manual_seed(2)
    audio_kv = network.decoder.audio_kv(torch.randn(1, 1500, 64)).half()
    cache = network.new_cache(1)
    text = 1000
    cases = {  # tokens so far -> what the next token must be
        (): lambda t: ts <= t <= ts + rules.max_initial_timestamp_index,  # a first timestamp, early
        (ts, text): lambda t: True,
        (ts + 10, text, ts + 40, ts + 40): lambda t: t < eot,  # a closed pair: text must follow
        (ts + 10, text, ts + 40): lambda t: t == eot or t >= ts + 40,  # after text's end: no going back
    }
    for generated, allowed in cases.items():
        for _ in range(20):
            hidden = 3 * torch.randn(1, 64)
            tokens = kernel.propose(1, [True], hidden, [5], RuleState.of([list(generated)], ts), cache.keys,
                                    cache.values, audio_kv.keys, audio_kv.values)
            assert len(tokens[0]) == 1 and allowed(tokens[0][0]), (generated, tokens)
            assert tokens[0][0] not in set(rules.suppress.tolist())


def test_a_round_feeds_its_drafts_into_the_cache_as_the_step_would(main_model, draft):
    network, kernel = draft
    tokenizer = main_model.tokenizer
    rules = LogitRules(tokenizer, main_model.suppress_tokens, main_model.begin_suppress_tokens,
                       DecodingOptions(timestamps=False), main_model.dims.n_vocab)
    kernel.set_rules(rules.suppress, rules.begin_suppress, False, tokenizer.timestamp_begin,
                     main_model.dims.n_vocab, None)
    torch.manual_seed(3)
    audio_kv = network.decoder.audio_kv(torch.randn(1, 1500, 64)).half()
    cache, hidden = network.new_cache(1), torch.randn(1, 64)
    cache.extend([7])  # as if a 7-token prompt were fed
    drafts = kernel.propose(5, [True], hidden, [7], RuleState.of([[400]], tokenizer.timestamp_begin), cache.keys,
                            cache.values, audio_kv.keys, audio_kv.values)[0]
    assert 1 <= len(drafts) <= 5
    # Every draft but the last was fed at positions 7, 8, ...: replaying them with `step` writes the same K/V.
    replay, state = network.new_cache(1), hidden
    replay.keys[:, :, :, :7] = cache.keys[:, :, :, :7]
    replay.values[:, :, :, :7] = cache.values[:, :, :, :7]
    for i, token in enumerate(drafts[:-1]):
        state = kernel.step(torch.tensor([token]), torch.tensor([7 + i]), state, replay.keys, replay.values,
                            audio_kv.keys, audio_kv.values)
    written = 7 + len(drafts) - 1
    assert torch.equal(replay.keys[:, :, :, :written], cache.keys[:, :, :, :written])
