"""CBAM: channel then spatial attention (Woo et al., 2018)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class ChannelAttention(nn.Module):
    """Shared MLP over average- and max-pooled channel descriptors, then a sigmoid gate."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3)))
        return x * torch.sigmoid(gate)[:, :, None, None]


class SpatialAttention(nn.Module):
    """A k×k convolution over channel-mean and channel-max maps, then a sigmoid gate."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"CBAM spatial kernel must be a positive odd number, got {kernel_size}"
            )
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        desc = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(desc))


class CBAM(nn.Module):
    """Convolutional block attention module.

    Args:
        channels: channels of the map it attends over.
        reduction: channel-MLP reduction ratio (hidden = channels // reduction).
        kernel_size: odd spatial-attention kernel.
        mode: ``cbam`` (channel then spatial), ``channel`` or ``spatial`` only.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 8,
        kernel_size: int = 3,
        mode: Literal["cbam", "channel", "spatial"] = "cbam",
    ) -> None:
        super().__init__()
        if mode not in ("cbam", "channel", "spatial"):
            raise ValueError(f"CBAM mode must be cbam, channel or spatial, got {mode!r}")
        if reduction < 1:
            raise ValueError(f"CBAM reduction must be >= 1, got {reduction}")
        self.channel = ChannelAttention(channels, reduction) if mode != "spatial" else nn.Identity()
        self.spatial = SpatialAttention(kernel_size) if mode != "channel" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))
