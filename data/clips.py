"""Cached clips: the HDF5 caches of one source's splits, their datasets and loaders.

:class:`ClipCaches` knows where each split's cache lives (its key), builds the missing
ones, opens and verifies them, and serves :class:`CachedSplit` datasets, DataLoaders,
the train split's class weights and band statistics. The data module
(:class:`data.datamodule.SleepSoundDataModule`) decides which splits a stage needs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from data.cache import (
    CacheCorruptError,
    CacheInfo,
    build_cache,
    cache_key,
    finite_rows,
    key_path,
    open_cache,
    summary_line,
    verify,
)
from data.errors import first_line
from data.features import LogMelFrontEnd
from data.sources.base import SPLITS, Source


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
                f"({first_line(err)}); "
                "delete it and build it again"
            ) from err
        self._file: h5py.File | None = None
        self._rows: h5py.Dataset | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def clip_ids(self) -> list[str]:
        """Each row's clip id (its source's stable name: a path, ``path#t=<start>``…)."""
        with h5py.File(self.path, "r") as f:
            return list(f["clip_ids"].asstr()[()])

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


class ClipCaches:
    """The caches of ``source``'s splits for one front end, class list and skip policy.

    Each split's file lives under ``cache_dir`` in a folder named by its cache key
    (see :mod:`data.cache`), so another feature config, source fingerprint, class list
    or policy never reuses an old file. Every file is verified against its key before
    it is read, and its summary line is shown once.

    Args:
        source: where the clips come from.
        features: the front end (its config is part of every key).
        classes: the labels kept, in label-index order (already checked).
        cache_dir: folder under which the caches are built and found.
        min_duration_s: clips shorter than this are skipped when a cache is built.
        in_memory: load each split's features into RAM once (see :class:`CachedSplit`).
        progress: show a progress bar while building.
    """

    def __init__(
        self,
        source: Source,
        features: LogMelFrontEnd,
        classes: Sequence[str],
        cache_dir: str | os.PathLike[str],
        min_duration_s: float = 0.25,
        in_memory: bool = False,
        progress: bool = True,
    ) -> None:
        self.source = source
        self.features = features
        self.classes = tuple(classes)
        self.cache_dir = Path(cache_dir)
        self.min_duration_s = float(min_duration_s)
        self.in_memory = in_memory
        self.progress = progress
        self._keys: dict[str, str] = {}
        self._info: dict[str, CacheInfo] = {}
        self._datasets: dict[str, CachedSplit] = {}
        self._shown: set[str] = set()

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

    def build(self, splits: Sequence[str]) -> None:
        """Build (or finish, or reuse) the caches of ``splits``.

        Each build looks for leakage into the earlier splits' caches that exist.
        """
        for split in splits:
            path = self.cache_file(split)
            existed = path.exists()
            earlier = [s for s in SPLITS[: SPLITS.index(split)] if self.cache_file(s).exists()]
            build_cache(
                self.source,
                split,
                self.features,
                self.classes,
                path,
                min_duration_s=self.min_duration_s,
                progress=self.progress,
                others={s: self.cache_file(s) for s in earlier},
            )
            if not existed:
                self._shown.add(split)  # build_cache showed its summary

    def info(self, split: str) -> CacheInfo:
        """What ``split``'s cache says about itself, verified against its key."""
        if split not in self._info:
            path = self.cache_file(split)
            if not path.exists():
                raise FileNotFoundError(
                    f"no {split} cache at {path}: call prepare_data() first "
                    "(the Trainer does) to build it"
                )
            info = verify(path, self.cache_key(split))
            self._info[split] = info
            if split not in self._shown:
                self._shown.add(split)
                rank_zero_info(summary_line(info))  # Lightning's console handler shows it
        return self._info[split]

    def dataset(self, split: str) -> CachedSplit:
        """``split``'s cache as a dataset (opened once)."""
        if split not in self._datasets:
            self._datasets[split] = CachedSplit(self.info(split).path, in_memory=self.in_memory)
        return self._datasets[split]

    def loader(
        self, split: str, batch_size: int, shuffle: bool = False, num_workers: int = 0
    ) -> DataLoader:
        """Batches ``(x float32 (B, C, F, T), y int64 (B,))`` of ``split``."""
        return DataLoader(
            self.dataset(split),
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=num_workers > 0,
        )

    def class_weights(self) -> torch.Tensor:
        """Inverse-frequency loss weights (float32) from the train cache's class counts.

        Raises:
            ValueError: a class has no train clips.
        """
        train = self.info("train")
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

    def band_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(band_mean, band_std)`` float32 ``(C, n_mels)`` of the train cache."""
        train = self.info("train")
        if train.band_mean is None or train.band_std is None:
            raise ValueError(f"train cache {train.path} holds no band statistics")
        return (
            torch.from_numpy(train.band_mean.astype(np.float32)),
            torch.from_numpy(train.band_std.astype(np.float32)),
        )

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

    def close(self) -> None:
        """Close this process's HDF5 handles."""
        for ds in self._datasets.values():
            ds.close()
