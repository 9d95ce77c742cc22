"""Where a run writes: its own run folder, claimed atomically, and checks before any step.

TensorBoardLogger picks ``version_<n>`` by listing the folders that exist, and creates
it later: runs started together with the same ``save_dir`` picked the same ``n`` and
wrote into one folder. :func:`claim_run_folder` instead creates the folder itself
with an exclusive ``mkdir`` and moves on to ``n + 1`` when another run got there
first, so every run owns its folder. :func:`prepare_outputs` does that for the
trainer's logger and checks that every place the run will write (run folder,
checkpoint folder, leaderboard, prediction folder) is writable, so a read-only or
impossible path is one error before the data and the training, not a traceback after.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

__all__ = ["OutputError", "allocate_version", "check_writable", "claim_run_folder"]

_VERSION = re.compile(r"version_(\d+)")
#: Environment variables that say which process of a multi-process run this is.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


class OutputError(RuntimeError):
    """An output location cannot be written (one-line message naming it and its option)."""


def is_launching_process() -> bool:
    """True unless the environment marks this process as a non-zero rank of a DDP run.

    Only the process that started the run claims its folder and checks outputs;
    Lightning gives the others rank zero's folder (``trainer.log_dir`` is broadcast).
    """
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "0").strip() or "0"
        if value != "0":
            return False
    return True


def allocate_version(root: str | os.PathLike[str]) -> int:
    """Create ``root/version_<n>`` for the lowest free ``n`` above every existing one.

    The folder is created with an exclusive ``mkdir``: when another process created
    the same name first, the next number is tried, so concurrent callers never share
    a folder.

    Args:
        root: the folder holding the ``version_<n>`` folders (created when missing).

    Returns:
        ``n``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir() if (m := _VERSION.fullmatch(p.name))]
    n = max(taken, default=-1) + 1
    while True:
        try:
            (root / f"version_{n}").mkdir()
            return n
        except FileExistsError:
            n += 1


def check_writable(folder: str | os.PathLike[str], option: str) -> Path:
    """Create ``folder`` if needed and write (then remove) a probe file in it.

    Args:
        folder: the output folder.
        option: the command-line option that sets it, for the message.

    Raises:
        OutputError: the folder cannot be created or written.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".earsleep-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(
            f"{option} {folder} is not writable ({_why(err)}); pass a folder you can write "
            "to or fix its permissions"
        ) from err
    return folder


def check_writable_file(path: str | os.PathLike[str], option: str) -> None:
    """Check that ``path`` can be created or appended to, and its folder written.

    Raises:
        OutputError: it cannot.
    """
    path = Path(path)
    check_writable(path.parent, option)
    for target in (path, path.with_name(path.name + ".lock")):
        if target.exists():
            try:
                with open(target, "a"):
                    pass
            except OSError as err:
                raise OutputError(
                    f"{option} {target} is not writable ({_why(err)}); pass another file or "
                    "fix its permissions"
                ) from err


def claim_run_folder(logger: Any, option: str = "--trainer.logger.init_args.save_dir") -> Path:
    """Give ``logger`` (TensorBoard or CSV) a run folder of its own and return it.

    A logger without a version gets a freshly created ``version_<n>``
    (:func:`allocate_version`); one with a version set (e.g. by a sweep) keeps it.
    Either way the folder is checked to be writable.

    Raises:
        OutputError: the folder cannot be created or written.
    """
    root = getattr(logger, "root_dir", None)
    if getattr(logger, "_version", 0) is None and root and "://" not in str(root):
        root = Path(os.path.expanduser(os.path.expandvars(root)))
        try:
            logger._version = allocate_version(root)
        except OSError as err:
            raise OutputError(
                f"{option} {root} is not writable ({_why(err)}): no run folder can be created "
                "there; pass a folder you can write to or fix its permissions"
            ) from err
    log_dir = getattr(logger, "log_dir", None)
    if not log_dir or "://" in str(log_dir):
        return Path(log_dir) if log_dir else Path()
    return check_writable(log_dir, option)


def prepare_outputs(trainer: pl.Trainer, stage: str, datamodule: Any = None) -> None:
    """Claim the run folder and check every output location, before data or training.

    Does nothing in the non-zero ranks of a multi-process run.

    Args:
        trainer: the run's trainer, before ``fit``/``validate``/``test``/``predict``.
        stage: the subcommand.
        datamodule: the run's data module (its ``predict_audio`` decides whether
            predict writes nights).

    Raises:
        OutputError: a location cannot be written.
    """
    from util.callbacks import Leaderboard, NightWriter  # the callbacks sit beside this module

    if not is_launching_process():
        return
    if trainer.logger is not None and not trainer.fast_dev_run:
        claim_run_folder(trainer.logger)
    for cb in trainer.checkpoint_callbacks:
        dirpath = getattr(cb, "dirpath", None)
        if stage == "fit" and dirpath and "://" not in str(dirpath):
            check_writable(dirpath, "--checkpoint.dirpath")
    for cb in trainer.callbacks:
        if isinstance(cb, Leaderboard) and cb.path and stage != "predict":
            check_writable_file(cb.path, "--leaderboard.path")
        nights = getattr(datamodule, "predict_audio", None) is not None
        if isinstance(cb, NightWriter) and stage == "predict" and nights:
            check_writable(cb.output_dir, "--night.output_dir")


def _why(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__
