"""The sources: DreamCatcher tarballs and trees, the hub download, folders, parquet, synthetic."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

import data.sources.dreamcatcher as dreamcatcher_module
from data.audio import SKIP_REASONS, check_waveform
from data.fixtures import MALFORMED_MEMBERS, malformed_member_name, write_dreamcatcher_archive
from data.sources import (
    DREAMCATCHER_LABELS,
    ArchiveError,
    AudioFolder,
    Clip,
    DatasetAccessError,
    DreamCatcher,
    HubAudioDataset,
    SkippedClip,
    Synthetic,
)
from data.sources.dreamcatcher import DEFAULT_REVISION, is_unsafe_member
from data.sources.synthetic import BANK_SAMPLES, Sound, breath_envelopes

PREFIX = "home/someone/datasets/DreamCatcher/extracted/2024-06-01/DreamCatcher-v1.0"
COUNTS = {"train": 12, "validation": 6, "test": 4}


@pytest.fixture(scope="module")
def corpus() -> Synthetic:
    return Synthetic(seed=3, clips_per_split=COUNTS)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, corpus: Synthetic) -> Path:
    root = tmp_path_factory.mktemp("dreamcatcher")
    # Deflated like the real tarballs (the default, level 0, only stores).
    return write_dreamcatcher_archive(root, corpus, prefix=PREFIX, malformed=True, compresslevel=6)


@pytest.fixture(params=["isal", "stdlib"])
def gzip_reader(request, monkeypatch) -> str:
    """Run a test with ISA-L's gzip reader (the default) and with the standard library's."""
    if request.param == "stdlib":
        monkeypatch.setattr(dreamcatcher_module, "_fast_gzip", None)
    assert dreamcatcher_module.gzip_module().__name__.endswith(
        "igzip" if request.param == "isal" else "gzip"
    )
    return request.param


def _records(source, split: str) -> list[Clip | SkippedClip]:
    return list(source.iter_clips(split))


def _wav(wave: np.ndarray, sr: int = 16000, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave.T, sr, subtype=subtype, format="WAV")
    return buf.getvalue()


# -- DreamCatcher ---------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_tarball_yields_every_clip_and_counts_every_bad_member(archive, corpus, split, gzip_reader):
    records = _records(DreamCatcher(root=str(archive)), split)
    clips = [r for r in records if isinstance(r, Clip)]
    skipped = [r for r in records if isinstance(r, SkippedClip)]

    kept_bad = [k for k, m in MALFORMED_MEMBERS.items() if m.source_reason is None]
    assert (len(kept_bad), len(skipped)) == (6, 5)  # the documented numbers per split
    assert len(clips) == COUNTS[split] + len(kept_bad)
    assert Counter(s.reason for s in skipped) == Counter(
        m.source_reason for m in MALFORMED_MEMBERS.values() if m.source_reason
    )
    assert all(s.reason in SKIP_REASONS for s in skipped)
    assert all(r.split == split for r in records)

    by_id = {c.clip_id: c for c in clips}
    for index in range(COUNTS[split]):
        expected = corpus.synthesize(split, index)
        member = f"{PREFIX}/data/{split}/{expected.label}/{corpus.clip_name(split, index)}.wav"
        clip = by_id[member]  # clip_id is the member path, long prefix included
        assert clip.label == expected.label
        assert clip.sample_rate == 16000
        assert clip.waveform.dtype == np.float32
        assert clip.waveform.shape == (2, 16000)
        np.testing.assert_allclose(clip.waveform, expected.waveform, atol=1 / 32768)

    # Decodable bad members are yielded; the cache's check gives the documented outcome.
    for key in kept_bad:
        clip = by_id[malformed_member_name(key, split, PREFIX)]
        assert clip.label == MALFORMED_MEMBERS[key].label
        assert (
            check_waveform(clip.waveform, clip.sample_rate) == MALFORMED_MEMBERS[key].cache_reason
        )
    assert by_id[malformed_member_name("mono", split, PREFIX)].waveform.shape[0] == 1
    assert by_id[malformed_member_name("rate_22050", split, PREFIX)].sample_rate == 22050
    reasons = {s.clip_id: s.reason for s in skipped}
    for key, member in MALFORMED_MEMBERS.items():
        if member.source_reason:
            assert reasons[malformed_member_name(key, split, PREFIX)] == member.source_reason


def test_order_is_stable_across_readers(archive):
    """Two readers yield the same records in the same order (what the cache's member-list
    hash of the ``clip_id`` sequence relies on)."""
    a, b = DreamCatcher(root=str(archive)), DreamCatcher(root=str(archive))
    ids_a = [r.clip_id for r in a.iter_clips("test")]
    ids_b = [r.clip_id for r in b.iter_clips("test")]
    assert ids_a == ids_b and len(ids_a) == COUNTS["test"] + len(MALFORMED_MEMBERS)


def test_unsafe_members_are_refused_and_never_extracted(tmp_path):
    wav = _wav(np.zeros((2, 8000), np.float32))
    tarball = tmp_path / "data" / "train.tar.gz"
    tarball.parent.mkdir()
    names = [
        "../../escape/data/train/quiet/a.wav",
        "/etc/data/train/quiet/b.wav",
        "x/data/train/quiet/../quiet/c.wav",
        "C:/x/data/train/quiet/d.wav",
        "x/data/train/quiet/ok.wav",
    ]
    with tarfile.open(tarball, "w:gz") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(wav)
            tar.addfile(info, io.BytesIO(wav))
        link = tarfile.TarInfo("x/data/train/quiet/link.wav")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    records = _records(DreamCatcher(root=str(tmp_path)), "train")
    assert [(r.clip_id, type(r).__name__) for r in records if isinstance(r, Clip)] == [
        ("x/data/train/quiet/ok.wav", "Clip")
    ]
    unsafe = [r.clip_id for r in records if isinstance(r, SkippedClip)]
    assert unsafe == [*names[:4], "x/data/train/quiet/link.wav"]
    assert all(r.reason == "unsafe_path" for r in records if isinstance(r, SkippedClip))
    assert not (tmp_path.parent / "escape").exists() and sorted(tmp_path.iterdir()) == [
        tmp_path / "data"
    ]
    assert is_unsafe_member("a/../b.wav") and not is_unsafe_member("a/..b/c.wav")


def test_extracted_tree_reads_like_the_tarball(archive, tmp_path):
    tree = tmp_path / "tree"
    with tarfile.open(archive / "data" / "train.tar.gz", "r:gz") as tar:
        safe = [m for m in tar.getmembers() if not is_unsafe_member(m.name)]
        tar.extractall(tree, members=safe, filter="data")
    from_tar = _records(DreamCatcher(root=str(archive)), "train")
    source = DreamCatcher(root=str(tree))
    from_tree = _records(source, "train")

    def clips(records):
        return {r.clip_id: r for r in records if isinstance(r, Clip)}

    def skips(records):
        return {(r.clip_id, r.reason) for r in records if isinstance(r, SkippedClip)}

    assert clips(from_tree).keys() == clips(from_tar).keys()
    for clip_id, clip in clips(from_tree).items():
        assert clip.label == clips(from_tar)[clip_id].label
        np.testing.assert_array_equal(clip.waveform, clips(from_tar)[clip_id].waveform)
    # Unsafe and wrong-split members never land in the tree's train folder.
    assert skips(from_tree) == {
        s for s in skips(from_tar) if s[1] not in ("unsafe_path", "wrong_split")
    }
    assert [r.clip_id for r in from_tree] == sorted(r.clip_id for r in from_tree)
    assert source.size_hint("train") == len(from_tree)
    assert source.fingerprint("train")["kind"] == "tree"
    with pytest.raises(FileNotFoundError, match="test"):
        _records(source, "test")


def test_fingerprint_is_cheap_stable_and_content_bound(archive, corpus, tmp_path):
    fp = DreamCatcher(root=str(archive)).fingerprint("train")
    assert fp["size"] == str((archive / "data" / "train.tar.gz").stat().st_size)
    # The writer is reproducible, so a rewrite (new mtime) keeps the fingerprint.
    again = write_dreamcatcher_archive(
        tmp_path / "a", corpus, splits=("train",), prefix=PREFIX, malformed=True, compresslevel=6
    )
    assert DreamCatcher(root=str(again)).fingerprint("train") == fp
    other = Synthetic(seed=4, clips_per_split=COUNTS)
    changed = write_dreamcatcher_archive(tmp_path / "b", other, splits=("train",), prefix=PREFIX)
    assert DreamCatcher(root=str(changed)).fingerprint("train") != fp
    # The default archive stores without deflating; it reads the same way.
    clips = _records(DreamCatcher(root=str(changed)), "train")
    assert [c.label for c in clips] == [c.label for c in other.iter_clips("train")]


def test_not_a_gzip_file_is_one_clear_error(tmp_path, gzip_reader):
    (tmp_path / "train.tar.gz").write_bytes(b"plain bytes, not gzip" * 100)
    with pytest.raises(ArchiveError, match="not a .tar.gz"):
        _records(DreamCatcher(root=str(tmp_path)), "train")


def test_truncated_tarball_is_one_clear_error_never_a_short_read(tmp_path, gzip_reader):
    source = Synthetic(seed=1, clips_per_split={"train": 4})
    data = write_dreamcatcher_archive(tmp_path / "full", source, splits=("train",)) / "data"
    whole = (data / "train.tar.gz").read_bytes()
    cut_root = tmp_path / "cut"
    cut_root.mkdir()
    outcomes = Counter()
    # Cut everywhere, inside members and inside headers: tarfile alone ends quietly
    # when a header is cut off, which would lose clips without a word.
    for cut in range(0, len(whole) - 8, len(whole) // 150):
        (cut_root / "train.tar.gz").write_bytes(whole[:cut])
        try:
            outcomes[len(_records(DreamCatcher(root=str(cut_root)), "train"))] += 1
        except ArchiveError as err:
            assert "truncated" in str(err) and "\n" not in str(err)
            outcomes["error"] += 1
    assert set(outcomes) == {"error"}


def test_hub_download_uses_the_pinned_revision(archive, monkeypatch, tmp_path):
    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(archive / kwargs["filename"])

    monkeypatch.setattr(dreamcatcher_module, "hf_hub_download", fake_download)
    source = DreamCatcher(download_dir=str(tmp_path))
    fp = source.fingerprint("validation")
    assert calls == []  # the fingerprint needs no download
    assert fp["revision"] == DEFAULT_REVISION and fp["filename"] == "data/validation.tar.gz"
    hub = [(r.clip_id, type(r).__name__) for r in source.iter_clips("validation")]
    local = [
        (r.clip_id, type(r).__name__)
        for r in DreamCatcher(root=str(archive)).iter_clips("validation")
    ]
    assert hub == local
    assert calls == [
        {
            "repo_id": "THU-PI-Sensing/DreamCatcher",
            "filename": "data/validation.tar.gz",
            "repo_type": "dataset",
            "revision": DEFAULT_REVISION,
            "token": None,
            "cache_dir": str(tmp_path),
        }
    ]


@pytest.mark.parametrize(
    ("error", "status"), [(GatedRepoError, 403), (HfHubHTTPError, 401), (HfHubHTTPError, 403)]
)
def test_refused_download_is_one_clear_error(monkeypatch, error, status):
    response = SimpleNamespace(status_code=status, headers={}, request=None)

    def refuse(**kwargs):
        raise error("Access to dataset is restricted", response=response)

    monkeypatch.setattr(dreamcatcher_module, "hf_hub_download", refuse)
    with pytest.raises(DatasetAccessError) as info:
        next(DreamCatcher().iter_clips("train"))
    message = str(info.value)
    assert "\n" not in message
    assert "HF_TOKEN" in message and "hf auth login" in message
    assert "huggingface.co/datasets/THU-PI-Sensing/DreamCatcher" in message


def test_other_hub_errors_are_not_disguised(monkeypatch):
    response = SimpleNamespace(status_code=500, headers={}, request=None)

    def fail(**kwargs):
        raise HfHubHTTPError("server error", response=response)

    monkeypatch.setattr(dreamcatcher_module, "hf_hub_download", fail)
    with pytest.raises(HfHubHTTPError):
        next(DreamCatcher().iter_clips("train"))


# -- AudioFolder ----------------------------------------------------------------------


def test_audio_folder(tmp_path):
    tone = np.sin(np.linspace(0, 200, 8000, dtype=np.float32))[None].repeat(2, 0) * 0.1
    files = {
        "train/snore/b.wav": _wav(tone),
        "train/quiet/A.FLAC": None,
        "train/quiet/c.Wav": _wav(tone[:1]),
        "train/quiet/broken.wav": b"not audio at all",
        "train/quiet/notes.txt": b"not audio: counted, never passed over unseen",
        "validation/breathe/d.wav": _wav(tone),
    }
    for rel, payload in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if payload is None:
            sf.write(path, tone.T, 16000, format="FLAC")
        else:
            path.write_bytes(payload)
    source = AudioFolder(str(tmp_path))
    assert source.labels == ("breathe", "quiet", "snore")
    records = _records(source, "train")
    assert [(r.clip_id, type(r).__name__) for r in records] == [
        ("train/quiet/A.FLAC", "Clip"),
        ("train/quiet/broken.wav", "SkippedClip"),
        ("train/quiet/c.Wav", "Clip"),
        ("train/quiet/notes.txt", "SkippedClip"),
        ("train/snore/b.wav", "Clip"),
    ]
    assert records[1].reason == "corrupt" and records[3].reason == "not_audio"
    assert [r.label for r in records] == ["quiet", "quiet", "quiet", "quiet", "snore"]
    assert records[0].waveform.shape == (2, 8000) and records[2].waveform.shape == (1, 8000)
    assert source.size_hint("train") == 5
    before = source.fingerprint("train")
    assert source.fingerprint("train") == before
    (tmp_path / "train/snore/e.wav").write_bytes(_wav(tone))
    assert source.fingerprint("train") != before
    with pytest.raises(FileNotFoundError):
        _records(source, "test")


#: Formats written by the tests: (soundfile format, subtype, file ending, lossless).
FORMATS = [
    ("WAV", "PCM_24", ".wav", True),
    ("FLAC", "PCM_16", ".flac", True),
    ("OGG", "VORBIS", ".ogg", False),
    ("OGG", "OPUS", ".opus", False),
    ("MP3", "MPEG_LAYER_III", ".mp3", False),
    ("AIFF", "PCM_16", ".aiff", True),
    ("CAF", "ALAC_16", ".caf", True),
    ("AU", "PCM_16", ".au", True),
    ("W64", "FLOAT", ".w64", True),
]


def _encoded(wave: np.ndarray, fmt: str, subtype: str) -> bytes | None:
    """``wave`` in ``fmt``, or ``None`` where this libsndfile cannot write it (MP3 < 1.1)."""
    buf = io.BytesIO()
    try:
        sf.write(buf, wave.T, 16000, format=fmt, subtype=subtype)
    except (ValueError, TypeError, sf.LibsndfileError):
        return None
    return buf.getvalue()


def _tone(seconds: float, channels: int = 2) -> np.ndarray:
    t = np.arange(int(seconds * 16000), dtype=np.float32) / 16000
    return (0.3 * np.sin(2 * np.pi * 440 * t))[None].repeat(channels, 0).astype(np.float32)


def test_audio_folder_reads_every_format_in_any_subfolder(tmp_path):
    tone = _tone(1.0)
    expected = {}
    for i, (fmt, subtype, ending, lossless) in enumerate(FORMATS):
        rel = (
            f"train/{'snore' if i % 2 else 'breathe'}/{'night/part/' if i % 3 else ''}x{i}{ending}"
        )
        payload = _encoded(tone, fmt, subtype)
        if payload is None:  # this libsndfile cannot write it: it must still be found
            payload = b"ID3\x04 not decodable here"
        expected[rel] = (lossless, payload.startswith(b"ID3\x04"))
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(payload)
    broken = {"train/snore/broken.mp3": b"ID3 but no frames", "train/snore/BROKEN.OGG": b"OggS" * 9}
    for rel, payload in broken.items():
        (tmp_path / rel).write_bytes(payload)
    (tmp_path / "train/snore/night/notes.txt").write_text("not audio: counted")
    sf.write(tmp_path / "train/loose.wav", tone.T, 16000)  # not in a label folder
    source = AudioFolder(str(tmp_path))
    assert source.labels == ("breathe", "snore")
    records = {r.clip_id: r for r in _records(source, "train")}
    assert len(records) == len(FORMATS) + 4 == source.size_hint("train")
    for rel, (lossless, undecodable) in expected.items():
        clip = records[rel]
        if undecodable:
            assert isinstance(clip, SkippedClip) and clip.reason == "corrupt"
            continue
        assert isinstance(clip, Clip), rel
        assert clip.label == rel.split("/")[1] and clip.sample_rate == 16000
        assert clip.waveform.shape[0] == 2
        if lossless:
            np.testing.assert_allclose(clip.waveform, tone, atol=1e-4)
        else:  # lossy codecs keep the length (within a frame) and the tone
            assert abs(clip.waveform.shape[1] - 16000) < 1200, rel
            spectrum = np.abs(np.fft.rfft(clip.waveform[0]))
            assert abs(np.argmax(spectrum) * 16000 / clip.waveform.shape[1] - 440) < 5, rel
    reasons = {k: r.reason for k, r in records.items() if isinstance(r, SkippedClip)}
    assert {k: reasons[k] for k in broken} == dict.fromkeys(broken, "corrupt")
    assert reasons["train/snore/night/notes.txt"] == "not_audio"
    assert reasons["train/loose.wav"] == "misplaced"


def test_predict_finds_every_format_and_names_what_it_passes_over(tmp_path, caplog):
    from data.features import LogMelFrontEnd
    from data.recordings import RecordingWindows
    from data.streaming import find_recordings

    expected = {}
    for fmt, subtype, ending, _ in FORMATS:
        payload = _encoded(_tone(2.0), fmt, subtype)
        path = (
            tmp_path / ("deep/er" if ending in (".mp3", ".caf") else "") / f"night{ending.upper()}"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload or b"ID3\x04 not decodable here")
        expected[path] = "ok" if payload is not None else "error"
    (tmp_path / "deep" / "broken.opus").write_bytes(b"OggS not really")
    expected[tmp_path / "deep" / "broken.opus"] = "error"
    (tmp_path / "notes.txt").write_text("not audio")
    (tmp_path / "deep" / "events.csv").write_text("onset,offset")
    with caplog.at_level("WARNING", logger="data.streaming"):
        found = find_recordings(tmp_path)
    assert sorted(found) == sorted(expected)
    assert "passed over 2 file(s)" in caplog.text and "notes.txt" in caplog.text
    items = list(RecordingWindows(tmp_path, LogMelFrontEnd(), batch_size=8))
    # An unreadable file is reported as the run goes on, never raised; the others are read.
    status = {Path(it["recording"]): it["info"]["status"] for it in items if it["last"]}
    assert status == expected


# -- HubAudioDataset (local parquet) --------------------------------------------------


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return datasets


def _write_parquet(datasets, path: Path, waves: list[np.ndarray], labels, label_feature) -> None:
    audio = [
        {"bytes": _wav(w) if w is not None else b"garbage", "path": f"c{i}.wav"}
        for i, w in enumerate(waves)
    ]
    # Encoding through Audio needs torchcodec; a plain struct cast to Audio does not.
    struct = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    features = datasets.Features({"audio": struct, "label": label_feature})
    ds = datasets.Dataset.from_dict({"audio": audio, "label": labels}, features=features)
    ds = ds.cast_column("audio", datasets.Audio(decode=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))


def test_hub_audio_dataset_on_local_parquet(tmp_path, datasets_cache):
    datasets = datasets_cache
    rng = np.random.default_rng(0)
    waves = [rng.uniform(-0.5, 0.5, (2, 4000)).astype(np.float32) for _ in range(3)]
    names = datasets.ClassLabel(names=["quiet", "breathe", "snore"])
    root = tmp_path / "ds"
    _write_parquet(
        datasets,
        root / "data" / "train-00000-of-00001.parquet",
        [*waves, None],
        [2, 0, 1, 0],
        names,
    )
    _write_parquet(datasets, root / "data" / "valid-00000-of-00001.parquet", waves[:1], [1], names)
    source = HubAudioDataset(str(root), splits={"train": "train", "validation": "valid"})
    assert source.labels == ("quiet", "breathe", "snore")
    records = _records(source, "train")
    assert [type(r).__name__ for r in records] == ["Clip", "Clip", "Clip", "SkippedClip"]
    assert [r.label for r in records] == ["snore", "quiet", "breathe", "quiet"]
    assert records[3].reason == "corrupt"
    assert records[0].clip_id == "train/0/c0.wav"
    for clip, wave in zip(records[:3], waves, strict=True):
        assert clip.sample_rate == 16000 and clip.waveform.dtype == np.float32
        np.testing.assert_allclose(clip.waveform, wave, atol=1 / 32768)
    assert [r.label for r in _records(source, "validation")] == ["breathe"]
    assert source.size_hint("train") == 4
    assert source.fingerprint("train") == HubAudioDataset(str(root)).fingerprint("train")
    with pytest.raises(FileNotFoundError):
        HubAudioDataset(str(root)).size_hint("test")


def test_hub_audio_dataset_with_string_labels(tmp_path, datasets_cache):
    datasets = datasets_cache
    wave = np.zeros((1, 1600), np.float32)
    root = tmp_path / "ds"
    _write_parquet(
        datasets, root / "train.parquet", [wave, wave], ["snore", "cough"], datasets.Value("string")
    )
    source = HubAudioDataset(str(root), splits={"train": "train"})
    assert source.labels == ("cough", "snore")
    assert [r.label for r in _records(source, "train")] == ["snore", "cough"]


def test_hub_audio_dataset_decodes_every_format(tmp_path, datasets_cache):
    datasets = datasets_cache
    tone = _tone(0.5)
    rows = [(f, e, _encoded(tone, f, s)) for f, s, e, _ in FORMATS]
    rows = [r for r in rows if r[2] is not None]
    audio = [{"bytes": payload, "path": f"x{ending}"} for _, ending, payload in rows]
    audio.append({"bytes": b"OggS not audio", "path": "bad.ogg"})
    struct = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    features = datasets.Features({"audio": struct, "label": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"audio": audio, "label": ["snore"] * len(audio)}, features)
    (tmp_path / "ds").mkdir()
    ds.cast_column("audio", datasets.Audio(decode=False)).to_parquet(
        str(tmp_path / "ds/train.parquet")
    )
    records = _records(HubAudioDataset(str(tmp_path / "ds"), splits={"train": "train"}), "train")
    assert [type(r).__name__ for r in records] == ["Clip"] * len(rows) + ["SkippedClip"]
    assert records[-1].reason == "corrupt" and records[-1].clip_id == f"train/{len(rows)}/bad.ogg"
    for record, (fmt, _, _) in zip(records, rows, strict=False):
        assert record.waveform.shape[0] == 2 and abs(record.waveform.shape[1] - 8000) < 1200, fmt


# -- Synthetic ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample() -> list[tuple[dict, np.ndarray]]:
    """Parameters and audio of 400 clips of another seed, for statistical properties."""
    source = Synthetic(seed=11, clips_per_split={"train": 400})
    return [
        (source.describe("train", i), c.waveform) for i, c in enumerate(source.iter_clips("train"))
    ]


def test_synthetic_is_deterministic_and_order_free(corpus):
    first = [c.waveform for c in corpus.iter_clips("validation")]
    again = Synthetic(seed=3, clips_per_split=COUNTS)
    # A clip alone, before any other of its split, equals the same clip in a full pass.
    np.testing.assert_array_equal(again.synthesize("validation", 4).waveform, first[4])
    np.testing.assert_array_equal(again.synthesize("validation", 0).waveform, first[0])
    other = Synthetic(seed=5, clips_per_split=COUNTS)
    assert not np.allclose(other.synthesize("validation", 4).waveform, first[4])
    assert not np.allclose(corpus.synthesize("test", 4).waveform, first[4])
    assert corpus.fingerprint("train") != other.fingerprint("train")


def test_synthetic_clip_format(corpus):
    clips = _records(corpus, "train")
    assert len(clips) == COUNTS["train"] == corpus.size_hint("train")
    for clip in clips:
        assert isinstance(clip, Clip) and clip.split == "train"
        assert clip.waveform.dtype == np.float32 and clip.waveform.shape == (2, 16000)
        assert clip.sample_rate == 16000 and clip.label in corpus.labels
        assert check_waveform(clip.waveform, clip.sample_rate) is None
        assert np.abs(clip.waveform).max() < 1.0
    assert set(corpus.labels) <= set(DREAMCATCHER_LABELS)


def _level_db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(x.astype(np.float64) ** 2) + 1e-20))


def test_synthetic_classes_follow_their_weights(sample):
    labels = Counter(info["label"] for info, _ in sample)
    order = [label for label, _ in labels.most_common()]
    assert order == ["quiet", "breathe", "snore", "non_wearer"]  # weights .4 .3 .2 .1


def test_partner_is_louder_outside_and_wearer_inside(sample):
    ratio: dict[str, list[float]] = {"quiet": [], "partner": [], "wearer": []}
    for info, wave in sample:
        if info["setup"] != "earable" or (info["label"] != "quiet" and info["snr_db"] < 10):
            continue
        key = {"quiet": "quiet", "non_wearer": "partner"}.get(info["label"], "wearer")
        ratio[key].append(_level_db(wave[1]) - _level_db(wave[0]))  # outer minus in-ear
    quiet, partner, wearer = (np.median(ratio[k]) for k in ("quiet", "partner", "wearer"))
    assert partner > 0 and partner > quiet + 3
    assert wearer < quiet - 3


def test_recording_setups_look_like_their_microphones(sample):
    """Half the wearer's clips are earable, the rest bedside microphones: a mono one
    duplicated (as predict duplicates a mono file), or two close ones that differ a little."""
    setups = Counter(info["setup"] for info, _ in sample)
    assert setups["earable"] > 100 and setups["mono"] > 60 and setups["stereo"] > 40
    for info, wave in sample:
        if info["label"] == "non_wearer":
            assert info["setup"] == "earable"  # a bedside mic cannot tell whose sound it is
        if info["setup"] == "mono":
            np.testing.assert_array_equal(wave[0], wave[1])
        if info["setup"] == "stereo":
            assert not np.array_equal(wave[0], wave[1])
            assert abs(_level_db(wave[0]) - _level_db(wave[1])) < 12


def _power_below_over_above(x: np.ndarray, hz: float = 750.0) -> float:
    power = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(x.size))) ** 2
    f = np.fft.rfftfreq(x.size, 1 / 16000)
    return float(power[(f > 40) & (f < hz)].sum() / power[f >= hz].sum())


def test_snores_carry_the_measured_spectral_balance(sample):
    """Palatal snores (most real ones) put far more power below 750 Hz than above it;
    tongue-base snores the other way round (Agrawal et al. 2002, in the module doc)."""
    kernel = {"palatal": [], "tongue": []}
    heard = {"palatal": [], "tongue": []}
    for info, wave in sample:
        if info["snore_type"] in kernel:
            kernel[info["snore_type"]].append(info["power_ratio"])
            if info["setup"] != "earable" and info["snr_db"] > 15:
                heard[info["snore_type"]].append(_power_below_over_above(wave[0]))
    assert 8 <= np.median(kernel["palatal"]) <= 100 and np.median(kernel["tongue"]) < 1.0
    assert len(heard["palatal"]) >= 5
    assert np.median(heard["palatal"]) > 3 * max(np.median(heard["tongue"] or [1.0]), 1.0)


def test_quiet_is_a_room_not_silence_and_level_does_not_give_the_class_away(sample):
    level = {"quiet": [], "snore": []}
    sources = Counter()
    for info, wave in sample:
        if info["label"] in level:
            level[info["label"]].append(_level_db(wave))
        if info["label"] == "quiet":
            assert _level_db(wave) > -100
            sources.update(s for s in info["room_sources"].split(",") if s)
    assert {"fan", "traffic"} <= set(sources)
    # The best single level threshold tells quiet from snore on fewer than 80 % of clips.
    q, s = np.array(level["quiet"]), np.array(level["snore"])
    best = max(((q < t).mean() + (s >= t).mean()) / 2 for t in np.concatenate([q, s]))
    assert best < 0.8


def test_snore_has_energy_at_its_pulse_fundamental(sample):
    ratios = []
    for info, wave in sample:
        if info["label"] != "snore" or info["snr_db"] < 10 or info["snore_type"] == "tongue":
            continue
        inear = wave[0].astype(np.float64)
        power = np.abs(np.fft.rfft(inear * np.hanning(inear.size))) ** 2  # 1 Hz bins
        f0 = info["f0_hz"]
        peak = power[int(f0 * 0.9) : int(f0 * 1.1) + 2].max()
        between = np.median(power[int(f0 * 1.35) : int(f0 * 1.65) + 1])
        ratios.append(peak / between)
    assert len(ratios) >= 10
    assert np.median(ratios) > 10


def test_breathing_is_modulated_and_quiet_is_steady(sample):
    def modulation(wave: np.ndarray) -> float:
        frames = wave[0, :16000].reshape(20, 800).astype(np.float64)
        level = 10 * np.log10(np.mean(frames**2, axis=1))
        return float(level.max() - level.min())

    spread: dict[str, list[float]] = {"quiet": [], "breathe": []}
    for info, wave in sample:
        if info["label"] == "quiet" or (info["label"] == "breathe" and info["snr_db"] > 10):
            spread[info["label"]].append(modulation(wave))
    assert np.median(spread["breathe"]) > np.median(spread["quiet"]) + 6


def test_the_sound_primitives_put_a_sound_where_its_emitter_is_loudest(corpus):
    """The public primitives the synthetic night drives: the wearer's snore is loudest in the
    ear, the partner's on the outer microphone; a bad sound is refused in one line."""
    bank = corpus.noise_banks("primitives")
    assert len(bank["white"]) == BANK_SAMPLES + corpus.padded_samples
    env = breath_envelopes((corpus.envelope_times / 4.0) % 1.0, 0.4, 0.4, 0.7)  # inhaling
    outer_minus_inear = {}
    for wearer in (True, False):
        wave = np.zeros((2, corpus.padded_samples), np.float32)
        sound = Sound("snore", 0.1, wearer, env)
        f0 = corpus.add_sound(np.random.default_rng(0), wave, bank, sound)
        assert 45.0 <= f0 <= 250.0
        outer_minus_inear[wearer] = _level_db(wave[1]) - _level_db(wave[0])
    assert outer_minus_inear[True] < 0 < outer_minus_inear[False]
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match="needs breathing envelopes"):
        corpus.add_sound(rng, wave, bank, Sound("breath", 0.1))
    with pytest.raises(ValueError, match="'gurgle'"):
        corpus.add_sound(rng, wave, bank, Sound("gurgle", 0.1, True, env))
