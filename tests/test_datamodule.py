"""The data module over the caches; and the whole chain from a DreamCatcher-layout archive."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from data.cache import open_cache
from data.datamodule import SleepSoundDataModule
from data.features import LogMelFrontEnd
from data.hashing import lines_sha256
from data.sources.base import DREAMCATCHER_LABELS, SPLITS, Clip, SkippedClip, Source

SR = 16000
COUNTS = {"train": 24, "validation": 9, "test": 7}
#: Label of clip i: two quiet for every breathe and snore, plus a non_wearer.
PATTERN = ("quiet", "breathe", "quiet", "snore", "non_wearer", "quiet")


class SplitSource(Source):
    """Short noisy tones per split; the label pattern fixes the class counts."""

    name = "splits"
    labels = ("quiet", "non_wearer", "breathe", "snore")

    def __init__(self, counts: dict[str, int] = COUNTS, pattern: tuple[str, ...] = PATTERN):
        self.counts = counts
        self.pattern = pattern

    def iter_clips(self, split: str) -> Iterator[Clip | SkippedClip]:
        for i in range(self.counts[split]):
            rng = np.random.default_rng([SPLITS.index(split), i])
            wave = (0.1 * rng.standard_normal((2, SR))).astype(np.float32)
            label = self.pattern[i % len(self.pattern)]
            yield Clip(wave, SR, label, f"{split}/{label}/{i:03d}.wav", split)

    def fingerprint(self, split: str) -> dict[str, str]:
        return {"counts": str(self.counts[split]), "pattern": ",".join(self.pattern)}

    def size_hint(self, split: str) -> int | None:
        return self.counts[split]


def expected_counts(split: str) -> dict[str, int]:
    labels = [PATTERN[i % len(PATTERN)] for i in range(COUNTS[split])]
    return {c: labels.count(c) for c in ("quiet", "breathe", "snore")}


@pytest.fixture
def dm(tmp_path: Path) -> SleepSoundDataModule:
    module = SleepSoundDataModule(
        source=SplitSource(), cache_dir=str(tmp_path / "cache"), batch_size=5, progress=False
    )
    module.prepare_data()
    return module


def test_attributes_are_known_before_any_data(tmp_path: Path) -> None:
    dm = SleepSoundDataModule(
        source=SplitSource(),
        features=LogMelFrontEnd("reference"),
        classes=["snore", "quiet"],
        cache_dir=str(tmp_path),
    )
    assert dm.num_classes == 2 and dm.class_names == ["snore", "quiet"]
    assert dm.in_channels == 1 and dm.input_shape == (1, 64, 501)
    assert dm.class_weights is None and dm.feature_stats is None
    assert not any(tmp_path.iterdir())  # nothing built yet
    default = SleepSoundDataModule(source=SplitSource(), cache_dir=str(tmp_path))
    assert default.input_shape == (2, 64, 101) and default.num_classes == 3


def test_unknown_class_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="quiet, non_wearer, breathe, snore"):
        SleepSoundDataModule(source=SplitSource(), classes=["quiet", "cough"], cache_dir=".")


def test_loaders_yield_promised_shapes_and_dtypes(dm: SleepSoundDataModule, caplog) -> None:
    dm = SleepSoundDataModule(source=dm.source, cache_dir=str(dm.cache_dir), batch_size=5)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        dm.setup("fit")
        dm.setup("test")
        dm.setup("predict")
    assert caplog.text.count("cache train:") == 1  # counts are shown once per split
    assert "other labels left out" in caplog.text
    loaders = {
        "train": dm.train_dataloader(),
        "validation": dm.val_dataloader(),
        "test": dm.test_dataloader(),
        "predict": dm.predict_dataloader(),
    }
    for name, loader in loaders.items():
        split = "test" if name == "predict" else name
        rows = sum(expected_counts(split).values())
        labels = []
        for x, y in loader:
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert x.shape[1:] == (2, 64, 101) and x.shape[0] == y.shape[0] <= 5
            labels.append(y)
        got = torch.cat(labels)
        assert len(got) == rows
        counts = torch.bincount(got, minlength=3).tolist()
        assert counts == list(expected_counts(split).values())


def test_train_shuffles_and_others_keep_cache_order(dm: SleepSoundDataModule) -> None:
    dm.setup("fit")
    torch.manual_seed(0)
    first = torch.cat([x[:, 0, 0, 0] for x, _ in dm.train_dataloader()])
    second = torch.cat([x[:, 0, 0, 0] for x, _ in dm.train_dataloader()])
    assert not torch.equal(first, second)
    assert torch.equal(torch.sort(first).values, torch.sort(second).values)
    val_a = torch.cat([y for _, y in dm.val_dataloader()])
    info = open_cache(dm.cache_file("validation"))
    assert info.n_rows == len(val_a)
    import h5py

    with h5py.File(info.path, "r") as f:
        assert torch.equal(val_a, torch.from_numpy(f["labels"][()]))


def test_class_weights_are_inverse_frequency(dm: SleepSoundDataModule) -> None:
    dm.setup("fit")
    counts = np.array(list(expected_counts("train").values()), dtype=np.float64)
    expected = counts.sum() / (len(counts) * counts)
    assert dm.class_weights.dtype == torch.float32
    np.testing.assert_allclose(dm.class_weights.numpy(), expected, rtol=1e-6)
    mean, std = dm.feature_stats
    assert mean.shape == std.shape == (2, 64) and mean.dtype == std.dtype == torch.float32
    np.testing.assert_array_equal(mean.numpy(), open_cache(dm.cache_file("train")).band_mean)


def test_class_weights_override_and_zero_count_error(tmp_path: Path) -> None:
    dm = SleepSoundDataModule(
        source=SplitSource(),
        cache_dir=str(tmp_path),
        class_weights=[1.0, 2.0, 3.0],
        progress=False,
    )
    dm.prepare_data()
    dm.setup("fit")
    assert dm.class_weights.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="3 classes"):
        SleepSoundDataModule(source=SplitSource(), class_weights=[1.0], cache_dir=str(tmp_path))
    no_snore = SplitSource(pattern=("quiet", "breathe"))
    dm = SleepSoundDataModule(source=no_snore, cache_dir=str(tmp_path), progress=False)
    dm.prepare_data()
    with pytest.raises(ValueError, match=r"\['snore'\] have no train clips"):
        dm.setup("fit")


def test_setup_without_prepare_data_says_so(tmp_path: Path) -> None:
    dm = SleepSoundDataModule(source=SplitSource(), cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        dm.setup("fit")


def test_workers_and_in_memory_yield_the_same_rows(dm: SleepSoundDataModule, tmp_path) -> None:
    dm.setup("validate")
    reference = [(x, y) for x, y in dm.val_dataloader()]
    dm.teardown()
    workers = SleepSoundDataModule(
        source=SplitSource(),
        cache_dir=str(tmp_path / "cache"),
        batch_size=5,
        num_workers=2,
        progress=False,
    )
    workers.setup("fit")
    loader = workers.val_dataloader()
    assert loader.persistent_workers and loader.num_workers == 2
    assert loader.pin_memory == torch.cuda.is_available()
    for (xa, ya), (xb, yb) in zip(reference, loader, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    train_labels = torch.cat([y for _, y in workers.train_dataloader()])
    assert torch.bincount(train_labels).tolist() == list(expected_counts("train").values())
    memory = SleepSoundDataModule(
        source=SplitSource(),
        cache_dir=str(tmp_path / "cache"),
        batch_size=5,
        in_memory=True,
        progress=False,
    )
    memory.setup("validate")
    assert memory.dataset("validation").features is not None
    for (xa, ya), (xb, yb) in zip(reference, memory.val_dataloader(), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_fingerprint_names_every_cache(dm: SleepSoundDataModule) -> None:
    dm.setup("fit")
    fp = dm.fingerprint()
    assert set(fp) == set(SPLITS)
    for split, entry in fp.items():
        assert entry["path"] == str(dm.cache_file(split))
        assert entry["cache_key"] == dm.cache_key(split)
        assert entry["feature_hash"] == dm.features.config_hash()
        assert entry["source_fingerprint"] == SplitSource().fingerprint(split)
        assert entry["rows"] == sum(expected_counts(split).values())
        assert len(entry["member_list_hash"]) == 64


def test_another_front_end_builds_another_cache(dm: SleepSoundDataModule, tmp_path) -> None:
    other = SleepSoundDataModule(
        source=SplitSource(),
        features=LogMelFrontEnd("native", n_mels=32),
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    assert other.cache_file("train") != dm.cache_file("train")
    with pytest.raises(FileNotFoundError):
        other.setup("fit")


class _Probe(L.LightningModule):
    """The smallest model that takes the data module's links and batches."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.layer = nn.Linear(in_channels, num_classes)
        self.seen: dict[str, int] = {}

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        assert dm.class_weights is not None and dm.feature_stats is not None

    def _step(self, batch, name: str) -> torch.Tensor:
        x, y = batch
        self.seen[name] = self.seen.get(name, 0) + len(y)
        return nn.functional.cross_entropy(self.layer(x.mean(dim=(2, 3))), y)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trainer_runs_prepare_setup_and_loaders(tmp_path: Path) -> None:
    dm = SleepSoundDataModule(
        source=SplitSource(), cache_dir=str(tmp_path / "cache"), batch_size=8, progress=False
    )
    model = _Probe(dm.in_channels, dm.num_classes)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    assert model.seen == {
        "train": sum(expected_counts("train").values()),
        "val": sum(expected_counts("validation").values()),
        "test": sum(expected_counts("test").values()),
    }


def test_dreamcatcher_archive_to_batches(tmp_path: Path) -> None:
    """Synthetic corpus → DreamCatcher tarballs with bad members → caches → batches, both presets."""
    from data.fixtures import MALFORMED_MEMBERS, write_dreamcatcher_archive
    from data.sources.dreamcatcher import DreamCatcher
    from data.sources.synthetic import Synthetic

    synth = Synthetic(seed=3, clips_per_split={"train": 24, "validation": 8, "test": 8})
    root = write_dreamcatcher_archive(tmp_path / "dc", synth, malformed=True)
    classes = ("quiet", "breathe", "snore")
    # A bad member of a class, or of no DreamCatcher label at all, is a counted skip.
    expected_skips: dict[str, int] = {}
    for m in MALFORMED_MEMBERS.values():
        reason = m.source_reason or m.cache_reason
        if reason and (m.label in classes or m.label not in DREAMCATCHER_LABELS):
            expected_skips[reason] = expected_skips.get(reason, 0) + 1
    kept_bad = {
        c: sum(1 for m in MALFORMED_MEMBERS.values() if m.repair and m.label == c) for c in classes
    }
    repairs = [m.repair for m in MALFORMED_MEMBERS.values() if m.repair]

    for preset, shape in (("native", (2, 64, 101)), ("reference", (1, 64, 501))):
        dm = SleepSoundDataModule(
            source=DreamCatcher(root=str(root)),
            features=LogMelFrontEnd(preset),
            cache_dir=str(tmp_path / "cache"),
            batch_size=16,
            progress=False,
        )
        dm.prepare_data()
        dm.setup("fit")
        dm.setup("test")
        assert dm.input_shape == shape
        for split in SPLITS:
            info = open_cache(dm.cache_file(split))
            labels = [
                synth.describe(split, i)["label"] for i in range(synth.clips_per_split[split])
            ]
            assert info.class_counts == {c: labels.count(c) + kept_bad[c] for c in classes}
            others = {"non_wearer": labels.count("non_wearer")}
            assert info.other_label_counts == {k: v for k, v in others.items() if v}
            assert info.skip_counts == expected_skips
            assert info.n_rows == sum(info.class_counts.values())
            for repair in ("resampled", "mono"):
                want = repairs.count(repair) if repair != "mono" or shape[0] == 2 else 0
                assert info.repair_counts[repair] == want
            # 1 s clips are zero-padded to the reference's 5 s
            assert info.repair_counts["padded"] == (info.n_rows if preset == "reference" else 0)
            assert info.repair_counts["cropped"] == 0
            assert len(set(info.skipped)) == len(info.skipped) == sum(expected_skips.values())
            ids = [item.clip_id for item in dm.source.iter_clips(split)]
            assert info.member_list_hash == lines_sha256(ids)
        x, y = next(iter(dm.train_dataloader()))
        assert x.shape == (16, *shape) and x.dtype == torch.float32 and y.dtype == torch.int64
        x, _ = next(iter(dm.test_dataloader()))
        assert x.shape[1:] == shape
