"""TinyCNN with a CBAM attention block after its second conv block."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from models.backbones.cbam import CBAM
from models.backbones.tinycnn import TinyCNN


class TinyCNNCBAM(TinyCNN):
    """TinyCNN with CBAM after the second block (23,801 parameters at r8/k3, 1 channel, 3 classes).

    Args:
        in_channels: input channels (given by the data, not by YAML).
        num_classes: output classes (given by the data, not by YAML).
        reduction: CBAM channel-MLP reduction ratio.
        kernel_size: CBAM spatial kernel (odd).
        mode: ``cbam``, ``channel`` or ``spatial``.
        channels: output channels of the conv blocks.
        batch_norm: add batch norm after each conv.
        dropout: dropout before the linear layer.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        reduction: int = 8,
        kernel_size: int = 3,
        mode: Literal["cbam", "channel", "spatial"] = "cbam",
        channels: Sequence[int] = (16, 32, 64),
        batch_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_channels, num_classes, channels, batch_norm, dropout)
        if len(self.blocks) < 2:
            raise ValueError("TinyCNNCBAM needs at least two conv blocks")
        self.cbam = CBAM(list(channels)[1], reduction, kernel_size, mode)

    def after_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Attention after the second block."""
        return self.cbam(x) if index == 1 else x
