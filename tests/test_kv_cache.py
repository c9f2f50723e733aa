"""The KV cache: append, O(1) rollback and re-append give the logits of decoding from scratch."""

import pytest
import torch

from random_models import make_random_model
from specwhisper.kv_cache import CacheOverflow, KVCache


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp("kv") / "m", seed=3)


@pytest.fixture(scope="module")
def audio_kv(model):
    torch.manual_seed(0)
    mel = torch.randn(2, 80, 3000)
    with torch.inference_mode():
        return model.network.decoder.audio_kv(model.network.encoder(mel))


def run(model, audio_kv, cache, tokens):
    with torch.inference_mode():
        return model.network.decoder.logits(model.network.decoder(torch.tensor(tokens), audio_kv, cache))


def test_one_pass_equals_token_by_token(model, audio_kv):
    tokens = [[50257, 50362, 400, 1029, 257, 11, 13, 818], [50257, 50362, 1, 2, 3, 4, 5, 6]]
    whole = run(model, audio_kv, model.network.new_cache(2), tokens)
    cache = model.network.new_cache(2)
    steps = torch.cat([run(model, audio_kv, cache, [[a[i]], [b[i]]]) for i, (a, b) in
                       enumerate([(tokens[0], tokens[1])] * len(tokens[0]))], dim=1)
    torch.testing.assert_close(steps, whole, atol=1e-4, rtol=1e-4)
    assert cache.lengths == [8, 8]


def test_rollback_and_reappend_equal_fresh_decoding(model, audio_kv):
    prefix, wrong, right = [50257, 50362, 400], [7, 8, 9, 10], [1029, 257]
    cache = model.network.new_cache(2)
    run(model, audio_kv, cache, [prefix, prefix])
    run(model, audio_kv, cache, [wrong, wrong])  # a rejected draft
    assert cache.lengths == [7, 7]
    cache.rollback(3)
    assert cache.lengths == [3, 3]
    after_rollback = run(model, audio_kv, cache, [right, right])
    fresh = run(model, audio_kv, model.network.new_cache(2), [prefix + right, prefix + right])[:, -2:]
    torch.testing.assert_close(after_rollback, fresh, atol=1e-4, rtol=1e-4)


def test_rows_roll_back_independently(model, audio_kv):
    cache = model.network.new_cache(2)
    run(model, audio_kv, cache, [[50257, 50362, 400, 401], [50257, 50362, 500, 501]])
    cache.rollback([2, 4])  # row 0 rejects two tokens, row 1 keeps all
    assert cache.uniform_length() is None
    out = run(model, audio_kv, cache, [[600, 601], [700, 701]])  # rows now sit at different positions
    assert cache.lengths == [4, 6]
    fresh0 = run(model, audio_kv, model.network.new_cache(2), [[50257, 50362, 600, 601]] * 2)[0, -2:]
    fresh1 = run(model, audio_kv, model.network.new_cache(2), [[50257, 50362, 500, 501, 700, 701]] * 2)[1, -2:]
    torch.testing.assert_close(out[0], fresh0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], fresh1, atol=1e-4, rtol=1e-4)


def test_rollback_is_o1_and_validated(model):
    cache = model.network.new_cache(1)
    cache.advance(5)
    keys_before = cache.keys.data_ptr()
    cache.rollback(2)
    assert cache.keys.data_ptr() == keys_before  # nothing reallocated or copied
    with pytest.raises(ValueError):
        cache.rollback(3)  # cannot roll *forward*
    with pytest.raises(ValueError):
        cache.rollback([1, 1])  # wrong number of rows


def test_writing_past_the_context_is_refused():
    cache = KVCache.allocate(n_layer=1, batch_size=1, n_head=1, max_len=4, head_dim=2, dtype=torch.float32,
                             device="cpu")
    cache.advance(3)
    with pytest.raises(CacheOverflow):
        cache.positions(2)
