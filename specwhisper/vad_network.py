"""Silero VAD v6's network in PyTorch (`specwhisper.vad` loads it and turns its output into speech regions)."""

from __future__ import annotations

import torch
from torch import nn

from .vad import CONTEXT


class SileroVad(nn.Module):
    def __init__(self):
        super().__init__()
        self.stft_conv = nn.Conv1d(1, 258, kernel_size=256, stride=128, bias=False)  # real and imaginary parts
        self.conv1 = nn.Conv1d(129, 128, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, kernel_size=3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, kernel_size=3, padding=1)
        self.lstm = nn.LSTM(128, 128, batch_first=True)  # Silero's LSTMCell (same gates), over the whole sequence
        self.final_conv = nn.Conv1d(128, 1, kernel_size=1)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """windows (n, CONTEXT + CHUNK) in time order -> speech probabilities (n,)."""
        x = nn.functional.pad(windows[:, None, :], (0, CONTEXT), mode="reflect")  # (n, 1, 640)
        x = self.stft_conv(x)  # (n, 258, 4)
        x = torch.sqrt(x[:, :129] ** 2 + x[:, 129:] ** 2)  # magnitudes (n, 129, 4)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = torch.relu(conv(x))  # ... -> (n, 128, 1)
        hidden, _ = self.lstm(x.squeeze(-1)[None])  # (1, n, 128)
        x = self.final_conv(torch.relu(hidden[0]).T[None])  # (1, 1, n)
        return torch.sigmoid(x)[0, 0]
