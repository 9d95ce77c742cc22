"""The LightningDataModule the CLI builds: which splits each stage reads, and from where.

It coordinates; the work is elsewhere: :mod:`data.clips` builds, opens and serves the
cached clips of each split, :mod:`data.recordings` streams windows of long recordings
for ``predict`` with ``predict_audio``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from data.augment import WaveAugment
from data.cache import DEFAULT_CLASSES, check_classes
from data.clips import CachedSplit, ClipCaches
from data.features import LogMelFrontEnd
from data.recordings import recordings_loader
from data.sources.augmented import Augmented
from data.sources.base import SPLITS, Source

#: Splits each Lightning stage reads (``None``: no trainer, every split). The stages
#: after ``fit`` never read train: a trained model's band statistics and class weights
#: are in its checkpoint.
_STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "validation"),
    "validate": ("validation",),
    "test": ("test",),
    "predict": ("test",),
    None: SPLITS,
}


class SleepSoundDataModule(L.LightningDataModule):
    """Cached log-mel spectrograms of a sleep-sound source, split by split; or recordings.

    The CLI's data class: it decides which splits a stage reads and hands the work to
    :class:`data.clips.ClipCaches` (cached clips) or :func:`data.recordings.recordings_loader`
    (``predict`` over ``predict_audio``). ``prepare_data`` builds the HDF5 cache of any
    split the stage needs that lacks one (see :mod:`data.cache`), under a folder keyed
    by the feature config, the source's fingerprint, the classes and the skip policy,
    so a change to any of them builds a new cache and never reuses an old one.
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
        augment: waveform augmentation of the train split
            (:class:`data.augment.WaveAugment`): ``copies`` augmented copies of each
            train clip (gain, coloured noise, a random EQ, a time shift) are cached
            besides it, deterministic from ``seed``; e.g. ``{copies: 1, gain_db: [-12,
            12]}``. Validation and test are left alone and share the caches of the plain
            source. Default: none.
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
        predict_prefetch: read the recordings in a background thread and compute
            their features on threads of their own (``predict_engine.feature_threads``,
            each batch on one), up to two batches ahead of the model, so that features
            and model run at once on all cores (the same windows and probabilities).
            The model then gets one intra-op thread fewer than ``--threads`` gives,
            never less than one. With ``num_workers`` above 0 the workers run ahead
            instead. ``false``: one thread does everything in turn.
    """

    def __init__(
        self,
        source: Source | None = None,
        augment: WaveAugment | None = None,
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
        predict_prefetch: bool = True,
    ) -> None:
        super().__init__()
        if source is None:
            from data.sources.synthetic import Synthetic

            source = Synthetic()
        #: The waveform augmentation of the train split, if any.
        self.augment = augment
        if augment is not None:
            source = Augmented(source, augment)
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
        self.predict_prefetch = bool(predict_prefetch)
        self._class_weights_override = None if class_weights is None else list(class_weights)
        # No save_hyperparameters(): LightningCLI records the config, fingerprint() the data,
        # and keys shared with the model's hparams (class_weights) would clash when merged.
        #: The cached clips of every split.
        self.caches = ClipCaches(
            self.source,
            self.features,
            self.classes,
            self.cache_dir,
            min_duration_s=self.min_duration_s,
            in_memory=in_memory,
            progress=progress,
        )

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

    # -- where the caches are ---------------------------------------------------

    def cache_key(self, split: str) -> str:
        """Key of ``split``'s cache (feature config, source fingerprint, classes, policy)."""
        return self.caches.cache_key(split)

    def cache_file(self, split: str) -> Path:
        """Path of ``split``'s cache file (it may not exist yet)."""
        return self.caches.cache_file(split)

    def dataset(self, split: str) -> CachedSplit:
        """``split``'s verified cache as a dataset."""
        return self.caches.dataset(split)

    # -- Lightning hooks ----------------------------------------------------------

    def _stage(self) -> str | None:
        """The running trainer's stage (``fit``, ``validate``, ``test``, ``predict``), if any."""
        fn = getattr(getattr(getattr(self, "trainer", None), "state", None), "fn", None)
        return None if fn is None else str(getattr(fn, "value", fn))

    def _streams(self, stage: str | None) -> bool:
        """Whether ``stage`` reads recordings (predict with ``predict_audio``), not caches."""
        return stage == "predict" and self.predict_audio is not None

    def prepare_data(self) -> None:
        """Build the caches the running stage needs that are missing (resuming a stopped build).

        ``fit`` (and a call without a trainer) builds every split, test included for the
        ``test`` that follows; ``validate``, ``test`` and ``predict`` build only the split
        they read: the model brings its band statistics and class weights from its
        checkpoint, so they never need the train split (a 250k-clip build on DreamCatcher).
        """
        stage = self._stage()
        if self._streams(stage):
            return  # recordings are streamed: no cache needed
        self.caches.build(SPLITS if stage in (None, "fit") else _STAGE_SPLITS[stage])

    def setup(self, stage: str | None = None) -> None:
        """Open and verify the caches ``stage`` reads; for ``fit``, also train's weights and stats.

        ``validate``, ``test`` and ``predict`` read only their own split: a trained
        model's band statistics and class weights are in its checkpoint.
        """
        if self._streams(stage):
            return  # recordings are streamed; the checkpoint carries the band statistics
        for split in _STAGE_SPLITS.get(stage, SPLITS):
            self.caches.dataset(split)
        if stage not in (None, "fit"):
            return
        if self._class_weights_override is not None:
            self.class_weights = torch.tensor(self._class_weights_override, dtype=torch.float32)
        else:
            self.class_weights = self.caches.class_weights()
        self.feature_stats = self.caches.band_stats()

    def teardown(self, stage: str | None = None) -> None:
        """Close this process's HDF5 handles."""
        self.caches.close()

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
        return recordings_loader(
            self.predict_audio,
            self.features,
            hop_s=self.predict_hop_s,
            batch_size=self.batch_size,
            extra_channels=self.predict_extra_channels,
            num_workers=self.num_workers,
            prefetch=self.predict_prefetch,
        )

    def fingerprint(self) -> dict[str, dict[str, Any]]:
        """Per split with a cache file: path, keys, source fingerprint, member hash, rows."""
        return self.caches.fingerprint()

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return self.caches.loader(split, self.batch_size, shuffle, self.num_workers)
