"""Fused Triton attention kernels for Whisper (imported as `specwhisper.kernels`).

One file per kernel entry point, each holding why it exists, a plain PyTorch
reference annotated with its memory traffic, the kernel and its launcher:

- `decode_attention`: T <= ~16 new decoder queries against the KV cache, per-row
  length from q_start, causal inside the new block; flash-decoding key split with
  an atomic-free combine kernel.
- `cross_attention`: decoder queries against the 1500 encoder K/V, no mask; the
  same split kernel with the mask compiled out.
- `encoder_attention`: flash-attention forward for the 1500 x 1500 encoder.

The model never calls these directly: `specwhisper.attention` dispatches to them
("auto" picks them for CUDA fp16). This package imports nothing itself, so
importing it does not import triton; the submodules do.
"""
