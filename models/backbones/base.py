"""The contract every backbone fulfils."""

from __future__ import annotations

import abc

import torch
from torch import nn


class Backbone(nn.Module, abc.ABC):
    """Base class of every backbone: log-mel maps in, class logits out.

    Subclasses implement :meth:`forward_with_maps`, which returns the logits and
    the intermediate maps that attention transfer taps, in one pass.

    Args:
        in_channels: input channels of the log-mel tensor (1 mono, 2 stereo).
        num_classes: number of output logits.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 2:
            raise ValueError(
                f"{type(self).__name__} needs in_channels >= 1 and num_classes >= 2, "
                f"got in_channels={in_channels}, num_classes={num_classes}"
            )
        self.in_channels = in_channels
        self.num_classes = num_classes

    @abc.abstractmethod
    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return ``(logits (B, num_classes), maps)`` for ``x`` of shape ``(B, C, F, T)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` for log-mel input ``(B, C, F, T)``."""
        return self.forward_with_maps(x)[0]


class ConvBlock(nn.Module):
    """3×3 convolution, optional batch norm, ReLU.

    The pooling that follows is left to the owner so that a trunk can drop its last pool.
    """

    def __init__(self, in_channels: int, out_channels: int, batch_norm: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batch_norm)
        self.norm = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))
