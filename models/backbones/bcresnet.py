"""BC-ResNet (Kim et al., Interspeech 2021): broadcasted-residual blocks with sub-spectral norm."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from models.backbones.base import Backbone


class SubSpectralNorm(nn.Module):
    """Batch norm with its own statistics and affine per channel and frequency sub-band.

    The frequency axis is cut into ``sub_bands`` equal bands and folded into the
    channels, ``(B, C, F, T) -> (B, C·S, F/S, T)``, normalised by one
    :class:`~torch.nn.BatchNorm2d` over ``C·S`` channels and unfolded again (Chang et
    al., ICASSP 2021). Only reshapes around a plain batch norm, so it exports to
    ONNX with dynamic batch and time axes; at inference it is a per-(channel, band) affine
    map (a ``BatchNormalization`` node of its own: a conv cannot absorb it).

    Args:
        channels: input channels ``C``.
        sub_bands: sub-bands ``S``; the frequency axis must be a multiple of it.
    """

    def __init__(self, channels: int, sub_bands: int) -> None:
        super().__init__()
        if sub_bands < 1:
            raise ValueError(f"SubSpectralNorm needs sub_bands >= 1, got {sub_bands}")
        self.sub_bands = sub_bands
        self.norm = nn.BatchNorm2d(channels * sub_bands)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` of shape ``(B, C, F, T)`` per channel and sub-band."""
        channels, bands = x.shape[1], x.shape[2]
        if bands % self.sub_bands:
            raise ValueError(
                f"SubSpectralNorm: {bands} frequency bins do not split into "
                f"{self.sub_bands} equal sub-bands; choose sub_bands dividing them"
            )
        folded = x.unflatten(2, (self.sub_bands, bands // self.sub_bands)).flatten(1, 2)
        return self.norm(folded).unflatten(1, (channels, self.sub_bands)).flatten(2, 3)


class BCResBlock(nn.Module):
    """One broadcasted-residual block (Kim et al., Interspeech 2021).

    ``f2``: a 3×1 frequency-wise depthwise conv and sub-spectral norm on the 2-D map;
    ``f1``: that map averaged over frequency, a dilated 1×3 time-wise depthwise conv,
    batch norm, SiLU, a 1×1 conv and channel dropout on the 1-D sequence. The output is
    ``ReLU(x + f2(x) + broadcast(f1(avg_F f2(x))))``. A transition block (``in_channels
    != out_channels``) first maps the channels with 1×1 conv, batch norm and ReLU and has
    no identity term.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        dilation: time dilation of the time-wise conv.
        sub_bands: sub-bands of the sub-spectral norm.
        dropout: channel dropout on the time-wise branch.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dilation: int = 1,
        sub_bands: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.transition = in_channels != out_channels
        self.expand = (
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            )
            if self.transition
            else nn.Identity()
        )
        c = out_channels
        self.frequency = nn.Sequential(
            nn.Conv2d(c, c, (3, 1), padding=(1, 0), groups=c, bias=False),
            SubSpectralNorm(c, sub_bands),
        )
        self.temporal = nn.Sequential(
            nn.Conv2d(
                c, c, (1, 3), padding=(0, dilation), dilation=(1, dilation), groups=c, bias=False
            ),
            nn.BatchNorm2d(c),
            nn.SiLU(inplace=True),
            nn.Conv2d(c, c, 1, bias=False),
            nn.Dropout2d(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, F, T)`` -> ``(B, out_channels, F, T)``."""
        identity = x
        x = self.expand(x)
        aux = self.frequency(x)
        out = aux + self.temporal(aux.mean(dim=2, keepdim=True))  # broadcast over frequency
        if not self.transition:
            out = out + identity
        return F.relu(out)


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class BCResNet(Backbone):
    """BC-ResNet-class tiny classifier: a stem, stages of broadcasted-residual blocks, a head.

    A 5×5 conv stem (batch norm, ReLU) at full resolution; stages of :class:`BCResBlock`
    (the first block of a stage is a transition when the width changes) with a 2×2 max
    pool after the stages marked in ``downsample``; a 1×1 conv head (batch norm, ReLU),
    the mean over frequency and time and one linear layer. Sub-spectral norm makes the
    frequency-wise branch learn per-band statistics; the time-wise branch sees the
    whole band's average, so a block's cost is mostly depthwise and 1-D.

    The maps for attention transfer are each resolution's last output: the stages
    before each pool and the last stage. With the defaults that is three maps at
    ``(F, T)``, ``(F/2, T/2)`` and ``(F/4, T/4)`` (floor), the sizes TinyCNN and the CRNN
    teacher give, so a BC-ResNet student aligns with them layer by layer.

    Size with 3 classes at the default width 1.75 (MACs: :func:`util.complexity.count_macs`
    at batch 1), beside TinyCNN's (without batch norm):

    ====================  ================  ============  ================
    input                 BC-ResNet params  MACs          TinyCNN
    ====================  ================  ============  ================
    native 2×64×101       20,611            14.83 M       23,635 / 16.61 M
    reference 1×64×501    19,911            51.22 M       23,491 / 78.35 M
    ====================  ================  ============  ================

    Args:
        in_channels: input channels (given by the data, not by YAML).
        num_classes: output classes (given by the data, not by YAML).
        width: multiplier of every channel count (stem, stages, head), rounded; at
            the default 1.75 (the paper's BC-ResNet-1 widths × 1.75) the model stays
            within TinyCNN's parameters and MACs at the native input.
        stem_channels: stem output channels at width 1.
        stage_channels: output channels of each stage at width 1 (not ``channels``: a
            backbone switched from TinyCNN on the command line would keep TinyCNN's).
        blocks: blocks per stage.
        dilations: time dilation of each stage's blocks.
        downsample: 2×2 max pool after each stage (the last stage's is ignored).
        head_channels: channels of the 1×1 head conv at width 1.
        sub_bands: sub-bands of every sub-spectral norm (must divide the frequency bins
            at every resolution: 4 suits 64 mels pooled twice).
        branch_dropout: channel dropout in the blocks' time-wise branches.
        dropout: dropout before the linear layer (TinyCNN's ``dropout``).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: float = 1.75,
        stem_channels: int = 16,
        stage_channels: Sequence[int] = (8, 12, 16, 20),
        blocks: Sequence[int] = (2, 2, 4, 4),
        dilations: Sequence[int] = (1, 2, 4, 4),
        downsample: Sequence[bool] = (True, True, False, False),
        head_channels: int = 32,
        sub_bands: int = 4,
        branch_dropout: float = 0.1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_channels, num_classes)
        channels = stage_channels
        stages = len(channels)
        if not (width > 0):
            raise ValueError(f"BCResNet width must be > 0, got {width}")
        if stages < 1 or not len(blocks) == len(dilations) == len(downsample) == stages:
            raise ValueError(
                "BCResNet needs one entry per stage in stage_channels, blocks, dilations and "
                f"downsample; got {len(channels)}, {len(blocks)}, {len(dilations)}, "
                f"{len(downsample)}"
            )
        if min(blocks) < 1 or min(dilations) < 1:
            raise ValueError(f"BCResNet needs blocks and dilations >= 1, got {blocks}, {dilations}")
        self.width = width
        stem = _scaled(stem_channels, width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 5, padding=2, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
        )
        self.stages = nn.ModuleList()
        cin = stem
        for c, n, d in zip(channels, blocks, dilations, strict=True):
            cout = _scaled(c, width)
            self.stages.append(
                nn.Sequential(
                    *(
                        BCResBlock(cin if i == 0 else cout, cout, d, sub_bands, branch_dropout)
                        for i in range(n)
                    )
                )
            )
            cin = cout
        self.pools = [bool(p) for p in downsample[:-1]] + [False]
        self.pool = nn.MaxPool2d(2)
        head = _scaled(head_channels, width)
        self.head = nn.Sequential(
            nn.Conv2d(cin, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU(inplace=True)
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head, num_classes)

    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.stem(x)
        maps = []
        for stage, pool in zip(self.stages, self.pools, strict=True):
            x = stage(x)
            if pool:
                maps.append(x)
                x = self.pool(x)
        maps.append(x)
        logits = self.classifier(self.dropout(self.head(x).mean(dim=(2, 3))))
        return logits, maps
