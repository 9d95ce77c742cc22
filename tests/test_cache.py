"""The HDF5 cache: contents, attributes, skip/repair policy, keys, atomic and resumable builds."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from data.cache import (
    DEFAULT_CLASSES,
    FORMAT_VERSION,
    PARTIAL_SUFFIX,
    CacheMismatchError,
    build_cache,
    cache_key,
    check_classes,
    key_path,
    open_cache,
    verify,
)
from data.features import LogMelFrontEnd
from data.sources.base import Clip, SkippedClip, Source

SR = 16000


def default_path(
    cache_dir: Path,
    source: Source,
    split: str,
    front_end: LogMelFrontEnd,
    classes: tuple[str, ...] = DEFAULT_CLASSES,
) -> Path:
    """Where ``build_cache(..., cache_dir=cache_dir)`` puts a split: the key's folder."""
    key = cache_key(source, split, front_end, check_classes(source, classes))
    return key_path(cache_dir, source.name, split, key)


def tone(seed: int, seconds: float = 1.0, channels: int = 2, sr: int = SR) -> np.ndarray:
    """A noisy tone whose pitch and level depend on ``seed`` (so rows differ)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.3 * np.sin(2 * np.pi * (200 + 37 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    return np.stack([wave * (0.5 + 0.5 * c) for c in range(channels)]).astype(np.float32)


class FakeSource(Source):
    """A source over a fixed list of items; can fail after ``fail_after`` items."""

    name = "fake"
    labels = ("quiet", "non_wearer", "breathe", "snore", "cough")

    def __init__(
        self,
        items: list[Clip | SkippedClip],
        tag: str = "v1",
        fail_after: int | None = None,
        error: type[BaseException] = RuntimeError,
    ) -> None:
        self.items = items
        self.tag = tag
        self.fail_after = fail_after
        self.error = error
        self.yielded = 0

    def iter_clips(self, split: str) -> Iterator[Clip | SkippedClip]:
        for i, item in enumerate(self.items):
            if self.fail_after is not None and i == self.fail_after:
                raise self.error(f"simulated interruption after {i} items")
            self.yielded += 1
            yield item

    def fingerprint(self, split: str) -> dict[str, str]:
        return {"source": "fake", "tag": self.tag, "split": split}

    def size_hint(self, split: str) -> int | None:
        return len(self.items)


def clip(i: int, label: str, wave: np.ndarray | None = None, sr: int = SR) -> Clip:
    wave = tone(i) if wave is None else wave
    return Clip(wave, sr, label, f"train/{label}/clip{i:03d}.wav", "train")


def regular_items(n: int, labels: tuple[str, ...] = ("quiet", "breathe", "snore")) -> list[Clip]:
    return [clip(i, labels[i % len(labels)]) for i in range(n)]


def read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {
            "features": f["features"][()],
            "labels": f["labels"][()],
            "clip_ids": f["clip_ids"].asstr()[()],
            "skipped": f["skipped"].asstr()[()],
        }


@pytest.fixture
def native() -> LogMelFrontEnd:
    return LogMelFrontEnd("native")


def test_rows_attrs_and_class_subset_order(tmp_path: Path, native: LogMelFrontEnd) -> None:
    items = [clip(i, lab) for i, lab in enumerate(["quiet", "snore", "cough", "breathe"] * 3)]
    src = FakeSource(items)
    path = build_cache(src, "train", native, ["snore", "quiet"], tmp_path / "c.h5", progress=False)
    data = read(path)
    kept = [c for c in items if c.label in ("snore", "quiet")]
    assert list(data["clip_ids"]) == [c.clip_id for c in kept]
    assert list(data["labels"]) == [0 if c.label == "snore" else 1 for c in kept]
    assert data["features"].dtype == np.float16
    assert data["features"].shape == (len(kept), 2, 64, 101)
    assert data["labels"].dtype == np.int64

    info = open_cache(path)
    assert info.classes == ("snore", "quiet")
    assert list(info.class_counts.items()) == [("snore", 3), ("quiet", 3)]
    assert info.other_label_counts == {"breathe": 3, "cough": 3}
    assert info.skip_counts == {} and info.skipped == []
    assert info.repair_counts == {"resampled": 0, "mono": 0, "padded": 0, "cropped": 0}
    assert info.feature_config == native.config()
    assert info.feature_hash == native.config_hash()
    assert info.source_name == "fake"
    assert info.source_fingerprint == src.fingerprint("train")
    assert info.cache_key == cache_key(src, "train", native, ["snore", "quiet"])
    assert info.min_duration_s == 0.25 and info.format_version == FORMAT_VERSION
    ids = "".join(f"{c.clip_id}\n" for c in items).encode()
    assert info.member_list_hash == hashlib.sha256(ids).hexdigest()
    with h5py.File(path, "r") as f:
        assert f["features"].chunks == (1, 2, 64, 101)
        assert f["features"].compression is None
        assert json.loads(f.attrs["class_counts"]) == {"snore": 3, "quiet": 3}


@pytest.mark.parametrize("preset", ["native", "reference"])
def test_rows_are_the_front_end_output(tmp_path: Path, preset: str) -> None:
    fe = LogMelFrontEnd(preset)
    items = [clip(0, "quiet"), clip(1, "snore", tone(1, seconds=0.7)), clip(2, "breathe")]
    path = build_cache(FakeSource(items), "train", fe, path=tmp_path / "c.h5", progress=False)
    feats = read(path)["features"]
    assert feats.shape[1:] == fe.output_shape
    for row, item in zip(feats, items, strict=True):
        expected = fe(torch.from_numpy(item.waveform)[None])[0].numpy()
        np.testing.assert_allclose(row.astype(np.float32), expected, rtol=2e-3, atol=2e-2)


def test_band_statistics_over_all_train_rows_and_frames(
    tmp_path: Path, native: LogMelFrontEnd
) -> None:
    path = build_cache(
        FakeSource(regular_items(9)), "train", native, path=tmp_path / "t.h5", progress=False
    )
    feats = read(path)["features"].astype(np.float64)
    info = open_cache(path)
    assert info.band_mean.dtype == np.float32 and info.band_mean.shape == (2, 64)
    np.testing.assert_allclose(info.band_mean, feats.mean(axis=(0, 3)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(info.band_std, feats.std(axis=(0, 3)), rtol=1e-4, atol=1e-5)
    val = build_cache(
        FakeSource(regular_items(3)), "validation", native, path=tmp_path / "v.h5", progress=False
    )
    assert open_cache(val).band_mean is None


def malformed_items() -> tuple[list[Clip | SkippedClip], list[str]]:
    """Bad clips among good ones, and the clip_ids that must be kept, in order."""
    bad: list[Clip | SkippedClip] = [
        clip(100, "quiet", np.zeros((2, 0), np.float32)),
        clip(101, "breathe", np.where(np.arange(SR) == 5, np.nan, tone(101)).astype(np.float32)),
        clip(102, "snore", tone(102, seconds=0.1)),
        clip(103, "quiet", tone(103, channels=3)),
        SkippedClip("train/snore/broken.wav", "train", "snore", "corrupt"),
        SkippedClip("train/cough/broken.wav", "train", "cough", "corrupt"),  # not a class
        SkippedClip("/abs/quiet/x.wav", "train", "gurgle", "unknown_label"),
    ]
    repaired = [
        clip(200, "breathe", tone(200, channels=1)),  # mono
        clip(201, "quiet", tone(201, sr=22050), sr=22050),  # resampled
        clip(202, "snore", tone(202, seconds=0.5)),  # padded
        clip(203, "quiet", tone(203, seconds=1.5)),  # cropped
    ]
    good = regular_items(6)
    items = good[:3] + bad[:4] + repaired + bad[4:] + good[3:]
    keep = [c.clip_id for c in good[:3] + repaired + good[3:]]
    return items, keep


def test_malformed_clips_are_skipped_or_repaired_and_counted(
    tmp_path: Path, native: LogMelFrontEnd
) -> None:
    items, keep = malformed_items()
    path = build_cache(
        FakeSource(items), "train", native, path=tmp_path / "m.h5", batch_size=4, progress=False
    )
    data = read(path)
    assert list(data["clip_ids"]) == keep  # nothing good dropped, duplicated or reordered
    info = open_cache(path)
    assert info.skip_counts == {
        "bad_shape": 1,
        "corrupt": 1,
        "empty": 1,
        "nan": 1,
        "too_short": 1,
        "unknown_label": 1,
    }
    assert info.repair_counts == {"resampled": 1, "mono": 1, "padded": 1, "cropped": 1}
    assert info.other_label_counts == {"cough": 1}
    assert [tuple(p) for p in data["skipped"]] == [
        ("train/quiet/clip100.wav", "empty"),
        ("train/breathe/clip101.wav", "nan"),
        ("train/snore/clip102.wav", "too_short"),
        ("train/quiet/clip103.wav", "bad_shape"),
        ("train/snore/broken.wav", "corrupt"),
        ("/abs/quiet/x.wav", "unknown_label"),
    ]
    assert info.skipped == [tuple(p) for p in data["skipped"]]
    assert np.isfinite(data["features"].astype(np.float32)).all()
    mono_row = data["features"][keep.index("train/breathe/clip200.wav")]
    np.testing.assert_array_equal(mono_row[0], mono_row[1])


def test_min_duration_is_policy(tmp_path: Path, native: LogMelFrontEnd) -> None:
    items = [clip(0, "quiet", tone(0, seconds=0.3)), clip(1, "quiet")]
    src = FakeSource(items)
    strict = build_cache(
        src, "train", native, path=tmp_path / "a.h5", min_duration_s=0.5, progress=False
    )
    assert open_cache(strict).skip_counts == {"too_short": 1}
    assert cache_key(src, "train", native, min_duration_s=0.5) != cache_key(src, "train", native)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_build_resumes_to_the_same_file(
    tmp_path: Path, native: LogMelFrontEnd, error: type[BaseException], caplog
) -> None:
    items, keep = malformed_items()
    kwargs = {"batch_size": 3, "checkpoint_every": 1, "progress": False}
    whole = build_cache(FakeSource(items), "train", native, path=tmp_path / "whole.h5", **kwargs)

    target = tmp_path / "resumed.h5"
    with pytest.raises(error, match="simulated"):
        build_cache(
            FakeSource(items, fail_after=12, error=error), "train", native, path=target, **kwargs
        )
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    assert partial.exists() and not target.exists()

    computed: list[int] = []
    forward = native.forward

    def counting(wave: torch.Tensor) -> torch.Tensor:
        computed.append(wave.shape[0])
        return forward(wave)

    native.forward = counting  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, logger="data.cache"):
        build_cache(FakeSource(items), "train", native, path=target, **kwargs)
    assert "resuming" in caplog.text
    assert sum(computed) < len(keep)  # stored rows were not computed again
    assert not partial.exists()

    a, b = read(whole), read(target)
    assert list(b["clip_ids"]) == keep
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    ia, ib = open_cache(whole), open_cache(target)
    for field in ("class_counts", "skip_counts", "repair_counts", "other_label_counts"):
        assert getattr(ia, field) == getattr(ib, field)
    assert ia.member_list_hash == ib.member_list_hash
    np.testing.assert_array_equal(ia.band_mean, ib.band_mean)
    np.testing.assert_array_equal(ia.band_std, ib.band_std)


def test_partial_with_another_key_is_discarded(
    tmp_path: Path, native: LogMelFrontEnd, caplog
) -> None:
    items = regular_items(10)
    target = tmp_path / "c.h5"
    kwargs = {"batch_size": 2, "checkpoint_every": 1, "progress": False}
    with pytest.raises(RuntimeError):
        build_cache(FakeSource(items, fail_after=7), "train", native, path=target, **kwargs)
    other = LogMelFrontEnd("native", n_mels=32)
    with caplog.at_level(logging.INFO, logger="data.cache"):
        build_cache(FakeSource(items), "train", other, path=target, **kwargs)
    assert "discarding partial cache" in caplog.text
    assert read(target)["features"].shape == (10, 2, 32, 101)
    assert open_cache(target).feature_hash == other.config_hash()


def test_partial_from_a_changed_source_is_never_mixed_in(
    tmp_path: Path, native: LogMelFrontEnd, caplog
) -> None:
    """Same key but other clips (a source that broke its fingerprint promise): start over."""
    target = tmp_path / "c.h5"
    kwargs = {"batch_size": 2, "checkpoint_every": 1, "progress": False}
    with pytest.raises(RuntimeError):
        build_cache(
            FakeSource(regular_items(10), fail_after=7), "train", native, path=target, **kwargs
        )
    changed = [clip(i + 50, c.label) for i, c in enumerate(regular_items(10))]
    with caplog.at_level(logging.WARNING, logger="data.cache"):
        build_cache(FakeSource(changed), "train", native, path=target, **kwargs)
    assert "building from the start" in caplog.text
    assert list(read(target)["clip_ids"]) == [c.clip_id for c in changed]


def test_complete_cache_is_reused_without_recomputing(
    tmp_path: Path, native: LogMelFrontEnd
) -> None:
    src = FakeSource(regular_items(4))
    first = build_cache(src, "train", native, cache_dir=tmp_path, progress=False)
    assert first == default_path(tmp_path, src, "train", native)
    mtime = first.stat().st_mtime_ns
    src.yielded = 0
    again = build_cache(src, "train", native, cache_dir=tmp_path, progress=False)
    assert again == first and first.stat().st_mtime_ns == mtime and src.yielded == 0


def test_another_config_gets_another_cache_and_verify_refuses(
    tmp_path: Path, native: LogMelFrontEnd
) -> None:
    src = FakeSource(regular_items(4))
    path = build_cache(src, "train", native, cache_dir=tmp_path, progress=False)
    variants = [
        (src, LogMelFrontEnd("native", hop_length=128), ("quiet", "breathe", "snore")),
        (src, LogMelFrontEnd("reference"), ("quiet", "breathe", "snore")),
        (src, native, ("quiet", "snore", "breathe")),
        (FakeSource(regular_items(4), tag="v2"), native, ("quiet", "breathe", "snore")),
    ]
    for source, fe, classes in variants:
        assert default_path(tmp_path, source, "train", fe, classes) != path
        other_key = cache_key(source, "train", fe, classes)
        with pytest.raises(CacheMismatchError) as err:
            verify(path, other_key)
        assert other_key in str(err.value) and open_cache(path).cache_key in str(err.value)
    assert default_path(tmp_path, src, "validation", native) != path
    assert verify(path, cache_key(src, "train", native)).n_rows == 4


def test_unknown_class_names_the_source_labels(tmp_path: Path, native: LogMelFrontEnd) -> None:
    with pytest.raises(ValueError, match="gurgle.*quiet, non_wearer, breathe, snore, cough"):
        build_cache(FakeSource([]), "train", native, ["quiet", "gurgle"], tmp_path / "x.h5")
    with pytest.raises(ValueError, match="more than once"):
        build_cache(FakeSource([]), "train", native, ["quiet", "quiet"], tmp_path / "x.h5")


def test_source_error_leaves_no_final_file(tmp_path: Path, native: LogMelFrontEnd) -> None:
    target = tmp_path / "c.h5"
    with pytest.raises(RuntimeError):
        build_cache(FakeSource(regular_items(5), fail_after=2), "train", native, path=target)
    assert not target.exists()
    with pytest.raises(CacheMismatchError, match="not a complete cache"):
        open_cache(target.with_name(target.name + PARTIAL_SUFFIX))


def test_damaged_partial_is_discarded(tmp_path: Path, native: LogMelFrontEnd, caplog) -> None:
    target = tmp_path / "c.h5"
    target.with_name(target.name + PARTIAL_SUFFIX).write_bytes(b"\x89HDF\r\n\x1a\n garbage")
    with caplog.at_level(logging.WARNING, logger="data.cache"):
        build_cache(FakeSource(regular_items(3)), "train", native, path=target, progress=False)
    assert "discarding unreadable partial cache" in caplog.text
    assert open_cache(target).n_rows == 3


def test_complete_partial_is_renamed_not_rebuilt(tmp_path: Path, native: LogMelFrontEnd) -> None:
    """A build stopped between its last flush and the rename loses nothing."""
    src = FakeSource(regular_items(3))
    done = build_cache(src, "train", native, path=tmp_path / "a.h5", progress=False)
    target = tmp_path / "b.h5"
    done.rename(target.with_name(target.name + PARTIAL_SUFFIX))
    src.yielded = 0
    assert build_cache(src, "train", native, path=target, progress=False) == target
    assert src.yielded == 0 and open_cache(target).n_rows == 3
