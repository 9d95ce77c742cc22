"""What earsleep guarantees about its data, each promise tried with the hostile input behind it.

Damaged caches, damaged tar headers, cut-off WAVs, misspelled and repeated input, counts a
user must see, a full disk and two builds at once: each is reproduced here, and the test
asserts the behaviour the README's "What earsleep guarantees" section promises.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

import data.cache.space as space_module
import data.sources.dreamcatcher as dreamcatcher_module
from data.audio import SKIP_REASONS, AudioDecodeError, decode
from data.cache import (
    PARTIAL_SUFFIX,
    CacheCorruptError,
    CacheMismatchError,
    CacheSpaceError,
    build_cache,
    open_cache,
)
from data.clips import CachedSplit
from data.datamodule import SleepSoundDataModule
from data.features import LogMelFrontEnd
from data.sources import (
    ArchiveError,
    AudioFolder,
    Clip,
    DreamCatcher,
    SkippedClip,
    Source,
    Synthetic,
)
from models.backbones import TinyCNN
from models.classifier import Classifier
from models.task import NonFiniteLossError
from util.callbacks import Leaderboard, RunArtifacts

ROOT = Path(__file__).resolve().parents[1]
SR = 16000
PREFIX = "home/someone/DreamCatcher-v1.0"
RANK_ZERO = "lightning.pytorch.utilities.rank_zero"


def wav(seconds: float = 0.3, channels: int = 2, seed: int = 0, subtype: str = "PCM_16") -> bytes:
    rng = np.random.default_rng(seed)
    wave = (0.2 * rng.standard_normal((int(seconds * SR), channels))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, wave, SR, subtype=subtype, format="WAV")
    return buf.getvalue()


def tone(seed: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    wave = 0.3 * np.sin(2 * np.pi * (200 + 37 * seed) * t)
    return np.stack([wave, 0.5 * wave]).astype(np.float32)


class ListSource(Source):
    """Fixed items per split; ``size_hint`` can be hidden like a tarball's."""

    name = "list"
    labels = ("quiet", "non_wearer", "breathe", "snore")

    def __init__(self, items: dict[str, list[Clip | SkippedClip]], hint: bool = True) -> None:
        self.items = items
        self.hint = hint

    def iter_clips(self, split: str) -> Iterator[Clip | SkippedClip]:
        yield from self.items.get(split, [])

    def fingerprint(self, split: str) -> dict[str, str]:
        return {"source": "list", "split": split, "n": str(len(self.items.get(split, [])))}

    def size_hint(self, split: str) -> int | None:
        return len(self.items.get(split, [])) if self.hint else None


def clip(i: int, label: str, split: str = "train", wave: np.ndarray | None = None) -> Clip:
    wave = tone(i) if wave is None else wave
    return Clip(wave, SR, label, f"data/{split}/{label}/c{i:04d}.wav", split)


def regular(n: int, split: str = "train", offset: int = 0) -> list[Clip | SkippedClip]:
    labels = ("quiet", "breathe", "snore")
    return [clip(offset + i, labels[i % 3], split) for i in range(n)]


@pytest.fixture(params=["isal", "stdlib"])
def gzip_reader(request, monkeypatch) -> str:
    if request.param == "stdlib":
        monkeypatch.setattr(dreamcatcher_module, "_fast_gzip", None)
    return request.param


def run_python(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter at the repository root."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- 3. a damaged cache never trains a model ---------------------------------------------


def overwrite_middle(path: Path, size: int = 1 << 20) -> None:
    with open(path, "r+b") as f:
        f.seek(max(path.stat().st_size // 2 - size // 2, 0))
        f.write(b"\xff" * size)


def fit_like_the_cli(tmp_path: Path, in_memory: bool) -> Trainer:
    """One epoch with the callbacks ``main.py fit`` always has that write results."""
    dm = SleepSoundDataModule(
        source=Synthetic(seed=0, clips_per_split={"train": 200, "validation": 48, "test": 48}),
        cache_dir=str(tmp_path / "cache"),
        in_memory=in_memory,
        progress=False,
    )
    model = Classifier(backbone=TinyCNN, num_classes=dm.num_classes, in_channels=dm.in_channels,
                       class_names=dm.class_names, input_shape=dm.input_shape)  # fmt: skip
    trainer = Trainer(
        max_epochs=1,
        logger=TensorBoardLogger(save_dir=str(tmp_path / "log"), name="run"),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            ModelCheckpoint(monitor="val/f1_macro", mode="max", save_last=True),
            RunArtifacts(),
            Leaderboard(str(tmp_path / "leaderboard.csv")),
        ],
    )
    trainer.fit(model, dm)
    return trainer


@pytest.mark.parametrize("in_memory", [False, True])
def test_byte_corrupted_cache_fails_fit_and_writes_no_leaderboard_row(tmp_path, in_memory):
    first = fit_like_the_cli(tmp_path, in_memory)  # the control: a clean run leaves a row
    rows = (tmp_path / "leaderboard.csv").read_text().splitlines()
    assert len(rows) == 2
    train = first.datamodule.cache_file("train")
    assert train.stat().st_size > 4 << 20  # the 1 MiB lands among the rows
    overwrite_middle(train)

    with pytest.raises(CacheCorruptError, match="damaged.*delete it"):
        fit_like_the_cli(tmp_path, in_memory)
    assert (tmp_path / "leaderboard.csv").read_text().splitlines() == rows
    second = tmp_path / "log" / "run" / "version_1"
    assert not list(second.rglob("*.ckpt")) and not (second / "metrics.json").exists()


def test_every_damaged_row_is_found_when_read_or_opened(tmp_path):
    path = build_cache(ListSource({"train": regular(240)}), "train", LogMelFrontEnd(),
                       path=tmp_path / "train.h5", progress=False)  # fmt: skip
    overwrite_middle(path)
    with pytest.raises(CacheCorruptError, match="damaged"):
        open_cache(path, check_rows=True)  # a full read: every checksum
    with pytest.raises(CacheCorruptError, match=r"row \d+ fails its checksum|damaged"):
        ds = CachedSplit(path)
        for i in range(len(ds)):
            ds[i]


def test_non_finite_features_are_never_stored_nor_read(tmp_path):
    huge = np.full((2, SR), 1e30, np.float32)  # finite samples whose power spectrum is inf
    items = regular(6) + [clip(99, "snore", wave=huge)]
    path = build_cache(ListSource({"train": items}), "train", LogMelFrontEnd(),
                       path=tmp_path / "train.h5", progress=False)  # fmt: skip
    info = open_cache(path, check_rows=True)
    assert info.n_rows == 6 and info.skip_counts == {"nonfinite_features": 1}
    assert ("data/train/snore/c0099.wav", "nonfinite_features") in info.skipped
    assert np.isfinite(info.band_mean).all() and np.isfinite(info.band_std).all()

    with h5py.File(path, "r+") as f:  # written through HDF5: the checksum still matches
        row = f["features"][3]
        row[0, 5, 7] = np.nan
        f["features"][3] = row
    with pytest.raises(CacheCorruptError, match="row 3 holds NaN"):
        open_cache(path, check_rows=True)
    with pytest.raises(CacheCorruptError, match="row 3 holds NaN"):
        CachedSplit(path)[3]
    assert CachedSplit(path)[2][0].isfinite().all()


def test_non_finite_loss_stops_fit_before_any_artifact(tmp_path):
    x = torch.randn(16, 2, 64, 101)
    x[5, 0, 3, 3] = float("nan")  # input no cache would hold, e.g. a custom data module
    loader = DataLoader(TensorDataset(x, torch.arange(16) % 3), batch_size=4)
    clean = DataLoader(TensorDataset(torch.randn(8, 2, 64, 101), torch.arange(8) % 3), batch_size=4)
    model = Classifier(backbone=TinyCNN, num_classes=3, in_channels=2, normalize=False,
                       class_names=["quiet", "breathe", "snore"], input_shape=(2, 64, 101))  # fmt: skip
    leaderboard = tmp_path / "leaderboard.csv"
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RunArtifacts(), Leaderboard(str(leaderboard))],
    )
    with pytest.raises(NonFiniteLossError, match="train loss is nan"):
        trainer.fit(model, loader, clean)
    assert not leaderboard.exists()
    assert not list(tmp_path.rglob("*.ckpt"))


def test_cache_of_the_old_format_is_refused_with_a_rebuild_message(tmp_path, caplog):
    source = ListSource({"train": regular(6)})
    path = build_cache(source, "train", LogMelFrontEnd(), path=tmp_path / "t.h5", progress=False)
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 1
    with pytest.raises(CacheMismatchError, match="format version 1.*build it again"):
        open_cache(path)
    with caplog.at_level(logging.WARNING, logger="data.cache"):
        build_cache(source, "train", LogMelFrontEnd(), path=path, progress=False)
    assert "rebuilding" in caplog.text and open_cache(path).n_rows == 6


def test_labels_that_disagree_with_the_counts_are_damage(tmp_path):
    path = build_cache(ListSource({"train": regular(6)}), "train", LogMelFrontEnd(),
                       path=tmp_path / "t.h5", progress=False)  # fmt: skip
    with h5py.File(path, "r+") as f:
        f["labels"][0] = 2 if f["labels"][0] != 2 else 1
    with pytest.raises(CacheCorruptError, match="labels count"):
        open_cache(path)


# -- 4. a damaged tar header is never a shorter split --------------------------------------


def tar_bytes(members: list[tuple[str, bytes]], end: bool = True) -> tuple[bytes, list[int]]:
    """An uncompressed tar and the header offset of each member."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(payload), 1_700_000_000
            tar.addfile(info, io.BytesIO(payload))
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offsets = [m.offset for m in tar.getmembers()]
    if not end:  # cut after the last member's data: no end-of-archive blocks
        last = tar_last_end(data, offsets)
        data = data[:last]
    return data, offsets


def tar_last_end(data: bytes, offsets: list[int]) -> int:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        m = tar.getmembers()[-1]
    return m.offset_data + -(-m.size // 512) * 512


@pytest.fixture(scope="module")
def big_tar() -> tuple[bytes, list[int]]:
    payload = wav(0.05, channels=1)
    members = [(f"{PREFIX}/data/train/quiet/c{i:04d}.wav", payload) for i in range(1500)]
    return tar_bytes(members)


def write_tgz(root: Path, data: bytes) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    path = root / "data" / "train.tar.gz"
    path.write_bytes(gzip.compress(data, compresslevel=1))  # a valid gzip stream
    return path


def test_bad_header_checksum_of_a_middle_member_fails_with_index_and_offset(
    tmp_path, big_tar, gzip_reader
):
    data, offsets = big_tar
    bad = bytearray(data)
    at = offsets[750]
    bad[at + 148 : at + 156] = b"0000000\0"  # the header's checksum field
    write_tgz(tmp_path, bytes(bad))
    with pytest.raises(ArchiveError, match=rf"member 750 .* at byte {at} .*invalid") as err:
        list(DreamCatcher(root=str(tmp_path)).iter_clips("train"))
    assert "\n" not in str(err.value)
    # and through the cache: no file, never a 750-row cache
    with pytest.raises(ArchiveError):
        build_cache(DreamCatcher(root=str(tmp_path)), "train", LogMelFrontEnd(),
                    path=tmp_path / "c.h5", progress=False)  # fmt: skip
    assert not (tmp_path / "c.h5").exists()


def test_zeroed_member_header_is_not_the_end_of_the_archive(tmp_path, big_tar, gzip_reader):
    data, offsets = big_tar
    bad = bytearray(data)
    bad[offsets[750] : offsets[750] + 512] = bytes(512)
    write_tgz(tmp_path, bytes(bad))
    with pytest.raises(ArchiveError, match=rf"at byte {offsets[750]}.*data follows"):
        list(DreamCatcher(root=str(tmp_path)).iter_clips("train"))


def test_tar_without_its_end_blocks_is_truncated(tmp_path, gzip_reader):
    members = [(f"{PREFIX}/data/train/quiet/c{i}.wav", wav(0.05, 1, i)) for i in range(20)]
    data, offsets = tar_bytes(members)
    last_member = offsets[12]  # cut at a member boundary, re-gzipped: a valid gzip stream
    write_tgz(tmp_path, data[:last_member])
    with pytest.raises(ArchiveError, match="truncated.*after 12 members"):
        list(DreamCatcher(root=str(tmp_path)).iter_clips("train"))
    write_tgz(tmp_path, data)  # the whole archive reads
    assert len(list(DreamCatcher(root=str(tmp_path)).iter_clips("train"))) == 20


# -- 5. no WAV prefix or byte flip crashes a build ------------------------------------------


@pytest.mark.parametrize("subtype", ["PCM_16", "FLOAT", "PCM_24"])
def test_every_prefix_and_random_byte_flips_decode_or_skip(subtype):
    data = wav(0.02, channels=2, subtype=subtype)
    outcomes: Counter[str] = Counter()
    for n in range(len(data) + 1):
        try:
            audio, sr = decode(data[:n])
            outcomes["decoded"] += 1
        except AudioDecodeError as err:
            assert err.reason in SKIP_REASONS
            outcomes[err.reason] += 1
    assert outcomes["decoded"] >= 1 and outcomes["truncated"] > len(data) // 2
    rng = np.random.default_rng(0)
    for _ in range(1500):
        flipped = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):  # mostly in the header, where parsing is
            flipped[int(rng.integers(0, 64 if rng.random() < 0.7 else len(data)))] ^= int(
                rng.integers(1, 256)
            )
        try:
            audio, sr = decode(bytes(flipped))
            assert audio.ndim == 2 and audio.dtype == np.float32
        except AudioDecodeError as err:
            assert err.reason in SKIP_REASONS


def test_a_wav_cut_at_half_its_data_is_truncated_not_padded(tmp_path):
    whole = wav(1.0)
    with pytest.raises(AudioDecodeError) as err:
        decode(whole[: 44 + (len(whole) - 44) // 2])
    assert err.value.reason == "truncated"
    assert decode(whole)[0].shape == (2, SR)


def test_thirty_byte_member_is_a_counted_skip_and_the_build_completes(tmp_path, gzip_reader):
    members = [(f"{PREFIX}/data/train/quiet/c{i}.wav", wav(0.5, 2, i)) for i in range(6)]
    members.insert(3, (f"{PREFIX}/data/train/snore/cut.wav", wav(0.5)[:30]))
    members.insert(4, (f"{PREFIX}/data/train/snore/half.wav", wav(0.5)[:8000]))
    write_tgz(tmp_path, tar_bytes(members)[0])
    path = build_cache(DreamCatcher(root=str(tmp_path)), "train", LogMelFrontEnd(),
                       path=tmp_path / "c.h5", progress=False)  # fmt: skip
    info = open_cache(path)
    assert info.n_rows == 6 and info.skip_counts == {"truncated": 2}
    assert info.repair_counts["padded"] == 6  # the 0.5 s clips, not the cut ones
    assert not path.with_name(path.name + PARTIAL_SUFFIX).exists()


# -- 6. no input is silently ignored or counted twice ----------------------------------------


def test_every_file_of_an_extracted_tree_is_read_or_counted(tmp_path, caplog):
    files = {
        "x/data/train/quiet/a.wav": wav(0.5, 2, 1),
        "x/data/Train/quiet/b.wav": wav(0.5, 2, 2),
        "x/data/TRAIN/snore/c.wav": wav(0.5, 2, 3),
        "x/data/train/quiet/notes.txt": b"hello",
        "x/data/train/loose.wav": wav(0.5, 2, 4),
        "x/data/train/quiet/deeper/d.wav": wav(0.5, 2, 5),
        "x/data/test/quiet/e.wav": wav(0.5, 2, 6),
        "x/README.md": b"readme",
    }
    for rel, payload in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(payload)
    source = DreamCatcher(root=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="data.sources.dreamcatcher"):
        records = {s: list(source.iter_clips(s)) for s in ("train", "test")}
    seen = {r.clip_id: getattr(r, "reason", "read") for rs in records.values() for r in rs}
    assert seen == {
        "x/data/train/quiet/a.wav": "read",
        "x/data/Train/quiet/b.wav": "misspelled_split",
        "x/data/TRAIN/snore/c.wav": "misspelled_split",
        "x/data/train/quiet/notes.txt": "not_audio",
        "x/data/train/loose.wav": "misplaced",
        "x/data/train/quiet/deeper/d.wav": "misplaced",
        "x/data/test/quiet/e.wav": "read",
    }
    assert "1 file(s)" in caplog.text and "x/README.md" in caplog.text  # in no split folder
    assert source.fingerprint("train")["outside_splits"] == "1"
    info = open_cache(build_cache(source, "train", LogMelFrontEnd(), path=tmp_path / "c.h5",
                                  progress=False))  # fmt: skip
    assert info.n_rows == 1
    assert info.skip_counts == {"misspelled_split": 2, "misplaced": 2, "not_audio": 1}


def test_every_file_of_an_audio_folder_is_read_or_counted(tmp_path):
    files = {
        "train/quiet/a.wav": wav(0.5, 2, 1),
        "train/quiet/deep/b.wav": wav(0.5, 2, 2),
        "train/c.wav": wav(0.5, 2, 3),
        "Train/snore/d.wav": wav(0.5, 2, 4),
        "train/snore/cut.wav": wav(0.5, 2, 5)[:100],
        "train/snore/e.mp3": b"ID3 not decoded",
        "train/snore/e.txt": b"not audio",
        "validation/quiet/f.wav": wav(0.5, 2, 6),
        "extra/quiet/g.wav": wav(0.5, 2, 7),
    }
    for rel, payload in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(payload)
    source = AudioFolder(str(tmp_path))
    seen = {r.clip_id: getattr(r, "reason", "read") for r in source.iter_clips("train")}
    assert seen == {
        "train/quiet/a.wav": "read",
        "train/quiet/deep/b.wav": "read",
        "train/c.wav": "misplaced",
        "Train/snore/d.wav": "misspelled_split",
        "train/snore/cut.wav": "truncated",
        "train/snore/e.mp3": "corrupt",
        "train/snore/e.txt": "not_audio",
    }
    assert source.fingerprint("train")["outside_splits"] == "1"  # extra/quiet/g.wav
    (tmp_path / "validation").rename(tmp_path / "VALIDATION")
    with pytest.raises(FileNotFoundError, match="found VALIDATION/"):
        list(AudioFolder(str(tmp_path)).iter_clips("validation"))


def test_a_member_path_repeated_in_a_tarball_is_one_row_and_counted(tmp_path, gzip_reader):
    name = f"{PREFIX}/data/train/quiet/same.wav"
    members = [(f"{PREFIX}/data/train/snore/a{i}.wav", wav(0.5, 2, i)) for i in range(3)]
    members += [(name, wav(0.5, 2, 10)), (name, wav(0.5, 2, 11)), (name, wav(0.5, 2, 12))]
    write_tgz(tmp_path, tar_bytes(members)[0])
    path = build_cache(DreamCatcher(root=str(tmp_path)), "train", LogMelFrontEnd(),
                       path=tmp_path / "c.h5", progress=False)  # fmt: skip
    info = open_cache(path)
    with h5py.File(path) as f:
        ids = list(f["clip_ids"].asstr()[()])
    assert info.n_rows == 4 and len(set(ids)) == len(ids) and ids.count(name) == 1
    assert info.skip_counts == {"duplicate_id": 2}


def test_duplicate_ids_stay_counted_across_a_resumed_build(tmp_path):
    items = regular(9)
    items.insert(7, clip(1, "breathe"))  # the id of item 1 again, after the interruption
    full = build_cache(ListSource({"train": items}), "train", LogMelFrontEnd(),
                       path=tmp_path / "full.h5", progress=False)  # fmt: skip

    class Stops(ListSource):
        def iter_clips(self, split):
            for i, item in enumerate(self.items[split]):
                if i == 6:
                    raise RuntimeError("simulated interruption")
                yield item

    kw = {"batch_size": 2, "checkpoint_every": 1, "progress": False}
    target = tmp_path / "resumed.h5"
    with pytest.raises(RuntimeError, match="simulated"):
        build_cache(Stops({"train": items}), "train", LogMelFrontEnd(), path=target, **kw)
    build_cache(ListSource({"train": items}), "train", LogMelFrontEnd(), path=target, **kw)
    a, b = open_cache(full), open_cache(target)
    assert a.skip_counts == b.skip_counts == {"duplicate_id": 1}
    assert a.n_rows == b.n_rows == 9


def test_identical_audio_across_splits_is_reported_as_leakage(tmp_path, caplog):
    shared = tone(7)
    items = {
        "train": regular(6) + [clip(50, "snore", "train", shared)],
        "validation": regular(3, "validation", offset=20),
        "test": regular(3, "test", offset=30) + [clip(51, "snore", "test", shared.copy())],
    }
    dm = SleepSoundDataModule(source=ListSource(items), cache_dir=str(tmp_path), progress=False)
    with caplog.at_level(logging.INFO):
        dm.prepare_data()
    test = open_cache(dm.cache_file("test"))
    assert test.leakage["train"]["rows"] == 1 and test.leakage["validation"]["rows"] == 0
    with h5py.File(test.path) as f:
        assert f["leaked"].asstr()[()].tolist() == [
            ["data/test/snore/c0051.wav", "train", "data/train/snore/c0050.wav"]
        ]
    assert open_cache(dm.cache_file("validation")).leakage["train"]["rows"] == 0
    assert "leakage: 1 clips of test share their decoded audio with train" in caplog.text
    assert "LEAKAGE: 1 clips share their audio with train" in caplog.text  # the summary line


# -- 7. the counts are shown ---------------------------------------------------------------


def test_counts_are_shown_on_the_console_after_a_build_and_on_open(tmp_path):
    code = """
        import sys
        import numpy as np
        from data.cache import build_cache
        from data.datamodule import SleepSoundDataModule
        from data.features import LogMelFrontEnd
        from data.sources import Clip, SkippedClip
        from tests.test_guarantees_data import ListSource, clip, regular

        items = regular(6) + [clip(60 + i, "non_wearer") for i in range(3)]
        items += [SkippedClip("data/train/quiet/bad.wav", "train", "quiet", "corrupt")]
        items += [clip(70, "quiet", wave=np.zeros((2, 0), np.float32))]
        src = ListSource({"train": items, "validation": regular(3), "test": regular(3)})
        dm = SleepSoundDataModule(source=src, cache_dir=sys.argv[1], progress=False)
        dm.prepare_data()
        print("--- opened ---", file=sys.stderr)
        SleepSoundDataModule(source=src, cache_dir=sys.argv[1]).setup("fit")
    """
    out = run_python(code, str(tmp_path))
    assert out.returncode == 0, out.stderr
    console = out.stdout + out.stderr
    built, opened = console.split("--- opened ---")
    line = next(x for x in built.splitlines() if "cache train:" in x)
    assert "6 clips (quiet 2, breathe 2, snore 2)" in line
    assert "other labels left out: 3 (non_wearer 3)" in line
    assert "skipped: 2 (corrupt 1, empty 1)" in line
    assert opened.count("cache train:") == 1 and opened.count("cache validation:") == 1


# -- 8. a full disk is one line, never a signal --------------------------------------------


def test_too_little_free_space_is_refused_before_the_build(tmp_path, monkeypatch):
    monkeypatch.setattr(space_module, "free_bytes", lambda folder: 3_000_000)
    with pytest.raises(CacheSpaceError, match=r"about \d+\.\d MB needed \(200 clips") as err:
        build_cache(ListSource({"train": regular(200)}), "train", LogMelFrontEnd(),
                    path=tmp_path / "c.h5", progress=False)  # fmt: skip
    assert "\n" not in str(err.value) and "3.0 MB free" in str(err.value)
    assert not list(tmp_path.iterdir()) or not list(tmp_path.glob("*.partial"))


def test_disk_filling_during_the_build_stops_cleanly_and_resumes(tmp_path, monkeypatch):
    room = {"bytes": 10 * 26_000 + space_module.SPACE_MARGIN}  # a disk with room for ~10 rows

    def free(folder: Path) -> int:
        return room["bytes"] - sum(p.stat().st_size for p in folder.iterdir() if p.is_file())

    monkeypatch.setattr(space_module, "free_bytes", free)
    monkeypatch.setattr(space_module, "_fallocate", None)  # judge by the (fake) free space
    source = ListSource({"train": regular(30)}, hint=False)
    target = tmp_path / "c.h5"
    with pytest.raises(CacheSpaceError, match="full.*resume"):
        build_cache(source, "train", LogMelFrontEnd(), path=target, progress=False,
                    batch_size=4, checkpoint_every=1)  # fmt: skip
    assert target.with_name("c.h5" + PARTIAL_SUFFIX).exists()
    room["bytes"] = 1 << 40
    build_cache(source, "train", LogMelFrontEnd(), path=target, progress=False, batch_size=4)
    whole = build_cache(source, "train", LogMelFrontEnd(), path=tmp_path / "w.h5", progress=False)
    with h5py.File(target) as a, h5py.File(whole) as b:
        np.testing.assert_array_equal(a["features"][()], b["features"][()])


@pytest.fixture
def tiny_disk(tmp_path) -> Iterator[Path]:
    """A 12 MB tmpfs (Linux, root); skipped where mounting is not permitted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("needs Linux mount to make a small disk")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)],
                          capture_output=True)  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({made.stderr.decode().strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


BUILD_ON = """
    import sys
    import data.cache as cache
    from data.features import LogMelFrontEnd
    from data.sources import Synthetic

    class Unsized(Synthetic):  # a tarball's size is unknown until read
        def size_hint(self, split):
            return None

    mode, folder = sys.argv[1], sys.argv[2]
    src = (Synthetic if mode == "sized" else Unsized)(seed=0, clips_per_split={"train": 700})
    cache.build_cache(src, "train", LogMelFrontEnd(), cache_dir=folder, progress=False)
"""


@pytest.mark.parametrize("mode", ["sized", "unsized"])
def test_full_disk_is_one_line_and_no_signal(tiny_disk, mode):
    out = run_python(BUILD_ON, mode, str(tiny_disk))
    assert out.returncode == 1, (out.returncode, out.stderr[-2000:])  # not 139 (SIGSEGV)
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("data.cache.errors.CacheSpaceError: [Errno 28]")
    assert "free" in last and "cache_dir" in last
    partials = list(tiny_disk.rglob("*" + PARTIAL_SUFFIX))
    assert len(partials) == (1 if mode == "unsized" else 0)  # kept where it can resume


def test_full_disk_through_main_fit_is_no_signal(tiny_disk, tmp_path):
    args = [
        sys.executable, "main.py", "fit", "--config", "config/demo.yaml",
        "--data.source.init_args.clips_per_split", '{"train": 600, "validation": 50, "test": 50}',
        "--data.cache_dir", str(tiny_disk), "--data.progress", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "log"),
        "--leaderboard.path", str(tmp_path / "leaderboard.csv"),
    ]  # fmt: skip
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, (out.returncode, out.stderr[-2000:])  # not 139 (SIGSEGV)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr
    assert "[Errno 28] not enough free space for the train cache" in errors[0]
    assert not (tmp_path / "leaderboard.csv").exists()


# -- 10. two builds of one cache at once ---------------------------------------------------

SLOW_BUILD = """
    import pathlib, sys, time
    from data.cache import build_cache
    from data.features import LogMelFrontEnd
    from data.sources import Synthetic

    class Slow(Synthetic):  # the same corpus and key; the first build holds its last clip
        def iter_clips(self, split):  # back until the test releases it (or 200 s pass)
            for i, item in enumerate(super().iter_clips(split)):
                if sys.argv[2] == "slow" and i == self.size_hint(split) - 1:
                    release = pathlib.Path(sys.argv[3])
                    for _ in range(4000):
                        if release.exists():
                            break
                        time.sleep(0.05)
                yield item

    src = Slow(seed=4, clips_per_split={"train": 120})
    print(build_cache(src, "train", LogMelFrontEnd(), cache_dir=sys.argv[1], batch_size=16))
"""


def test_two_processes_building_one_cache_wait_and_agree(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    release = tmp_path / "release"
    cmd = [sys.executable, "-c", textwrap.dedent(SLOW_BUILD), str(tmp_path / "shared")]
    first = subprocess.Popen([*cmd, "slow", str(release)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not list((tmp_path / "shared").rglob("*" + PARTIAL_SUFFIX)):
        assert first.poll() is None and time.monotonic() < deadline, "first build never started"
        time.sleep(0.05)
    # The second build starts while the first holds its last clip, and must wait for it.
    log = tmp_path / "second.log"
    with log.open("w") as err:
        second = subprocess.Popen([*cmd, "fast", str(release)], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
        while "waiting for another process" not in log.read_text():
            assert second.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        release.touch()
        out_second, _ = second.communicate(timeout=300)
    out_first, err_first = first.communicate(timeout=300)
    assert first.returncode == 0, err_first[-2000:]
    assert second.returncode == 0, log.read_text()[-2000:]
    path = Path(out_first.strip().splitlines()[-1])
    assert out_second.strip().splitlines()[-1] == str(path)
    assert not list((tmp_path / "shared").rglob("*" + PARTIAL_SUFFIX))

    alone = run_python(SLOW_BUILD, str(tmp_path / "alone"), "fast", str(release))
    assert alone.returncode == 0, alone.stderr[-2000:]
    with h5py.File(path) as a, h5py.File(alone.stdout.strip().splitlines()[-1]) as b:
        for name in ("features", "labels", "content_hash"):
            np.testing.assert_array_equal(a[name][()], b[name][()])
        assert list(a["clip_ids"].asstr()[()]) == list(b["clip_ids"].asstr()[()])
        assert json.loads(a.attrs["skip_counts"]) == json.loads(b.attrs["skip_counts"])
