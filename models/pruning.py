"""Load a channel-pruned state dict into a module built at its unpruned size.

A checkpoint of a structurally pruned model (see :class:`util.callbacks.pruning.ChannelPruning`)
holds the hyper-parameters of the *unpruned* backbone (``channels: [16, 32, 64]``) and
weights of fewer channels (``[8, 16, 32]``). :func:`conform_to_state_dict` rebuilds every
layer whose parameter shapes in the state dict differ from the module's, with the state
dict's sizes and the layer's other options (kernel, stride, padding, groups, bias, affine),
so that ``load_state_dict`` then fits exactly. It needs nothing but PyTorch: loading a
pruned checkpoint (``test``, ``predict``, export, a KD teacher) never imports the pruning
library. :meth:`models.task.Task.on_load_checkpoint` calls it before Lightning loads the
weights.

The checkpoint also records that (and how) it was pruned under :data:`PRUNING_KEY`;
:func:`pruning_record` reads it back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "PRUNING_KEY",
    "PrunedShapeError",
    "conform_to_state_dict",
    "layer_widths",
    "load_conformed",
    "pruning_record",
]

#: Checkpoint key of the pruning record (scenario, sparsity, channels before and after).
PRUNING_KEY = "earsleep_pruning"


class PrunedShapeError(ValueError):
    """A state dict's shape differs in a layer that cannot be rebuilt at the new size."""


def pruning_record(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The pruning record of a checkpoint dictionary, ``None`` when it was never pruned.

    Keys (written by :class:`util.callbacks.pruning.ChannelPruning`): ``scenario``,
    ``schedule``, ``sparsity`` (fraction of channels removed), ``steps``, ``steps_done``,
    ``importance``, ``init_checkpoint``, ``channels_before`` / ``channels_after``
    (``{layer: width}``), ``params_before`` / ``params_after``, ``macs_before`` / ``macs_after``.
    """
    record = checkpoint.get(PRUNING_KEY)
    return dict(record) if isinstance(record, Mapping) else None


def layer_widths(module: nn.Module) -> dict[str, int]:
    """Output width of every convolution and linear layer: ``{qualified name: channels}``."""
    widths = {}
    for name, layer in module.named_modules():
        if isinstance(layer, nn.modules.conv._ConvNd):
            widths[name] = int(layer.out_channels)
        elif isinstance(layer, nn.Linear):
            widths[name] = int(layer.out_features)
    return widths


def _shape(state_dict: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
    value = state_dict.get(key)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _rebuilt_conv(layer: nn.modules.conv._ConvNd, weight: tuple[int, ...]) -> nn.Module:
    if layer.transposed:
        raise PrunedShapeError(f"cannot rebuild transposed convolution {layer} at new size")
    out_channels = weight[0]
    groups = layer.groups
    if groups > 1:  # depthwise/grouped: keep the output channels per group
        per_group = layer.out_channels // layer.groups
        if out_channels % per_group:
            raise PrunedShapeError(
                f"{out_channels} output channels do not split into groups of {per_group}"
            )
        groups = out_channels // per_group
    return type(layer)(
        groups * weight[1],
        out_channels,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=groups,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
    )


def _rebuilt(layer: nn.Module, prefix: str, state_dict: Mapping[str, Any]) -> nn.Module | None:
    """``layer`` rebuilt at the state dict's shapes, or ``None`` when they already agree."""
    own = {name: tuple(t.shape) for name, t in layer.state_dict().items()}
    theirs = {name: _shape(state_dict, prefix + name) for name in own}
    if all(theirs[n] is None or theirs[n] == own[n] for n in own):
        return None
    if isinstance(layer, nn.modules.conv._ConvNd) and theirs.get("weight"):
        new = _rebuilt_conv(layer, theirs["weight"])
    elif isinstance(layer, nn.Linear) and theirs.get("weight"):
        out_features, in_features = theirs["weight"]
        new = nn.Linear(in_features, out_features, bias=layer.bias is not None)
    elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
        size = theirs.get("running_mean") or theirs.get("weight")
        if not size:
            raise PrunedShapeError(f"{prefix or 'the module'}: no size for {type(layer).__name__}")
        new = type(layer)(
            size[0],
            eps=layer.eps,
            momentum=layer.momentum,
            affine=layer.affine,
            track_running_stats=layer.track_running_stats,
        )
    elif isinstance(layer, nn.LayerNorm) and theirs.get("weight"):
        new = nn.LayerNorm(
            theirs["weight"], eps=layer.eps, bias=getattr(layer, "bias", None) is not None
        )
    elif isinstance(layer, nn.PReLU) and theirs.get("weight"):
        new = nn.PReLU(theirs["weight"][0])
    else:
        wrong = next(n for n in own if theirs[n] is not None and theirs[n] != own[n])
        raise PrunedShapeError(
            f"{prefix}{wrong} has shape {list(theirs[wrong])} in the state dict and "
            f"{list(own[wrong])} in the model, and a {type(layer).__name__} cannot be rebuilt "
            "at another size (only convolutions, linear, batch/layer norm and PReLU can)"
        )
    reference = next(iter(layer.parameters()), None)
    if reference is None:
        reference = next(iter(layer.buffers()), None)
    if reference is not None:
        new = new.to(device=reference.device, dtype=reference.dtype)
    new.train(layer.training)
    return new


def conform_to_state_dict(module: nn.Module, state_dict: Mapping[str, Any]) -> list[str]:
    """Rebuild the layers of ``module`` whose shapes in ``state_dict`` differ; load nothing.

    Every convolution (any dimension, grouped and depthwise included), linear layer,
    batch norm, layer norm and PReLU whose parameters or buffers have other shapes in
    ``state_dict`` is replaced, in its parent, by a fresh layer of the state dict's sizes
    and the old layer's other options. Layers whose shapes agree, and keys the module does
    not have, are left alone, so a state dict of the unpruned model changes nothing.
    Afterwards ``module.load_state_dict(state_dict)`` fits (see :func:`load_conformed`).

    Args:
        module: the module as built from its (unpruned) hyper-parameters.
        state_dict: the weights to fit, e.g. ``checkpoint["state_dict"]``.

    Returns:
        The qualified names of the layers rebuilt (empty: nothing differed).

    Raises:
        PrunedShapeError: a shape differs in a layer of another kind (a GRU, say).
    """
    rebuilt = []
    for name, layer in list(module.named_modules()):
        if not name or not (layer._parameters or layer._buffers):
            continue
        new = _rebuilt(layer, f"{name}.", state_dict)
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, new)
        rebuilt.append(name)
    return rebuilt


def load_conformed(
    module: nn.Module, state_dict: Mapping[str, Any], strict: bool = True
) -> list[str]:
    """:func:`conform_to_state_dict`, then ``module.load_state_dict(state_dict, strict)``.

    Returns:
        The qualified names of the layers rebuilt.
    """
    rebuilt = conform_to_state_dict(module, state_dict)
    module.load_state_dict(state_dict, strict=strict)
    return rebuilt
