"""Reading a user's ``.ckpt`` file: weights-only, always, with one-line errors.

A checkpoint is a pickle. Loading it with torch's full unpickler runs whatever code the
file names (an object whose ``__reduce__`` calls ``os.system`` runs that command), so
every path in earsleep that opens a checkpoint goes through :func:`read_checkpoint`,
which loads tensors and plain Python values only and refuses anything else. The
checkpoints earsleep writes need nothing more: LightningCLI records classes as
``class_path`` strings, and the callbacks' states are tensors, numbers and strings.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "force_weights_only", "read_checkpoint"]

#: Names Lightning's ``ckpt_path`` accepts besides a file.
SPECIAL_CKPT_PATHS = ("best", "last", "hpc", "registry")
_GLOBAL = re.compile(r"GLOBAL (\S+)")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or holds more than weights (one-line message)."""


def force_weights_only() -> None:
    """Make every ``torch.load`` in this process weights-only, even one asking otherwise.

    Lightning falls back to the full unpickler for remote checkpoint paths and accepts
    ``--weights_only false``; torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides
    both (and any library's call) for this process and the processes it starts.
    """
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # both set is an error in torch
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"


def read_checkpoint(path: str | os.PathLike[str], what: str = "checkpoint") -> dict[str, Any]:
    """Load a Lightning checkpoint weights-only on the CPU.

    Args:
        path: the ``.ckpt`` file.
        what: how to name the file in messages (e.g. ``--ckpt_path``).

    Returns:
        The checkpoint dict (``state_dict``, ``hyper_parameters``, ...).

    Raises:
        CheckpointError: the file is missing, truncated, not a checkpoint, or holds
            objects other than tensors and plain values (never unpickled).
    """
    path = Path(path)
    if not path.is_file():
        kind = "a folder, not a file" if path.is_dir() else "no such file"
        raise CheckpointError(
            f"{what} {path}: {kind}; pass a .ckpt written by `main.py fit` "
            "(its run folder's checkpoints/best-*.ckpt or last.ckpt)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = _GLOBAL.search(str(err))
        named = f" (it names {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{what} {path} holds objects other than tensors and plain values{named}; "
            "earsleep loads checkpoints weights-only and refuses this file: use one "
            "written by `main.py fit`"
        ) from err
    except Exception as err:  # truncated zip, text file, wrong format: torch raises many kinds
        raise CheckpointError(
            f"{what} {path} is not a readable checkpoint ({_reason(err)}): the file is "
            "truncated or not a .ckpt; pass a .ckpt written by `main.py fit`"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{what} {path} is not a Lightning checkpoint (no state_dict); "
            "pass a .ckpt written by `main.py fit`"
        )
    return checkpoint


def _reason(err: BaseException) -> str:
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    first = first.split(". ", 1)[0].rstrip(".")  # torch's zip errors go on with advice
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
