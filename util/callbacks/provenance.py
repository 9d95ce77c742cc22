"""Where a run came from: its environment, its code and its data, written at setup.

Files in the run's log directory (``trainer.log_dir``), written by :class:`Provenance`:

- ``env.json``: Python, platform, package versions, GPU and CPU, and the environment
  variables that change how a run behaves (:data:`ENV_PREFIXES`, :data:`ENV_NAMES`),
  secrets masked.
- ``git.json``: commit, branch and whether tracked files differ from it; never a remote URL.
- ``data_fingerprint.json``: the data module's ``fingerprint()`` (the cache hashes).

Two short facts of these files identify a result wherever it is shown (leaderboard,
a sweep's ``runs.csv`` and summary): :func:`data_fingerprint_hash` of the fingerprint and
the code version (``git_commit``, ``git_dirty``). :attr:`Provenance.summary` holds them
for :class:`~util.callbacks.leaderboard.Leaderboard`; the sweep reads them from the files.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from data.system import usable_cpus
from util.callbacks.artifacts import run_folder, write_json
from util.cpu import cpu_model
from util.redact import mask_secrets

__all__ = [
    "ENV_NAMES",
    "ENV_PREFIXES",
    "Provenance",
    "code_version",
    "data_fingerprint_hash",
    "environment_info",
    "git_info",
]

#: Environment variables worth recording, by prefix; secrets among them are masked.
ENV_PREFIXES = (
    "CUDA_",
    "NCCL_",
    "OMP_",
    "MKL_",
    "OPENBLAS_",
    "PL_",
    "PYTORCH_",
    "TORCH_",
    "TORCHINDUCTOR_",
    "HF_",
    "HUGGINGFACE_",
    "SLURM_",
    "CUBLAS_",
    "CUDNN_",
)
#: Environment variables worth recording, by exact name.
ENV_NAMES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PYTHONHASHSEED",
)


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_info(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Versions, hardware and selected environment variables (secrets masked).

    Args:
        environ: the environment to read (default ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    selected = {
        name: value
        for name, value in sorted(environ.items())
        if name.startswith(ENV_PREFIXES) or name in ENV_NAMES
    }
    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {
            name: _package_version(name)
            for name in ("torch", "lightning", "torchaudio", "torchmetrics", "numpy", "h5py")
        },
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": {
            "available": cuda,
            "version": torch.version.cuda,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if cuda
            else [],
        },
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable_cpus(),
        "env": mask_secrets(selected),
    }


def git_info(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Commit, branch and dirtiness of the git checkout holding ``path``; no remote URL.

    ``dirty`` means tracked files differ from the commit. Outside a git repository (or
    without git) every field is ``None`` and ``error`` says why.

    Args:
        path: a folder inside the checkout (default: this project's root).
    """
    root = Path(path) if path is not None else Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(root), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return out.stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError) as err:
        reason = getattr(err, "stderr", None) or str(err)
        return {"commit": None, "branch": None, "dirty": None, "error": reason.strip()}


def data_fingerprint_hash(fingerprint: Any) -> str | None:
    """A short name of a data fingerprint: 12 hex digits of the sha256 of its sorted-key JSON.

    Equal content gives an equal name whatever the key order, so the hash of a run's
    ``data_fingerprint.json`` and that of the data module's ``fingerprint()`` now agree
    exactly when the data (cache keys, source fingerprints, rows) is the same.

    Args:
        fingerprint: the fingerprint (a JSON-able mapping); ``None``: not recorded.

    Returns:
        The hash, or ``None`` when ``fingerprint`` is ``None``.
    """
    if fingerprint is None:
        return None
    text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def code_version(git: Mapping[str, Any] | None) -> str | None:
    """``<commit[:12]>`` plus ``+dirty`` when tracked files differed; ``None`` without a commit.

    Args:
        git: what :func:`git_info` returns (or a run's ``git.json``).
    """
    commit = (git or {}).get("commit")
    if not commit:
        return None
    return str(commit)[:12] + ("+dirty" if git.get("dirty") else "")


class Provenance(Callback):
    """Write ``env.json``, ``git.json`` and ``data_fingerprint.json`` at setup.

    In ``trainer.log_dir``, by global rank zero, at the setup of ``fit``, ``validate``
    and ``test`` (each overwrites the last: the files describe the latest stage);
    ``data_fingerprint.json`` only when the data module has ``fingerprint()``. Nothing
    is written under ``fast_dev_run``, without a logger, or for ``predict``.

    Attributes:
        summary: what the files of the latest stage say in short, once they are written
            (global rank zero only; ``None`` before and when nothing was written):
            ``data_fingerprint`` (:func:`data_fingerprint_hash` of
            ``data_fingerprint.json``, ``None`` without one), ``git_commit`` and
            ``git_dirty`` (from ``git.json``). :class:`~util.callbacks.Leaderboard` puts
            them in its row.
    """

    def __init__(self) -> None:
        super().__init__()
        self.summary: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.summary = None
        log_dir = run_folder(trainer, stage)  # every rank asks: a collective under DDP
        if log_dir is None or not trainer.is_global_zero:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        write_json(log_dir / "env.json", environment_info())
        git = git_info()
        write_json(log_dir / "git.json", git)
        datamodule = trainer.datamodule
        fingerprint = None
        if datamodule is not None and hasattr(datamodule, "fingerprint"):
            fingerprint = datamodule.fingerprint()
            write_json(log_dir / "data_fingerprint.json", fingerprint)
            # the hash is of what the file holds (masked, non-finite numbers as null)
            fingerprint = json.loads((log_dir / "data_fingerprint.json").read_text())
        self.summary = {
            "data_fingerprint": data_fingerprint_hash(fingerprint),
            "git_commit": git.get("commit"),
            "git_dirty": git.get("dirty"),
        }
