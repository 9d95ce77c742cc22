"""What an exported ONNX file says about its model: the keys of its ``metadata_props``.

:func:`model_metadata` is what the exporter writes into every ``.onnx`` (fp32, and int8,
which copies the fp32 file's metadata): enough to run the file with nothing but
``onnxruntime``, ``numpy`` and :mod:`util.deploy.standalone`, which holds the reader
(:func:`read_metadata`) because it must not import this module's dependencies.

Keys, all strings (JSON where noted), prefixed ``earsleep.``:

- ``backbone``, ``model_class``: the backbone's class name and the module's class path.
- ``metadata_version`` (JSON int): :data:`METADATA_VERSION` of this layout.
- For a :class:`~models.classifier.Classifier`:
  ``class_names`` (JSON list, label order), ``input_shape`` (JSON ``[C, F, T]``),
  ``normalize`` (JSON bool: band standardisation is applied),
  ``standardized_in_graph`` (JSON bool: the graph applies it itself, as
  ``Classifier.forward`` does, so the file takes the front end's raw features),
  ``band_mean`` / ``band_std`` (JSON ``{"dtype": "<f4", "shape": [C, F], "base64": ...}``:
  the buffers of shape ``(C, F, 1)`` without the last axis as little-endian float32
  bytes, so they read back bit for bit; a quarter of the size of decimal lists, which
  mattered for the int8 file of a 24k-parameter model) and, when the model
  records its front end, ``feature_config`` (sorted-key JSON of
  :meth:`data.features.LogMelFrontEnd.config`) and ``feature_hash`` (its sha256, the
  cache's feature key).

The exporter's CLI adds ``checkpoint``; the int8 quantiser adds ``quantization``.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import torch
from torch import nn

from data.hashing import json_sha256
from models.classifier import Classifier
from util.deploy.standalone import METADATA_PREFIX, read_metadata

__all__ = ["METADATA_VERSION", "model_metadata", "read_metadata"]

#: Bump when a key changes meaning; :mod:`util.deploy.standalone` reads version 1.
METADATA_VERSION = 1


def model_metadata(model: nn.Module, standardized_in_graph: bool = True) -> dict[str, str]:
    """The ``earsleep.*`` metadata strings of ``model``, for an exported ONNX file.

    Args:
        model: the module being exported; a :class:`~models.classifier.Classifier` (or
            subclass) gets every key above, any other module only its class names.
        standardized_in_graph: whether the exported graph contains the band
            standardisation (true when the whole Classifier forward is exported).

    Raises:
        ValueError: the band statistics are not finite or not of shape ``(C, F, 1)``.
    """
    backbone = getattr(model, "backbone", model)
    meta: dict[str, Any] = {
        "backbone": type(backbone).__name__,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "metadata_version": json.dumps(METADATA_VERSION),
    }
    if isinstance(model, Classifier):
        channels, bands = int(model.input_shape[0]), int(model.input_shape[1])
        meta["class_names"] = json.dumps(list(model.class_names))
        meta["input_shape"] = json.dumps([int(d) for d in model.input_shape])
        meta["normalize"] = json.dumps(bool(model.normalize))
        meta["standardized_in_graph"] = json.dumps(bool(standardized_in_graph))
        meta["band_mean"] = _band_json("band_mean", model.band_mean, channels, bands)
        meta["band_std"] = _band_json("band_std", model.band_std, channels, bands)
        if model.feature_config:
            meta["feature_config"] = json.dumps(model.feature_config, sort_keys=True)
            meta["feature_hash"] = json_sha256(model.feature_config)
    return {f"{METADATA_PREFIX}{key}": value for key, value in meta.items()}


def _band_json(name: str, buffer: torch.Tensor, channels: int, bands: int) -> str:
    """A ``(C, F, 1)`` float32 buffer as JSON holding its ``(C, F)`` float32 bytes."""
    values = buffer.detach().cpu().to(torch.float32).numpy()
    if values.shape != (channels, bands, 1) or not np.isfinite(values).all():
        raise ValueError(
            f"{name} must be finite with shape {(channels, bands, 1)}, got shape "
            f"{values.shape}; set the model's band statistics before exporting"
        )
    data = np.ascontiguousarray(values[..., 0], dtype="<f4").tobytes()
    return json.dumps(
        {"dtype": "<f4", "shape": [channels, bands], "base64": base64.b64encode(data).decode()}
    )
