"""Make specwhisper/assets/vad/silero_vad_v6_16k.safetensors from Silero VAD v6's 16 kHz ONNX model.

    pip install silero-vad==6.2.3 onnx && python scripts/convert_silero_vad.py

The `silero-vad` package (MIT, Silero Team) ships v6 as ONNX and TorchScript; its safetensors file
holds other weights (they do not reproduce the ONNX model's output). This reads the ONNX file's
initializers with the `onnx` package (a protobuf parser: nothing is unpickled), renames them to
`specwhisper.vad.SileroVad`'s parameters, checks the network gives the ONNX model's probabilities on
a test signal (when onnxruntime is importable), and writes safetensors.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from safetensors.torch import save_file

from specwhisper.vad import SileroVad, speech_probabilities

OUT = Path(__file__).resolve().parents[1] / "specwhisper" / "assets" / "vad" / "silero_vad_v6_16k.safetensors"
NAMES = {"model.stft.forward_basis_buffer": "stft_conv.weight",
         "model.decoder.decoder.2.weight": "final_conv.weight", "model.decoder.decoder.2.bias": "final_conv.bias",
         **{f"model.encoder.{i}.reparam_conv.{w}": f"conv{i + 1}.{w}" for i in range(4) for w in ("weight", "bias")},
         **{f"model.decoder.rnn.{w}": f"lstm.{w}_l0" for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}}


def main() -> None:
    package = Path(list(importlib.util.find_spec("silero_vad").submodule_search_locations)[0])
    onnx_file = package / "data" / "silero_vad_16k_op15.onnx"
    tensors = {NAMES[i.name]: torch.from_numpy(numpy_helper.to_array(i).copy())
               for i in onnx.load(str(onnx_file)).graph.initializer}
    model = SileroVad()
    model.load_state_dict(tensors)  # strict: every parameter named, nothing left over
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        signal = np.random.default_rng(0).standard_normal(512 * 90).astype(np.float32) * 0.1
        ours = speech_probabilities(model.eval(), signal)
        session = onnxruntime.InferenceSession(str(onnx_file))
        state, context, theirs = np.zeros((2, 1, 128), np.float32), np.zeros(64, np.float32), []
        for chunk in signal.reshape(-1, 512):
            out, state = session.run(None, {"input": np.concatenate([context, chunk])[None], "state": state,
                                            "sr": np.array(16000, np.int64)})
            theirs.append(float(out.reshape(-1)[0]))
            context = chunk[-64:]
        print(f"largest difference from the ONNX model: {np.abs(ours - np.array(theirs)).max():.2e}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT),
              metadata={"source": "silero-vad 6.2.3, data/silero_vad_16k_op15.onnx", "license": "MIT, Silero Team"})
    print(OUT)


if __name__ == "__main__":
    main()
