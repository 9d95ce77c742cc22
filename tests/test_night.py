"""Night-long prediction: streaming windows, events, summary, plot, writer, synthetic night.

Why about 790 lines: one night's path end to end (windows streamed from disk, the writer in
``Trainer.predict``, ``main.py predict``, the summary's words and the timeline's axis) shares
its fixtures and bad files; the streaming tests could move beside ``data/recordings.py`` in a
``tests/test_recordings.py``. Re-deriving from saved probabilities: ``tests/test_rederive.py``;
event scoring: ``tests/test_scoring.py``.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader, TensorDataset

from data.audio import resample
from data.features import LogMelFrontEnd
from data.recordings import RecordingWindows, ahead
from data.streaming import BlockResampler, StreamState, find_recordings, probe, read_blocks
from models.classifier import Classifier
from tests.helpers import build_like_cli, load_windows_whole, save_checkpoint
from util.callbacks.night import NightWriter
from util.night import (
    Event,
    PostProcessing,
    console_line,
    detect_events,
    evaluate_events,
    format_duration,
    hysteresis_runs,
    median_filter,
    plot_timeline,
    read_events_csv,
    resolve,
    snore_warning,
    summarize,
    time_axis,
    window_bounds,
)
from util.night.generate import night_plan, truth_events, write_night
from util.night.plot import stack_fractions
from util.night.probabilities import read_probabilities
from util.night.summary import timeline_title

CLASSES = ["quiet", "breathe", "snore"]
SR = 16000

# Lightning says both for every IterableDataset that feeds a prediction writer:
# __len__ is exact here (computed per process from the headers) and the writer uses
# the batch's own window indices, not Lightning's sampler indices.
LIGHTNING_NOISE = [
    "ignore:Your `IterableDataset` has `__len__` defined:UserWarning",
    "ignore:Couldn't infer the batch indices:UserWarning",
    "ignore:.*does not have many workers:UserWarning",
]


@contextlib.contextmanager
def repair_logged(text: str) -> Iterator[None]:
    """Assert that reading logs one ``data.streaming`` warning line containing ``text``."""
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("data.streaming")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert any(text in line and "\n" not in line for line in seen), seen


def _noise(seconds: float, channels: int = 2, seed: int = 0, sr: int = SR) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.05 * rng.standard_normal((channels, int(round(seconds * sr))))).astype(np.float32)


def _write(path: Path, wave: np.ndarray, sr: int = SR, subtype: str = "FLOAT") -> Path:
    sf.write(str(path), wave.T, sr, subtype=subtype)
    return path


@pytest.fixture(scope="module")
def front_end() -> LogMelFrontEnd:
    return LogMelFrontEnd()


@pytest.fixture(scope="module")
def model() -> Classifier:
    torch.manual_seed(0)
    return Classifier(num_classes=3, class_names=CLASSES).eval()


def _trainer(writer: NightWriter) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[writer],
    )


# -- events from probabilities ----------------------------------------------------


def test_events_from_a_constructed_probability_sequence():
    n, hop, window = 80, 0.5, 1.0
    probs = np.zeros((n, 3), np.float32)
    probs[:, 0] = 1.0
    snore = np.zeros(n, np.float32)
    snore[10:30] = 0.9
    snore[15] = 0.2  # a one-window dip below "off": two runs 0.5 s apart, merged
    snore[40:42] = 0.9  # 1.0 s long: dropped by min_duration_s=2
    snore[50:60] = 0.4  # above "off" but never reaches "on": no event
    breathe = np.zeros(n, np.float32)
    breathe[60:70] = 0.6
    breathe[70] = 0.35  # stays above "off": extends the event by one window
    probs[:, 2], probs[:, 1] = snore, breathe
    probs[:, 0] = 1.0 - snore - breathe
    duration = 40.3
    bounds = window_bounds(n, hop, window, duration)
    assert bounds[0] == 0.0 and bounds[1] == 0.75 and bounds[10] == 5.25 and bounds[-1] == duration
    events = detect_events(
        probs,
        CLASSES,
        bounds,
        PostProcessing(
            median_windows=1,
            on_threshold=0.5,
            off_threshold=0.3,
            min_duration_s=2.0,
            merge_gap_s=3.0,
        ),
    )
    assert [(e.start_s, e.end_s, e.label) for e in events] == [
        (5.25, 15.25, "snore"),
        (30.25, 35.75, "breathe"),
    ]
    assert events[0].mean_prob == pytest.approx((19 * 0.9 + 0.2) / 20)
    assert events[1].mean_prob == pytest.approx((10 * 0.6 + 0.35) / 11)
    # Without merging the dip splits the bout; a larger min duration then drops the 2.5 s half.
    split = detect_events(probs, CLASSES, bounds, PostProcessing(1, 0.5, 0.3, 3.0, 0.0))
    assert [(e.start_s, e.end_s) for e in split if e.label == "snore"] == [(8.25, 15.25)]


def test_exclusive_events_give_overlaps_to_the_priority_class():
    n = 60
    probs = np.zeros((n, 3), np.float32)
    probs[10:50, 1] = 0.45  # breathing throughout...
    probs[12:14, 1] = 0.7
    probs[20:30, 2] = 0.5  # ...with a snore bout in the middle
    probs[20:30, 1] = 0.45
    probs[22, 2] = 0.8
    probs[:, 0] = 1.0 - probs[:, 1] - probs[:, 2]
    bounds = window_bounds(n, 0.5, 1.0, 30.25)
    pp = PostProcessing(1, 0.6, 0.4, 1.0, 0.0)
    both = detect_events(probs, CLASSES, bounds, replace(pp, exclusive=False))
    assert [(e.start_s, e.end_s, e.label) for e in both] == [
        (5.25, 25.25, "breathe"),
        (10.25, 15.25, "snore"),
    ]
    cut = detect_events(probs, CLASSES, bounds, pp)  # exclusive, snore first
    assert [(e.start_s, e.end_s, e.label) for e in cut] == [
        (5.25, 10.25, "breathe"),
        (10.25, 15.25, "snore"),
        (15.25, 25.25, "breathe"),
    ]
    # A piece shorter than its class's minimum goes: the 5 s of breathing before the bout.
    short = detect_events(
        probs, CLASSES, bounds, replace(pp, min_duration_s={"breathe": 5.5, "default": 1.0})
    )
    assert [e.label for e in short] == ["snore", "breathe"]


def test_median_filter_removes_spikes_and_fills_dips():
    p = np.zeros((11, 1), np.float32)
    p[3] = 1.0  # lone spike
    p[6:11] = 1.0
    p[8] = 0.0  # lone dip
    out = median_filter(p, 3)[:, 0]
    assert out.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="odd"):
        median_filter(p, 4)


def test_hysteresis_extends_back_to_where_the_probability_rose_above_off():
    p = np.array([0.0, 0.35, 0.4, 0.6, 0.4, 0.35, 0.0, 0.45, 0.0])
    assert hysteresis_runs(p, on=0.5, off=0.3) == [(1, 6)]


def test_per_class_options_take_a_number_or_a_mapping_with_default():
    assert resolve(0.4, "snore", CLASSES, "x") == 0.4
    assert resolve({"snore": 10.0, "default": 3.0}, "snore", CLASSES, "x") == 10.0
    assert resolve({"snore": 10.0, "default": 3.0}, "breathe", CLASSES, "x") == 3.0
    with pytest.raises(ValueError, match="snroe"):
        resolve({"snroe": 1.0, "default": 3.0}, "snore", CLASSES, "merge_gap_s")


def test_post_processing_resolves_per_class_and_refuses_bad_settings():
    pp = PostProcessing(min_duration_s={"snore": 10.0, "default": 3.0}, background=["quiet"])
    assert pp.background == ("quiet",)
    assert pp.for_class("snore", CLASSES).min_duration_s == 10.0
    assert pp.for_class("breathe", CLASSES).thresholds() == {
        "on_threshold": 0.6,
        "off_threshold": 0.4,
        "min_duration_s": 3.0,
        "merge_gap_s": 20.0,
    }
    assert list(pp.describe(CLASSES)["per_class"]) == ["breathe", "snore"]  # quiet: background
    with pytest.raises(ValueError, match="median_windows"):
        PostProcessing(median_windows=4)
    with pytest.raises(ValueError, match="durations"):
        PostProcessing(merge_gap_s=-1.0).check(CLASSES)
    with pytest.raises(ValueError, match="no value for class 'breathe'"):
        PostProcessing(on_threshold={"snore": 0.7}).check(CLASSES)


def test_summary_numbers():
    bounds = window_bounds(7200, 0.5, 1.0, 3600.25)  # one hour
    smoothed = np.tile(np.array([[0.8, 0.1, 0.1]], np.float32), (7200, 1))
    events = [
        Event(600.0, 900.0, "snore", 0.9),
        Event(1500.0, 1560.0, "snore", 0.9),
        Event(2000.0, 2100.0, "breathe", 0.7),
    ]
    s = summarize(events, smoothed, CLASSES, bounds, 3600.25)
    assert s["duration_h"] == pytest.approx(3600.25 / 3600)
    assert s["snore"]["episodes"] == 2
    assert s["snore"]["episodes_per_hour"] == pytest.approx(2 / (3600.25 / 3600))
    assert s["snore"]["minutes"] == pytest.approx(6.0)
    assert s["snore"]["longest_episode_min"] == pytest.approx(5.0)
    assert s["snore"]["longest_snore_free_min"] == pytest.approx((3600.25 - 1560.0) / 60)
    assert s["event_minutes"]["breathe"] == pytest.approx(100 / 60)
    assert s["top_class_minutes"]["quiet"] == pytest.approx(3600.25 / 60)
    assert s["event_counts"] == {"breathe": 1, "snore": 2}
    no_snore = summarize(events[2:], smoothed[:, :2], CLASSES[:2], bounds, 3600.25)
    assert no_snore["snore"]["episodes"] is None


def test_a_short_recording_gets_no_rate_per_hour_and_lengths_that_do_not_round_to_zero():
    """The issue's file: a 4.75 s snore event in 8.7 s was "415.5 episodes/h" and "0 min"."""
    n = 16
    bounds = window_bounds(n, 0.5, 1.0, 8.7)
    smoothed = np.tile(np.array([[0.2, 0.2, 0.6]], np.float32), (n, 1))
    events = [Event(2.0, 6.75, "snore", 0.8)]
    s = summarize(events, smoothed, CLASSES, bounds, 8.7)
    assert s["snore"]["episodes"] == 1 and "episodes_per_hour" not in s["snore"]
    assert s["snore"]["episodes_per_hour_omitted"] == (
        "only for recordings of at least 1 h; this one is 8.7 s"
    )
    s["recording"], s["status"] = "/data/clip.wav", "ok"
    title = timeline_title("clip.wav", s)
    assert title == "clip.wav  ·  8.7 s  ·  snore: 4.8 s in 1 episode, longest free stretch 2.0 s"
    assert format_duration(29.0) == "29.0 s" and format_duration(750.0) == "12.5 min"
    assert format_duration(8 * 3600 + 300) == "8 h 05 min"
    hour = summarize(events, smoothed, CLASSES, window_bounds(n, 0.5, 1.0, 3600.0), 3600.0)
    assert hour["snore"]["episodes_per_hour"] == pytest.approx(1.0)
    assert "episodes_per_hour_omitted" not in hour["snore"]


def _summary_with(top_snore_min: float, event_snore_min: float) -> dict:
    summary = summarize([], np.zeros((0, 3), np.float32), CLASSES, np.array([0.0]), 600.0)
    summary.update(recording="night.wav", status="ok")
    summary["top_class_minutes"]["snore"] = top_snore_min
    summary["snore"]["minutes"] = event_snore_min
    summary["snore"]["episodes"] = 1 if event_snore_min else 0
    return summary


def test_console_line_and_the_warning_when_events_and_top_class_time_disagree():
    # Snore is the top class for 4.5 min but events cover nothing: thresholds too high.
    line = console_line(_summary_with(4.5, 0.0), "predictions/night")
    assert line == (
        "night: night.wav: 10.0 min, snore 0.0 s in 0 episodes, thresholds: defaults -> "
        "predictions/night; WARNING: snore is the top class for 4.5 min but its events cover "
        "0.0 s: on_threshold 0.6 may be too high for this model"
    )
    # Events twice the top-class time are normal (exhalations lean to breathe): no warning.
    assert snore_warning(_summary_with(2.0, 4.0)) is None
    assert console_line(_summary_with(2.0, 4.0), "out").endswith("thresholds: defaults -> out")
    assert "too low" in snore_warning(_summary_with(1.0, 4.0))
    assert snore_warning(_summary_with(0.02, 0.0)) is None  # 1.2 s: less than one event
    assert snore_warning(_summary_with(0.0, 0.0)) is None


def test_the_time_axis_fits_the_length():
    step, fmt, unit = time_axis(29.0)
    assert (step, unit, fmt(10.0)) == (2.0, "s", "10")
    step, fmt, unit = time_axis(13 * 60.0)
    assert (step, unit, fmt(90.0)) == (60.0, "mm:ss", "01:30")
    step, fmt, unit = time_axis(8 * 3600.0)
    assert (step, unit, fmt(3600 * 7 + 60 * 5 + 20)) == (1800.0, "hh:mm", "07:05")
    assert time_axis(119.0)[2] == "s" and time_axis(3599.0)[2] == "mm:ss"
    assert all(time_axis(d)[0] * 16 >= d for d in (5.0, 100.0, 1000.0, 3000.0, 20000.0))


def test_stacked_probabilities_fill_the_plot(tmp_path):
    """Smoothed rows that add up to 0.9 still fill the probability axes: no white anywhere in it."""
    from matplotlib.image import imread

    n = 57
    probs = np.full((n, 3), 0.3, np.float32)
    probs[20:30] = [0.1, 0.2, 0.5]  # 0.8
    path = tmp_path / "t.png"
    plot_timeline(path, probs, window_bounds(n, 0.5, 1.0, 29.0), [], CLASSES, title="29 s")
    img = imread(str(path))[:, :, :3]
    dark = (img < 0.3).all(axis=2)
    spines = np.flatnonzero(dark[:, 150:1400].mean(axis=1) > 0.8)  # the axes' frame lines
    top, bottom = spines[0], spines[1]
    sides = np.flatnonzero(dark[top + 5 : bottom - 5].mean(axis=0) > 0.8)
    left, right = sides[0], sides[-1]
    assert bottom - top > 200 and right - left > 1000
    white = (img[top + 1 : bottom, left + 1 : right] > 0.99).all(axis=2)
    assert white.sum() == 0
    np.testing.assert_allclose(stack_fractions(probs).sum(axis=1), 1.0, rtol=1e-6)


# -- streaming ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orig", "new"),
    [
        (44100, 16000),
        (22050, 16000),
        (8000, 16000),
        (48000, 16000),
        (11025, 16000),
        (96000, 16000),
        (32000, 16000),
    ],
)
def test_block_resampling_equals_resampling_the_whole_signal(orig, new):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 30011)).astype(np.float32)
    r = BlockResampler(orig, new)
    parts, i = [], 0
    while i < x.shape[1]:
        step = int(rng.integers(1, 7000))
        parts.append(r.push(x[:, i : i + step]))
        i += step
    parts.append(r.flush())
    got = np.concatenate(parts, axis=1)
    want = resample(x, orig, new)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("orig", [48000, 96000, 32000, 8000, 24000])
def test_the_phase_blocks_are_torchaudios_resampling_for_any_length(orig):
    r = BlockResampler(orig, 16000)
    assert r._phases is not None  # these rates take the matrix products, not torchaudio's conv
    rng = np.random.default_rng(2)
    for n in (1, 2, 3, 7, 100, 3 * orig + 7):
        x = rng.standard_normal((2, n)).astype(np.float32)
        got, want = r._resample(x), resample(x, orig, 16000)
        assert got.shape == want.shape, n
        np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("kind", ["stereo_16k", "stereo_44k1", "mono_16k"])
def test_streaming_windows_equal_the_whole_file(tmp_path, front_end, model, kind):
    wave = _noise(9.3, seed=2)
    if kind == "stereo_44k1":
        path = _write(tmp_path / "a.wav", resample(wave, SR, 44100), 44100)
    elif kind == "mono_16k":
        path = _write(tmp_path / "a.flac", wave[:1], subtype="PCM_24")
    else:
        path = _write(tmp_path / "a.wav", wave)
    # Small blocks and batches put block and batch seams everywhere.
    ds = RecordingWindows(path, front_end, hop_s=0.5, batch_size=4, block_s=0.7)
    if kind == "mono_16k":
        with repair_logged("duplicated"):
            items = list(ds)
    else:
        items = list(ds)
    assert len(items) == len(ds)
    assert [it["last"] for it in items] == [False] * (len(items) - 1) + [True]
    x = torch.cat([it["x"] for it in items])
    starts = torch.cat([it["start_s"] for it in items])
    index = torch.cat([it["index"] for it in items])
    ref_x, ref_starts = load_windows_whole(path, front_end, hop_s=0.5)
    assert x.shape == ref_x.shape == (17, 2, 64, 101)
    assert items[-1]["n_windows"] == 17 and items[-1]["info"]["status"] == "ok"
    assert index.tolist() == list(range(17))
    torch.testing.assert_close(starts, ref_starts)
    torch.testing.assert_close(x, ref_x, atol=1e-4, rtol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(
            model(x).softmax(1), model(ref_x).softmax(1), atol=1e-5, rtol=1e-4
        )
    if kind == "stereo_44k1":
        assert any("resampled from 44100" in r for r in items[-1]["info"]["repairs"])


@pytest.mark.parametrize(("suffix", "channels"), [(".wav", 2), (".flac", 2), (".wav", 1)])
def test_16_bit_pcm_blocks_are_soundfiles_floats_bit_for_bit(tmp_path, suffix, channels):
    # Every 16-bit value, both extremes included, across block seams.
    values = np.arange(-32768, 32768, dtype=np.int16)
    ints = np.stack([values, values[::-1]])[:channels].T.copy()
    path = tmp_path / f"every_value{suffix}"
    sf.write(path, ints, SR, subtype="PCM_16")
    info = probe(path)
    assert info.format.endswith("/PCM_16")
    got = np.concatenate(list(read_blocks(info, SR, block_s=0.3)), axis=1)
    want, _ = sf.read(path, dtype="float32", always_2d=True)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want.T)


@pytest.mark.parametrize("hop_s", [0.25, 0.5, 1.5])
def test_batches_cut_from_blocks_of_any_size_hold_the_signals_windows(tmp_path, front_end, hop_s):
    """Blocks smaller than a hop, larger than a batch, and every seam between: each
    batch's segment is exactly the signal's samples of its windows."""
    ds = RecordingWindows(
        _write(tmp_path / "a.wav", _noise(1.0)), front_end, hop_s=hop_s, batch_size=3
    )
    rng = np.random.default_rng(7)
    signal = rng.standard_normal((2, int(11.3 * SR))).astype(np.float32)
    cuts = np.cumsum(rng.integers(1, SR, 40))
    blocks = [b for b in np.split(signal, cuts[cuts < signal.shape[1]], axis=1) if b.shape[1]]
    got = list(ds._batches(iter(blocks)))
    n = 1 + (signal.shape[1] - SR) // ds.hop_samples
    assert [first for first, *_ in got] == list(range(0, n, 3))
    assert sum(count for _, _, count, _ in got) == n
    assert [last for *_, last in got] == [False] * (len(got) - 1) + [True]
    for first, segment, count, _ in got:
        begin = first * ds.hop_samples
        want = signal[:, begin : begin + (count - 1) * ds.hop_samples + SR]
        assert segment.is_contiguous() and np.array_equal(segment.numpy(), want)
        assert not np.shares_memory(segment.numpy(), signal)


def test_hop_and_window_timing(tmp_path, front_end):
    path = _write(tmp_path / "a.wav", _noise(10.0))
    items = list(RecordingWindows(path, front_end, hop_s=2.0, batch_size=3))
    starts = torch.cat([it["start_s"] for it in items]).tolist()
    assert starts == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert items[-1]["info"]["duration_s"] == pytest.approx(10.0)


def test_find_recordings_takes_a_file_a_folder_or_a_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    a = _write(tmp_path / "a.wav", _noise(0.1))
    b = _write(tmp_path / "sub" / "b.FLAC", _noise(0.1), subtype="PCM_16")
    (tmp_path / "notes.txt").write_text("not audio")
    assert find_recordings(a) == [a]
    assert find_recordings(tmp_path) == [a, b]
    assert find_recordings(str(tmp_path / "**" / "*.wav")) == [a]
    with pytest.raises(FileNotFoundError, match="no recordings"):
        find_recordings(tmp_path / "nothing*.wav")


def test_a_folder_is_read_through_its_links_and_a_dead_link_is_reported(tmp_path, front_end):
    elsewhere = tmp_path / "disk" / "2026-12-01"
    elsewhere.mkdir(parents=True)
    night = _write(elsewhere / "night.wav", _noise(3.0), subtype="PCM_16")
    nights = tmp_path / "nights"
    nights.mkdir()
    (nights / "2026-12-01").symlink_to(elsewhere)  # a night kept on another disk
    (nights / "again").symlink_to(elsewhere)  # the same folder twice: read once
    (elsewhere / "up").symlink_to(nights)  # a link back up: no loop
    (nights / "gone.wav").symlink_to(tmp_path / "unmounted" / "night.wav")
    found = find_recordings(nights)
    assert found == [nights / "2026-12-01" / "night.wav", nights / "gone.wav"]
    items = list(RecordingWindows(nights, front_end, batch_size=8))
    last = {Path(it["recording"]).name: it["info"] for it in items if it["last"]}
    assert last["night.wav"]["status"] == "ok"
    assert last["gone.wav"]["status"] == "error"
    assert "does not exist" in last["gone.wav"]["error"]
    assert "unmounted" in last["gone.wav"]["error"]
    assert night.exists()


def test_workers_split_recordings_never_a_recording(tmp_path, front_end):
    for i in range(3):
        _write(tmp_path / f"r{i}.wav", _noise(4.0 + i, seed=i))
    ds = RecordingWindows(tmp_path, front_end, batch_size=2)
    items = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert len(items) == len(ds)
    by_rec: dict[str, list[int]] = {}
    for it in items:
        by_rec.setdefault(it["recording"], []).extend(it["index"].tolist())
    assert {Path(k).name: v for k, v in by_rec.items()} == {
        f"r{i}.wav": list(range(2 * (4 + i) - 1)) for i in range(3)
    }
    assert sum(it["last"] for it in items) == 3


def test_prefetched_windows_are_the_same_items_in_the_same_order(tmp_path, front_end):
    for i in range(2):
        _write(tmp_path / f"r{i}.wav", _noise(5.0 + i, seed=i))
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunk")
    plain = list(RecordingWindows(tmp_path, front_end, batch_size=3, block_s=0.7))
    for threads in (1, 3):
        ahead_items = list(
            RecordingWindows(
                tmp_path, front_end, batch_size=3, block_s=0.7, prefetch=True,
                feature_threads=threads,
            )
        )  # fmt: skip
        assert [(it["recording"], it["index"].tolist(), it["last"]) for it in ahead_items] == [
            (it["recording"], it["index"].tolist(), it["last"]) for it in plain
        ]
        for a, b in zip(ahead_items, plain, strict=True):
            assert torch.equal(a["x"], b["x"]) and a["info"] == b["info"]
            assert a.get("n_windows") == b.get("n_windows")
    for bad in (0, "2", True):
        with pytest.raises(ValueError, match="feature_threads"):
            RecordingWindows(tmp_path, front_end, feature_threads=bad)
    assert not any(t.name == "earsleep-prefetch" for t in threading.enumerate())


def test_prefetch_raises_the_threads_error_and_stops_when_the_consumer_does():
    def boom():
        yield 1
        raise OSError("disk gone")

    got = ahead(boom())
    assert next(got) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(got)
    closed = []

    def endless():
        try:
            n = 0
            while True:
                n += 1
                yield n
        finally:
            closed.append(True)

    for n in ahead(endless()):
        if n == 5:
            break  # the consumer stops: the thread must stop and close its source
    assert closed == [True]
    assert not any(t.name == "earsleep-prefetch" for t in threading.enumerate())


def test_items_made_on_several_threads_come_in_order_and_errors_where_they_happened():
    import random
    import time

    made_on = set()

    def make(n):
        time.sleep(random.random() * 0.01)  # finish out of order
        made_on.add(threading.current_thread().name)
        if n == 7:
            raise ValueError("bad batch 7")
        return n * n

    got = ahead(iter(range(7)), make, threads=3)
    assert list(got) == [n * n for n in range(7)]
    assert all(name.startswith("earsleep-features") for name in made_on) and len(made_on) > 1
    got = ahead(iter(range(20)), make, threads=3)
    assert [next(got) for _ in range(7)] == [n * n for n in range(7)]
    with pytest.raises(ValueError, match="bad batch 7"):
        next(got)
    got.close()
    closed = []

    def endless():
        try:
            yield from itertools.count()
        finally:
            closed.append(True)

    for n in ahead(endless(), make, threads=2):
        if n == 16:
            break
    assert closed == [True]
    time.sleep(0.05)
    assert not any(t.name.startswith("earsleep-") for t in threading.enumerate())


def test_the_engine_gives_the_model_a_thread_fewer_when_features_run_ahead(
    tmp_path, model, monkeypatch
):
    import types

    from data.recordings import recordings_loader
    from util.callbacks import engine as engine_module
    from util.callbacks.engine import PredictEngine, model_threads

    path = _write(tmp_path / "n.wav", _noise(3.0))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        loaders = {
            on: recordings_loader(path, LogMelFrontEnd(), prefetch=on) for on in (True, False)
        }
        trainer = {on: types.SimpleNamespace(predict_dataloaders=ld) for on, ld in loaders.items()}
        assert model_threads(trainer[True]) == 1 and model_threads(trainer[False]) == 2
        torch.set_num_threads(1)
        assert model_threads(trainer[True]) == 1  # never fewer than one
        # workers run ahead on their own: no thread in the main process
        with_workers = recordings_loader(path, LogMelFrontEnd(), num_workers=1, prefetch=True)
        assert not with_workers.dataset.prefetch
        torch.set_num_threads(2)
        engine = PredictEngine("onnxruntime")
        engine.on_predict_start(trainer[True], model)
        assert model.predict_runner is not None
        assert loaders[True].dataset.channels_last is False  # ONNX Runtime takes NCHW
        assert torch.get_num_threads() == 1  # PyTorch leaves the feature thread its core
        engine.on_predict_end(trainer[True], model)
        assert torch.get_num_threads() == 2
        # The TinyCNN's pieces run side by side: on every core by default, one intra-op
        # thread each; a --threads number (handed over by the CLI) or workers: N instead.
        monkeypatch.setattr(engine_module, "available_cores", lambda: 3)
        # So are the features, each batch on one of feature_threads (same auto rule).
        for kwargs, requested, want, features in (
            ({}, None, 3, 3),
            ({}, 2, 2, 2),
            ({"workers": 1}, None, 1, 3),
            ({"feature_threads": 1}, None, 3, 1),
        ):
            engine = PredictEngine("onnxruntime", **kwargs)
            engine.threads_requested = requested
            engine.on_predict_start(trainer[True], model)
            assert model.predict_runner.workers == want
            assert loaders[True].dataset.feature_threads == features
            intra_op = 1 if want > 1 else model_threads(trainer[True])
            assert engine.ran_with == {
                "runner": "SharedWindowRunner",
                "threads": intra_op,
                "workers": want,
                "feature_threads": features,
            }
            engine.on_predict_end(trainer[True], model)
            assert not any(t.name.startswith("earsleep-model") for t in threading.enumerate())
        engine = PredictEngine("onnxruntime")
        engine.on_predict_start(trainer[False], model)  # nothing runs ahead without prefetch
        assert engine.ran_with["feature_threads"] == 0
        engine.on_predict_end(trainer[False], model)
        for name in ("workers", "feature_threads"):
            for bad in (0, -1, "many", True):
                with pytest.raises(ValueError, match=f"predict_engine.{name}"):
                    PredictEngine(**{name: bad})
    finally:
        torch.set_num_threads(previous)


# -- bad input ------------------------------------------------------------------


def _bad_files(folder: Path) -> dict[str, str]:
    """Write one file per fault; return the status each must get."""
    good = _noise(6.0, seed=3)
    _write(folder / "good.wav", good, subtype="PCM_16")
    (folder / "unreadable.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunk" + bytes(range(256)))
    (folder / "zero_bytes.wav").write_bytes(b"")
    _write(folder / "no_frames.wav", good[:, :0], subtype="PCM_16")
    raw = _write(folder / "full.wav", _noise(8.0, seed=4), subtype="PCM_16").read_bytes()
    (folder / "full.wav").unlink()
    (folder / "truncated.wav").write_bytes(raw[: len(raw) - 4 * SR * 2 * 2])  # 4 s of data cut
    raw = _write(folder / "full.flac", _noise(8.0, seed=5), subtype="PCM_16").read_bytes()
    (folder / "full.flac").unlink()
    (folder / "cut.flac").write_bytes(raw[: len(raw) // 2])
    _write(folder / "too_short.wav", good[:, : SR // 2], subtype="PCM_16")
    _write(folder / "three_channels.wav", np.concatenate([good, good[:1]]), subtype="PCM_16")
    return {
        "good.wav": "ok",
        "unreadable.wav": "error",
        "zero_bytes.wav": "error",
        "no_frames.wav": "error",
        "truncated.wav": "truncated",
        "cut.flac": "partial",
        "too_short.wav": "too_short",
        "three_channels.wav": "error",
    }


def test_bad_recordings_are_reported_and_the_others_processed(tmp_path, front_end):
    expected = _bad_files(tmp_path)
    ds = RecordingWindows(tmp_path, front_end, batch_size=8)
    items = list(ds)
    assert len(items) <= len(ds)  # exact for intact files; the cut FLAC's header promises more
    last = {Path(it["recording"]).name: it for it in items if it["last"]}
    assert {k: v["info"]["status"] for k, v in last.items()} == expected
    assert last["truncated.wav"]["n_windows"] == 7  # 4 s of the promised 8 s
    assert "promises 8.0 s" in last["truncated.wav"]["info"]["error"]
    assert "3 channels" in last["three_channels.wav"]["info"]["error"]
    assert "zero-length" in last["no_frames.wav"]["info"]["error"]
    for name, item in last.items():
        assert name in (item["info"]["error"] or name)  # every message names its file
    assert probe(tmp_path / "good.wav").declared_frames is None


@pytest.mark.parametrize("block_s", [30.0, 1.0])
def test_a_cut_flac_keeps_every_sample_decoded_before_the_damage(tmp_path, block_s):
    wave = _noise(8.0, seed=5)
    raw = _write(tmp_path / "full.flac", wave, subtype="PCM_16").read_bytes()
    intact, _ = sf.read(str(tmp_path / "full.flac"), dtype="float32", always_2d=True)
    cut = tmp_path / "cut.flac"
    cut.write_bytes(raw[: len(raw) // 2])  # noise hardly compresses: about 4 s are left
    state = StreamState()
    got = np.concatenate(list(read_blocks(probe(cut), SR, block_s=block_s, state=state)), axis=1)
    assert "read error after" in state.error and "cut.flac" in state.error
    # the whole 8-s file is one 30-s block: the samples before the damage in that block
    # are kept, not dropped with it, and they are the file's own
    assert got.shape[1] >= 3 * SR, got.shape
    np.testing.assert_array_equal(got, intact[: got.shape[1]].T)
    assert state.samples == got.shape[1]


def test_more_than_two_channels_can_keep_the_first_two(tmp_path, front_end):
    wave = _noise(3.0, channels=3)
    path = _write(tmp_path / "three.wav", wave)
    with repair_logged("kept channels 0 and 1"):
        items = list(RecordingWindows(path, front_end, extra_channels="first_two"))
    two = list(RecordingWindows(_write(tmp_path / "two.wav", wave[:2]), front_end))
    torch.testing.assert_close(items[-1]["x"], two[-1]["x"])


def test_nonfinite_samples_are_zeroed_and_counted(tmp_path, front_end):
    wave = _noise(3.0)
    wave[:, 100:150] = np.nan
    path = _write(tmp_path / "nan.wav", wave)
    with repair_logged("non-finite"):
        items = list(RecordingWindows(path, front_end))
    assert items[-1]["info"]["nonfinite_samples"] == 100
    assert torch.isfinite(items[-1]["x"]).all()


def test_absurd_float_samples_are_zeroed_and_counted_and_loud_ones_kept(tmp_path, front_end):
    wave = _noise(3.0)
    wave[:, 16000:16040] = 1e25  # finite, but its power spectrum overflows float32
    with repair_logged("non-finite"):
        items = list(RecordingWindows(_write(tmp_path / "damaged.wav", wave), front_end))
    assert items[-1]["info"]["nonfinite_samples"] == 80
    assert all(torch.isfinite(it["x"]).all() for it in items)
    # a float file that kept the integer scale (±32768) is loud, not damaged: untouched
    loud = list(RecordingWindows(_write(tmp_path / "loud.wav", _noise(3.0) * 32768), front_end))
    assert loud[-1]["info"].get("nonfinite_samples", 0) == 0
    assert all(torch.isfinite(it["x"]).all() for it in loud)


# -- the writer in a real Trainer.predict ---------------------------------------------


@pytest.mark.filterwarnings(*LIGHTNING_NOISE)
def test_writer_writes_events_summary_and_timeline_and_reports_bad_files(
    tmp_path, front_end, model, caplog
):
    audio = tmp_path / "audio"
    audio.mkdir()
    expected = _bad_files(audio)
    write_night(audio / "night.wav", hours=3 / 60, seed=1, scale=0.05)
    expected["night.wav"] = "ok"
    out = tmp_path / "out"
    writer = NightWriter(
        output_dir=str(out),
        postprocessing=PostProcessing(min_duration_s={"snore": 2.0, "default": 1.0}),
    )
    ds = RecordingWindows(audio, front_end, batch_size=64)
    with caplog.at_level("INFO"):
        _trainer(writer).predict(model, DataLoader(ds, batch_size=None), return_predictions=False)

    for stem in ("night", "good", "truncated"):
        assert {p.name for p in (out / stem).iterdir()} == {
            "events.csv",
            "probabilities.parquet",
            "summary.json",
            "timeline.png",
        }
    summary = json.loads((out / "night" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["duration_s"] == pytest.approx(180.0)
    assert summary["n_windows"] == 359
    # Under an hour: no episodes per hour, and the summary says why.
    assert "episodes_per_hour" not in summary["snore"]
    assert "at least 1 h" in summary["snore"]["episodes_per_hour_omitted"]
    assert summary["postprocessing"]["source"] == "options"  # min_duration_s was given
    assert summary["files"]["probabilities"] == "probabilities.parquet"

    # The window probabilities, as any Parquet reader sees them: times and one column per class.
    table = pq.read_table(out / "night" / "probabilities.parquet")
    assert table.column_names == ["start_s", "end_s", *CLASSES]
    assert [str(table.schema.field(c).type) for c in CLASSES] == ["float"] * 3
    start = table.column("start_s").to_numpy()
    np.testing.assert_array_equal(start, np.arange(359) * 0.5)
    np.testing.assert_array_equal(table.column("end_s").to_numpy(), start + 1.0)
    x = torch.cat([it["x"] for it in RecordingWindows(audio / "night.wav", front_end)])
    with torch.inference_mode():
        expected_probs = model(x).softmax(1).numpy()
    saved = np.stack([table.column(c).to_numpy() for c in CLASSES], axis=1)
    np.testing.assert_allclose(saved, expected_probs, atol=1e-5)
    night = read_probabilities(out / "night" / "probabilities.parquet")
    assert (night.hop_s, night.window_s, night.duration_s) == (0.5, 1.0, pytest.approx(180.0))
    assert night.class_names == CLASSES and night.model == summary["model"]
    assert night.postprocessing == writer.postprocessing
    assert night.recording == str(audio / "night.wav")

    # One console line per recording when prediction ends; the untrained model's snore
    # probabilities sit below "on" while snore is often the top class: a warning says so.
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("night: ")]
    by_name = {line.split(":")[1].strip().split(" ")[0]: line for line in lines}
    assert set(by_name) >= {"night.wav", "good.wav", "truncated.wav", "too_short.wav"}
    assert by_name["night.wav"].startswith(
        f"night: night.wav: 3.0 min, snore {summary['snore']['minutes'] * 60:.1f} s in "
    )
    assert f"thresholds: options -> {out / 'night'}" in by_name["night.wav"]
    assert by_name["truncated.wav"].startswith("night: truncated.wav (truncated): 4.0 s, snore")
    top_s = summary["top_class_minutes"]["snore"] * 60
    assert top_s >= 2.0 and summary["snore"]["minutes"] * 60 < top_s / 2
    assert "; WARNING: snore is the top class for" in by_name["night.wav"]
    assert summary["warnings"] == [by_name["night.wav"].split("WARNING: ")[1]]
    assert summary["model"]["backbone"] == "TinyCNN"
    assert summary["model"]["class_names"] == CLASSES
    assert summary["model"]["feature_config_hash"] == front_end.config_hash()
    assert summary["postprocessing"]["per_class"]["snore"]["min_duration_s"] == 2.0
    assert sum(summary["top_class_minutes"].values()) == pytest.approx(3.0)
    with open(out / "night" / "events.csv") as f:
        assert next(csv.reader(f)) == ["start_s", "end_s", "label", "mean_prob"]
    for e in read_events_csv(out / "night" / "events.csv"):
        assert 0 <= e.start_s < e.end_s <= 180.0 and e.label in ("breathe", "snore")

    short = json.loads((out / "too_short" / "summary.json").read_text())
    assert short["status"] == "too_short" and short["n_windows"] == 0
    assert short["files"]["timeline"] is None
    assert not (out / "unreadable").exists()
    with open(out / "recordings.csv") as f:
        rows = {Path(r["recording"]).name: r for r in csv.DictReader(f)}
    assert {k: r["status"] for k, r in rows.items()} == expected
    errors = {Path(e["recording"]).name: e for e in json.loads((out / "errors.json").read_text())}
    assert set(errors) == {k for k, v in expected.items() if v != "ok"}
    for name, e in errors.items():
        assert name in e["error"]


@pytest.mark.filterwarnings(*LIGHTNING_NOISE)
def test_writer_ignores_batches_that_are_not_recording_windows(tmp_path, model):
    data = TensorDataset(torch.randn(8, 2, 64, 101), torch.zeros(8, dtype=torch.long))
    out = tmp_path / "out"
    preds = _trainer(NightWriter(output_dir=str(out))).predict(
        model, DataLoader(data, batch_size=4)
    )
    assert len(preds) == 2 and not out.exists()


def test_writer_checks_thresholds_before_predicting(model):
    writer = NightWriter(postprocessing=PostProcessing(on_threshold=0.3, off_threshold=0.5))
    with pytest.raises(ValueError, match="off_threshold <= on_threshold"):
        writer.on_predict_start(None, model)
    named_like_a_column = Classifier(num_classes=3, class_names=["quiet", "start_s", "snore"])
    with pytest.raises(ValueError, match="cannot be columns of probabilities.parquet"):
        NightWriter().on_predict_start(None, named_like_a_column)


# -- the synthetic night and the summary against its truth ------------------------


def test_night_plan_is_contiguous_deterministic_and_sleep_like():
    plan = night_plan(8.0, seed=0)
    assert plan == night_plan(8.0, seed=0) and plan != night_plan(8.0, seed=1)
    assert plan[0].start_s == 0 and plan[-1].end_s == 8 * 3600
    assert all(a.end_s == b.start_s for a, b in zip(plan, plan[1:], strict=False))
    bouts = [s for s in plan if s.kind == "snore"]
    assert len(bouts) >= 3
    assert all(5 * 60 <= s.end_s - s.start_s <= 60 * 60 for s in bouts[:-1])
    after = {plan[i + 1].kind for i, s in enumerate(plan[:-1]) if s.kind == "snore"}
    assert after == {"breath"}  # breathing between bouts
    kinds = {s.kind for s in plan}
    assert {"quiet", "breath", "snore"} <= kinds and kinds & {
        "partner_snore",
        "partner_breath",
        "partner_cough",
    }


def test_synthetic_night_file_and_truth(tmp_path):
    audio, truth, plan = write_night(tmp_path / "n.wav", hours=40 / 3600, seed=3, scale=0.02)
    info = sf.info(str(audio))
    assert (info.samplerate, info.channels, info.frames) == (SR, 2, 40 * SR)
    with open(truth) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["start_s", "end_s", "label", "kind", "snr_db"]
    assert [(float(r["start_s"]), float(r["end_s"]), r["label"]) for r in rows] == [
        (e.start_s, e.end_s, e.label) for e in truth_events(plan)
    ]
    again, _, _ = write_night(tmp_path / "m.wav", hours=40 / 3600, seed=3, scale=0.02)
    assert audio.read_bytes() == again.read_bytes()
    wave, _ = sf.read(str(audio), dtype="float32")
    assert np.isfinite(wave).all() and np.abs(wave).max() < 1.0


def test_the_night_generator_runs_as_a_module(tmp_path, capsys):
    from util.night import generate

    out = tmp_path / "night.wav"
    generate.main(["--hours", str(20 / 3600), "--out", str(out), "--seed", "2", "--scale", "0.02"])
    assert sf.info(str(out)).duration == pytest.approx(20.0)
    assert out.with_suffix(".csv").is_file()
    assert f"wrote {out}" in capsys.readouterr().out


def _truth_probabilities(plan, class_names, n_windows, hop_s, window_s) -> np.ndarray:
    """Confident window probabilities from the truth: the label at each window's centre."""
    centres = np.arange(n_windows) * hop_s + window_s / 2
    probs = np.full((n_windows, len(class_names)), 0.05, np.float32)
    starts = np.array([s.start_s for s in plan])
    for k, c in enumerate(centres):
        seg = plan[int(np.searchsorted(starts, c, side="right")) - 1]
        probs[k, class_names.index(seg.label)] = 0.9
    return probs / probs.sum(axis=1, keepdims=True)


def test_summary_matches_the_synthetic_nights_truth():
    """Summary maths on truth-derived probabilities: every boundary within half a hop.

    Tolerance: each event edge moves by at most 0.25 s (half the hop), so snore minutes
    agree within 0.5 s per episode and the longest snore-free stretch within 0.5 s.
    """
    classes = ["quiet", "breathe", "snore", "non_wearer"]
    hours, hop, window = 2.0, 0.5, 1.0
    plan = night_plan(hours, seed=5, scale=0.5)
    duration = plan[-1].end_s
    n = int((duration - window) // hop) + 1
    probs = _truth_probabilities(plan, classes, n, hop, window)
    bounds = window_bounds(n, hop, window, duration)
    events = detect_events(probs, classes, bounds, PostProcessing(5, 0.5, 0.3, 0.5, 0.0))
    truth = [Event(s.start_s, s.end_s, s.label) for s in truth_events(plan)]
    summary = summarize(events, median_filter(probs, 5), classes, bounds, duration)

    bouts = [e for e in truth if e.label == "snore"]
    assert summary["snore"]["episodes"] == len(bouts) >= 2
    assert summary["snore"]["episodes_per_hour"] == pytest.approx(len(bouts) / hours)
    truth_minutes = sum(e.duration_s for e in bouts) / 60
    assert abs(summary["snore"]["minutes"] - truth_minutes) <= 0.5 * len(bouts) / 60
    edges = [0.0] + [x for e in bouts for x in (e.start_s, e.end_s)] + [duration]
    free = max(b - a for a, b in zip(edges[0::2], edges[1::2], strict=True)) / 60
    assert abs(summary["snore"]["longest_snore_free_min"] - free) <= 0.5 / 60
    for label in ("breathe", "snore", "non_wearer"):  # every event found, edges within 0.25 s
        ref = sorted((e for e in truth if e.label == label), key=lambda e: e.start_s)
        found = [e for e in events if e.label == label]
        assert len(found) == len(ref) > 0, label
        for r, e in zip(ref, found, strict=True):
            assert (
                abs(e.start_s - r.start_s) <= 0.25 + 1e-9 and abs(e.end_s - r.end_s) <= 0.25 + 1e-9
            )


def test_timeline_png(tmp_path):
    n = 8 * 3600 * 2
    t = np.arange(n) / 7200.0
    snore = (np.sin(2 * np.pi * t) > 0.6).astype(np.float32) * 0.8
    probs = np.stack([1 - snore - 0.1, np.full(n, 0.1, np.float32), snore], 1)
    bounds = window_bounds(n, 0.5, 1.0, n * 0.5 + 0.5)
    events = detect_events(probs, CLASSES, bounds)
    path = tmp_path / "timeline.png"
    plot_timeline(path, probs, bounds, events, CLASSES, title="a night")
    from matplotlib.image import imread

    assert imread(str(path)).shape[:2] == (600, 1600)


# -- main.py predict ----------------------------------------------------------------


def _checkpoint(path: Path) -> Path:
    """A TinyCNN checkpoint as ``main.py fit`` would write it (weights untrained)."""
    torch.manual_seed(0)
    model = build_like_cli(
        Classifier, "models.backbones.TinyCNN", num_classes=3, class_names=CLASSES
    )
    return save_checkpoint(model, path)


@pytest.mark.filterwarnings(*LIGHTNING_NOISE)
def test_main_predict_writes_a_timeline_per_recording(tmp_path):
    from main import main

    root = Path(__file__).resolve().parents[1]
    audio = tmp_path / "audio"
    write_night(audio / "night.wav", hours=2 / 60, seed=2, scale=0.05)
    _write(audio / "broken.wav", _noise(1.0)).write_bytes(b"RIFF....WAVEjunk")
    out = tmp_path / "predictions"
    ckpt = _checkpoint(tmp_path / "tiny.ckpt")
    cli = main(
        [
            "predict",
            "--config", str(root / "config" / "demo.yaml"),
            "--ckpt_path", str(ckpt),
            "--data.predict_audio", str(audio),
            "--data.cache_dir", str(tmp_path / "cache"),
            "--night.output_dir", str(out),
            "--night.postprocessing.min_duration_s", "{snore: 5.0, default: 3.0}",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "log"),
            "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip
    assert {p.name for p in (out / "night").iterdir()} == {
        "events.csv",
        "probabilities.parquet",
        "summary.json",
        "timeline.png",
    }
    summary = json.loads((out / "night" / "summary.json").read_text())
    assert summary["duration_s"] == pytest.approx(120.0)
    assert summary["model"]["checkpoint"] == str(ckpt.resolve())
    assert summary["postprocessing"]["per_class"]["snore"]["min_duration_s"] == 5.0
    errors = json.loads((out / "errors.json").read_text())
    assert [Path(e["recording"]).name for e in errors] == ["broken.wav"]
    assert not (tmp_path / "cache").exists()  # recordings need no spectrogram cache
    # The writer has the outputs; Lightning keeps none of them (memory flat over a night).
    assert not any(cli.trainer.predict_loop.predictions)


@pytest.mark.filterwarnings(*LIGHTNING_NOISE)
def test_main_predict_exits_1_when_no_recording_could_be_read(tmp_path, capsys):
    from util.cli import cli

    root = Path(__file__).resolve().parents[1]
    audio = tmp_path / "audio"
    audio.mkdir()
    (audio / "a.wav").write_bytes(b"RIFF....WAVEjunk")
    (audio / "b.wav").write_bytes(b"")
    out = tmp_path / "predictions"
    command = [
        "predict",
        "--config", str(root / "config" / "demo.yaml"),
        "--ckpt_path", str(_checkpoint(tmp_path / "tiny.ckpt")),
        "--data.predict_audio", str(audio),
        "--night.output_dir", str(out),
        "--trainer.logger", "false",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    assert cli(command) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: no recording could be read: ")
    assert "a.wav" in line and "(and 1 more)" in line and str(out / "errors.json") in line
    # what was learnt about each file is still written
    errors = json.loads((out / "errors.json").read_text())
    assert sorted(Path(e["recording"]).name for e in errors) == ["a.wav", "b.wav"]
    # one readable recording among them: the run succeeds (the bad one is reported)
    write_night(audio / "night.wav", hours=1 / 60, seed=2, scale=0.05)
    assert cli(command) == 0
    assert (out / "night" / "summary.json").exists()


# -- slow: a trained model end to end ---------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings(*LIGHTNING_NOISE)
def test_a_trained_tiny_model_finds_the_snoring_in_a_synthetic_night(tmp_path):
    """Fit the demo TinyCNN (8 epochs of 4000 clips) on the synthetic corpus, predict a 20-minute night.

    Such a model is still weak (validation macro-F1 about 0.8), so the bar is the snore
    minutes within 25 % of the truth and event-level snore F1 of at least 0.5 with a
    5 s onset collar and a max(2 s, 20 %) offset collar.
    """
    from main import main

    root = Path(__file__).resolve().parents[1]
    fit = main(
        [
            "fit",
            "--config", str(root / "config" / "demo.yaml"),
            "--data.source.init_args.clips_per_split", '{"train": 4000, "validation": 400, "test": 64}',
            "--data.cache_dir", str(tmp_path / "cache"),
            "--data.progress", "false",
            "--trainer.max_epochs", "8",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "log"),
            "--trainer.enable_progress_bar", "false",
            "--leaderboard.path", str(tmp_path / "leaderboard.csv"),
            "--latency.runs", "5",
        ]
    )  # fmt: skip
    best = fit.trainer.checkpoint_callback.best_model_path
    model = type(fit.model).load_from_checkpoint(best, map_location="cpu").eval()
    audio, truth_csv, plan = write_night(tmp_path / "night.wav", hours=1 / 3, seed=11, scale=0.25)
    out = tmp_path / "out"
    ds = RecordingWindows(audio, fit.datamodule.features, batch_size=256)
    _trainer(NightWriter(output_dir=str(out))).predict(
        model, DataLoader(ds, batch_size=None), ckpt_path=None, return_predictions=False
    )
    summary = json.loads((out / "night" / "summary.json").read_text())
    truth = [e for e in read_events_csv(truth_csv) if e.label == "snore"]
    truth_minutes = sum(e.duration_s for e in truth) / 60
    assert summary["snore"]["minutes"] == pytest.approx(truth_minutes, rel=0.25)
    found = read_events_csv(out / "night" / "events.csv")
    scores = evaluate_events(truth, found, labels=["snore"], collar_s=5.0)
    assert scores["per_class"]["snore"]["f1"] >= 0.5, scores
    assert not math.isnan(summary["snore"]["longest_snore_free_min"])
