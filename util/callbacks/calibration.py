"""Calibrate the post-processing thresholds at the end of ``fit`` and store them in the checkpoints."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from util.checkpoint import CheckpointError, read_checkpoint
from util.night.thresholds import (
    CHECKPOINT_KEY,
    CalibratedThresholds,
    calibrate_thresholds,
    checkpoint_facts,
    clip_probabilities,
    store_calibration,
)

__all__ = ["Calibration"]


class Calibration(Callback):
    """At the end of a successful ``fit``, choose thresholds on validation; store them.

    The best checkpoint's weights (the monitoring ``ModelCheckpoint``'s
    ``best_model_path``) run over the data module's validation split, as much of it as
    validation reads (``limit_val_batches``), the model in eval and without gradients;
    :func:`util.night.thresholds.calibrate_thresholds` chooses each event
    class's on/off thresholds from those clip probabilities, and the result is written
    into the checkpoint file under ``earsleep_postprocessing``, atomically. Every other
    file a ``ModelCheckpoint`` kept (``last.ckpt``) gets the calibration of its own weights:
    the same when they are the best's, a second pass when they differ. ``main.py predict
    --ckpt_path`` then uses the thresholds (:class:`util.callbacks.NightWriter`).

    The model ends with the weights it had before (the last epoch's). A fit that raised,
    or wrote no checkpoint (``fast_dev_run``), is not calibrated; a checkpoint that cannot
    be read or written is a logged warning, never a failed fit. Only the process of
    ``global_rank`` 0 calibrates and writes; the others wait for it.

    Args:
        enabled: calibrate at all (``--calibration.enabled false`` turns it off; a
            checkpoint can be calibrated later with ``python -m util.night.calibrate``).
        progress: a progress bar over the validation split (only when the trainer shows
            its own).
    """

    def __init__(self, enabled: bool = True, progress: bool = True) -> None:
        self.enabled = enabled
        self.progress = progress
        #: What was stored, by checkpoint file (after ``fit``).
        self.stored: dict[str, CalibratedThresholds] = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stored = {}
        if not self.enabled:
            return
        if trainer.is_global_zero:
            self._calibrate_all(trainer, pl_module)
        trainer.strategy.barrier("calibration")

    # -- the work -------------------------------------------------------------------

    def _calibrate_all(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = getattr(pl_module, "class_names", None)
        if not names:
            rank_zero_warn("calibration: the model has no class_names; nothing calibrated")
            return
        files = _checkpoint_files(trainer)
        if not files:
            rank_zero_info("calibration: fit wrote no checkpoint; nothing to calibrate")
            return
        loader = _validation_batches(trainer)
        if loader is None:
            rank_zero_warn("calibration: no validation data; the checkpoints keep no thresholds")
            return
        if isinstance(loader, list) and not loader:
            rank_zero_info("calibration: validation is off (limit_val_batches 0); none done")
            return
        by_weights: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
        for path in files:
            try:
                checkpoint = read_checkpoint(path)
            except CheckpointError as err:
                rank_zero_warn(f"calibration: {err}; it keeps no thresholds")
                continue
            sha = checkpoint_facts(checkpoint, path)["weights_sha256"]
            by_weights.setdefault(sha, []).append((path, checkpoint))
        final = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        device = trainer.strategy.root_device
        show = self.progress and trainer.progress_bar_callback is not None
        try:
            for group in by_weights.values():
                _, checkpoint = group[0]
                pl_module.load_state_dict(checkpoint["state_dict"])
                probs, labels = clip_probabilities(pl_module, loader, device, show)
                calibration = calibrate_thresholds(probs, labels, names, data=_data(trainer))
                for path, _ in group:
                    store_calibration(path, calibration)
                    self.stored[str(path)] = calibration
        except Exception as err:  # after a finished fit: a warning, never a failed run
            rank_zero_warn(
                f"calibration failed ({type(err).__name__}: {err}); the checkpoints not yet "
                "calibrated keep no thresholds (python -m util.night.calibrate --ckpt_path ...)"
            )
        finally:
            pl_module.load_state_dict(final)
        for path, calibration in self.stored.items():
            rank_zero_info(
                f"calibration: {calibration.source()} -> {CHECKPOINT_KEY} of {Path(path).name}"
            )


def _data(trainer: pl.Trainer) -> dict[str, Any] | None:
    """The validation data's identity: its cache key (features, source, classes, policy)."""
    cache_key = getattr(trainer.datamodule, "cache_key", None)
    return {"cache_key": cache_key("validation")} if callable(cache_key) else None


def _checkpoint_files(trainer: pl.Trainer) -> list[Path]:
    """The best checkpoint first, then every other file a ``ModelCheckpoint`` kept (last.ckpt)."""
    found: list[Path] = []
    callbacks = [trainer.checkpoint_callback, *trainer.checkpoint_callbacks]
    for cb in callbacks:
        if not isinstance(cb, ModelCheckpoint):
            continue
        for name in (cb.best_model_path, cb.last_model_path):
            if name and Path(name).is_file() and Path(name) not in found:
                found.append(Path(name))
    return found


def _validation_batches(trainer: pl.Trainer) -> Any:
    """The validation batches, as many as validation itself reads (``limit_val_batches``).

    The data module's validation loader, else the trainer's; ``None`` when there is none,
    an empty list when ``limit_val_batches`` is 0.
    """
    loader = None
    dm = trainer.datamodule
    if dm is not None and callable(getattr(dm, "val_dataloader", None)):
        try:
            loader = dm.val_dataloader()
        except NotImplementedError:  # LightningDataModule's default: none
            loader = None
    if loader is None:
        loaders = trainer.val_dataloaders
        loader = (loaders[0] if loaders else None) if isinstance(loaders, list | tuple) else loaders
    if loader is None:
        return None
    limit = trainer.limit_val_batches
    if isinstance(limit, float):
        if limit >= 1.0:
            return loader
        try:
            count = len(loader)
        except TypeError:  # a stream of unknown length: all of it
            return loader
        keep = max(1, int(count * limit)) if limit > 0 else 0
    else:
        keep = int(limit)
    return list(itertools.islice(loader, keep))
