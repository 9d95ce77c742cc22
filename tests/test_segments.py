"""Labelled recordings of any length: clip-length windows that keep their recording's id,
use every second, stay in one split, and can be found again by name."""

from __future__ import annotations

import io
from collections import Counter, defaultdict
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf

from data.cache import build_cache, open_cache
from data.datamodule import SleepSoundDataModule
from data.features import LogMelFrontEnd
from data.sources import AudioFolder, Clip, HubAudioDataset, SkippedClip
from data.sources.audiofolder import DerivedSplits
from data.sources.base import Segment, parse_clip_id, window_clip_id

SR = 16000


def _noise(seconds: float, channels: int = 2, seed: int = 0, sr: int = SR) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal((channels, int(round(seconds * sr))))).astype(np.float32)


def _write(root: Path, rel: str, wave: np.ndarray, sr: int = SR, **kwargs) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    float_wav = {"subtype": "FLOAT"} if path.suffix == ".wav" else {}  # exact samples in WAV
    sf.write(str(path), wave.T, sr, **(float_wav | kwargs))
    return path


def _folder(root: Path, seconds: dict[str, float], split: str = "train") -> Path:
    for i, (rel, s) in enumerate(seconds.items()):
        _write(root, f"{split}/{rel}", _noise(s, seed=i))
    return root


def _windows(source, split: str = "train") -> list[Clip | SkippedClip]:
    return list(source.iter_clips(split))


def test_a_5_s_and_a_30_s_file_use_every_second(tmp_path):
    five = _noise(5.0, seed=1)
    thirty = _noise(30.0, channels=1, seed=2, sr=44100)
    _write(tmp_path, "train/snore/five.wav", five, subtype="FLOAT")
    _write(tmp_path, "train/breathe/night/thirty.flac", thirty, sr=44100, subtype="PCM_24")
    decoded = sf.read(str(tmp_path / "train/breathe/night/thirty.flac"), dtype="float32")[0]

    source = AudioFolder(str(tmp_path), segment=Segment(hop_s=1.0, min_s=0.25))
    source.use_clip_seconds(1.0)  # what the data module does with the front end's clip length
    items = _windows(source)
    assert all(isinstance(c, Clip) for c in items)
    by_file = defaultdict(list)
    for clip in items:
        by_file[clip.recording].append(clip)
    assert {k: len(v) for k, v in by_file.items()} == {
        "train/breathe/night/thirty.flac": 30,
        "train/snore/five.wav": 5,
    }
    # No overlap at hop = window: the windows laid end to end are the whole file.
    np.testing.assert_array_equal(np.concatenate([c.waveform for c in by_file[
        "train/snore/five.wav"]], axis=1), five)  # fmt: skip
    joined = np.concatenate([c.waveform for c in by_file["train/breathe/night/thirty.flac"]], 1)
    np.testing.assert_array_equal(joined, decoded[None])
    assert {c.waveform.shape[1] for c in by_file["train/breathe/night/thirty.flac"]} == {44100}
    assert [c.clip_id for c in by_file["train/snore/five.wav"]] == [
        f"train/snore/five.wav#t={s}.00" for s in range(5)
    ]
    assert {c.label for c in by_file["train/breathe/night/thirty.flac"]} == {"breathe"}

    # Overlapping windows (hop 0.5 s) still cover every sample, each window one clip long.
    source = AudioFolder(str(tmp_path), segment=Segment(hop_s=0.5, min_s=0.25, window_s=1.0))
    counts = Counter(c.recording for c in _windows(source))
    assert counts == {"train/breathe/night/thirty.flac": 59, "train/snore/five.wav": 9}
    covered = np.zeros(five.shape[1], bool)
    for clip in _windows(source):
        if clip.recording == "train/snore/five.wav":
            start = round(clip.start_s * SR)
            np.testing.assert_array_equal(clip.waveform, five[:, start : start + SR])
            covered[start : start + clip.waveform.shape[1]] = True
    assert covered.all()
    assert source.size_hint("train") == 59 + 9  # from the headers, for the progress bar


def test_the_last_window_is_kept_from_min_s_padded_and_otherwise_counted(tmp_path):
    _folder(tmp_path, {"snore/long.wav": 5.3, "snore/cut.wav": 5.2, "snore/tiny.wav": 0.1})
    source = AudioFolder(str(tmp_path), segment=Segment(hop_s=1.0, min_s=0.25, window_s=1.0))
    items = {r.clip_id: r for r in _windows(source)}
    assert items["train/snore/long.wav#t=5.00"].waveform.shape == (2, round(0.3 * SR))
    dropped = [r for r in items.values() if isinstance(r, SkippedClip)]
    assert [(r.clip_id, r.reason) for r in dropped] == [
        ("train/snore/cut.wav#t=5.00", "too_short"),
        ("train/snore/tiny.wav#t=0.00", "too_short"),
    ]
    path = build_cache(
        source, "train", LogMelFrontEnd(), ("snore",), path=tmp_path / "c.h5", progress=False
    )
    info = open_cache(path)
    assert info.n_rows == 6 + 5  # long: 5 whole windows + 0.3 s; cut: 5 whole windows
    assert info.repair_counts.get("padded") == 1  # the 0.3 s window, zero-padded as any clip
    assert info.skip_counts == {"too_short": 2}
    assert sorted(info.skipped) == [(r.clip_id, "too_short") for r in dropped]

    # With an overlap, the last window starts one hop after the last whole one.
    source = AudioFolder(str(tmp_path), segment=Segment(hop_s=0.5, min_s=0.25, window_s=1.0))
    ids = [r.clip_id for r in _windows(source) if r.recording == "train/snore/long.wav"]
    assert len(ids) == 10 and ids[-1] == "train/snore/long.wav#t=4.50"
    assert source.read_clip(ids[-1]).waveform.shape[1] == round(0.8 * SR)


def test_a_clip_is_found_by_its_name_in_the_cache(tmp_path):
    _folder(tmp_path, {"snore/a.wav": 3.0, "breathe/sub/b.flac": 2.5})
    source = AudioFolder(str(tmp_path), segment=Segment(hop_s=0.5, min_s=0.25, window_s=1.0))
    path = build_cache(
        source, "train", LogMelFrontEnd(), ("breathe", "snore"), path=tmp_path / "c.h5",
        progress=False,
    )  # fmt: skip
    with h5py.File(path) as f:
        ids = [s.decode() for s in f["clip_ids"][()]]
    assert "train/breathe/sub/b.flac#t=1.50" in ids and len(ids) == len(set(ids)) == 5 + 4
    clips = {c.clip_id: c for c in _windows(source)}
    for clip_id in ids:  # a row's id leads back to its file, its second and its audio
        again = source.read_clip(clip_id)
        assert again.label == clips[clip_id].label
        np.testing.assert_array_equal(again.waveform, clips[clip_id].waveform)
    recording, start = parse_clip_id("train/breathe/sub/b.flac#t=1.50")
    assert (recording, start) == ("train/breathe/sub/b.flac", 1.5)
    assert (tmp_path / recording).is_file()
    with pytest.raises(KeyError, match="no window at 9.0 s"):
        source.read_clip("train/snore/a.wav#t=9.00")
    assert window_clip_id("x.wav", 2000, SR) == "x.wav#t=0.125"  # names its sample exactly


def test_windows_of_one_recording_never_land_in_two_splits(tmp_path):
    lengths = {}
    for label in ("snore", "breathe"):
        for i in range(20):
            lengths[f"{label}/{'deep/' if i % 3 == 0 else ''}r{i:02d}.wav"] = 1.0 + (i % 4)
    for i, (rel, seconds) in enumerate(lengths.items()):
        _write(tmp_path, rel, _noise(seconds, seed=i))
    (tmp_path / "README.txt").write_text("a file in no label folder: counted")
    splits = DerivedSplits(validation=0.2, test=0.2)
    source = AudioFolder(
        str(tmp_path), segment={"hop_s": 0.5, "window_s": 1.0}, derive_splits=splits
    )
    assert source.labels == ("breathe", "snore")
    owner: dict[str, str] = {}
    windows: Counter[str] = Counter()
    per_split = {}
    for split in ("train", "validation", "test"):
        items = _windows(source, split)
        per_split[split] = {r.recording for r in items}
        for item in items:
            assert owner.setdefault(item.recording, split) == split  # one split per recording
            windows[item.recording] += 1
    assert set(owner) == set(lengths) | {"README.txt"}
    assert per_split["validation"] & per_split["train"] == set()
    for rel, seconds in lengths.items():  # every window of every recording, in its split
        assert windows[rel] == 2 * seconds - 1
    held_out = Counter((owner[r], r.split("/")[0]) for r in lengths)
    assert held_out[("validation", "snore")] == held_out[("test", "breathe")] == 4  # 20 x 0.2
    assert owner["README.txt"] == "train"
    assert [r.reason for r in _windows(source) if r.recording == "README.txt"] == ["misplaced"]

    again = AudioFolder(
        str(tmp_path), segment={"hop_s": 0.5, "window_s": 1.0}, derive_splits=splits
    )
    assert [r.clip_id for r in _windows(again, "test")] == [
        r.clip_id for r in _windows(source, "test")
    ]
    reseeded = AudioFolder(str(tmp_path), derive_splits=DerivedSplits(0.2, 0.2, seed=1))
    assert {r.recording for r in _windows(reseeded, "test")} != per_split["test"]
    assert source.fingerprint("test") != reseeded.fingerprint("test")
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="has split folders"):
        AudioFolder(str(tmp_path), derive_splits=splits)


def test_a_data_module_trains_on_every_window(tmp_path):
    _folder(tmp_path, {"snore/a.wav": 5.0, "breathe/b.wav": 30.0})
    _folder(tmp_path, {"snore/c.wav": 2.0, "breathe/d.wav": 2.0}, split="validation")
    _folder(tmp_path, {"snore/e.wav": 2.0, "breathe/f.wav": 2.0}, split="test")
    source = AudioFolder(str(tmp_path), segment=Segment(hop_s=1.0, min_s=0.25, window_s=1.0))
    dm = SleepSoundDataModule(
        source=source, classes=["breathe", "snore"], cache_dir=str(tmp_path / "cache"),
        batch_size=8, progress=False,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.dataset("train")) == 35 and len(dm.dataset("validation")) == 4
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, *dm.input_shape) and set(y.tolist()) <= {0, 1}


def test_the_window_length_is_the_front_ends_or_an_error(tmp_path):
    _folder(tmp_path, {"snore/a.wav": 2.0})
    unbound = AudioFolder(str(tmp_path), segment=Segment(hop_s=0.5))
    with pytest.raises(ValueError, match="window length") as info:
        _windows(unbound)
    assert "\n" not in str(info.value)
    fixed = AudioFolder(str(tmp_path), segment=Segment(hop_s=0.5, window_s=1.0))
    with pytest.raises(ValueError, match="differs from the front end's 5 s clip"):
        fixed.use_clip_seconds(5.0)
    with pytest.raises(ValueError, match="would be lost"):
        Segment(hop_s=2.0, window_s=1.0)
    with pytest.raises(ValueError, match="would be lost"):
        unbound_long = AudioFolder(str(tmp_path), segment=Segment(hop_s=2.0))
        unbound_long.use_clip_seconds(1.0)
    plain = AudioFolder(str(tmp_path))  # no segment: one clip per file, as before
    plain.use_clip_seconds(1.0)
    assert [(c.clip_id, c.waveform.shape) for c in _windows(plain)] == [
        ("train/snore/a.wav", (2, 2 * SR))
    ]
    assert plain.fingerprint("train") != fixed.fingerprint("train")


def test_hub_rows_are_cut_into_windows_of_their_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    waves = [_noise(3.2, seed=1), _noise(1.5, channels=1, seed=2)]
    formats = ["FLAC", "OGG"]
    audio = []
    for i, (wave, fmt) in enumerate(zip(waves, formats, strict=True)):
        buf = io.BytesIO()
        sf.write(buf, wave.T, SR, format=fmt)
        audio.append({"bytes": buf.getvalue(), "path": f"rec{i}.{fmt.lower()}"})
    struct = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    features = datasets.Features({"audio": struct, "label": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"audio": audio, "label": ["snore", "breathe"]}, features)
    (tmp_path / "ds").mkdir()
    ds.cast_column("audio", datasets.Audio(decode=False)).to_parquet(
        str(tmp_path / "ds/train.parquet")
    )
    source = HubAudioDataset(
        str(tmp_path / "ds"), splits={"train": "train"}, segment=Segment(hop_s=1.0, min_s=0.25)
    )
    source.use_clip_seconds(1.0)
    items = _windows(source)
    assert [(r.clip_id, type(r).__name__) for r in items] == [
        ("train/0/rec0.flac#t=0.00", "Clip"),
        ("train/0/rec0.flac#t=1.00", "Clip"),
        ("train/0/rec0.flac#t=2.00", "Clip"),
        ("train/0/rec0.flac#t=3.00", "SkippedClip"),  # 0.2 s left: under min_s
        ("train/1/rec1.ogg#t=0.00", "Clip"),
        ("train/1/rec1.ogg#t=1.00", "Clip"),
    ]
    assert [r.label for r in items] == ["snore"] * 4 + ["breathe"] * 2
    np.testing.assert_allclose(items[1].waveform, waves[0][:, SR : 2 * SR], atol=1e-4)
    assert items[5].waveform.shape == (1, SR // 2)
    assert source.size_hint("train") is None  # unknown until the rows are decoded


def test_the_data_module_sets_the_window_length_from_its_front_end(tmp_path):
    _folder(tmp_path, {"snore/a.wav": 5.0})
    for split in ("validation", "test"):
        _folder(tmp_path, {"snore/b.wav": 2.0}, split=split)
    dm = SleepSoundDataModule(
        source=AudioFolder(str(tmp_path), segment=Segment(hop_s=1.0)),
        features=LogMelFrontEnd(clip_seconds=2.0),
        classes=["snore"],
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.dataset("train")) == 4  # 2-s windows starting at 0, 1, 2 and 3 s
    assert len(dm.dataset("validation")) == 1
