"""TinyCNN: three 3×3 conv blocks, global average pooling, one linear layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.backbones.base import Backbone, ConvBlock


class TinyCNN(Backbone):
    """The reference tiny classifier (23,491 parameters for 1 channel and 3 classes).

    Each block is conv 3×3 → (batch norm) → ReLU → 2×2 max pool; the last map is
    averaged over frequency and time and fed to a linear layer.

    Args:
        in_channels: input channels (given by the data, not by YAML).
        num_classes: output classes (given by the data, not by YAML).
        channels: output channels of the conv blocks.
        batch_norm: add batch norm after each conv (off keeps the reference size).
        dropout: dropout before the linear layer.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: Sequence[int] = (16, 32, 64),
        batch_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_channels, num_classes)
        widths = [in_channels, *channels]
        self.blocks = nn.ModuleList(
            ConvBlock(cin, cout, batch_norm) for cin, cout in zip(widths, widths[1:], strict=False)
        )
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(widths[-1], num_classes)

    def trunk(
        self, x: torch.Tensor, last_pool: bool = True
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the conv blocks; return the final map and each block's pre-pool map."""
        maps = []
        for i, block in enumerate(self.blocks):
            x = self.after_block(i, block(x))
            maps.append(x)
            if last_pool or i < len(self.blocks) - 1:
                x = self.pool(x)
        return x, maps

    def after_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """What follows conv block ``index`` before its pooling (nothing here; CBAM's hook)."""
        return x

    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, maps = self.trunk(x)
        logits = self.head(self.dropout(x.mean(dim=(2, 3))))
        return logits, maps
