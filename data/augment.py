"""Waveform augmentation of training clips: a time shift, a random EQ, coloured noise, gain.

Features are cached once from a source's clips, so augmentation happens on the waveform,
before the cache: :class:`WaveAugment` makes extra copies of each train clip, and
:class:`data.sources.augmented.Augmented` adds them to the train split, so that a model
learns the sound rather than one recording chain (or one generator). It complements the
feature-domain SpecAugment and mixup of the task (:mod:`models.task`), which run per batch.

Every copy is a pure function of ``(seed, clip_id, copy)`` (the clip id hashed with
sha256, never Python's ``hash()``), so an augmented corpus is as deterministic as its
source and its cache is reproducible; :meth:`WaveAugment.fingerprint` goes into the cache
key, so other parameters build another cache.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torchaudio.functional as AF

#: Bump when the augmented audio changes for the same parameters (it is in the cache key).
AUGMENT_VERSION = 1
#: The peak an augmented clip is scaled down to when it would reach it (full scale is 1.0).
PEAK_LIMIT = 0.98
#: Noise colours by spectral slope: power ∝ f^-slope (white 0, pink 1, brown 2).
NOISE_SLOPES: dict[str, float] = {"white": 0.0, "pink": 1.0, "brown": 2.0}
#: Below this frequency (Hz) coloured noise is flat, so brown noise does not pile up at DC.
_NOISE_FLOOR_HZ = 20.0
#: Ranges of the random EQ: high-pass and low-pass cut-offs and a peaking/shelf centre (Hz,
#: drawn log-uniformly), its gain (dB) and Q.
HIGHPASS_HZ = (40.0, 400.0)
LOWPASS_HZ = (3000.0, 7500.0)
PEAK_HZ = (100.0, 6000.0)
PEAK_GAIN_DB = 10.0
PEAK_Q = (0.5, 2.0)
#: Microphone mismatch: each channel's filter frequency differs by up to this many octaves
#: and its gain by up to this many dB from the shared filter.
MISMATCH_OCTAVES = 0.15
MISMATCH_DB = 1.0
#: Filters are run on the clip scaled to this peak, then scaled back: torchaudio's
#: ``lfilter`` clamps to [-1, 1], and a boost must not clip inside it.
_FILTER_HEADROOM = 1e-3
#: Length of the window the ``pad`` shift takes the clip's noise floor from (seconds).
_FLOOR_WINDOW_S = 0.1


@dataclass(frozen=True)
class Biquad:
    """One filter of a copy's EQ.

    Attributes:
        kind: ``highpass``, ``lowpass``, ``peak`` (peaking), ``lowshelf`` or ``highshelf``.
        freq_hz: cut-off or centre frequency, per channel.
        gain_db: boost (or cut) of a peak or shelf, per channel; 0 for the pass filters.
        q: quality factor, shared by the channels.
    """

    kind: str
    freq_hz: tuple[float, float]
    gain_db: tuple[float, float]
    q: float


@dataclass(frozen=True)
class Plan:
    """What one augmented copy does, in the order it is done (see :meth:`WaveAugment.plan`).

    Attributes:
        shift_s: time shift in seconds (positive: later).
        filters: the random EQ, in order; empty when no filter was drawn.
        snr_db: the added noise's SNR over each channel's RMS; ``None``: no noise.
        noise_mix: weight of each of :data:`NOISE_SLOPES` (white, pink, brown) in the
            noise's power; they sum to 1.
        noise_shared: the share of the noise's power common to both channels.
        gain_db: overall gain.
    """

    shift_s: float
    filters: tuple[Biquad, ...]
    snr_db: float | None
    noise_mix: tuple[float, float, float]
    noise_shared: float
    gain_db: float


class WaveAugment:
    """Random gain, coloured noise, EQ and time shift for copies of training clips.

    A copy is made in this order: **shift**, **EQ**, **noise**, **gain**, then its peak
    is limited:

    * shift: by a uniform ``[-shift_s, shift_s]`` seconds. ``pad`` (default) fills the
      gap left at one end with noise shaped like the clip's own noise floor (the spectrum
      and level of its quietest 0.1 s, per channel) and drops what moves past the other
      end; ``circular`` rolls the clip, so what leaves one end comes back at the other.
    * EQ, with probability ``filter_p``: any of a high-pass (40-400 Hz), a low-pass
      (3-7.5 kHz, at most 0.45 of the sample rate) and a peaking, low-shelf or high-shelf
      biquad of ±10 dB, each drawn with probability 1/2 (at least one), run with
      ``torchaudio.functional``. The same filters on both channels, each channel's
      frequency and gain slightly off (up to 0.15 octave, 1 dB): a microphone mismatch.
    * noise, with probability ``noise_p``: a random mix of white, pink and brown noise,
      part of it common to both channels and the rest independent, at an SNR drawn
      uniformly from ``noise_snr_db`` over each channel's RMS (a silent channel stays
      silent).
    * gain: uniform in dB over ``gain_db``.
    * peak: a copy whose peak would reach :data:`PEAK_LIMIT` (0.98) is scaled down to it,
      so no sample clips at full scale; the gain then is smaller than drawn.

    Each copy is a pure function of ``(seed, clip_id, copy)``; :meth:`plan` tells what
    it does.

    Args:
        copies: augmented copies of each train clip, kept besides the original (0: none).
        gain_db: range of the overall gain, dB.
        noise_p: probability that a copy gets added noise.
        noise_snr_db: range of the added noise's SNR, dB.
        filter_p: probability that a copy goes through the random EQ.
        shift_s: largest time shift, seconds (0: none).
        shift_mode: ``pad`` (fill with the clip's noise floor) or ``circular`` (roll).
        seed: seed of the augmentation; another seed gives other copies.
    """

    def __init__(
        self,
        copies: int = 1,
        gain_db: tuple[float, float] = (-12.0, 12.0),
        noise_p: float = 0.5,
        noise_snr_db: tuple[float, float] = (5.0, 40.0),
        filter_p: float = 0.5,
        shift_s: float = 0.25,
        shift_mode: Literal["pad", "circular"] = "pad",
        seed: int = 0,
    ) -> None:
        self.copies = int(copies)
        self.gain_db = _range("gain_db", gain_db)
        self.noise_p = _probability("noise_p", noise_p)
        self.noise_snr_db = _range("noise_snr_db", noise_snr_db)
        self.filter_p = _probability("filter_p", filter_p)
        self.shift_s = float(shift_s)
        self.shift_mode = shift_mode
        self.seed = int(seed)
        if self.copies < 0:
            raise ValueError(f"augment copies must be >= 0, got {copies}")
        if not self.shift_s >= 0:
            raise ValueError(f"augment shift_s must be >= 0 seconds, got {shift_s}")
        if shift_mode not in ("pad", "circular"):
            raise ValueError(f"augment shift_mode must be 'pad' or 'circular', got {shift_mode!r}")
        if self.seed < 0:
            raise ValueError(f"augment seed must be >= 0, got {seed}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.fingerprint().items() if k != "version")
        return f"WaveAugment({args})"

    def fingerprint(self) -> dict[str, Any]:
        """Every parameter (and :data:`AUGMENT_VERSION`), for cache keys."""
        return {
            "version": AUGMENT_VERSION,
            "copies": self.copies,
            "gain_db": list(self.gain_db),
            "noise_p": self.noise_p,
            "noise_snr_db": list(self.noise_snr_db),
            "filter_p": self.filter_p,
            "shift_s": self.shift_s,
            "shift_mode": self.shift_mode,
            "seed": self.seed,
        }

    # -- randomness -------------------------------------------------------------

    def _streams(self, clip_id: str, copy: int) -> tuple[np.random.Generator, np.random.Generator]:
        """Two generators of ``(seed, clip_id, copy)``: one for the plan, one for noise."""
        digest = hashlib.sha256(clip_id.encode("utf-8", "surrogateescape")).digest()
        entropy = [AUGMENT_VERSION, self.seed, int.from_bytes(digest[:16], "little"), int(copy)]
        plan, signal = np.random.SeedSequence(entropy).spawn(2)
        return np.random.default_rng(plan), np.random.default_rng(signal)

    def plan(self, clip_id: str, copy: int, sample_rate: int = 16000) -> Plan:
        """What copy ``copy`` of clip ``clip_id`` does (its random draws, nothing applied)."""
        return self._plan(self._streams(clip_id, copy)[0], sample_rate)

    def _plan(self, rng: np.random.Generator, sample_rate: int) -> Plan:
        # Every draw is made whatever the probabilities, so one parameter's change leaves
        # the others' draws as they were.
        shift = float(rng.uniform(-1.0, 1.0)) * self.shift_s
        use_filter = rng.random() < self.filter_p
        filters = _draw_filters(rng, sample_rate)
        use_noise = rng.random() < self.noise_p
        snr = float(rng.uniform(*self.noise_snr_db))
        mix = rng.dirichlet(np.ones(len(NOISE_SLOPES)))
        shared = float(rng.random())
        gain = float(rng.uniform(*self.gain_db))
        return Plan(
            shift_s=shift,
            filters=filters if use_filter else (),
            snr_db=snr if use_noise else None,
            noise_mix=(float(mix[0]), float(mix[1]), float(mix[2])),
            noise_shared=shared,
            gain_db=gain,
        )

    # -- applying ---------------------------------------------------------------

    def __call__(
        self, waveform: np.ndarray, sample_rate: int, clip_id: str, copy: int
    ) -> np.ndarray:
        """Copy ``copy`` of a clip: float32 ``(channels, samples)``, the input's shape.

        Args:
            waveform: the clip, float ``(channels, samples)`` with 1 or 2 channels.
            sample_rate: its samples per second.
            clip_id: the clip's stable id (with ``copy``, all the randomness depends on).
            copy: the copy's index (1 for the first).
        """
        wave = np.asarray(waveform, dtype=np.float64)
        if wave.ndim != 2 or not 1 <= wave.shape[0] <= 2 or wave.shape[1] == 0:
            raise ValueError(
                f"augment needs a (channels, samples) clip of 1 or 2 channels, got {wave.shape}"
            )
        plan_rng, signal_rng = self._streams(clip_id, copy)
        plan = self._plan(plan_rng, sample_rate)
        wave = self._shift(wave, round(plan.shift_s * sample_rate), sample_rate, signal_rng)
        if plan.filters:
            wave = _run_filters(wave, plan.filters, sample_rate)
        if plan.snr_db is not None:
            wave = wave + _noise_like(wave, sample_rate, plan, signal_rng)
        wave = wave * 10.0 ** (plan.gain_db / 20.0)
        peak = float(np.abs(wave).max())
        if peak >= PEAK_LIMIT:
            wave = wave * (PEAK_LIMIT / peak)
        return wave.astype(np.float32)

    def _shift(
        self, wave: np.ndarray, shift: int, sample_rate: int, rng: np.random.Generator
    ) -> np.ndarray:
        n = wave.shape[1]
        if shift == 0:
            return wave
        if self.shift_mode == "circular":
            return np.roll(wave, shift, axis=1)
        gap = min(abs(shift), n)
        fill = _noise_floor(wave, gap, sample_rate, rng)
        if shift > 0:
            return np.concatenate([fill, wave[:, : n - gap]], axis=1)
        return np.concatenate([wave[:, gap:], fill], axis=1)


def _range(name: str, value: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not lo <= hi:
        raise ValueError(f"augment {name} must be [low, high] with low <= high, got {list(value)}")
    return lo, hi


def _probability(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"augment {name} must be a probability in [0, 1], got {value}")
    return float(value)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _draw_filters(rng: np.random.Generator, sample_rate: int) -> tuple[Biquad, ...]:
    """A random EQ: high-pass, low-pass, peak/shelf, each with probability 1/2, at least one."""
    chosen = rng.random(3) < 0.5
    if not chosen.any():
        chosen[rng.integers(3)] = True
    nyquist_cap = 0.45 * sample_rate
    freqs = (
        _log_uniform(rng, *HIGHPASS_HZ),
        min(_log_uniform(rng, *LOWPASS_HZ), nyquist_cap),
        min(_log_uniform(rng, *PEAK_HZ), nyquist_cap),
    )
    tone = ("peak", "lowshelf", "highshelf")[int(rng.integers(3))]
    tone_gain = float(rng.uniform(-PEAK_GAIN_DB, PEAK_GAIN_DB))
    tone_q = _log_uniform(rng, *PEAK_Q)
    detune = rng.uniform(-MISMATCH_OCTAVES, MISMATCH_OCTAVES, size=(3, 2))
    regain = rng.uniform(-MISMATCH_DB, MISMATCH_DB, size=2)
    specs = (("highpass", 0.0, 0.707), ("lowpass", 0.0, 0.707), (tone, tone_gain, tone_q))
    out = []
    for i, (kind, gain, q) in enumerate(specs):
        if not chosen[i]:
            continue
        per_freq = tuple(min(freqs[i] * 2.0 ** float(d), nyquist_cap) for d in detune[i])
        per_gain = (0.0, 0.0) if gain == 0.0 else tuple(gain + float(g) for g in regain)
        out.append(Biquad(kind, per_freq, per_gain, float(q)))  # type: ignore[arg-type]
    return tuple(out)


def _run_filters(wave: np.ndarray, filters: Sequence[Biquad], sample_rate: int) -> np.ndarray:
    """Run ``filters`` over each channel (its own frequency and gain) in float64."""
    peak = float(np.abs(wave).max())
    if peak == 0.0:
        return wave
    scale = _FILTER_HEADROOM / peak
    out = np.empty_like(wave)
    for c in range(wave.shape[0]):
        x = torch.from_numpy(wave[c] * scale)
        for f in filters:
            x = _biquad(x, f.kind, f.freq_hz[c], f.gain_db[c], f.q, sample_rate)
        out[c] = x.numpy()
    return out / scale


def _biquad(
    x: torch.Tensor, kind: str, freq: float, gain: float, q: float, sample_rate: int
) -> torch.Tensor:
    if kind == "highpass":
        return AF.highpass_biquad(x, sample_rate, freq, q)
    if kind == "lowpass":
        return AF.lowpass_biquad(x, sample_rate, freq, q)
    if kind == "peak":
        return AF.equalizer_biquad(x, sample_rate, freq, gain, q)
    if kind == "lowshelf":
        return AF.bass_biquad(x, sample_rate, gain, freq, q)
    if kind == "highshelf":
        return AF.treble_biquad(x, sample_rate, gain, freq, q)
    raise ValueError(f"unknown filter kind {kind!r}")


def _shaped(power: np.ndarray, n: int, streams: int, rng: np.random.Generator) -> np.ndarray:
    """``streams`` Gaussian noises of ``n`` samples with the rfft power ``power``, unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal((streams, n)), axis=1) * np.sqrt(power)
    noise = np.fft.irfft(spectrum, n=n, axis=1)
    rms = np.sqrt(np.mean(noise**2, axis=1, keepdims=True))
    return noise / np.where(rms > 0, rms, 1.0)


def _noise_like(
    wave: np.ndarray, sample_rate: int, plan: Plan, rng: np.random.Generator
) -> np.ndarray:
    """The plan's coloured noise for ``wave``, scaled to its SNR over each channel's RMS."""
    channels, n = wave.shape
    f = np.maximum(np.fft.rfftfreq(n, 1.0 / sample_rate), _NOISE_FLOOR_HZ)
    power = np.zeros_like(f)
    for weight, slope in zip(plan.noise_mix, NOISE_SLOPES.values(), strict=True):
        shape = f**-slope
        power += weight * shape / shape.mean()
    own = _shaped(power, n, channels, rng)
    common = _shaped(power, n, 1, rng)
    noise = math.sqrt(1.0 - plan.noise_shared) * own + math.sqrt(plan.noise_shared) * common
    noise /= np.maximum(np.sqrt(np.mean(noise**2, axis=1, keepdims=True)), 1e-30)
    level = np.sqrt(np.mean(wave**2, axis=1, keepdims=True)) * 10.0 ** (-plan.snr_db / 20.0)
    return noise * level


def _noise_floor(
    wave: np.ndarray, samples: int, sample_rate: int, rng: np.random.Generator
) -> np.ndarray:
    """``samples`` of noise per channel with the spectrum and RMS of the clip's quietest window."""
    channels, n = wave.shape
    width = max(1, min(n, round(_FLOOR_WINDOW_S * sample_rate)))
    hop = max(1, width // 4)
    starts = np.arange(0, n - width + 1, hop)
    running = np.concatenate([[0.0], np.cumsum(np.sum(wave**2, axis=0))])
    energy = running[starts + width] - running[starts]
    first = int(starts[int(np.argmin(energy))])
    quiet = wave[:, first : first + width]
    rms = np.sqrt(np.mean(quiet**2, axis=1, keepdims=True))
    window = np.hanning(width) if width > 2 else np.ones(width)
    floor_power = np.abs(np.fft.rfft(quiet * window, axis=1)) ** 2
    grid = np.fft.rfftfreq(samples, 1.0 / sample_rate)
    known = np.fft.rfftfreq(width, 1.0 / sample_rate)
    out = np.empty((channels, samples))
    for c in range(channels):
        power = np.interp(grid, known, floor_power[c])
        out[c] = _shaped(power + 1e-30, samples, 1, rng)[0]
    return out * rms
