"""Counting the places where the host reads a tensor's values: on a GPU, each is a sync.

A sync stalls the host until the device has finished everything queued, so the next launches wait
for it: the GPU path (specwhisper.fixed_shape) allows one per greedy step or speculative round.
`count_host_reads` wraps the Tensor methods that read values into Python (`item`, `tolist`, `bool`,
`int`, `float`, `numpy`, `cpu`) for the length of a block and counts the calls on tensors of one
device, so the count is testable on the CPU, where no sync exists. On the CPU every tensor is a
"device" tensor, so a count there is an upper bound of what a GPU would sync.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import torch

READING_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")


@contextmanager
def count_host_reads(device: torch.device | str) -> Iterator[Counter]:
    """Inside the block, a Counter {method name: calls} of value reads from tensors on `device`."""
    device_type = torch.device(device).type
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READING_METHODS}

    def counting(name, original):
        def read(tensor, *args, **kwargs):
            if tensor.device.type == device_type:
                counts[name] += 1
            return original(tensor, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
