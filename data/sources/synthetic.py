"""A procedural corpus of two-channel sleep sounds, and a writer for DreamCatcher tarballs.

:class:`Synthetic` draws every clip from ``(seed, split, index)`` alone, so any clip
can be regenerated on its own and the corpus never depends on generation order.
Channel 0 is the in-ear microphone, channel 1 the outer microphone. The acoustic
cues mirror the real recordings closely enough that models differ on it:

* room noise on every clip: a random white/pink/brown mix at a random level on the
  outer microphone; the in-ear microphone hears it occluded (quieter, low-passed)
  above its own self-noise;
* ``breathe``: band-limited turbulence noise under inhale/exhale envelopes at
  10-24 breaths per minute, caught at any phase (a clip may fall in a pause);
  body-conducted (louder, lower) in the ear, airborne on the outer microphone;
* ``snore``: a glottal-like pulse train at 30-120 Hz with jitter and shimmer,
  exciting 2-3 formant resonators during inhalation, over the wearer's breathing;
  the in-ear channel is dominated by the body-conducted pulse fundamental;
* ``non_wearer``: a bed partner's snore, breathing or cough, louder on the outer
  microphone than in the ear (occluded: attenuated and low-passed);
* ``quiet``: room noise only.

The event level is drawn as an SNR over the outer microphone's room noise, from
-10 to +25 dB, so classes overlap: a clip at -10 dB is hard to tell from quiet.
Measured: a TinyCNN (with batch norm) trained 10 epochs on the default 3,000
training clips (``native`` 2x64x101 log-mels) reaches 0.80-0.83 validation
macro-F1 over the four classes, its errors mostly quiet-looking low-SNR events.

Noise comes from per-split banks of shaped noise (made once per ``(seed, split)``
in the frequency domain) read at random offsets, which keeps generation at
thousands of clips per second on one core without scipy.

Why about 740 lines: the class generators (breathing, snoring, partner sounds, room
noise) share one parameter space and one seeded plan; the DreamCatcher-layout archive
writer is to move to ``data/fixtures.py`` (issue 14), which leaves the generators alone
here.
"""

from __future__ import annotations

import io
import os
import queue
import struct
import tarfile
import threading
import zlib
from collections.abc import Iterator, Sequence
from math import log, sqrt
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import soundfile as sf

from data.audio import resample
from data.sources.base import DREAMCATCHER_LABELS, SPLITS, Clip, SkippedClip, Source

#: Bump when the generated audio changes for the same arguments.
SYNTHETIC_VERSION = 1

_DEFAULT_CLIPS = {"train": 3000, "validation": 600, "test": 600}
_DEFAULT_WEIGHTS = {"quiet": 0.4, "breathe": 0.3, "snore": 0.2, "non_wearer": 0.1}
#: Samples per envelope step: envelopes are computed at sample_rate / 32 and held
#: (2 ms at 16 kHz, far shorter than any breath or cough onset).
_ENV_HOP = 32
_PARTNER_KINDS = ("snore", "breath", "cough")
_PARTNER_CUM = (0.45, 0.8, 1.0)
#: Formant ranges (Hz) and relative amplitudes of the snore resonators.
_FORMANTS = ((250.0, 650.0, 1.0), (800.0, 1500.0, 0.6), (2000.0, 3200.0, 0.35))
#: log2 of the noise bank length in samples (2**18: about 16 s at 16 kHz).
_BANK_LOG2 = 18
#: Default path prefix inside the written tarballs, as long as the real dataset's.
DEFAULT_PREFIX = "home/user/datasets/DreamCatcher/extracted/v1"


class Synthetic(Source):
    """Procedural two-channel sleep sounds, deterministic from a seed.

    Each clip is a function of ``(seed, split, index)`` only. Its label is drawn
    from ``class_weights``; ``describe`` returns the drawn parameters (SNR, room
    level, snore fundamental...) for tests and inspection.

    Args:
        seed: seed of the whole corpus; another seed gives other clips.
        clips_per_split: number of clips of each split (default train 3000,
            validation 600, test 600).
        labels: classes to generate; each must be one of ``quiet``, ``breathe``,
            ``snore``, ``non_wearer``.
        class_weights: probability of each label (normalised); default is
            imbalanced like the real data (quiet .4, breathe .3, snore .2,
            non_wearer .1, restricted to ``labels``).
        sample_rate: samples per second of the generated audio.
        duration_s: length of every clip in seconds.
    """

    name = "synthetic"

    def __init__(
        self,
        seed: int = 0,
        clips_per_split: dict[str, int] | None = None,
        labels: Sequence[str] = ("quiet", "breathe", "snore", "non_wearer"),
        class_weights: Sequence[float] | None = None,
        sample_rate: int = 16000,
        duration_s: float = 1.0,
    ) -> None:
        labels = tuple(labels)
        unknown = [label for label in labels if label not in _DEFAULT_WEIGHTS]
        if unknown or not labels or len(set(labels)) != len(labels):
            raise ValueError(
                f"labels must be distinct names among {tuple(_DEFAULT_WEIGHTS)}, got {labels}"
            )
        if class_weights is None:
            class_weights = [_DEFAULT_WEIGHTS[label] for label in labels]
        weights = np.asarray(class_weights, dtype=np.float64)
        if weights.shape != (len(labels),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(
                f"class_weights must be {len(labels)} non-negative numbers, got {class_weights}"
            )
        if sample_rate < 8000 or duration_s <= 0:
            raise ValueError("need sample_rate >= 8000 and duration_s > 0")
        self.seed = int(seed)
        self.clips_per_split = dict(_DEFAULT_CLIPS if clips_per_split is None else clips_per_split)
        self.labels = labels
        self.class_weights = tuple(float(w) for w in weights / weights.sum())
        self.sample_rate = int(sample_rate)
        self.duration_s = float(duration_s)
        self.num_samples = int(round(self.duration_s * self.sample_rate))
        self._cum_weights = np.cumsum(self.class_weights)
        self._banks: dict[str, dict[str, np.ndarray]] = {}
        n_env = -(-self.num_samples // _ENV_HOP)
        self._n_pad = n_env * _ENV_HOP
        #: Start time (s) of each envelope step; envelopes hold one value per step.
        self._t_env = np.arange(n_env) * _ENV_HOP / self.sample_rate

    # -- Source API -----------------------------------------------------------------

    def iter_clips(self, split: str) -> Iterator[Clip | SkippedClip]:
        """Yield clips ``0 .. clips_per_split[split] - 1`` of ``split``."""
        for index in range(self._count(split)):
            yield self.synthesize(split, index)

    def fingerprint(self, split: str) -> dict[str, str]:
        """Every argument that shapes the clips of ``split``, and the generator version."""
        return {
            "source": self.name,
            "version": str(SYNTHETIC_VERSION),
            "seed": str(self.seed),
            "split": split,
            "clips": str(self._count(split)),
            "labels": ",".join(self.labels),
            "class_weights": ",".join(f"{w:.6f}" for w in self.class_weights),
            "sample_rate": str(self.sample_rate),
            "duration_s": repr(self.duration_s),
        }

    def size_hint(self, split: str) -> int | None:
        """The configured number of clips of ``split``."""
        return self._count(split)

    # -- generation -----------------------------------------------------------------

    def clip_name(self, split: str, index: int) -> str:
        """File stem of clip ``index`` of ``split`` (as written into tarballs)."""
        return f"syn{self.seed}_{split}_{index:06d}"

    def synthesize(self, split: str, index: int) -> Clip:
        """Clip ``index`` of ``split``, computed from ``(seed, split, index)`` alone.

        Any split name and any index >= 0 work; ``clips_per_split`` only says how
        many :meth:`iter_clips` yields.
        """
        wave, info = self._render(split, index)
        label = info["label"]
        return Clip(
            waveform=wave,
            sample_rate=self.sample_rate,
            label=label,
            clip_id=f"{split}/{label}/{self.clip_name(split, index)}.wav",
            split=split,
        )

    def describe(self, split: str, index: int) -> dict[str, Any]:
        """The parameters drawn for clip ``index`` of ``split``.

        Keys: ``label``; ``room_db`` (outer-mic room noise RMS, dBFS); ``snr_db``
        (event level over it); ``emitter`` (``wearer``, ``partner`` or ``None``);
        ``kind`` (``breath``, ``snore``, ``cough`` or ``None``); ``f0_hz`` (snore
        pulse rate, else ``None``).
        """
        return self._render(split, index)[1]

    def _count(self, split: str) -> int:
        if split not in self.clips_per_split:
            raise KeyError(f"split {split!r} not in clips_per_split {self.clips_per_split}")
        return int(self.clips_per_split[split])

    def _split_code(self, split: str) -> int:
        return zlib.crc32(split.encode())

    def _bank(self, split: str) -> dict[str, np.ndarray]:
        """Unit-RMS shaped noise banks of ``split`` (made once, from seed and split only)."""
        if split not in self._banks:
            rng = np.random.default_rng([self.seed, self._split_code(split), 1])
            n = 1 << _BANK_LOG2
            f = np.fft.rfftfreq(n, 1.0 / self.sample_rate).astype(np.float32)
            f_safe = np.maximum(f, np.float32(20.0))

            def hp(fc: float) -> np.ndarray:
                r = (f / fc) ** 2
                return r / (1.0 + r)

            def lp(fc: float, order: int = 4) -> np.ndarray:
                return 1.0 / np.sqrt(1.0 + (f / fc) ** (2 * order))

            def unit(x: np.ndarray) -> np.ndarray:
                return x / np.sqrt(np.mean(np.square(x, dtype=np.float64)))

            def shaped(spectrum: np.ndarray, gain: np.ndarray) -> np.ndarray:
                gain[0] = 0.0
                return unit(np.fft.irfft(spectrum * gain, n))

            def normal() -> np.ndarray:
                return rng.standard_normal(n, dtype=np.float32)

            # float32 throughout: NumPy >= 2 transforms float32 without promoting.
            white = normal()
            pink, brown, breath = (np.fft.rfft(normal()) for _ in range(3))
            banks = {
                "white": unit(white),
                "pink": shaped(pink, 1.0 / np.sqrt(f_safe)),
                "brown": shaped(brown, 1.0 / f_safe),
                # One turbulence noise seen three ways, so equal offsets are coherent.
                "breath_air": shaped(breath, hp(250.0) * lp(2500.0, 2)),
                "breath_hiss": shaped(breath, hp(1200.0) * lp(6000.0, 2)),
                "breath_body": shaped(breath, hp(60.0) * lp(450.0)),
            }
            m = self._n_pad
            # Append the head so any offset in [0, n) reads m samples without wrapping.
            self._banks[split] = {
                k: np.concatenate([v, v[:m]]).astype(np.float32) for k, v in banks.items()
            }
        return self._banks[split]

    def _render(self, split: str, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        if index < 0:
            raise IndexError(f"clip index must be >= 0, got {index}")
        rng = _Draws(np.random.default_rng([self.seed, self._split_code(split), 0, index]))
        bank = self._bank(split)
        n = self._n_pad  # work on whole envelope steps; cropped to num_samples at the end
        span = 1 << _BANK_LOG2
        label = self.labels[int(np.searchsorted(self._cum_weights, rng.random() * 0.999999))]

        def noise(kind: str) -> np.ndarray:
            o = int(rng.integers(span))
            return bank[kind][o : o + n]

        # Room noise: random colour and level outside, occluded inside, self-noise floor.
        # Scalars stay Python floats so that float32 arrays are never promoted.
        wave = np.empty((2, n), dtype=np.float32)
        inear, outer = wave[0], wave[1]
        room_db = rng.uniform(-70.0, -35.0)
        colour = [rng.exponential() for _ in range(3)]  # Dirichlet(1, 1, 1) mix weights
        norm = _db(room_db) / sqrt(sum(c * c for c in colour))
        self_noise = _db(rng.uniform(-88.0, -78.0))  # white: adds in power to the room's
        np.multiply(noise("white"), sqrt((colour[0] * norm) ** 2 + self_noise**2), out=outer)
        outer += noise("pink") * (colour[1] * norm)
        outer += noise("brown") * (colour[2] * norm)
        occlusion_db = rng.uniform(6.0, 16.0)
        pb = rng.uniform(0.2, 1.0)
        g_in = _db(room_db - occlusion_db) / sqrt(pb**2 + (1 - pb) ** 2)
        np.multiply(noise("white"), self_noise, out=inear)
        inear += noise("pink") * (g_in * pb)
        inear += noise("brown") * (g_in * (1 - pb))

        snr_db = rng.uniform(-10.0, 25.0)
        event = _db(room_db + snr_db)
        info: dict[str, Any] = {
            "label": label,
            "room_db": room_db,
            "snr_db": snr_db,
            "emitter": None,
            "kind": None,
            "f0_hz": None,
        }
        if label == "breathe":
            info.update(emitter="wearer", kind="breath")
            env = self._breath_env(rng, snore=False)
            self._add_breath(rng, bank, wave, env, event, wearer=True)
        elif label == "snore":
            info.update(emitter="wearer", kind="snore")
            env = self._breath_env(rng, snore=True)
            info["f0_hz"] = self._add_snore(rng, wave, env, event, wearer=True)
            breath_level = event * _db(-rng.uniform(6.0, 20.0))
            self._add_breath(rng, bank, wave, env, breath_level, wearer=True)
        elif label == "non_wearer":
            kind = _PARTNER_KINDS[int(np.searchsorted(_PARTNER_CUM, rng.random() * 0.999999))]
            info.update(emitter="partner", kind=kind)
            if kind == "snore":
                env = self._breath_env(rng, snore=True)
                info["f0_hz"] = self._add_snore(rng, wave, env, event, wearer=False)
                breath_level = event * _db(-rng.uniform(6.0, 20.0))
                self._add_breath(rng, bank, wave, env, breath_level, wearer=False)
            elif kind == "breath":
                env = self._breath_env(rng, snore=False)
                self._add_breath(rng, bank, wave, env, event, wearer=False)
            else:
                self._add_cough(rng, bank, wave, event)

        if n != self.num_samples:
            wave = np.ascontiguousarray(wave[:, : self.num_samples])
        peak = max(float(wave.max()), -float(wave.min()))
        if peak > 0.95:  # keep PCM_16 writes free of clipping
            wave *= 0.95 / peak
        return wave, info

    def _breath_env(self, rng: _Rng, snore: bool) -> dict[str, np.ndarray]:
        """Inhale and exhale envelopes (one value per envelope step, float32).

        Breathing is caught at any phase; a snore clip is placed so that its inhale
        (when snoring happens) overlaps the clip.
        """
        period = 60.0 / rng.uniform(10.0, 24.0)
        p_in = rng.uniform(0.3, 0.45)
        p_ex = rng.uniform(0.35, 0.5)
        if snore:
            start = rng.uniform(-0.6 * p_in * period, 0.6 * self.duration_s)
            phase0 = (-start / period) % 1.0
        else:
            phase0 = rng.random()
        phi = (phase0 + self._t_env / period) % 1.0
        inhale = _bump(phi / p_in)
        exhale = _bump((phi - p_in) / p_ex) * rng.uniform(0.4, 1.0)
        return {"inhale": inhale.astype(np.float32), "exhale": exhale.astype(np.float32)}

    def _add_breath(
        self,
        rng: _Rng,
        bank: dict[str, np.ndarray],
        wave: np.ndarray,
        env: dict[str, np.ndarray],
        level: float,
        wearer: bool,
    ) -> None:
        n = self._n_pad
        o = int(rng.integers(1 << _BANK_LOG2))
        hiss = rng.uniform(0.0, 0.6)
        if wearer:  # body-conducted: strongest and lowest in the ear
            g_in, g_out = level, level * _db(-rng.uniform(2.0, 12.0))
        else:  # the partner: airborne to the outer mic, occluded in the ear
            g_in, g_out = level * _db(-rng.uniform(15.0, 30.0)), level
        e = (env["inhale"] + env["exhale"])[:, None]
        air = bank["breath_air"][o : o + n] * g_out
        air += bank["breath_hiss"][o : o + n] * (hiss * g_out)
        body = bank["breath_body"][o : o + n] * g_in
        wave[0] += (body.reshape(-1, _ENV_HOP) * e).reshape(-1)
        wave[1] += (air.reshape(-1, _ENV_HOP) * e).reshape(-1)

    def _add_snore(
        self,
        rng: _Rng,
        wave: np.ndarray,
        env: dict[str, np.ndarray],
        level: float,
        wearer: bool,
    ) -> float:
        """Add a jittered glottal pulse train through formant resonators; return its f0."""
        sr = self.sample_rate
        n = self._n_pad
        f0 = rng.uniform(30.0, 120.0)
        t0 = sr / f0
        width = max(4, int(rng.uniform(0.4, 0.7) * t0))
        # 10 ms of formant ringing (bandwidths >= 80 Hz have decayed by 20 dB), faded out.
        ring = int(0.01 * sr)
        klen = max(width, ring)
        t = np.arange(klen) / sr
        glottal = np.zeros(klen)
        glottal[:width] = np.hanning(width + 2)[1:-1]
        formants = np.zeros(klen)
        n_formants = 2 + int(rng.random() < 0.5)
        for lo, hi, amp in _FORMANTS[:n_formants]:
            fc, bw = rng.uniform(lo, hi), rng.uniform(80.0, 200.0)
            formants += amp * np.exp(-np.pi * bw * t) * np.sin(2 * np.pi * fc * t)
        formants[ring:] = 0.0
        fade = ring // 4
        formants[ring - fade : ring] *= np.linspace(1.0, 0.0, fade)
        formants /= np.sqrt(np.sum(formants**2))
        glottal /= np.sqrt(np.sum(glottal**2))
        if wearer:  # in the ear the pulse is body-conducted (its fundamental dominates)
            k_in = glottal + formants * rng.uniform(0.05, 0.3)
            k_out = glottal * rng.uniform(0.1, 0.5) + formants
            g_in, g_out = level, level * _db(-rng.uniform(0.0, 10.0))
        else:  # occluded: only the low pulse reaches the ear, far weaker
            k_in = glottal
            k_out = glottal * rng.uniform(0.1, 0.5) + formants
            g_in, g_out = level * _db(-rng.uniform(15.0, 30.0)), level
        # Pulse times with jitter; amplitudes follow the inhale envelope with shimmer.
        count = int(n / t0) + 3
        jitter = rng.uniform(0.02, 0.1)
        steps = t0 * (1.0 + jitter * rng.standard_normal(count)).clip(0.5, 1.5)
        times = (np.cumsum(steps) - (1.0 + rng.random()) * t0).astype(np.int64)
        times = times[(times > -klen) & (times < n)]
        amp = env["inhale"][np.maximum(times, 0) // _ENV_HOP].astype(np.float64)
        amp *= 1.0 + rng.uniform(0.05, 0.2) * rng.standard_normal(times.size)
        onset = rng.uniform(0.05, 0.25)  # airflow needed before the soft palate flutters
        keep = amp > onset
        times, amp = times[keep], amp[keep]
        if times.size:
            idx = ((times + klen)[:, None] + np.arange(klen)[None, :]).ravel()
            size = n + 2 * klen
            for ch, kernel, gain in ((0, k_in, g_in), (1, k_out, g_out)):
                # Unit kernel energy at f0 pulses/s gives unit RMS when fully voiced.
                scale = gain / np.sqrt(np.sum(kernel**2) * f0 / sr)
                w = (amp[:, None] * (kernel * scale)[None, :]).ravel()
                wave[ch] += np.bincount(idx, weights=w, minlength=size)[klen : klen + n]
        return float(f0)

    def _add_cough(
        self,
        rng: _Rng,
        bank: dict[str, np.ndarray],
        wave: np.ndarray,
        level: float,
    ) -> None:
        """Add one or two explosive noise bursts (the partner's cough)."""
        t = self._t_env
        env = np.zeros_like(t)
        onset = rng.uniform(-0.1, 0.7)
        for _ in range(1 + int(rng.random() < 0.4)):
            attack, decay = rng.uniform(0.01, 0.025), rng.uniform(0.04, 0.15)
            u = t - onset
            rise = np.clip(u / attack, 0.0, 1.0)
            fall = np.exp(-np.maximum(u - attack, 0.0) / decay)
            env += np.where(u < attack, rise, fall) * rng.uniform(0.5, 1.0)
            onset += rng.uniform(0.25, 0.45)
        n = self._n_pad
        o = int(rng.integers(1 << _BANK_LOG2))
        g_in = level * _db(-rng.uniform(15.0, 30.0))
        e = env.astype(np.float32)[:, None]
        air = bank["breath_air"][o : o + n] + bank["breath_hiss"][o : o + n]
        air *= level
        body = bank["breath_body"][o : o + n] * g_in
        wave[0] += (body.reshape(-1, _ENV_HOP) * e).reshape(-1)
        wave[1] += (air.reshape(-1, _ENV_HOP) * e).reshape(-1)


class _Draws:
    """Scalar random draws served from one block drawn up front.

    A clip needs a few dozen scalars; one generator call for all of them costs far
    less than one call each. Arrays still come straight from the generator.
    """

    _BLOCK = 64

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self._values = rng.random(self._BLOCK).tolist()
        self._next = 0

    def random(self) -> float:
        if self._next == len(self._values):
            self._values += self.rng.random(self._BLOCK).tolist()
        value = self._values[self._next]
        self._next += 1
        return value

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def integers(self, high: int) -> int:
        return min(int(self.random() * high), high - 1)

    def exponential(self) -> float:
        return -log(1.0 - self.random())

    def standard_normal(self, size: int) -> np.ndarray:
        return self.rng.standard_normal(size)


#: What the clip primitives draw from: a clip's :class:`_Draws`, or any NumPy
#: Generator (``data.sources.night`` drives the primitives with its own).
_Rng = _Draws | np.random.Generator


def _bump(x: np.ndarray) -> np.ndarray:
    """Smooth bump ``16 x^2 (1 - x)^2`` on ``[0, 1]``, zero outside (a raised-cosine look-alike)."""
    x = np.clip(x, 0.0, 1.0)
    y = 4.0 * x * (1.0 - x)
    return y * y


def _db(db: float) -> float:
    """Amplitude gain of ``db`` decibels."""
    return 10.0 ** (db / 20.0)


class MalformedMember(NamedTuple):
    """One deliberately bad member that ``write_dreamcatcher_archive(malformed=True)`` adds.

    Attributes:
        label: the label folder the member sits in.
        source_reason: the :class:`SkippedClip` reason DreamCatcher gives it, or
            ``None`` when it is yielded as a :class:`Clip`.
        cache_reason: the :func:`data.audio.check_waveform` reason the cache gives
            the yielded clip, or ``None`` when it is kept.
        repair: the :data:`data.audio.REPAIRS` entry applied when kept, if any.
    """

    label: str
    source_reason: str | None
    cache_reason: str | None
    repair: str | None


#: The bad members added to *each* split's tarball with ``malformed=True``, by key;
#: member ``key`` is named ``malformed_<key>_<split>.wav`` (see
#: :func:`malformed_member_name`). Per split: 5 skipped by the source (corrupt 1,
#: unsafe_path 2, unknown_label 1, wrong_split 1), 6 yielded as clips, of which the
#: cache skips 4 (empty, nan, too_short, bad_shape) and keeps 2 (a mono breathe
#: clip, duplicated to two channels, and a 22.05 kHz quiet clip, resampled).
MALFORMED_MEMBERS: dict[str, MalformedMember] = {
    "corrupt": MalformedMember("snore", "corrupt", None, None),
    "empty": MalformedMember("quiet", None, "empty", None),
    "nan": MalformedMember("breathe", None, "nan", None),
    "too_short": MalformedMember("quiet", None, "too_short", None),
    "three_channel": MalformedMember("snore", None, "bad_shape", None),
    "mono": MalformedMember("breathe", None, None, "mono"),
    "rate_22050": MalformedMember("quiet", None, None, "resampled"),
    "dotdot": MalformedMember("snore", "unsafe_path", None, None),
    "absolute": MalformedMember("quiet", "unsafe_path", None, None),
    "unknown_label": MalformedMember("gurgle", "unknown_label", None, None),
    "wrong_split": MalformedMember("quiet", "wrong_split", None, None),
}


def malformed_member_name(key: str, split: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Archive path of the bad member ``key`` in ``split``'s tarball."""
    label = MALFORMED_MEMBERS[key].label
    stem = f"malformed_{key}_{split}.wav"
    if key == "dotdot":
        return f"{prefix}/../data/{split}/{label}/{stem}"
    if key == "absolute":
        return f"/{prefix}/data/{split}/{label}/{stem}"
    if key == "wrong_split":
        other = SPLITS[(SPLITS.index(split) + 1) % len(SPLITS)] if split in SPLITS else "train"
        return f"{prefix}/data/{other}/{label}/{stem}"
    return f"{prefix}/data/{split}/{label}/{stem}"


def _wav_bytes(wave: np.ndarray, sample_rate: int, subtype: str) -> bytes:
    """WAV bytes of ``(channels, samples)``, equal for equal input on every platform.

    ``PCM_16`` is encoded here (a canonical 44-byte header and ``round(x * 32768)``,
    which soundfile decodes back within half a step): about ten times faster than
    soundfile's writer, whose file-like output goes through Python callbacks.
    Other subtypes go through soundfile, less libsndfile's time-stamped PEAK chunk.
    """
    if subtype == "PCM_16":
        channels = wave.shape[0]
        scaled = wave * np.float32(32768.0)
        np.rint(scaled, out=scaled)
        np.clip(scaled, -32768, 32767, out=scaled)
        planar = scaled.astype("<i2")
        frames = np.empty((wave.shape[1], channels), dtype="<i2")
        for channel in range(channels):  # interleave; faster than a strided tobytes()
            frames[:, channel] = planar[channel]
        data = frames.tobytes()
        fmt = struct.pack(
            "<HHIIHH", 1, channels, sample_rate, sample_rate * channels * 2, channels * 2, 16
        )
        header = b"WAVEfmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data))
        return b"RIFF" + struct.pack("<I", len(header) + len(data)) + header + data
    buf = io.BytesIO()
    sf.write(buf, np.ascontiguousarray(wave.T), sample_rate, subtype=subtype, format="WAV")
    data = buf.getvalue()
    chunks, pos = [], 12
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        end = pos + 8 + size + (size & 1)
        if data[pos : pos + 4] != b"PEAK":
            chunks.append(data[pos:end])
        pos = end
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + len(body).to_bytes(4, "little") + body


def _malformed_payloads(source: Synthetic, split: str, subtype: str) -> dict[str, bytes]:
    sr = source.sample_rate
    base = source.synthesize(split, 0).waveform
    short = base[:, : int(0.1 * sr)]
    nan_wave = base.copy()
    nan_wave[:, 100:200] = np.nan
    valid = _wav_bytes(base, sr, subtype)
    return {
        "corrupt": b"RIFF\x24\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4,
        "empty": _wav_bytes(np.zeros((2, 0), np.float32), sr, subtype),
        "nan": _wav_bytes(nan_wave, sr, "FLOAT"),
        "too_short": _wav_bytes(short, sr, subtype),
        "three_channel": _wav_bytes(np.concatenate([base, base[:1]]), sr, subtype),
        "mono": _wav_bytes(base[:1], sr, subtype),
        "rate_22050": _wav_bytes(resample(base, sr, 22050), 22050, subtype),
        "dotdot": valid,
        "absolute": valid,
        "unknown_label": valid,
        "wrong_split": valid,
    }


def write_dreamcatcher_archive(
    root: str | os.PathLike[str],
    source: Synthetic,
    splits: Sequence[str] = SPLITS,
    prefix: str = DEFAULT_PREFIX,
    malformed: bool = False,
    subtype: str = "PCM_16",
    compresslevel: int = 0,
) -> Path:
    """Write ``source`` as DreamCatcher tarballs ``root/data/{split}.tar.gz``.

    Every clip becomes ``<prefix>/data/<split>/<label>/<clip_name>.wav``. The
    tarballs are byte-for-byte reproducible (fixed member and gzip times) and each
    is written under a temporary name and renamed when complete.

    The gzip level defaults to 0 (stored): synthetic noise shrinks by only a third
    at level 1, while deflating and inflating it would dominate writing and reading
    (on a 2.5 GHz Xeon core zlib deflates about 500 and inflates about 1,700 such
    clips per second). Pass 1-9 to measure reading at the real archives' cost.

    Args:
        root: folder to write into (``DreamCatcher(root=root)`` reads it back).
        source: the synthetic corpus to write; its labels must be DreamCatcher's.
        splits: splits to write.
        prefix: path prefix of every member, like the real archive's long one.
        malformed: also add each entry of :data:`MALFORMED_MEMBERS` to every split,
            in the middle of the stream.
        subtype: soundfile subtype of the regular clips (``PCM_16``, ``FLOAT``...).
        compresslevel: gzip level, 0 (stored, fastest) to 9.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    bad = [label for label in source.labels if label not in DREAMCATCHER_LABELS]
    if bad:
        raise ValueError(f"labels {bad} are not DreamCatcher labels {DREAMCATCHER_LABELS}")
    prefix = prefix.strip("/")
    out = Path(root) / "data"
    out.mkdir(parents=True, exist_ok=True)
    for split in splits:
        count = source.size_hint(split) or 0
        extras: list[tuple[str, bytes]] = []
        if malformed:
            payloads = _malformed_payloads(source, split, subtype)
            extras = [(malformed_member_name(k, split, prefix), payloads[k]) for k in payloads]
        final = out / f"{split}.tar.gz"
        tmp = out / f".{split}.tar.gz.tmp"
        with (
            GzipDeflater(tmp, level=compresslevel) as gz,
            tarfile.open(fileobj=gz, mode="w|", format=tarfile.GNU_FORMAT) as tar,
        ):
            for index in range(count):
                if index == count // 2:
                    for name, payload in extras:
                        _add_member(tar, name, payload)
                clip = source.synthesize(split, index)
                name = f"{prefix}/data/{split}/{clip.label}/{source.clip_name(split, index)}.wav"
                _add_member(tar, name, _wav_bytes(clip.waveform, clip.sample_rate, subtype))
            if count == 0:
                for name, payload in extras:
                    _add_member(tar, name, payload)
        os.replace(tmp, final)
    return Path(root)


class GzipDeflater(io.RawIOBase):
    """A write-only gzip file whose compression runs in a background thread.

    zlib releases the GIL while it deflates, so compressing overlaps generating and
    encoding the next clips. The gzip header carries no name and time 0, so equal
    input gives equal bytes.

    Args:
        path: file to create.
        level: zlib compression level, 0 (stored) to 9.
        chunk: bytes gathered before handing them to the compressing thread.
    """

    def __init__(self, path: str | os.PathLike[str], level: int = 0, chunk: int = 1 << 20) -> None:
        super().__init__()
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._deflate = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._chunk = chunk
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gzip-deflater", daemon=True)
        self._thread.start()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self._error is not None:
            raise self._error
        block = bytes(data)
        self._pending.append(block)
        self._pending_size += len(block)
        if self._pending_size >= self._chunk:
            self._flush_pending()
        return len(block)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._flush_pending()
            self._queue.put(None)
            self._thread.join()
        finally:
            self._file.close()
            super().close()
        if self._error is not None:
            raise self._error

    def _flush_pending(self) -> None:
        if self._pending:
            self._queue.put(b"".join(self._pending))
            self._pending, self._pending_size = [], 0

    def _run(self) -> None:
        try:
            while (block := self._queue.get()) is not None:
                self._file.write(self._deflate.compress(block))
            self._file.write(self._deflate.flush())
        except BaseException as err:  # raised in the writing thread by write() or close()
            self._error = err
            while self._queue.get() is not None:  # unblock the writer until it closes
                pass


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 1_700_000_000
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))
