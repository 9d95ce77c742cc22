"""The clips an export is checked and scored on: the run's validation and test splits.

The data module is the run's own: :class:`~data.datamodule.SleepSoundDataModule` built
from the ``data`` section of the run's ``config.yaml`` (LightningCLI writes it next to
``checkpoints/``) by jsonargparse, as ``main.py`` builds it. One rule,
:func:`models.compatibility.check_compatible`, decides whether it fits the checkpoint
(classes, input shape, front end); a config that disagrees is refused in one line. Then
the data module builds (when missing), verifies and opens only the splits the export
reads, as ``main.py validate`` and ``main.py test`` do: validation (calibration, parity,
the int8 guard) and test (scores); the train split is never touched.

``--calib_cache`` / ``--test_cache`` name other cache files instead; the same rule refuses
one of other features, classes or shape than the model's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from lightning.pytorch.cli import LightningArgumentParser
from torch.utils.data import DataLoader, Subset

from data.cache import open_cache
from data.clips import CachedSplit
from data.datamodule import SleepSoundDataModule
from models.compatibility import IncompatibleError, check_compatible
from util.deploy.errors import ExportError, FeatureMismatchError
from util.errors import condense

__all__ = ["ExportData", "Split", "datamodule_from_config", "export_data", "find_run_config"]


class Split:
    """One split's clips for scoring: random samples of its rows, read in batches.

    Args:
        dataset: the split's cache as the data module reads it (every row checked).
    """

    def __init__(self, dataset: CachedSplit) -> None:
        self.dataset = dataset
        #: The cache file.
        self.path = Path(dataset.path).resolve()

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, n: int | None, seed: int = 0) -> np.ndarray:
        """Up to ``n`` row indices (all when ``None``), drawn at random and sorted.

        Random, not the first rows: a cache keeps its source's order, which may be
        grouped by label.
        """
        rows = len(self)
        if n is None or n >= rows:
            return np.arange(rows)
        return np.sort(np.random.default_rng(seed).choice(rows, size=n, replace=False))

    def batches(
        self, batch_size: int, indices: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(features float32, labels int64)`` of ``indices`` (default all), in order."""
        rows = range(len(self)) if indices is None else [int(i) for i in indices]
        for x, y in DataLoader(Subset(self.dataset, rows), batch_size=batch_size):
            yield x.numpy(), y.numpy()


@dataclass
class ExportData:
    """What the model was trained on, and the splits it is checked and scored on.

    Attributes:
        config_path: the run config the data section came from.
        feature_config: the front end's resolved parameters.
        feature_hash: sha256 of ``feature_config`` (as in the caches).
        class_names: class names in label order.
        input_shape: ``(C, F, T)`` of one clip's features.
        validation: calibration, parity and the int8 guard run on these clips.
        test: every file is scored on these.
    """

    config_path: Path
    feature_config: dict[str, Any]
    feature_hash: str
    class_names: list[str]
    input_shape: tuple[int, int, int]
    validation: Split
    test: Split


def find_run_config(ckpt_path: str | Path) -> Path | None:
    """The run's ``config.yaml``: next to the checkpoint or one folder up (LightningCLI's layout)."""
    ckpt_path = Path(ckpt_path)
    for folder in (ckpt_path.parent, ckpt_path.parent.parent):
        candidate = folder / "config.yaml"
        if candidate.is_file():
            return candidate
    return None


def datamodule_from_config(
    config_path: str | Path, progress: bool | None = None
) -> SleepSoundDataModule:
    """The data module of a config's ``data`` section, parsed and built as ``main.py`` does.

    The section may be inline (a run's ``config.yaml``, ``config/demo.yaml``) or the path
    of a data YAML relative to the config (``data: data/dreamcatcher_reference.yaml``).
    Nothing is built or read: only the data module object.

    Args:
        config_path: the run config (or an experiment YAML).
        progress: replaces the section's ``progress`` (bars while a cache is built).

    Raises:
        ExportError: no such file, no data section, or one the data module refuses.
    """
    config_path = Path(config_path)
    if not config_path.is_file():
        raise ExportError(f"no run config at {config_path}; pass the run's config.yaml")
    config = yaml.safe_load(config_path.read_text()) or {}
    section = config.get("data") if isinstance(config, dict) else None
    if isinstance(section, str) and (config_path.parent / section).is_file():
        section = str(config_path.parent / section)  # jsonargparse reads it, relative to cwd
    if not isinstance(section, str | dict):
        raise ExportError(
            f"{config_path} has no data section: pass the config.yaml of the run that "
            "trained the checkpoint (--run_config)"
        )
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(SleepSoundDataModule, "data")
    try:
        parsed = parser.parse_object({"data": section})
        if progress is not None:
            parsed.data.progress = progress
        # ``instantiate`` since jsonargparse 4.49; ``instantiate_classes`` before (deprecated)
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
        return instantiate(parsed).data
    except Exception as err:
        raise ExportError(
            f"{config_path}: cannot build the data module: {condense(str(err))}"
        ) from err


def run_datamodule(
    ckpt_path: str | Path,
    hparams: Mapping[str, Any],
    run_config: str | Path | None = None,
    progress: bool = True,
    option: str = "--run_config",
) -> tuple[SleepSoundDataModule, Path]:
    """The data module of the run that trained ``ckpt_path``, checked against it.

    Built from ``run_config`` (default: :func:`find_run_config`) and refused when the
    checkpoint was trained on other classes, input shape or features. ``option`` is the
    flag that names the config in messages (the calibrate command calls it ``--config``).

    Raises:
        ExportError: no run config, or one the data module refuses.
        IncompatibleError: the run config does not fit the checkpoint.
    """
    config_path = Path(run_config) if run_config else find_run_config(ckpt_path)
    if config_path is None:
        raise ExportError(
            f"cannot tell which features {ckpt_path} was trained on: no config.yaml next to "
            f"it or in its run folder; pass {option} <the run's config.yaml>"
        )
    dm = datamodule_from_config(config_path, progress)
    check_compatible(
        hparams,
        class_names=dm.class_names,
        input_shape=dm.input_shape,
        feature_config=dm.feature_config,
        what=f"--ckpt_path {ckpt_path}",
        fix=f"pass the config of the run that trained it ({option}), not {config_path}",
    )
    return dm, config_path


def export_data(
    ckpt_path: str | Path,
    hparams: Mapping[str, Any],
    run_config: str | Path | None = None,
    calib_cache: str | Path | None = None,
    test_cache: str | Path | None = None,
    progress: bool = True,
) -> ExportData:
    """The run's data for an export: its front end, classes and validation and test splits.

    Args:
        ckpt_path: the checkpoint (its run folder holds the default ``config.yaml``).
        hparams: the checkpoint's hyper-parameters (what the model was trained on).
        run_config: the run config (default: :func:`find_run_config`).
        calib_cache: a validation cache file to use instead of the run's own.
        test_cache: a test cache file to use instead of the run's own.
        progress: show a progress bar while a missing cache is built.

    Raises:
        ExportError: no run config, or one the data module refuses.
        FeatureMismatchError: the run config or a cache file does not fit the checkpoint.
    """
    try:
        dm, config_path = run_datamodule(ckpt_path, hparams, run_config, progress)
    except IncompatibleError as err:
        raise FeatureMismatchError(str(err)) from err
    # explicit files first: a wrong one is refused before any cache is built
    given = {"validation": calib_cache, "test": test_cache}
    roles = {"validation": "calibration/validation", "test": "test"}
    splits = {s: _cache_file(path, dm, roles[s]) for s, path in given.items() if path}
    for split in ("validation", "test"):
        if split not in splits:
            dm.caches.build([split])
            splits[split] = dm.dataset(split)
    return ExportData(
        config_path=config_path,
        feature_config=dm.feature_config,
        feature_hash=dm.features.config_hash(),
        class_names=list(dm.class_names),
        input_shape=tuple(int(d) for d in dm.input_shape),
        validation=Split(splits["validation"]),
        test=Split(splits["test"]),
    )


def _cache_file(path: str | Path, dm: SleepSoundDataModule, role: str) -> CachedSplit:
    """A cache file given by the user, refused unless it holds the run's features and classes."""
    info = open_cache(path)
    ours = dm.features.config_hash()
    trained = {
        "features": dm.feature_config,
        "class_names": list(dm.class_names),
        "input_shape": list(dm.input_shape),
    }
    try:
        check_compatible(
            trained,
            class_names=list(info.classes),
            input_shape=info.feature_shape,
            feature_config=info.feature_config,
            what="the model",
            fix=f"use a cache built with the run's own data config (this one has feature hash "
            f"{info.feature_hash}, the model's is {ours})",
        )
    except IncompatibleError as err:
        raise FeatureMismatchError(f"{role} cache {info.path}: {err}") from err
    return CachedSplit(info.path)
