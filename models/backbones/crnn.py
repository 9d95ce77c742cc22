"""CRNN: the TinyCNN trunk, averaged over frequency, then a GRU over time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from models.backbones.base import Backbone
from models.backbones.tinycnn import TinyCNN


class CRNN(Backbone):
    """Convolutional-recurrent teacher (73,411 parameters with hidden 64, 2 layers, 1 channel, 3 classes).

    The TinyCNN conv trunk runs without its last pool; its map is averaged over
    frequency and read as a sequence over time by a GRU.

    Args:
        in_channels: input channels (given by the data, not by YAML).
        num_classes: output classes (given by the data, not by YAML).
        rnn_hidden: GRU hidden size.
        rnn_layers: stacked GRU layers.
        pooling: summarise the GRU outputs by the ``last`` step or their ``mean``.
        channels: output channels of the conv blocks.
        batch_norm: add batch norm after each conv.
        rnn_dropout: dropout between GRU layers.
        dropout: dropout before the linear layer.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        rnn_hidden: int = 64,
        rnn_layers: int = 2,
        pooling: Literal["last", "mean"] = "last",
        channels: Sequence[int] = (16, 32, 64),
        batch_norm: bool = False,
        rnn_dropout: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_channels, num_classes)
        if pooling not in ("last", "mean"):
            raise ValueError(f"CRNN pooling must be 'last' or 'mean', got {pooling!r}")
        self.pooling = pooling
        cnn = TinyCNN(in_channels, num_classes, channels, batch_norm)
        self.blocks, self.pool = cnn.blocks, cnn.pool
        self.rnn = nn.GRU(
            list(channels)[-1],
            rnn_hidden,
            num_layers=rnn_layers,
            batch_first=True,
            dropout=rnn_dropout if rnn_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(rnn_hidden, num_classes)

    trunk = TinyCNN.trunk
    after_block = TinyCNN.after_block

    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, maps = self.trunk(x, last_pool=False)
        seq, _ = self.rnn(x.mean(dim=2).transpose(1, 2))  # (B, T', C)
        summary = seq[:, -1] if self.pooling == "last" else seq.mean(dim=1)
        return self.head(self.dropout(summary)), maps
