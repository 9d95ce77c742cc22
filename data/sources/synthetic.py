"""A procedural corpus of two-channel sleep sounds, deterministic from a seed.

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

The sound primitives are public (:meth:`Synthetic.add_sound`, :meth:`Synthetic.noise_banks`,
:func:`breath_envelopes`, :class:`Sound`) so that the synthetic night
(:mod:`util.night.generate`) makes the same sounds, second after second. The corpus is
written as DreamCatcher tarballs by :func:`data.fixtures.write_dreamcatcher_archive`.

Why about 530 lines: the class generators (breathing, snoring, partner sounds, room noise)
share one parameter space, one seeded plan and one set of noise banks.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from math import log, sqrt
from typing import Any, NamedTuple

import numpy as np

from data.sources.base import Clip, SkippedClip, Source

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
#: Samples of each noise bank before its wrap-around head (2**18: about 16 s at 16 kHz).
BANK_SAMPLES = 1 << 18

#: Inhale and exhale envelopes (``{"inhale": ..., "exhale": ...}``), one float32 value
#: per envelope step of a clip (:attr:`Synthetic.envelope_times`).
Envelopes = dict[str, np.ndarray]
#: Unit-RMS shaped noise banks by kind (:meth:`Synthetic.noise_banks`).
Banks = dict[str, np.ndarray]


class Sound(NamedTuple):
    """One sound for :meth:`Synthetic.add_sound` to add to a clip.

    Attributes:
        kind: ``breath``, ``snore`` (over quieter breathing) or ``cough``.
        level: linear amplitude where the sound is loudest: in the ear for the
            wearer's own sounds, on the outer microphone for the partner's.
        wearer: the wearer's own sound (body-conducted: strongest in the ear) or
            the bed partner's (airborne: strongest on the outer microphone).
        envelopes: the breathing it follows (:func:`breath_envelopes`); unused by
            a cough.
    """

    kind: str
    level: float
    wearer: bool = True
    envelopes: Envelopes | None = None


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
        self._banks: dict[str, Banks] = {}
        n_env = -(-self.num_samples // _ENV_HOP)
        #: Samples every primitive works on: ``num_samples`` rounded up to whole
        #: envelope steps (a clip is cropped to ``num_samples`` at the end).
        self.padded_samples = n_env * _ENV_HOP
        #: Start time (s) of each envelope step of a clip; envelopes hold one value per step.
        self.envelope_times = np.arange(n_env) * _ENV_HOP / self.sample_rate

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

    def noise_banks(self, split: str) -> Banks:
        """Unit-RMS shaped noise of ``split``, made once from the seed and ``split`` alone.

        Kinds: ``white``, ``pink``, ``brown`` (room noise) and ``breath_air``,
        ``breath_hiss``, ``breath_body`` (one turbulence noise filtered three ways, so
        equal offsets are coherent). Each holds :data:`BANK_SAMPLES` samples followed by
        its first :attr:`padded_samples` again, so any offset below
        :data:`BANK_SAMPLES` reads a whole clip without wrapping. Any name works as
        ``split`` (the synthetic night uses ``"night"``).
        """
        if split not in self._banks:
            rng = np.random.default_rng([self.seed, self._split_code(split), 1])
            n = BANK_SAMPLES
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
            m = self.padded_samples
            # Append the head so any offset in [0, n) reads m samples without wrapping.
            self._banks[split] = {
                k: np.concatenate([v, v[:m]]).astype(np.float32) for k, v in banks.items()
            }
        return self._banks[split]

    def _render(self, split: str, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        if index < 0:
            raise IndexError(f"clip index must be >= 0, got {index}")
        rng = _Draws(np.random.default_rng([self.seed, self._split_code(split), 0, index]))
        bank = self.noise_banks(split)
        n = self.padded_samples  # work on whole envelope steps; cropped to num_samples at the end
        label = self.labels[int(np.searchsorted(self._cum_weights, rng.random() * 0.999999))]

        def noise(kind: str) -> np.ndarray:
            o = int(rng.integers(BANK_SAMPLES))
            return bank[kind][o : o + n]

        # Room noise: random colour and level outside, occluded inside, self-noise floor.
        # Scalars stay Python floats so that float32 arrays are never promoted.
        wave = np.empty((2, n), dtype=np.float32)
        inear, outer = wave[0], wave[1]
        room_db = rng.uniform(-70.0, -35.0)
        colour = [rng.exponential() for _ in range(3)]  # Dirichlet(1, 1, 1) mix weights
        norm = db_gain(room_db) / sqrt(sum(c * c for c in colour))
        self_noise = db_gain(rng.uniform(-88.0, -78.0))  # white: adds in power to the room's
        np.multiply(noise("white"), sqrt((colour[0] * norm) ** 2 + self_noise**2), out=outer)
        outer += noise("pink") * (colour[1] * norm)
        outer += noise("brown") * (colour[2] * norm)
        occlusion_db = rng.uniform(6.0, 16.0)
        pb = rng.uniform(0.2, 1.0)
        g_in = db_gain(room_db - occlusion_db) / sqrt(pb**2 + (1 - pb) ** 2)
        np.multiply(noise("white"), self_noise, out=inear)
        inear += noise("pink") * (g_in * pb)
        inear += noise("brown") * (g_in * (1 - pb))

        snr_db = rng.uniform(-10.0, 25.0)
        event = db_gain(room_db + snr_db)
        info: dict[str, Any] = {
            "label": label,
            "room_db": room_db,
            "snr_db": snr_db,
            "emitter": None,
            "kind": None,
            "f0_hz": None,
        }
        if label != "quiet":
            wearer = label != "non_wearer"
            if wearer:
                kind = "snore" if label == "snore" else "breath"
            else:
                kind = _PARTNER_KINDS[int(np.searchsorted(_PARTNER_CUM, rng.random() * 0.999999))]
            info.update(emitter="wearer" if wearer else "partner", kind=kind)
            env = None if kind == "cough" else self._breath_env(rng, snore=kind == "snore")
            info["f0_hz"] = self.add_sound(rng, wave, bank, Sound(kind, event, wearer, env))

        if n != self.num_samples:
            wave = np.ascontiguousarray(wave[:, : self.num_samples])
        peak = max(float(wave.max()), -float(wave.min()))
        if peak > 0.95:  # keep PCM_16 writes free of clipping
            wave *= 0.95 / peak
        return wave, info

    # -- sound primitives (the synthetic night drives them too) -------------------

    def add_sound(self, rng: Rng, wave: np.ndarray, bank: Banks, sound: Sound) -> float | None:
        """Add ``sound`` to ``wave`` in place; return a snore's pulse rate (Hz), else ``None``.

        Args:
            rng: where every draw comes from (voice, channel gains, noise offsets).
            wave: ``(2, padded_samples)`` float32, in-ear channel first.
            bank: the noise to shape (:meth:`noise_banks`).
            sound: what to add; a snore also adds the breathing it rides on, 6-20 dB
                quieter.
        """
        if sound.kind == "cough":
            self._add_cough(rng, bank, wave, sound.level)
            return None
        if sound.envelopes is None:
            raise ValueError(f"a {sound.kind} sound needs breathing envelopes")
        if sound.kind == "breath":
            self._add_breath(rng, bank, wave, sound)
            return None
        if sound.kind != "snore":
            raise ValueError(f"sound kind must be breath, snore or cough, got {sound.kind!r}")
        f0 = self._add_snore(rng, wave, sound)
        breath = sound._replace(level=sound.level * db_gain(-rng.uniform(6.0, 20.0)))
        self._add_breath(rng, bank, wave, breath)
        return f0

    def _breath_env(self, rng: Rng, snore: bool) -> Envelopes:
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
        phi = (phase0 + self.envelope_times / period) % 1.0
        return breath_envelopes(phi, p_in, p_ex, rng.uniform(0.4, 1.0))

    def _add_breath(self, rng: Rng, bank: Banks, wave: np.ndarray, sound: Sound) -> None:
        """Add band-limited turbulence noise under the inhale and exhale envelopes."""
        level, env = sound.level, sound.envelopes
        n = self.padded_samples
        o = int(rng.integers(BANK_SAMPLES))
        hiss = rng.uniform(0.0, 0.6)
        if sound.wearer:  # body-conducted: strongest and lowest in the ear
            g_in, g_out = level, level * db_gain(-rng.uniform(2.0, 12.0))
        else:  # the partner: airborne to the outer mic, occluded in the ear
            g_in, g_out = level * db_gain(-rng.uniform(15.0, 30.0)), level
        e = (env["inhale"] + env["exhale"])[:, None]
        air = bank["breath_air"][o : o + n] * g_out
        air += bank["breath_hiss"][o : o + n] * (hiss * g_out)
        body = bank["breath_body"][o : o + n] * g_in
        wave[0] += (body.reshape(-1, _ENV_HOP) * e).reshape(-1)
        wave[1] += (air.reshape(-1, _ENV_HOP) * e).reshape(-1)

    def _add_snore(self, rng: Rng, wave: np.ndarray, sound: Sound) -> float:
        """Add a jittered glottal pulse train through formant resonators; return its f0."""
        level, env = sound.level, sound.envelopes
        sr = self.sample_rate
        n = self.padded_samples
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
        if sound.wearer:  # in the ear the pulse is body-conducted (its fundamental dominates)
            k_in = glottal + formants * rng.uniform(0.05, 0.3)
            k_out = glottal * rng.uniform(0.1, 0.5) + formants
            g_in, g_out = level, level * db_gain(-rng.uniform(0.0, 10.0))
        else:  # occluded: only the low pulse reaches the ear, far weaker
            k_in = glottal
            k_out = glottal * rng.uniform(0.1, 0.5) + formants
            g_in, g_out = level * db_gain(-rng.uniform(15.0, 30.0)), level
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

    def _add_cough(self, rng: Rng, bank: Banks, wave: np.ndarray, level: float) -> None:
        """Add one or two explosive noise bursts (the partner's cough)."""
        t = self.envelope_times
        env = np.zeros_like(t)
        onset = rng.uniform(-0.1, 0.7)
        for _ in range(1 + int(rng.random() < 0.4)):
            attack, decay = rng.uniform(0.01, 0.025), rng.uniform(0.04, 0.15)
            u = t - onset
            rise = np.clip(u / attack, 0.0, 1.0)
            fall = np.exp(-np.maximum(u - attack, 0.0) / decay)
            env += np.where(u < attack, rise, fall) * rng.uniform(0.5, 1.0)
            onset += rng.uniform(0.25, 0.45)
        n = self.padded_samples
        o = int(rng.integers(BANK_SAMPLES))
        g_in = level * db_gain(-rng.uniform(15.0, 30.0))
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


#: What the sound primitives draw from: a clip's own draws, or any NumPy Generator
#: (:mod:`util.night.generate` drives them with its own).
Rng = _Draws | np.random.Generator


def breath_envelopes(
    phase: np.ndarray, inhale_share: float, exhale_share: float, exhale_gain: float
) -> Envelopes:
    """Inhale and exhale envelopes at breathing-cycle ``phase`` (in ``[0, 1)``, float32 out).

    Args:
        phase: position in the breathing cycle at each envelope step.
        inhale_share: the part of a cycle spent inhaling (from phase 0).
        exhale_share: the part spent exhaling, right after the inhale (then a pause).
        exhale_gain: loudness of the exhale relative to the inhale.
    """
    inhale = _bump(phase / inhale_share)
    exhale = _bump((phase - inhale_share) / exhale_share) * exhale_gain
    return {"inhale": inhale.astype(np.float32), "exhale": exhale.astype(np.float32)}


def _bump(x: np.ndarray) -> np.ndarray:
    """Smooth bump ``16 x^2 (1 - x)^2`` on ``[0, 1]``, zero outside (a raised-cosine look-alike)."""
    x = np.clip(x, 0.0, 1.0)
    y = 4.0 * x * (1.0 - x)
    return y * y


def db_gain(db: float) -> float:
    """Amplitude gain of ``db`` decibels."""
    return 10.0 ** (db / 20.0)
