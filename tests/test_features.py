"""The log-mel front end: shapes, scales, channel modes, config identity."""

from __future__ import annotations

import json

import pytest
import torch

from data.features import PRESETS, LogMelFrontEnd


def _noise(batch: int, channels: int, samples: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, samples, generator=g) * 0.1


@pytest.mark.parametrize(
    ("preset", "shape"), [("native", (2, 64, 101)), ("reference", (1, 64, 501))]
)
@pytest.mark.parametrize(("channels", "seconds"), [(2, 1.0), (1, 0.6), (2, 5.7)])
def test_preset_output_shape(preset: str, shape: tuple, channels: int, seconds: float) -> None:
    fe = LogMelFrontEnd(preset)
    x = _noise(3, channels, int(seconds * 16000))
    y = fe(x)
    assert fe.output_shape == shape
    assert fe.out_channels == shape[0]
    assert y.shape == (3, *shape)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("preset", ["native", "reference"])
def test_matches_torchaudio_melspectrogram(preset: str) -> None:
    """The fast STFT path computes what torchaudio's own MelSpectrogram computes."""
    fe = LogMelFrontEnd(preset)
    x = _noise(4, 2, fe.clip_samples) * torch.tensor([1.0, 0.01, 3.0, 0.2]).view(4, 1, 1)
    mel = fe.mel(fe.adapt(x))
    if fe.scale == "log":
        expected = torch.log(mel + fe.eps)
    else:
        db = 10 * torch.log10(mel.clamp(min=1e-10))
        expected = (db - db.amax(dim=(1, 2, 3), keepdim=True)).clamp(min=-80)
    torch.testing.assert_close(fe(x), expected, rtol=1e-4, atol=1e-4)


def test_db_scale_is_relative_to_each_clip_max_with_80_db_floor() -> None:
    fe = LogMelFrontEnd("reference")
    x = _noise(2, 1, fe.clip_samples)
    x[1] *= 1000.0  # a far louder clip still peaks at 0 dB
    x[:, :, 40000:] = 0.0  # silence: floored at -80 dB
    y = fe(x)
    for clip in y:
        assert clip.max().item() == pytest.approx(0.0, abs=1e-6)
        assert clip.min().item() == pytest.approx(-80.0)
    assert (y >= -80.0).all()


def test_native_log_scale_is_log_of_mel_plus_eps() -> None:
    fe = LogMelFrontEnd("native")
    y = fe(torch.zeros(1, 2, fe.clip_samples))
    torch.testing.assert_close(y, torch.full_like(y, torch.log(torch.tensor(1e-6)).item()))


def test_stereo_duplicates_a_mono_input() -> None:
    fe = LogMelFrontEnd("native")
    mono = _noise(2, 1, fe.clip_samples)
    y = fe(mono)
    torch.testing.assert_close(y[:, 0], y[:, 1])
    torch.testing.assert_close(y, fe(mono.expand(-1, 2, -1)))


def test_mono_mode_is_mean_of_channels() -> None:
    fe = LogMelFrontEnd("native", channels="mono")
    x = _noise(2, 2, fe.clip_samples)
    assert fe(x).shape == (2, 1, 64, 101)
    torch.testing.assert_close(fe(x), fe(x.mean(dim=1, keepdim=True)))


def test_in_ear_mode_reads_channel_zero_only() -> None:
    fe = LogMelFrontEnd("native", channels="in_ear")
    x = _noise(2, 2, fe.clip_samples)
    other = x.clone()
    other[:, 1] = _noise(2, 1, fe.clip_samples, seed=9)[:, 0]
    assert fe(x).shape == (2, 1, 64, 101)
    torch.testing.assert_close(fe(x), fe(other))
    torch.testing.assert_close(fe(x), fe(x[:, :1]))


def test_pads_with_zeros_and_crops_from_the_start() -> None:
    fe = LogMelFrontEnd("native")
    short = _noise(1, 2, 9000)
    padded = torch.cat([short, torch.zeros(1, 2, fe.clip_samples - 9000)], dim=-1)
    torch.testing.assert_close(fe(short), fe(padded))
    long = _noise(1, 2, 30000)
    torch.testing.assert_close(fe(long), fe(long[..., : fe.clip_samples]))


def test_batch_is_computed_clip_by_clip() -> None:
    """A clip's features do not depend on its batch (pieces, dB reference)."""
    fe = LogMelFrontEnd("reference")
    x = _noise(7, 2, fe.clip_samples)
    x[3] *= 100.0
    whole = fe(x)
    torch.testing.assert_close(whole[2:3], fe(x[2:3]), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("preset", ["native", "reference"])
@pytest.mark.parametrize(
    "hop_samples",
    [8000, 160 * 3, 4321, 16000, 90000],
    ids=["0.5s", "3-frames", "not-frame-multiple", "1s", "5.6s"],
)
@pytest.mark.parametrize("channels", [2, 1])
def test_overlapping_windows_equal_the_clips_one_by_one(
    preset: str, hop_samples: int, channels: int
) -> None:
    """``windows`` (frames shared between overlapping clips) equals ``forward`` per clip."""
    fe = LogMelFrontEnd(preset)
    count, clip = 5, fe.clip_samples
    signal = _noise(1, channels, (count - 1) * hop_samples + clip + 101, seed=3)[0]
    signal[:, clip // 3 : clip // 2] *= 50.0  # loud and quiet stretches across clip edges
    signal[:, -clip // 4 :] = 0.0
    got = fe.windows(signal, hop_samples, count)
    clips = torch.stack([signal[:, k * hop_samples : k * hop_samples + clip] for k in range(count)])
    torch.testing.assert_close(got, fe(clips), rtol=1e-5, atol=1e-5)


def test_windows_refuses_a_signal_shorter_than_its_clips() -> None:
    fe = LogMelFrontEnd("native")
    with pytest.raises(ValueError, match="at least 24000 samples"):
        fe.windows(torch.zeros(2, 23999), 8000, 2)


def test_config_is_resolved_json_and_overrides_apply() -> None:
    fe = LogMelFrontEnd("reference", n_mels=40, clip_seconds=2.0)
    cfg = fe.config()
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg["n_mels"] == 40 and cfg["clip_seconds"] == 2.0
    assert cfg["channels"] == "mono" and cfg["scale"] == "db"  # the preset's values
    assert None not in cfg.values()
    assert fe.output_shape == (1, 40, 201)
    assert fe.clip_samples == 32000


_ALTERNATIVES = {
    "sample_rate": 22050,
    "n_fft": 1024,
    "win_length": 256,
    "hop_length": 128,
    "n_mels": 32,
    "f_min": 0.0,
    "f_max": 7000.0,
    "clip_seconds": 2.0,
    "channels": "mono",
    "scale": "db",
    "eps": 1e-5,
    "mel_scale": "slaney",
    "mel_norm": "slaney",
    "pad_mode": "constant",
}


def test_alternatives_cover_every_parameter() -> None:
    assert set(_ALTERNATIVES) == set(PRESETS["native"])


@pytest.mark.parametrize(("name", "value"), sorted(_ALTERNATIVES.items()))
def test_config_hash_changes_with_every_parameter(name: str, value: object) -> None:
    base = LogMelFrontEnd("native")
    changed = LogMelFrontEnd("native", **{name: value})
    assert changed.config()[name] == value
    assert changed.config_hash() != base.config_hash()
    assert LogMelFrontEnd("native").config_hash() == base.config_hash()
    assert len(base.config_hash()) == 64


def test_presets_hash_differently() -> None:
    assert LogMelFrontEnd("native").config_hash() != LogMelFrontEnd("reference").config_hash()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"preset": "fancy"},
        {"channels": "left"},
        {"scale": "linear"},
        {"win_length": 1024},
        {"f_max": 9000.0},
        {"clip_seconds": 0.0},
    ],
)
def test_invalid_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LogMelFrontEnd(**kwargs)


def test_rejects_three_channels_and_unbatched_input() -> None:
    fe = LogMelFrontEnd()
    with pytest.raises(ValueError, match="1 or 2 channels"):
        fe(torch.zeros(1, 3, 16000))
    with pytest.raises(ValueError, match="batch"):
        fe(torch.zeros(2, 16000))


def test_stays_float32_under_autocast() -> None:
    fe = LogMelFrontEnd("native")
    x = _noise(2, 2, fe.clip_samples)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fe(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, fe(x))


@pytest.mark.parametrize(
    "kwargs",
    [{"preset": "native"}, {"preset": "reference"}, {"n_mels": 40, "n_fft": 1024, "f_min": 0.0}],
)
def test_the_banded_filter_bank_product_equals_the_whole_matmul(kwargs: dict) -> None:
    """The groups of bands skip only weights that are zero for the whole group."""
    from data.features import band_groups

    fe = LogMelFrontEnd(**kwargs)
    fb = fe.mel.mel_scale.fb
    groups = band_groups(fb)
    assert [j0 for j0, *_ in groups] == list(range(0, fe.n_mels, 16))  # every band, in order
    covered = torch.zeros_like(fb, dtype=torch.bool)
    for j0, j1, lo, hi in groups:
        covered[lo:hi, j0:j1] = True
    assert not (fb[~covered] != 0).any()  # nothing non-zero left out
    assert covered.sum() < 0.5 * fb.numel()  # and most of the bank is
    power = torch.rand(300, fb.shape[0], dtype=torch.float64) ** 4  # decades apart
    whole = power @ fb.double()
    banded = torch.zeros_like(whole)
    for j0, j1, lo, hi in groups:
        banded[:, j0:j1] = power[:, lo:hi] @ fb[lo:hi, j0:j1].double()
    torch.testing.assert_close(banded, whole, rtol=1e-12, atol=0)


def test_a_band_without_bins_stays_zero_and_a_loaded_bank_is_used() -> None:
    from data.features import band_groups

    fb = torch.zeros(20, 40)
    fb[3:6, 0] = 1.0
    fb[10:12, 39] = 2.0
    assert band_groups(fb) == [(0, 16, 3, 6), (32, 40, 10, 12)]  # bands 16-31 have no bin
    fe = LogMelFrontEnd("native")
    x = _noise(2, 2, fe.clip_samples)
    before = fe(x)
    state = fe.state_dict()
    state["mel.mel_scale.fb"] = state["mel.mel_scale.fb"] * 2.0
    state["mel.mel_scale.fb"][:, 5] = 0.0  # one band emptied
    fe.load_state_dict(state)
    after = fe(x)
    torch.testing.assert_close(after, torch.log(fe.mel(fe.adapt(x)) + fe.eps), rtol=1e-4, atol=1e-4)
    assert (after[:, :, 5] == torch.log(torch.tensor(fe.eps))).all()
    assert not torch.allclose(after, before, atol=1e-2)
