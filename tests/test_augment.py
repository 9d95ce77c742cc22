"""Waveform augmentation of the train split: deterministic copies, each transform as documented."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from lightning.pytorch.trainer.states import TrainerFn

from data.augment import PEAK_LIMIT, WaveAugment
from data.cache import open_cache
from data.datamodule import SleepSoundDataModule
from data.sources.augmented import Augmented
from data.sources.base import SPLITS, Clip, SkippedClip, Source
from main import main
from tests.helpers import tiny_args

SR = 16000
COUNTS = {"train": 12, "validation": 6, "test": 6}
LABELS = ("quiet", "breathe", "snore")
#: Every transform off: each test switches on the one it measures.
OFF = {"gain_db": (0.0, 0.0), "noise_p": 0.0, "filter_p": 0.0, "shift_s": 0.0}


class NoiseSource(Source):
    """Quiet white noise per split; train also holds one undecodable member and one NaN clip."""

    name = "noise"
    labels = LABELS

    def iter_clips(self, split: str) -> Iterator[Clip | SkippedClip]:
        for i in range(COUNTS[split]):
            rng = np.random.default_rng([SPLITS.index(split), i])
            wave = (0.05 * rng.standard_normal((2, SR))).astype(np.float32)
            label = LABELS[i % len(LABELS)]
            yield Clip(wave, SR, label, f"{split}/{label}/{i:03d}.wav", split)
        if split == "train":
            yield SkippedClip("train/snore/broken.wav", split, "snore", "corrupt")
            nan = np.full((2, SR), np.nan, np.float32)
            yield Clip(nan, SR, "quiet", "train/quiet/nan.wav", split)

    def fingerprint(self, split: str) -> dict[str, str]:
        return {"counts": str(COUNTS[split])}

    def size_hint(self, split: str) -> int | None:
        return COUNTS[split] + (2 if split == "train" else 0)


def white(seconds: float = 1.0, level: float = 0.05, seed: int = 0) -> np.ndarray:
    return (level * np.random.default_rng(seed).standard_normal((2, int(SR * seconds)))).astype(
        np.float32
    )


def rms_db(x: np.ndarray) -> np.ndarray:
    return 10 * np.log10(np.mean(np.asarray(x, np.float64) ** 2, axis=-1))


def band_db(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Power per channel between ``lo`` and ``hi`` Hz, dB."""
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64), axis=-1)) ** 2
    f = np.fft.rfftfreq(x.shape[-1], 1 / SR)
    return 10 * np.log10(spectrum[:, (f >= lo) & (f < hi)].sum(axis=-1))


def test_a_copy_is_a_pure_function_of_seed_clip_and_copy() -> None:
    wave = white()
    one = WaveAugment(seed=3)(wave, SR, "train/snore/a.wav", 1)
    assert np.array_equal(one, WaveAugment(seed=3)(wave.copy(), SR, "train/snore/a.wav", 1))
    assert one.dtype == np.float32 and one.shape == wave.shape
    for other in (
        WaveAugment(seed=4)(wave, SR, "train/snore/a.wav", 1),
        WaveAugment(seed=3)(wave, SR, "train/snore/b.wav", 1),
        WaveAugment(seed=3)(wave, SR, "train/snore/a.wav", 2),
    ):
        assert not np.allclose(one, other)
    assert WaveAugment(seed=3).plan("x", 1) == WaveAugment(seed=3).plan("x", 1)


def test_train_gains_copies_after_each_clip_with_the_same_label() -> None:
    source = Augmented(NoiseSource(), WaveAugment(copies=2))
    items = list(source.iter_clips("train"))
    clips = [c for c in NoiseSource().iter_clips("train") if isinstance(c, Clip)][:-1]
    # each clip, then its copies #aug1, #aug2; the skip and the NaN clip pass through once
    expected = [f"{c.clip_id}{s}" for c in clips for s in ("", "#aug1", "#aug2")]
    assert [i.clip_id for i in items] == [
        *expected,
        "train/snore/broken.wav",
        "train/quiet/nan.wav",
    ]
    by_id = {i.clip_id: i for i in items}
    for clip in clips:
        for k in (1, 2):
            copy = by_id[f"{clip.clip_id}#aug{k}"]
            assert isinstance(copy, Clip)
            assert (copy.label, copy.split, copy.sample_rate) == (clip.label, "train", SR)
            assert not np.array_equal(copy.waveform, clip.waveform)
        assert np.array_equal(by_id[clip.clip_id].waveform, clip.waveform)  # the original as is
    assert source.size_hint("train") == 3 * NoiseSource().size_hint("train")
    assert source.name == "noise" and source.labels == LABELS


def test_other_splits_pass_through_and_share_the_plain_caches(tmp_path: Path) -> None:
    plain = NoiseSource()
    source = Augmented(plain, WaveAugment(copies=1))
    for split in ("validation", "test"):
        assert source.fingerprint(split) == plain.fingerprint(split)
        assert source.size_hint(split) == plain.size_hint(split)
        ours, theirs = list(source.iter_clips(split)), list(plain.iter_clips(split))
        assert [c.clip_id for c in ours] == [c.clip_id for c in theirs]
        assert all(
            np.array_equal(a.waveform, b.waveform) for a, b in zip(ours, theirs, strict=True)
        )
    train = source.fingerprint("train")
    assert json.loads(train.pop("augment")) == WaveAugment(copies=1).fingerprint()
    assert train == plain.fingerprint("train")
    assert Augmented(plain, WaveAugment(copies=0)).fingerprint("train") == plain.fingerprint(
        "train"
    )

    def module(augment: WaveAugment | None) -> SleepSoundDataModule:
        return SleepSoundDataModule(
            source=NoiseSource(),
            augment=augment,
            cache_dir=str(tmp_path),
            batch_size=4,
            progress=False,
        )

    base, aug, reseeded = module(None), module(WaveAugment()), module(WaveAugment(seed=1))
    for split in ("validation", "test"):
        assert aug.cache_file(split) == base.cache_file(split) == reseeded.cache_file(split)
    assert (
        len({base.cache_file("train"), aug.cache_file("train"), reseeded.cache_file("train")}) == 3
    )
    aug.prepare_data()
    aug.setup("fit")
    info = open_cache(aug.cache_file("train"))
    assert info.n_rows == 2 * COUNTS["train"]  # the NaN clip is skipped once, its copies never made
    assert aug.dataset("train").clip_ids[1] == "train/quiet/000.wav#aug1"
    assert json.loads(info.source_fingerprint["augment"])["copies"] == 1
    counts = [info.class_counts[c] for c in LABELS]
    assert counts == [8, 8, 8]  # class weights and band statistics come from the augmented rows
    # the validation and test caches are the plain source's: a plain module finds them built
    assert all(base.cache_file(s).exists() for s in ("validation", "test"))


@pytest.mark.parametrize("stage", ["test", "predict", "validate"])
def test_stages_after_fit_build_no_augmented_cache(tmp_path: Path, stage: str) -> None:
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.state.fn = TrainerFn(stage)
    dm = SleepSoundDataModule(
        source=NoiseSource(), augment=WaveAugment(), cache_dir=str(tmp_path), progress=False
    )
    dm.trainer = trainer
    dm.prepare_data()
    built = sorted(p.name for p in tmp_path.glob("*/*.h5"))
    assert built == ["validation.h5" if stage == "validate" else "test.h5"]
    assert not dm.cache_file("train").exists()


def test_gain_is_the_drawn_gain_in_db_and_the_peak_stays_below_full_scale() -> None:
    wave = white(level=0.01)
    augment = WaveAugment(**{**OFF, "gain_db": (-12.0, 12.0)})
    for copy in range(1, 6):
        out = augment(wave, SR, "a.wav", copy)
        measured = rms_db(out) - rms_db(wave)
        assert measured == pytest.approx([augment.plan("a.wav", copy, SR).gain_db] * 2, abs=1e-3)
    loud = WaveAugment(**{**OFF, "gain_db": (12.0, 12.0)})(white(level=0.3), SR, "a.wav", 1)
    assert np.abs(loud).max() == pytest.approx(PEAK_LIMIT, abs=1e-6)


def test_noise_is_added_at_the_drawn_snr_on_each_channel() -> None:
    wave = white(level=0.05)
    wave[1] *= 0.1  # the outer channel 20 dB quieter: the SNR holds on each channel
    augment = WaveAugment(**{**OFF, "noise_p": 1.0})
    for copy in range(1, 5):
        plan = augment.plan("a.wav", copy, SR)
        noise = augment(wave, SR, "a.wav", copy).astype(np.float64) - wave
        assert rms_db(wave) - rms_db(noise) == pytest.approx([plan.snr_db] * 2, abs=0.1)
        shared = np.corrcoef(noise)[0, 1]  # unit-RMS parts: correlation = the shared power share
        assert shared == pytest.approx(plan.noise_shared, abs=0.1)
    silent = np.zeros((2, SR), np.float32)
    assert not augment(silent, SR, "a.wav", 1).any()  # no signal, no noise


def find_copy(augment: WaveAugment, kinds: tuple[str, ...], below_hz: float = 8000.0) -> int:
    """The first copy of ``a.wav`` whose EQ is exactly ``kinds``, all under ``below_hz``."""
    for copy in range(1, 500):
        filters = augment.plan("a.wav", copy, SR).filters
        if tuple(f.kind for f in filters) == kinds and all(
            max(f.freq_hz) < below_hz for f in filters
        ):
            return copy
    raise AssertionError(f"no copy with filters {kinds} under {below_hz} Hz")


def test_highpass_removes_energy_below_its_cutoff() -> None:
    wave = white(seconds=2.0)
    augment = WaveAugment(**{**OFF, "filter_p": 1.0})
    copy = find_copy(augment, ("highpass",))
    (hp,) = augment.plan("a.wav", copy, SR).filters
    assert hp.freq_hz[0] != hp.freq_hz[1]  # the two microphones differ slightly
    assert all(30 <= f <= 450 for f in hp.freq_hz)
    out = augment(wave, SR, "a.wav", copy)
    cut = min(hp.freq_hz)
    loss_below = band_db(wave, 5, cut / 3) - band_db(out, 5, cut / 3)
    loss_above = band_db(wave, 2 * max(hp.freq_hz), 7000) - band_db(out, 2 * max(hp.freq_hz), 7000)
    assert (loss_below > 15).all() and (np.abs(loss_above) < 1.5).all()


def test_lowpass_and_peak_shape_the_spectrum_as_drawn() -> None:
    wave = white(seconds=2.0)
    augment = WaveAugment(**{**OFF, "filter_p": 1.0})
    (lp,) = augment.plan("a.wav", copy := find_copy(augment, ("lowpass",), 5000.0), SR).filters
    assert lp.freq_hz[0] != lp.freq_hz[1] and all(2500 <= f <= 5000 for f in lp.freq_hz)
    out = augment(wave, SR, "a.wav", copy)
    top = 1.5 * max(lp.freq_hz)
    assert (band_db(wave, top, 8000) - band_db(out, top, 8000) > 8).all()
    assert (np.abs(band_db(wave, 100, 1000) - band_db(out, 100, 1000)) < 1.0).all()
    (peak,) = augment.plan("a.wav", copy := find_copy(augment, ("peak",)), SR).filters
    out = augment(wave, SR, "a.wav", copy)
    for c in range(2):
        f0 = peak.freq_hz[c]
        centre = band_db(out[c : c + 1], f0 / 1.05, f0 * 1.05) - band_db(
            wave[c : c + 1], f0 / 1.05, f0 * 1.05
        )
        assert centre[0] == pytest.approx(peak.gain_db[c], abs=1.5)


@pytest.mark.parametrize("mode", ["pad", "circular"])
def test_shift_moves_an_impulse_by_the_drawn_shift(mode: str) -> None:
    wave = np.zeros((2, SR), np.float32)
    wave[:, 8000] = 0.5
    augment = WaveAugment(**{**OFF, "shift_s": 0.25, "shift_mode": mode})
    for copy in range(1, 6):
        shift = round(augment.plan("a.wav", copy, SR).shift_s * SR)
        assert 0 < abs(shift) <= SR // 4
        out = augment(wave, SR, "a.wav", copy)
        assert np.flatnonzero(out[0]).tolist() == [8000 + shift]
        assert out[0, 8000 + shift] == pytest.approx(0.5)
    edge = np.zeros((2, SR), np.float32)
    edge[:, 10] = 0.5  # near the start: a shift to earlier drops it (pad) or wraps it (circular)
    copy = next(k for k in range(1, 50) if augment.plan("a.wav", k, SR).shift_s < -0.01)
    out = augment(edge, SR, "a.wav", copy)
    wrapped = (10 + round(augment.plan("a.wav", copy, SR).shift_s * SR)) % SR
    assert np.flatnonzero(out[0]).tolist() == ([wrapped] if mode == "circular" else [])


def test_padded_shift_fills_the_gap_with_the_clips_noise_floor() -> None:
    wave = white(level=0.01)
    wave[:, 4000:12000] *= 10  # a loud event (20 dB up) over a quiet floor
    augment = WaveAugment(**{**OFF, "shift_s": 0.25})
    copy = next(k for k in range(1, 50) if augment.plan("a.wav", k, SR).shift_s > 0.1)
    shift = round(augment.plan("a.wav", copy, SR).shift_s * SR)
    out = augment(wave, SR, "a.wav", copy)
    assert np.array_equal(out[:, shift:], wave[:, : SR - shift])
    assert rms_db(out[:, :shift]) == pytest.approx(rms_db(wave[:, :4000]), abs=1.0)


def test_bad_parameters_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="gain_db must be"):
        WaveAugment(gain_db=(6, -6))
    with pytest.raises(ValueError, match="noise_p must be a probability"):
        WaveAugment(noise_p=1.5)
    with pytest.raises(ValueError, match="copies must be >= 0"):
        WaveAugment(copies=-1)
    with pytest.raises(ValueError, match="already augmented"):
        Augmented(Augmented(NoiseSource(), WaveAugment()), WaveAugment())


def test_fit_with_augment_from_the_cli(tmp_path: Path) -> None:
    splits = '{"train": 48, "validation": 24, "test": 24}'
    args = tiny_args(
        tmp_path, "--trainer.max_steps", "2", "--trainer.max_epochs", "1", splits=splits
    )
    cli = main(["fit", *args, "--data.augment.copies", "1", "--data.augment.seed", "5"])
    dm = cli.datamodule
    assert isinstance(dm.augment, WaveAugment) and dm.augment.seed == 5
    assert cli.trainer.global_step == 2
    ids = dm.dataset("train").clip_ids
    originals = [i for i in ids if "#aug" not in i]
    assert ids == [i for o in originals for i in (o, f"{o}#aug1")]
    plain = SleepSoundDataModule(
        source=dm.source.source,
        features=dm.features,
        classes=dm.classes,
        cache_dir=str(dm.cache_dir),
    )
    for split in ("validation", "test"):  # built once, shared with the plain source
        assert dm.cache_file(split) == plain.cache_file(split)
    assert dm.cache_file("train") != plain.cache_file("train")
    assert len(list(Path(dm.cache_dir).glob("*/*.h5"))) == 3
