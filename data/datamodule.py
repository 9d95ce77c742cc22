"""The LightningDataModule over the HDF5 spectrogram caches."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import h5py
import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from data.cache import (
    DEFAULT_CLASSES,
    CacheCorruptError,
    CacheInfo,
    build_cache,
    cache_key,
    check_classes,
    finite_rows,
    key_path,
    open_cache,
    summary_line,
    verify,
)
from data.features import LogMelFrontEnd
from data.recording import RecordingWindows
from data.sources.base import SPLITS, Source

log = logging.getLogger(__name__)

#: Splits each Lightning stage reads.
_STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "validation"),
    "validate": ("validation",),
    "test": ("test",),
    "predict": ("test",),
    None: SPLITS,
}


class CachedSplit(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """One cache file as ``(features float32 (C, F, T), label int64)`` items.

    The HDF5 file is opened lazily by whichever process reads first (and again
    after a fork), so DataLoader workers never share an h5py handle. With
    ``in_memory`` the float16 features are read into RAM once, here; forked
    workers then share those pages.

    Every row read is checked: HDF5 verifies its chunk's checksum, and a row that
    fails it or holds NaN or inf raises :class:`~data.cache.CacheCorruptError`
    naming the row and its clip, so a damaged cache never trains a model.

    Args:
        path: a complete cache file.
        in_memory: load every row into RAM now instead of reading rows on demand.
    """

    def __init__(self, path: str | os.PathLike[str], in_memory: bool = False) -> None:
        self.path = Path(path)
        try:
            with h5py.File(self.path, "r") as f:
                self.labels = torch.from_numpy(f["labels"][()].astype(np.int64))
                self.feature_shape = tuple(f["features"].shape[1:])
                self.features: np.ndarray | None = f["features"][()] if in_memory else None
        except FileNotFoundError:
            raise
        except (OSError, KeyError) as err:
            raise CacheCorruptError(
                f"cache {self.path} is damaged: reading it fails "
                f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                "delete it and build it again"
            ) from err
        self._file: h5py.File | None = None
        self._rows: h5py.Dataset | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.features if self.features is not None else self._open()
        try:
            row = rows[index]
        except OSError as err:  # h5py: the chunk's Fletcher-32 checksum does not match
            raise self._damaged(index, f"fails its checksum ({err})") from err
        if not finite_rows(row[None])[0]:
            raise self._damaged(index, "holds NaN or inf")
        return torch.from_numpy(np.asarray(row, dtype=np.float32)), self.labels[index]

    def _damaged(self, index: int, what: str) -> CacheCorruptError:
        return CacheCorruptError(
            f"cache {self.path} is damaged: row {index} {what.splitlines()[0]}; "
            "delete it and build it again"
        )

    def _open(self) -> h5py.Dataset:
        if self._rows is None or self._pid != os.getpid():
            # A handle inherited through fork belongs to the parent: leave it alone.
            self._file = h5py.File(self.path, "r")
            self._rows = self._file["features"]
            self._pid = os.getpid()
        return self._rows

    def close(self) -> None:
        """Close this process's handle (if any)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._rows = self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_file=None, _rows=None, _pid=None)
        return state


class SleepSoundDataModule(L.LightningDataModule):
    """Cached log-mel spectrograms of a sleep-sound source, split by split.

    ``prepare_data`` builds the HDF5 cache of any split that lacks one (train,
    validation, test; see :mod:`data.cache`), under a folder keyed by the feature
    config, the source's fingerprint, the classes and the skip policy, so a
    change to any of them builds a new cache and never reuses an old one.
    ``setup`` opens the caches and checks their keys. Batches are
    ``(x float32 (B, C, n_mels, T), y int64 (B,))`` of the front end's raw output:
    the model normalises with :attr:`feature_stats`.

    Available right after construction (the CLI links them into the model):
    ``num_classes``, ``class_names``, ``in_channels``, ``input_shape``. After
    ``setup``: ``class_weights`` and ``feature_stats``.

    Args:
        source: where the clips come from (``class_path``/``init_args`` in YAML),
            e.g. ``data.sources.dreamcatcher.DreamCatcher``. Default: the synthetic
            corpus ``data.sources.synthetic.Synthetic()``.
        features: the log-mel front end; default ``LogMelFrontEnd()`` (the
            ``native`` preset: both channels, 1 s, 2×64×101).
        classes: the labels to classify, in label-index order: any distinct subset
            of the source's labels. Clips of other labels are counted and left out.
        cache_dir: folder under which the caches are built and found.
        batch_size: clips per batch for every split.
        num_workers: DataLoader worker processes (0 reads in the main process).
        in_memory: load each split's features into RAM once instead of reading
            rows from disk (train on DreamCatcher: about 6.5 GB at float16).
        min_duration_s: clips shorter than this are skipped when the cache is built.
        class_weights: one loss weight per class, overriding the inverse-frequency
            weights computed from the train counts.
        progress: show a progress bar while building caches.
        predict_audio: long recordings to analyse with ``predict`` instead of the
            cached test split: a WAV/FLAC file, a folder (searched recursively) or a
            glob. They are streamed in blocks, never loaded whole, and need no cache.
        predict_hop_s: seconds between the starts of consecutive analysis windows
            (each window is the front end's clip length).
        predict_extra_channels: recordings with more than two channels: ``error``
            refuses them, ``first_two`` uses channels 0 and 1 (in-ear, outer).
    """

    def __init__(
        self,
        source: Source | None = None,
        features: LogMelFrontEnd | None = None,
        classes: Sequence[str] = DEFAULT_CLASSES,
        cache_dir: str = "cache",
        batch_size: int = 64,
        num_workers: int = 0,
        in_memory: bool = False,
        min_duration_s: float = 0.25,
        class_weights: Sequence[float] | None = None,
        progress: bool = True,
        predict_audio: str | None = None,
        predict_hop_s: float = 0.5,
        predict_extra_channels: Literal["error", "first_two"] = "error",
    ) -> None:
        super().__init__()
        if source is None:
            from data.sources.synthetic import Synthetic

            source = Synthetic()
        self.source = source
        self.features = features if features is not None else LogMelFrontEnd()
        self.classes = check_classes(source, classes)
        if batch_size < 1 or num_workers < 0:
            raise ValueError("need batch_size >= 1 and num_workers >= 0")
        if class_weights is not None and len(class_weights) != len(self.classes):
            raise ValueError(
                f"class_weights has {len(class_weights)} values for {len(self.classes)} "
                f"classes {list(self.classes)}"
            )
        self.cache_dir = Path(cache_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.in_memory = in_memory
        self.min_duration_s = float(min_duration_s)
        self.progress = progress
        self.predict_audio = predict_audio
        self.predict_hop_s = predict_hop_s
        self.predict_extra_channels = predict_extra_channels
        self._class_weights_override = None if class_weights is None else list(class_weights)
        # No save_hyperparameters(): LightningCLI records the config, fingerprint() the data,
        # and keys shared with the model's hparams (class_weights) would clash when merged.

        self.class_names: list[str] = list(self.classes)
        self.num_classes: int = len(self.classes)
        self.in_channels: int = self.features.out_channels
        self.input_shape: tuple[int, int, int] = self.features.output_shape
        #: The front end's configuration (linked into the model, saved in its checkpoint).
        self.feature_config: dict[str, Any] = self.features.config()
        #: Loss weight per class (float32), set by :meth:`setup`.
        self.class_weights: torch.Tensor | None = None
        #: ``(band_mean, band_std)`` float32 ``(C, n_mels)`` of the train cache, set by :meth:`setup`.
        self.feature_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self._keys: dict[str, str] = {}
        self._info: dict[str, CacheInfo] = {}
        self._datasets: dict[str, CachedSplit] = {}
        self._logged: set[str] = set()

    # -- where the caches are ---------------------------------------------------

    def cache_key(self, split: str) -> str:
        """Key of ``split``'s cache (feature config, source fingerprint, classes, policy)."""
        if split not in self._keys:
            self._keys[split] = cache_key(
                self.source, split, self.features, self.classes, self.min_duration_s
            )
        return self._keys[split]

    def cache_file(self, split: str) -> Path:
        """Path of ``split``'s cache file (it may not exist yet)."""
        return key_path(self.cache_dir, self.source.name, split, self.cache_key(split))

    # -- Lightning hooks ----------------------------------------------------------

    def _stage(self) -> str | None:
        """The running trainer's stage (``fit``, ``validate``, ``test``, ``predict``), if any."""
        fn = getattr(getattr(getattr(self, "trainer", None), "state", None), "fn", None)
        return None if fn is None else str(getattr(fn, "value", fn))

    def prepare_data(self) -> None:
        """Build the caches the running stage needs that are missing (resuming a stopped build).

        ``fit`` (and a call without a trainer) builds every split, test included for the
        ``test`` that follows; ``validate``, ``test`` and ``predict`` build only the split
        they read: the model brings its band statistics and class weights from its
        checkpoint, so they never need the train split (a 250k-clip build on DreamCatcher).
        """
        stage = self._stage()
        if stage == "predict" and self.predict_audio is not None:
            return  # recordings are streamed: no cache needed
        splits = SPLITS if stage in (None, "fit") else _STAGE_SPLITS[stage]
        for split in splits:
            path = self.cache_file(split)
            existed = path.exists()
            earlier = SPLITS[: SPLITS.index(split)]
            build_cache(
                self.source,
                split,
                self.features,
                self.classes,
                path,
                min_duration_s=self.min_duration_s,
                progress=self.progress,
                # leakage into earlier splits (those built)
                others={s: self.cache_file(s) for s in earlier if self.cache_file(s).exists()},
            )
            if not existed:
                self._logged.add(split)  # build_cache showed its summary

    def setup(self, stage: str | None = None) -> None:
        """Open and verify the caches ``stage`` reads; for ``fit``, also train's weights and stats.

        ``validate``, ``test`` and ``predict`` read only their own split: a trained
        model's band statistics and class weights are in its checkpoint.
        """
        if stage == "predict" and self.predict_audio is not None:
            return  # recordings are streamed; the checkpoint carries the band statistics
        for split in _STAGE_SPLITS.get(stage, SPLITS):
            self._dataset(split)
        if stage not in (None, "fit"):
            return
        train = self._load_info("train")
        self.class_weights = self._compute_class_weights(train)
        if train.band_mean is None or train.band_std is None:
            raise ValueError(f"train cache {train.path} holds no band statistics")
        self.feature_stats = (
            torch.from_numpy(train.band_mean.astype(np.float32)),
            torch.from_numpy(train.band_std.astype(np.float32)),
        )

    def teardown(self, stage: str | None = None) -> None:
        """Close this process's HDF5 handles."""
        for ds in self._datasets.values():
            ds.close()

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of the train split."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Batches of the validation split, in cache order."""
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Batches of the test split, in cache order."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Windows of ``predict_audio`` recordings, or else batches of the test split."""
        if self.predict_audio is None:
            return self._loader("test", shuffle=False)
        windows = RecordingWindows(
            self.predict_audio,
            self.features,
            hop_s=self.predict_hop_s,
            batch_size=self.batch_size,
            extra_channels=self.predict_extra_channels,
        )
        return DataLoader(windows, batch_size=None, num_workers=self.num_workers)

    # -- provenance -----------------------------------------------------------------

    def fingerprint(self) -> dict[str, dict[str, Any]]:
        """Per split with a cache file: path, keys, source fingerprint, member hash, rows."""
        out: dict[str, dict[str, Any]] = {}
        for split in SPLITS:
            path = self.cache_file(split)
            if split not in self._info and not path.exists():
                continue
            info = self._info.get(split) or open_cache(path)
            out[split] = {
                "path": str(info.path),
                "cache_key": info.cache_key,
                "feature_hash": info.feature_hash,
                "source_name": info.source_name,
                "source_fingerprint": info.source_fingerprint,
                "member_list_hash": info.member_list_hash,
                "rows": info.n_rows,
                "leakage_rows": {s: int(v.get("rows", 0)) for s, v in info.leakage.items()},
            }
        return out

    # -- internals ------------------------------------------------------------------

    def _load_info(self, split: str) -> CacheInfo:
        if split not in self._info:
            path = self.cache_file(split)
            if not path.exists():
                raise FileNotFoundError(
                    f"no {split} cache at {path}: call prepare_data() first "
                    "(the Trainer does) to build it"
                )
            info = verify(path, self.cache_key(split))
            self._info[split] = info
            self._log_counts(info)
        return self._info[split]

    def _dataset(self, split: str) -> CachedSplit:
        if split not in self._datasets:
            info = self._load_info(split)
            self._datasets[split] = CachedSplit(info.path, in_memory=self.in_memory)
        return self._datasets[split]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self._dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def _compute_class_weights(self, train: CacheInfo) -> torch.Tensor:
        if self._class_weights_override is not None:
            return torch.tensor(self._class_weights_override, dtype=torch.float32)
        counts = [int(train.class_counts.get(c, 0)) for c in self.classes]
        empty = [c for c, n in zip(self.classes, counts, strict=True) if n == 0]
        if empty:
            raise ValueError(
                f"class(es) {empty} have no train clips in {train.path} "
                f"(counts {dict(zip(self.classes, counts, strict=True))}); "
                "drop them from classes or give class_weights explicitly"
            )
        total, k = sum(counts), len(counts)
        return torch.tensor([total / (k * n) for n in counts], dtype=torch.float32)

    def _log_counts(self, info: CacheInfo) -> None:
        if info.split in self._logged:
            return
        self._logged.add(info.split)
        rank_zero_info(summary_line(info))  # Lightning's console handler shows it
