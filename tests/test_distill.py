"""Distilled drafts: built around the main model by reference, trained to agree with it, saved and
reloaded exactly, found by `--assistant auto`, and never changing what speculative decoding outputs.

Distillation itself runs on a tiny random-weight main model (seconds); exactness runs on base with
real dev clips and a draft whose quality does not matter (verification decides every token).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from conftest import read_manifest
from random_models import make_random_model
from specwhisper import audio
from specwhisper.assistants import load_assistant, make_assistant, resolve_auto_assistant
from specwhisper.cli import main as cli_main
from specwhisper.decoding import DecodeStats, DecodingOptions
from specwhisper.distill.data import AugmentOptions, AudioFile, plan_windows, split_files
from specwhisper.distill.shortlist import choose_shortlist
from specwhisper.draft import (LowRankHead, ShortlistHead, build_draft_network, shift_features, spread_layers,
                               with_shortlist)
from specwhisper.draft_files import find_draft, load_draft, new_config, save_draft, wrap
from specwhisper.errors import IncompatibleAssistantError
from specwhisper.prepack import Int8Linear, int8_available
from specwhisper.transcription import decode_window


def first_window_mel_of(model, samples):
    return audio.first_window_mel(samples, model.dims.n_mels)


def distill_main(args: list[str]) -> int:
    return cli_main(["distill", *args])


@pytest.fixture(scope="module")
def tiny_main(tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp("main") / "m", seed=21, n_text_layer=4)


@pytest.fixture()
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECWHISPER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_layers_are_spread_from_first_to_last():
    assert spread_layers(6, 2) == (0, 5)
    assert spread_layers(6, 3) == (0, 2, 5) or spread_layers(6, 3) == (0, 3, 5)
    assert spread_layers(4, 1) == (0,)
    with pytest.raises(ValueError):
        spread_layers(4, 5)


@pytest.mark.parametrize("head", ["full", "shortlist", "lowrank"])
def test_draft_shares_encoder_and_embeddings_and_its_training_forward_equals_the_cached_path(tiny_main, head):
    network = build_draft_network(tiny_main, (0, 3), head, shortlist=list(range(0, 51864, 7)), rank=16)
    main_net = tiny_main.network
    assert network.encoder is main_net.encoder
    assert network.decoder.token_embedding is main_net.decoder.token_embedding
    assert network.decoder.positional_embedding is main_net.decoder.positional_embedding
    assert network.dims.n_text_layer == 2
    assistant = make_assistant(tiny_main, wrap(tiny_main, network, "draft"))
    assert assistant.kind == "shared-encoder"

    torch.manual_seed(0)
    tokens = torch.randint(0, 50000, (2, 9))
    with torch.no_grad():
        audio_kv = network.decoder.audio_kv(torch.randn(2, 1500, 64))
        no_cache = network.decoder(tokens, audio_kv)
        cached = network.decoder(tokens, audio_kv, network.new_cache(2))
        torch.testing.assert_close(no_cache, cached, atol=1e-5, rtol=1e-5)
        logits = network.decoder.logits(cached)
    if head == "shortlist":
        outside = torch.ones(51864, dtype=torch.bool)
        outside[network.decoder.output_projection.ids] = False
        assert torch.isneginf(logits[..., outside]).all() and torch.isfinite(logits[..., ~outside]).all()


def perturb_fusion(network, scale: float = 0.05) -> None:
    """Make a feature draft's fusion really read the feature (it starts out ignoring it)."""
    with torch.no_grad():
        network.decoder.fuse.weight.add_(scale * torch.randn_like(network.decoder.fuse.weight))


def test_feature_draft_reads_the_main_hidden_states_and_its_training_forward_equals_the_cached_path(tiny_main):
    torch.manual_seed(1)
    network = build_draft_network(tiny_main, (0, 3), "full", features=True)
    assert network.decoder.reads_features and not build_draft_network(tiny_main, (0, 3), "full").decoder.reads_features
    tokens = torch.randint(0, 50000, (2, 9))
    main_hidden = torch.randn(2, 9, 64)
    with torch.no_grad():
        audio_kv = network.decoder.audio_kv(torch.randn(2, 1500, 64))
        # Initialised to ignore the feature: the plain draft's output, whatever the feature is.
        plain = network.decoder(tokens, audio_kv, features=torch.zeros(2, 9, 64))
        assert torch.allclose(plain, network.decoder(tokens, audio_kv, features=shift_features(main_hidden)),
                              atol=1e-6)
        perturb_fusion(network)
        no_cache = network.decoder(tokens, audio_kv, features=shift_features(main_hidden))
        assert not torch.allclose(no_cache, plain, atol=1e-3)
        # The cached path in two chunks, as speculative decoding feeds it.
        cache = network.new_cache(2)
        first = network.decoder(tokens[:, :4], audio_kv, cache, features=shift_features(main_hidden)[:, :4])
        second = network.decoder(tokens[:, 4:], audio_kv, cache, features=main_hidden[:, 3:8])
        torch.testing.assert_close(torch.cat([first, second], 1), no_cache, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="features"):
            network.decoder(tokens, audio_kv, network.new_cache(2))


def test_training_never_touches_the_main_model(tiny_main):
    network = build_draft_network(tiny_main, (0, 3), "full")
    before = {k: v.clone() for k, v in tiny_main.network.decoder.token_embedding.state_dict().items()}
    tokens = torch.randint(0, 50000, (1, 6))
    hidden = network.decoder(tokens, network.decoder.audio_kv(torch.randn(1, 1500, 64)))
    (hidden @ network.decoder.token_embedding.weight.detach().T).logsumexp(-1).sum().backward()
    assert tiny_main.network.decoder.token_embedding.weight.grad is None
    assert network.decoder.blocks[0].mlp[0].weight.grad is not None
    assert all(torch.equal(v, tiny_main.network.decoder.token_embedding.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("head", ["full", "shortlist", "lowrank", "full+features"])
def test_a_saved_draft_reloads_bit_identically(tiny_main, tmp_path, head):
    reads_features = head.endswith("+features")
    head = head.removesuffix("+features")
    network = build_draft_network(tiny_main, (1, 2), head, shortlist=[5, 900, 51000, 3], rank=8,
                                  features=reads_features)
    if reads_features:
        perturb_fusion(network)
    with torch.no_grad():  # trained-looking weights, not a copy of the main model's layers
        for p in network.decoder.blocks.parameters():
            p.add_(0.01 * torch.randn_like(p))
        if head != "full":
            for p in network.decoder.output_projection.parameters():
                p.add_(0.01 * torch.randn_like(p))
    folder = save_draft(network, new_config(tiny_main, network, (1, 2), {"note": "test"}), tmp_path / "d")
    loaded = load_draft(tiny_main, folder, prepack=False)
    saved, reloaded = network.own_state_dict(), loaded.network.own_state_dict()
    assert saved.keys() == reloaded.keys()
    assert all(torch.equal(saved[k], reloaded[k]) for k in saved)
    assert loaded.network.encoder is tiny_main.network.encoder
    assert loaded.tokenizer is tiny_main.tokenizer
    head_type = {"full": type(None), "shortlist": ShortlistHead, "lowrank": LowRankHead}[head]
    assert isinstance(loaded.network.decoder.output_projection, head_type)
    tokens, features = torch.randint(0, 50000, (1, 5)), torch.randn(1, 1500, 64)
    main_hidden = torch.randn(1, 5, 64) if reads_features else None
    with torch.no_grad():
        before = network.decoder.logits(
            network.decoder(tokens, network.decoder.audio_kv(features), features=main_hidden))
        after = loaded.network.decoder.logits(
            loaded.network.decoder(tokens, loaded.network.decoder.audio_kv(features), features=main_hidden))
    assert torch.equal(before, after)
    config = json.loads((folder / "draft.json").read_text())
    assert config["init_layers"] == [1, 2] and config["head"] == head and config["training"] == {"note": "test"}
    assert config["features"] is reads_features and loaded.network.decoder.reads_features is reads_features


def test_float16_storage_halves_the_file_and_reloads_the_rounded_weights(tiny_main, tmp_path):
    network = build_draft_network(tiny_main, (0, 3), "full")
    config = new_config(tiny_main, network, (0, 3))
    full = save_draft(network, config, tmp_path / "fp32")
    half = save_draft(network, config, tmp_path / "fp16", dtype="float16")
    assert (half / "draft.safetensors").stat().st_size < 0.6 * (full / "draft.safetensors").stat().st_size
    reloaded = load_draft(tiny_main, half, prepack=False).network.own_state_dict()
    for name, tensor in network.own_state_dict().items():
        assert torch.equal(reloaded[name], tensor.half().float()), name


def test_int8_delta_storage_quarters_the_file_and_reloads_the_same_values_every_time(tiny_main, tmp_path):
    network = build_draft_network(tiny_main, (0, 3), "shortlist", shortlist=list(range(3000)))
    with torch.no_grad():  # training moves weights a few percent from where they started
        for p in network.decoder.blocks.parameters():
            p.mul_(1 + 0.05 * torch.randn_like(p))
    config = new_config(tiny_main, network, (0, 3))
    full = save_draft(network, config, tmp_path / "fp32")
    small = save_draft(network, config, tmp_path / "int8", dtype="int8-delta", main=tiny_main)
    assert (small / "draft.safetensors").stat().st_size < 0.35 * (full / "draft.safetensors").stat().st_size
    first = load_draft(tiny_main, small, prepack=False).network.own_state_dict()
    second = load_draft(tiny_main, small, prepack=False).network.own_state_dict()
    for name, tensor in network.own_state_dict().items():
        assert torch.equal(first[name], second[name])
        if not tensor.is_floating_point():  # the shortlist's token ids
            assert torch.equal(first[name], tensor), name
            continue
        assert (first[name] - tensor).norm() <= 2e-3 * tensor.norm(), name


def test_a_draft_for_another_model_is_refused_in_one_line(tiny_main, tmp_path):
    network = build_draft_network(tiny_main, (0, 3), "full")
    folder = save_draft(network, new_config(tiny_main, network, (0, 3)), tmp_path / "d")
    other = make_random_model(tmp_path / "other", seed=22, n_text_layer=4)  # same dims, other weights
    with pytest.raises(IncompatibleAssistantError, match="fingerprint") as err:
        load_draft(other, folder)
    assert "\n" not in str(err.value)
    wider = make_random_model(tmp_path / "wider", seed=21, n_text_layer=4, n_text_state=96, n_audio_state=96)
    with pytest.raises(IncompatibleAssistantError, match="dims differ"):
        load_assistant(wider, str(folder))
    with pytest.raises(IncompatibleAssistantError, match="not a specwhisper draft"):
        load_draft(tiny_main, tmp_path)


def test_auto_assistant_is_none_without_a_draft_and_finds_one_in_the_cache(tiny_main, empty_cache):
    assert find_draft(tiny_main) is None
    assert resolve_auto_assistant(tiny_main) is None
    network = build_draft_network(tiny_main, (0, 3), "full")
    save_draft(network, new_config(tiny_main, network, (0, 3)), empty_cache / "drafts" / "tiny-2")
    assistant = resolve_auto_assistant(tiny_main)
    assert assistant is not None and assistant.kind == "shared-encoder"
    assert assistant.model.network.encoder is tiny_main.network.encoder


def test_validation_files_never_reach_training_windows():
    files = [AudioFile(f"/a/{i}.wav", "en", 4.0 + i) for i in range(10)] + [AudioFile("/b/x.wav", "de", 5.0)]
    train, val = split_files(files, 0.2, seed=0)
    assert len(val) == 2 and not set(train) & set(val)
    specs = plan_windows(train, AugmentOptions(), seed=0)
    used = {path for spec in specs for path in spec.sources}
    assert used == {f.path for f in train}
    assert any(len(s.sources) > 1 for s in specs)  # concatenations
    assert any(s.speed != 1.0 for s in specs) and any(s.crop for s in specs)
    assert any(s.timestamps for s in specs) and any(not s.timestamps for s in specs)


def test_distillation_lowers_the_kl_and_raises_agreement(tiny_main, empty_cache, tmp_path):
    """The whole CLI on a random-weight main model: the trained draft matches it better than at start."""
    clips = [r["path"] for r in read_manifest("dev")[:8]]
    out = tmp_path / "draft"
    status = distill_main(["--main", str(tiny_main.folder), "--audio", *clips, "--out", str(out), "--layers", "2",
                           "--head", "full", "--epochs", "8", "--lr", "3e-3", "--batch-size", "2",
                           "--speeds", "--crops", "0", "--concat-passes", "0", "--val-fraction", "0.25",
                           "--max-new-tokens", "24", "--patience", "8", "--device", "cpu", "--no-progress"])
    assert status == 0
    training = json.loads((out / "draft.json").read_text())["training"]
    assert training["validation_kl"] < 0.9 * training["initial_validation_kl"]
    assert training["validation_agreement"] > training["initial_validation_agreement"] + 0.05
    assert (out / "checkpoint.pt").is_file()
    draft = load_draft(tiny_main, out)
    assert draft.network.decoder.token_embedding is tiny_main.network.decoder.token_embedding


def test_feature_distillation_lowers_the_kl_raises_agreement_and_resumes(tiny_main, empty_cache, tmp_path):
    clips = [r["path"] for r in read_manifest("dev")[:8]]
    out = tmp_path / "draft"
    args = ["--main", str(tiny_main.folder), "--audio", *clips, "--out", str(out), "--layers", "1", "--features",
            "--head", "shortlist", "--shortlist-size", "4096", "--lr", "3e-3", "--batch-size", "2", "--speeds",
            "--crops", "0", "--concat-passes", "0", "--val-fraction", "0.25", "--max-new-tokens", "24",
            "--patience", "8", "--device", "cpu", "--no-progress"]
    assert distill_main([*args, "--epochs", "6"]) == 0
    saved = json.loads((out / "draft.json").read_text())
    assert saved["features"] is True
    training = saved["training"]
    assert training["validation_kl"] < 0.9 * training["initial_validation_kl"]
    assert training["validation_agreement"] > training["initial_validation_agreement"] + 0.05
    # A resumed run continues from the checkpoint (epoch 7 onward), never from scratch.
    assert distill_main([*args, "--epochs", "7", "--resume"]) == 0
    assert json.loads((out / "draft.json").read_text())["training"]["epochs_run"] == 7


def test_init_continues_from_a_saved_draft_exactly_and_keeps_its_shape(tiny_main, empty_cache, tmp_path):
    """`distill --init A`: training starts from A itself, not from the main model's layers."""
    clips = [r["path"] for r in read_manifest("dev")[:8]]
    common = ["--main", str(tiny_main.folder), "--audio", *clips, "--batch-size", "2", "--speeds", "--crops", "0",
              "--concat-passes", "0", "--val-fraction", "0.25", "--max-new-tokens", "24", "--device", "cpu",
              "--no-progress"]
    first, second = tmp_path / "a", tmp_path / "b"
    assert distill_main([*common, "--out", str(first), "--layers", "1", "--features", "--head", "shortlist",
                         "--shortlist-size", "4096", "--lr", "3e-3", "--epochs", "4", "--patience", "8"]) == 0
    a = json.loads((first / "draft.json").read_text())
    # Other shape options on the command line are overridden by the draft's own.
    assert distill_main([*common, "--out", str(second), "--init", str(first), "--layers", "2", "--head", "full",
                         "--lr", "1e-4", "--epochs", "1"]) == 0
    b = json.loads((second / "draft.json").read_text())
    # Same audio, so the same shortlist and validation split: before its first step the warm-started
    # draft IS draft A, and scores exactly A's best validation agreement (a fresh draft scores far less).
    assert b["training"]["initial_validation_agreement"] == a["training"]["validation_agreement"]
    assert a["training"]["validation_agreement"] > a["training"]["initial_validation_agreement"] + 0.05
    assert b["features"] is True and b["init_layers"] == a["init_layers"] and b["head"] == "shortlist"
    assert b["shortlist"] == a["shortlist"]
    assert b["training"]["init"]["command"] == a["training"]["command"]
    assert load_draft(tiny_main, second).network.decoder.blocks.__len__() == 1


def test_from_layers_picks_the_main_layers_the_blocks_start_from(tiny_main, empty_cache, tmp_path, capsys):
    clip = read_manifest("dev")[0]["path"]
    common = ["--main", str(tiny_main.folder), "--audio", clip, "--speeds", "--crops", "0", "--concat-passes", "0",
              "--val-fraction", "0", "--max-new-tokens", "8", "--epochs", "1", "--device", "cpu", "--no-progress"]
    assert distill_main([*common, "--out", str(tmp_path / "d"), "--from-layers", "3", "--head", "full"]) == 0
    saved = json.loads((tmp_path / "d" / "draft.json").read_text())
    assert saved["init_layers"] == [3]
    assert distill_main([*common, "--out", str(tmp_path / "e"), "--from-layers", "4"]) == 1  # tiny_main has 0..3
    assert "layers 0 to 3" in capsys.readouterr().err.strip().splitlines()[-1]


def test_init_refuses_a_draft_for_another_model_before_any_work(tiny_main, empty_cache, tmp_path, capsys):
    other = make_random_model(tmp_path / "other", seed=22, n_text_layer=4)
    network = build_draft_network(other, (0, 3), "full")
    folder = save_draft(network, new_config(other, network, (0, 3)), tmp_path / "d")
    clip = read_manifest("dev")[0]["path"]
    status = distill_main(["--main", str(tiny_main.folder), "--audio", clip, "--out", str(tmp_path / "out"),
                           "--init", str(folder), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and "fingerprint" in err[-1] and err[-1].startswith("specwhisper: error:")
    assert not (empty_cache / "distill").exists()  # refused before the teacher pass
    assert distill_main(["--main", str(tiny_main.folder), "--audio", clip, "--out", str(tmp_path / "out"),
                         "--init", str(tmp_path), "--device", "cpu", "--no-progress"]) == 1


def test_a_new_shortlist_keeps_the_learned_bias_of_every_token_in_both(tiny_main):
    network = build_draft_network(tiny_main, (0, 3), "shortlist", shortlist=[5, 7, 9, 11, 13])
    with torch.no_grad():
        network.decoder.output_projection.bias.copy_(torch.tensor([1.0, -2.0, -3.0, -4.0, 0.0]))
    head = with_shortlist(network, [9, 100, 5, 200])
    assert network.decoder.output_projection is head and head.ids.tolist() == [9, 100, 5, 200]
    # 9 and 5 keep theirs; 100 and 200 start at the old median (-2), not at a fresh head's 0.
    assert head.bias.tolist() == [-3.0, -2.0, 1.0, -2.0]
    assert torch.equal(head.rows, tiny_main.network.decoder.token_embedding.weight[[9, 100, 5, 200]])


def test_int8_linear_is_close_to_fp32_and_a_draft_runs_with_it(tiny_main):
    if not int8_available():
        pytest.skip("no quantized engine in this PyTorch build")
    torch.manual_seed(0)
    weight, bias, x = 0.05 * torch.randn(300, 64), torch.randn(300), torch.randn(2, 3, 64)
    exact = x @ weight.T + bias
    rounded = Int8Linear(weight, bias)(x)
    assert rounded.shape == exact.shape
    assert (rounded - exact).abs().max() < 0.03 * exact.abs().max()
    network = build_draft_network(tiny_main, (0, 3), "shortlist", shortlist=list(range(0, 51864, 3)))
    tokens, features = torch.randint(0, 50000, (1, 6)), torch.randn(1, 1500, 64)
    with torch.no_grad():
        reference = network.decoder.logits(network.decoder(tokens, network.decoder.audio_kv(features),
                                                           network.new_cache(1)))
        network.prepack(tiny_main.network, int8=True)
        assert network.is_prepacked
        packed = network.decoder.logits(network.decoder(tokens, network.decoder.audio_kv(features),
                                                        network.new_cache(1)))
    finite = torch.isfinite(reference)
    assert torch.equal(finite, torch.isfinite(packed))
    # Activations are rounded too (per call, to 8 bits): close, not equal, through two blocks.
    assert torch.nn.functional.cosine_similarity(packed[finite], reference[finite], dim=0) > 0.99


def test_shortlist_keeps_end_of_text_and_timestamps(tiny_main):
    tokenizer = tiny_main.tokenizer
    shortlist = choose_shortlist(tokenizer, [], 3000)
    assert len(shortlist) == 3000 and len(set(shortlist)) == 3000
    assert tokenizer.eot in shortlist and set(range(tokenizer.timestamp_begin, tokenizer.n_vocab)) <= set(shortlist)


# ---------------------------------------------------------------- exactness on real clips with base


@pytest.fixture(scope="module")
def base_draft(base_model):
    """An untrained shortlist draft: poor proposals, every one of them verified."""
    shortlist = choose_shortlist(base_model.tokenizer, [], 6000)
    network = build_draft_network(base_model, (0, 5), "shortlist", shortlist=shortlist)
    # int8 linears (how drafts run on the CPU): rounded proposals, every one still verified.
    return wrap(base_model, network.prepack(base_model.network, int8=int8_available()), "base+untrained-draft")


@pytest.fixture(scope="module")
def base_feature_draft(base_model):
    """An untrained feature draft whose fusion really mixes in the main model's hidden states."""
    torch.manual_seed(3)
    shortlist = choose_shortlist(base_model.tokenizer, [], 6000)
    network = build_draft_network(base_model, (0, 5), "shortlist", shortlist=shortlist, features=True)
    perturb_fusion(network, 0.02)
    return wrap(base_model, network.prepack(base_model.network), "base+untrained-feature-draft")


@pytest.mark.parametrize("timestamps,features", [(False, False), (True, False), (False, True), (True, True)])
def test_speculative_with_a_draft_equals_greedy_on_real_clips(base_model, base_draft, base_feature_draft,
                                                              timestamps, features):
    rows = [r for r in read_manifest("dev") if r["file"].startswith(("ls_1089-134686-0001", "vctk_p225_008"))]
    mels = torch.stack([first_window_mel_of(base_model, audio.load_audio(r["path"])) for r in rows])
    options = DecodingOptions(language="en", timestamps=timestamps)
    assistant = make_assistant(base_model, base_feature_draft if features else base_draft, draft_length=3)
    assert assistant.reads_features is features
    assert assistant.kind == "shared-encoder"
    greedy = [r.tokens for r in decode_window(base_model, mels, options)]
    stats = DecodeStats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = [r.tokens for r in decode_window(base_model, mels, options, assistant=assistant, stats=stats)]
    assert spec == greedy
    assert stats.drafted > 0


def test_the_shipped_draft_is_found_for_base_equals_greedy_and_pays_in_passes(base_model, empty_cache):
    """The draft in specwhisper/assets/drafts, on recordings it never trained on (../shared/audio/long,
    timestamp mode, as long-form decoding runs it): the main model's tokens exactly, in fewer passes."""
    assistant = resolve_auto_assistant(base_model, draft_length=4)  # constant γ: passes do not depend on load
    assert assistant is not None, "no draft for base in specwhisper/assets/drafts"
    assert assistant.kind == "shared-encoder" and assistant.model.network.encoder is base_model.network.encoder
    total = DecodeStats()
    for row in read_manifest("long"):
        mel = first_window_mel_of(base_model, audio.load_audio(row["path"]))[None]
        options = DecodingOptions(language="en", timestamps=True)
        greedy = [r.tokens for r in decode_window(base_model, mel, options)]
        stats = DecodeStats()
        spec = [r.tokens for r in decode_window(base_model, mel, options, assistant=assistant, stats=stats)]
        assert spec == greedy, row["file"]
        total.add(stats)
    # Measured when it shipped: 2.97 tokens per main pass at γ=4 on these windows (211 tokens in 71
    # passes; acceptance per drafted position 0.75), as for the draft it was continued from. The draft
    # trained without synthetic speech gave ~2.3 (0.63); greedy is 1.
    assert total.tokens_per_main_pass > 2.5, total.as_dict()
