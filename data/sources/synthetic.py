"""A procedural corpus of two-channel sleep sounds, deterministic from a seed.

:class:`Synthetic` draws every clip from ``(seed, split, index)`` alone, so any clip
can be regenerated on its own and the corpus never depends on generation order.
It is the demo's only data, and a model trained on it is pointed at real recordings
(phones and recorders at the bedside, mono or stereo, 16-48 kHz, normalised or not), so
the generators follow measured acoustics of snoring and breathing rather than any one
recording, and every clip is "recorded" through a randomly drawn room and microphone.

**Recording setup** (``describe()["setup"]``), drawn per clip:

* ``earable`` (half of the wearer's clips, every ``non_wearer`` clip): channel 0 the
  in-ear microphone, channel 1 the outer one. The wearer's own sounds reach the ear
  body-conducted and low-passed, boosted below ~1 kHz by the occlusion effect (10-20 dB;
  Stenfelt & Reinfeldt 2007, Int J Audiol 46:595); airborne sounds reach it attenuated
  by the earpiece's seal (6-16 dB plus a low-pass). The partner's sounds are louder
  outside than in the ear.
* ``mono`` (30 %): one bedside microphone, duplicated into both channels exactly as
  ``predict`` duplicates a mono file.
* ``stereo`` (20 %): two bedside microphones a few centimetres apart (up to 1 ms apart,
  +-3 dB, each its own response and self-noise; the room partly coherent).

**Snoring** (``snore``): a pulse train exciting vocal-tract formants during inspiration.
Snoring is produced in the vocal tract like voiced speech and its pitch lies below 500 Hz
as a fundamental with harmonics, set by soft-palate flutter (Pevernagie, Aarts & De Meyer
2010, "The acoustics of snoring", Sleep Med Rev 14:131). Three source types, as measured
at sleep nasendoscopy (Agrawal et al. 2002, Clin Otolaryngol 27:162: palatal snores peak
at a median 136 Hz with 33x more power below 750 Hz than above, natural snores at 132 Hz
and 88x; tongue-base snores at 1,243 Hz and 0.2x; both sites at 190 Hz and 5x):
``palatal`` (70 %: f0 45-160 Hz, below/above-750-Hz power ratio 8-100), ``mixed`` (15 %:
f0 60-200 Hz, ratio 2-12) and ``tongue`` (15 %: noisy, turbulence through the formants,
weak pulses at 80-250 Hz, ratio 0.1-0.6); the ratio is set exactly on each clip's kernel.
Formants F1 ~ N(560, 170) Hz and F2 ~ N(1500, 450) Hz, F3 2.3-3.4 kHz, bandwidths 60-250 Hz
(smartphone recordings: F1 488 +- 126 / 635 +- 197 Hz, F2 1267 +- 307 / 1724 +- 550 Hz for
retropalatal / retrolingual snorers; Koo et al. 2017, Eur Arch Otorhinolaryngol 274:1735).
Pulses carry 2-10 % jitter and 5-20 % shimmer (30 % jitter for tongue-base), start once the
inspiratory flow passes a threshold and follow it, over the sleeper's quieter breathing.

**Breathing** (``breathe``): turbulence noise under inhale/exhale envelopes at 10-22
breaths a minute (adults breathe 12-20 a minute at rest), an inhale 30-45 % of the cycle
and an exhale 35-50 % (an I:E ratio near 1:1.5, then a pause), caught at any phase (a clip
may fall in the pause). Inspiration has relatively more energy at 400-1000 Hz than expiration
(their 400-1000 / 10-400 Hz ratio differed by more than 1.5x in 90 % of breaths; Alshaer,
Fernie & Bradley 2010, Int J Healthc Technol Manag 11:163), so the inhale is drawn from
250-2500 Hz noise with a 1.2-6 kHz hiss and the exhale shifted lower, both through a
random airway resonance (-6..+12 dB at 0.3-2.5 kHz).

**The room** is under every clip, and a ``quiet`` clip is the room alone, not silence:
coloured noise (a random white/pink/brown mix), microphone self-noise, and, each with its
own chance, a fan or air conditioner (broadband with a resonance hump and blade-pass tones
at 30-150 Hz), mains hum (50 or 60 Hz with harmonics), traffic (rumble swelling over seconds),
distant speech or TV (speech-shaped noise with 3-6 Hz syllabic modulation) and bedding or
clothing rustle (bursts of hiss). Bedrooms at night sit around 30 dB(A) (WHO Night Noise
Guidelines for Europe, 2009), snoring at the bedside is often 40-60 dB(A) and louder,
audible breathing a few dB over the room; the event level is drawn as an SNR over the room
(snore -5..+35 dB, breathing -10..+30, partner sounds -10..+25), so the classes overlap
and level alone never tells them apart. Airborne sound is reverberated with a synthetic
room impulse response (exponentially decaying noise, RT60 0.15-0.8 s, high frequencies
decaying faster; furnished bedrooms measure about 0.3-0.6 s), at a direct-to-reverberant
ratio of -3..+12 dB.

**The microphone**: a high-pass at 20-150 Hz (log-uniform), for half of the clips a low-pass at
3.4-7.8 kHz (telephone-band and compressed recordings), a +-6 dB resonance at 1-5 kHz,
and for 60 % of clips a recording gain that puts the peak anywhere from -40 to -1 dBFS
(recorders normalise and apply automatic gain); the others keep the room's physical level
(-70..-35 dBFS). Filters are applied in the frequency domain (zero phase, over the clip).

Noise comes from per-split banks of shaped noise (made once per ``(seed, split)`` in the
frequency domain) read at random offsets, and reverberation from a per-split bank of 32
impulse responses (their spectra computed once), which keeps generation at about 700 clips a
second on one idle Zen 5 core (1.4 ms a clip, most of it FFTs; about 5 ms under load 9)
without scipy.

The sound primitives are public (:meth:`Synthetic.add_sound`, :meth:`Synthetic.noise_banks`,
:func:`breath_envelopes`, :class:`Sound`) so that the synthetic night
(:mod:`util.night.generate`) makes the same dry sounds, second after second, in an earable
room of its own. The corpus is written as DreamCatcher tarballs by
:func:`data.fixtures.write_dreamcatcher_archive`.

Why about 900 lines: the class generators (breathing, snoring, partner sounds, the room's
sources, the microphones) share one parameter space, one seeded plan and one set of banks.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from math import cos, exp, log, pi, sqrt
from typing import Any, NamedTuple

import numpy as np

from data.sources.base import Clip, SkippedClip, Source

#: Bump when the generated audio changes for the same arguments.
SYNTHETIC_VERSION = 3

_DEFAULT_CLIPS = {"train": 3000, "validation": 600, "test": 600}
_DEFAULT_WEIGHTS = {"quiet": 0.4, "breathe": 0.3, "snore": 0.2, "non_wearer": 0.1}
#: Samples per envelope step: envelopes are computed at sample_rate / 32 and held
#: (2 ms at 16 kHz, far shorter than any breath or cough onset).
_ENV_HOP = 32
_PARTNER_KINDS = ("snore", "breath", "cough")
_PARTNER_CUM = (0.45, 0.8, 1.0)
#: Recording setups of the wearer's clips and their cumulative chances (``non_wearer``
#: clips are always ``earable``: a bedside microphone cannot tell whose sound it hears).
_SETUPS = ("earable", "mono", "stereo")
_SETUP_CUM = (0.5, 0.8, 1.0)
#: Snore source types: cumulative chance, f0 range (Hz), below/above-750-Hz power ratio
#: range, and the share of turbulence in the excitation (Agrawal et al. 2002; module doc).
_SNORE_TYPES = (
    ("palatal", 0.70, (45.0, 160.0), (8.0, 100.0), 0.0),
    ("mixed", 0.85, (60.0, 200.0), (2.0, 12.0), 0.3),
    ("tongue", 1.00, (80.0, 250.0), (0.1, 0.6), 0.85),
)
#: Event level over the room (SNR range, dB) by sound kind.
_SNR_DB = {"snore": (-5.0, 35.0), "breath": (-10.0, 30.0), "partner": (-10.0, 25.0)}
#: Chance of each optional room source in a clip.
_ROOM_SOURCES = {"fan": 0.35, "hum": 0.15, "traffic": 0.2, "speech": 0.12, "rustle": 0.12}
#: Samples of each noise bank before its wrap-around head (2**18: about 16 s at 16 kHz).
BANK_SAMPLES = 1 << 18
#: Room impulse responses per split, and the longest one (s).
_IRS = 32
_IR_MAX_S = 0.6

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
        self._irs: dict[str, tuple[list[np.ndarray], list[float]]] = {}
        self._ir_spectra: dict[str, list[np.ndarray]] = {}
        #: FFT length of a linear convolution of a clip with any response.
        self._conv_size = 1 << int(
            np.ceil(np.log2(self.padded_samples + int(_IR_MAX_S * sample_rate)))
        )
        self._freqs = np.fft.rfftfreq(self.padded_samples, 1.0 / self.sample_rate).astype(
            np.float32
        )

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

        Keys: ``label``; ``setup`` (``earable``, ``mono`` or ``stereo``); ``room_db``
        (the room's diffuse noise RMS, dBFS, before the recording gain); ``room_sources``
        (comma-joined: ``fan``, ``hum``, ``traffic``, ``speech``, ``rustle``); ``snr_db``
        (event level over the room at the airborne microphone, else ``None``); ``emitter``
        (``wearer``, ``partner`` or ``None``); ``kind`` (``breath``, ``snore``, ``cough``
        or ``None``); ``f0_hz``, ``snore_type`` (``palatal``, ``mixed``, ``tongue``) and
        ``power_ratio`` (below/above 750 Hz) of a snore, else ``None``; ``rt60_s`` of the
        room the event was heard in; ``gain_db``, the recording gain applied at the end.
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

        Kinds: ``white``, ``pink``, ``brown`` (room noise), ``speech`` (the long-term
        spectrum of speech: a broad peak near 500 Hz, -6 dB/octave above 1 kHz) and
        ``breath_air``, ``breath_hiss``, ``breath_body`` (one turbulence noise filtered
        three ways, so equal offsets are coherent). Each holds :data:`BANK_SAMPLES` samples
        followed by its first :attr:`padded_samples` again, so any offset below
        :data:`BANK_SAMPLES` reads a whole clip without wrapping. Any name works as
        ``split`` (the synthetic night uses ``"night"``).
        """
        if split not in self._banks:
            rng = np.random.default_rng([self.seed, self._split_code(split), 1])
            n = BANK_SAMPLES
            f = np.fft.rfftfreq(n, 1.0 / self.sample_rate).astype(np.float32)
            f_safe = np.maximum(f, np.float32(20.0))

            def shaped(spectrum: np.ndarray, gain: np.ndarray) -> np.ndarray:
                gain[0] = 0.0
                return _unit(np.fft.irfft(spectrum * gain, n))

            def normal() -> np.ndarray:
                return rng.standard_normal(n, dtype=np.float32)

            # float32 throughout: NumPy >= 2 transforms float32 without promoting.
            white = normal()
            pink, brown, breath, speech = (np.fft.rfft(normal()) for _ in range(4))
            banks = {
                "white": _unit(white),
                "pink": shaped(pink, 1.0 / np.sqrt(f_safe)),
                "brown": shaped(brown, 1.0 / f_safe),
                "speech": shaped(speech, _hp(f, 150.0) * _lp(f, 600.0, 1) * _lp(f, 4000.0, 2)),
                # One turbulence noise seen three ways, so equal offsets are coherent.
                "breath_air": shaped(breath, _hp(f, 250.0) * _lp(f, 2500.0, 2)),
                "breath_hiss": shaped(breath, _hp(f, 1200.0) * _lp(f, 6000.0, 2)),
                "breath_body": shaped(breath, _hp(f, 60.0) * _lp(f, 450.0, 4)),
            }
            m = self.padded_samples
            # Append the head so any offset in [0, n) reads m samples without wrapping.
            self._banks[split] = {
                k: np.concatenate([v, v[:m]]).astype(np.float32) for k, v in banks.items()
            }
        return self._banks[split]

    def impulse_responses(self, split: str) -> tuple[list[np.ndarray], list[float]]:
        """The split's room impulse responses (unit energy, float32) and their RT60s (s).

        Made once from the seed and ``split``: :data:`_IRS` tails of exponentially
        decaying noise at an RT60 drawn from 0.15-0.8 s (at most 0.6 s long), the part
        above 2 kHz decaying twice as fast (air and soft furnishings absorb the highs).
        The direct sound is not in them: :meth:`_reverb` mixes dry and wet.
        """
        if split not in self._irs:
            rng = np.random.default_rng([self.seed, self._split_code(split), 2])
            sr = self.sample_rate
            irs = []
            f = np.fft.rfftfreq(int(_IR_MAX_S * sr), 1.0 / sr)
            split_lp = _lp(f, 2000.0, 2)  # below 2 kHz decays at RT60, above twice as fast
            irs, rt60s = [], []
            for _ in range(_IRS):
                rt60 = float(rng.uniform(0.15, 0.8))
                length = int(min(rt60, _IR_MAX_S) * sr)
                t = np.arange(length) / sr
                spectrum = np.fft.rfft(rng.standard_normal(f.size * 2 - 2))
                low = np.fft.irfft(spectrum * split_lp)[:length]
                high = np.fft.irfft(spectrum * np.sqrt(np.maximum(1.0 - split_lp**2, 0.0)))[:length]
                y = low * np.exp(-6.91 * t / rt60) + high * np.exp(-13.8 * t / rt60)
                y[: int(0.002 * sr)] = 0.0  # the first reflection after ~2 ms
                irs.append((y / np.sqrt(np.sum(y * y))).astype(np.float32))
                rt60s.append(rt60)
            self._irs[split] = (irs, rt60s)
        return self._irs[split]

    def _render(self, split: str, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        if index < 0:
            raise IndexError(f"clip index must be >= 0, got {index}")
        rng = _Draws(np.random.default_rng([self.seed, self._split_code(split), 0, index]))
        bank = self.noise_banks(split)
        n = self.padded_samples  # work on whole envelope steps; cropped to num_samples at the end
        label = self.labels[int(np.searchsorted(self._cum_weights, rng.random() * 0.999999))]
        setup = "earable"
        if label != "non_wearer":
            setup = _SETUPS[int(np.searchsorted(_SETUP_CUM, rng.random() * 0.999999))]
        room_db = rng.uniform(-70.0, -35.0)
        info: dict[str, Any] = {
            "label": label,
            "setup": setup,
            "room_db": room_db,
            "snr_db": None,
            "emitter": None,
            "kind": None,
            "f0_hz": None,
            "snore_type": None,
            "room_sources": [],
            "rt60_s": None,
            "gain_db": 0.0,
            "power_ratio": None,
        }
        wave, airborne_room = self._room(rng, bank, setup, room_db, info)

        if label != "quiet":
            wearer = label != "non_wearer"
            if wearer:
                kind = "snore" if label == "snore" else "breath"
            else:
                kind = _PARTNER_KINDS[int(np.searchsorted(_PARTNER_CUM, rng.random() * 0.999999))]
            lo, hi = _SNR_DB[kind if wearer else "partner"]
            snr_db = rng.uniform(lo, hi)
            info.update(emitter="wearer" if wearer else "partner", kind=kind, snr_db=snr_db)
            env = None if kind == "cough" else self._breath_env(rng, snore=kind == "snore")
            event = np.zeros((2, n), np.float32)
            # At a bedside microphone the wearer's sound is airborne, like a partner's at the
            # earable's outer microphone: render it that way and keep the outer channel.
            drawn = self._add(
                rng, event, bank, Sound(kind, 1.0, wearer and setup == "earable", env)
            )
            info.update(drawn)
            # The level is set on what the microphone hears, over the room it hears.
            heard = event[1]
            scale = airborne_room * db_gain(snr_db) / max(_rms_active(heard), 1e-12)
            event *= np.float32(scale)
            rev = self._reverb(rng, split, event[1], info)
            if setup == "earable":
                wave[0] += event[0]
                wave[1] += rev
            else:
                wave[0] += rev
                if (
                    setup == "stereo"
                ):  # the second microphone: a little later, a little louder or softer
                    lag = int(rng.uniform(0.0, 0.001) * self.sample_rate)
                    rev2 = np.roll(rev, lag) * np.float32(db_gain(rng.uniform(-3.0, 3.0)))
                    rev2[:lag] = 0.0
                    wave[1] += rev2
        self._microphones(rng, wave, setup)  # a mono clip's channel 1 becomes its channel 0

        if n != self.num_samples:
            wave = np.ascontiguousarray(wave[:, : self.num_samples])
        peak = max(float(wave.max()), -float(wave.min()), 1e-12)
        if rng.random() < 0.6:  # a normalising recorder or automatic gain
            gain = db_gain(rng.uniform(-40.0, -1.0)) / peak
            wave *= np.float32(gain)
            info["gain_db"] = 20.0 * log(gain, 10)
            peak *= gain
        if peak > 0.95:  # keep PCM_16 writes free of clipping
            wave *= np.float32(0.95 / peak)
            info["gain_db"] += 20.0 * log(0.95 / peak, 10)
        return wave, info

    def _room(
        self, rng: Rng, bank: Banks, setup: str, room_db: float, info: dict[str, Any]
    ) -> tuple[np.ndarray, float]:
        """The room at both microphones ``(2, n)`` and its RMS at the airborne one."""
        n = self.padded_samples
        sr = self.sample_rate

        def noise(kind: str) -> np.ndarray:
            o = int(rng.integers(BANK_SAMPLES))
            return bank[kind][o : o + n]

        # Scalars stay Python floats so that float32 arrays are never promoted.
        level = db_gain(room_db)
        colour = [rng.exponential() for _ in range(3)]  # Dirichlet(1, 1, 1) mix weights
        norm = level / sqrt(sum(c * c for c in colour))
        diffuse = noise("white") * (colour[0] * norm)
        diffuse += noise("pink") * (colour[1] * norm)
        diffuse += noise("brown") * (colour[2] * norm)
        sources = np.zeros(n, np.float32)  # fans, hum, traffic, speech, rustle: heard by both mics
        t = np.arange(n, dtype=np.float32) / sr
        for name, chance in _ROOM_SOURCES.items():
            if rng.random() >= chance:
                continue
            info["room_sources"].append(name)
            if name == "fan":  # broadband with a resonance hump, plus blade-pass tones
                hump = _fft_filter(
                    noise("pink"), self._curve(peak=(rng.uniform(150.0, 1500.0), 12.0, 1.0))
                )
                part = _unit(hump)
                bp = rng.uniform(30.0, 150.0)
                for k in (1, 2, 3):
                    amp = db_gain(-rng.uniform(8.0, 25.0) - 4.0 * k) * sqrt(2.0)
                    part += np.sin(2 * np.pi * k * bp * t + 6.283 * rng.random()) * amp
                part *= level * db_gain(rng.uniform(-6.0, 10.0))
            elif name == "hum":
                mains = 50.0 if rng.random() < 0.5 else 60.0
                part = np.zeros(n, np.float32)
                for k in (1, 2, 3, 4):
                    amp = db_gain(-6.0 * (k - 1) - rng.uniform(0.0, 6.0)) * sqrt(2.0)
                    part += np.sin(2 * np.pi * k * mains * t + 6.283 * rng.random()) * amp
                part *= level * db_gain(rng.uniform(-12.0, 3.0))
            elif name == "traffic":  # rumble swelling and fading over seconds
                swell = 1.0 + rng.uniform(0.3, 0.9) * np.sin(
                    2 * np.pi * rng.uniform(0.1, 0.6) * t + 6.283 * rng.random()
                )
                part = noise("brown") * swell * (level * db_gain(rng.uniform(-6.0, 12.0)))
            elif name == "speech":  # distant talk or TV: speech-shaped noise in syllables
                part = noise("speech") * self._syllables(rng)
                part *= level * db_gain(rng.uniform(-10.0, 10.0))
            else:  # rustle: bursts of hiss
                env = np.zeros(n, np.float32)
                for _ in range(1 + int(rng.random() * 3)):
                    a = int(rng.random() * n)
                    b = min(n, a + int(rng.uniform(0.05, 0.3) * sr))
                    env[a:b] = np.hanning(b - a + 2)[1:-1] * rng.uniform(0.5, 1.0)
                part = noise("breath_hiss") * env * (level * db_gain(rng.uniform(0.0, 20.0)))
            sources += part.astype(np.float32)
        airborne = diffuse + sources
        airborne_rms = float(np.sqrt(np.mean(np.square(airborne, dtype=np.float64))))
        wave = np.empty((2, n), dtype=np.float32)
        if setup == "earable":
            self_noise = db_gain(rng.uniform(-88.0, -78.0))
            wave[1] = airborne + noise("white") * self_noise
            # In the ear: the seal attenuates the room and low-passes it; self-noise floor.
            seal = self._curve(lp=(rng.uniform(800.0, 2500.0), 2))
            wave[0] = _fft_filter(airborne, seal) * db_gain(-rng.uniform(6.0, 16.0))
            wave[0] += noise("white") * self_noise
        else:
            wave[0] = airborne + noise("white") * db_gain(rng.uniform(-88.0, -70.0))
            if setup == "stereo":  # partly the same diffuse field, the sources shared
                rho = rng.uniform(0.3, 0.9)
                other = noise("pink") * (colour[1] * norm) + noise("brown") * (colour[2] * norm)
                other += noise("white") * (colour[0] * norm)
                wave[1] = diffuse * rho + other * sqrt(1.0 - rho * rho) + sources
                wave[1] += noise("white") * db_gain(rng.uniform(-88.0, -70.0))
            else:
                wave[1] = 0.0
        info["room_sources"] = ",".join(info["room_sources"])
        return wave, airborne_rms

    def _syllables(self, rng: Rng) -> np.ndarray:
        """A speech-like amplitude envelope: 3-6 syllables a second with pauses (float32)."""
        n = self.padded_samples
        sr = self.sample_rate
        env = np.zeros(n, np.float32)
        pos = -rng.uniform(0.0, 0.3)
        while pos < self.duration_s:
            dur = rng.uniform(0.08, 0.3)
            if rng.random() < 0.8:
                length = int(dur * sr)
                idx = np.arange(length) + int(round(pos * sr))
                keep = (idx >= 0) & (idx < n)
                env[idx[keep]] = np.hanning(length + 2)[1:-1][keep] * rng.uniform(0.3, 1.0)
            pos += dur + rng.uniform(0.02, 0.15)
        return env

    def _curve(
        self,
        hp: float | None = None,
        lp: tuple[float, int] | None = None,
        peak: tuple[float, float, float] | None = None,
    ) -> np.ndarray:
        """Magnitude response on the clip's rFFT bins: Butterworth high-pass (2nd order) at
        ``hp`` Hz, low-pass ``(corner, order)``, log-Gaussian peak ``(centre, dB, octaves)``."""
        f = self._freqs
        g = np.ones_like(f)
        if hp is not None:
            g *= _hp(f, hp)
        if lp is not None:
            g *= _lp(f, *lp)
        if peak is not None:
            fc, db, octaves = peak
            g *= 10.0 ** (
                db * np.exp(-0.5 * (np.log2(np.maximum(f, 1.0) / fc) / octaves) ** 2) / 20
            )
        return g.astype(np.float32)

    def _microphones(self, rng: Rng, wave: np.ndarray, setup: str) -> None:
        """Each microphone's response, in place: high-pass, maybe a low-pass, a resonance."""

        def response() -> np.ndarray:
            lp = (rng.uniform(3400.0, 7800.0), 4) if rng.random() < 0.5 else None
            peak = (rng.uniform(1000.0, 5000.0), rng.uniform(-6.0, 6.0), rng.uniform(0.3, 1.0))
            return self._curve(hp=exp(rng.uniform(log(20.0), log(150.0))), lp=lp, peak=peak)

        if setup == "earable":  # in-ear: the canal's own low-pass; outer: a MEMS microphone
            wave[0] = _fft_filter(wave[0], self._curve(hp=rng.uniform(20.0, 60.0)))
            wave[1] = _fft_filter(wave[1], response())
        elif setup == "mono":
            wave[0] = _fft_filter(wave[0], response())
            wave[1] = wave[0]
        else:
            shared = response()
            for ch in (0, 1):  # one model of microphone, each unit a little different
                own = self._curve(peak=(rng.uniform(500.0, 6000.0), rng.uniform(-2.0, 2.0), 1.0))
                wave[ch] = _fft_filter(wave[ch], shared * own)

    def _reverb(self, rng: Rng, split: str, dry: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        """``dry`` (airborne) plus its reverberation from one of the split's rooms (float32)."""
        irs, rt60s = self.impulse_responses(split)
        k = rng.integers(len(irs))
        drr = db_gain(rng.uniform(-3.0, 12.0))  # direct-to-reverberant ratio
        if split not in self._ir_spectra:  # every response's spectrum, once per split
            self._ir_spectra[split] = [np.fft.rfft(ir, self._conv_size) for ir in irs]
        spectrum = np.fft.rfft(dry, self._conv_size) * self._ir_spectra[split][k]
        wet = np.fft.irfft(spectrum, self._conv_size)[: dry.size]
        info["rt60_s"] = rt60s[k]
        out = dry + wet.astype(np.float32) * np.float32(_rms(dry) / max(_rms(wet), 1e-20) / drr)
        return out.astype(np.float32)

    # -- sound primitives (the synthetic night drives them too) -------------------

    def add_sound(self, rng: Rng, wave: np.ndarray, bank: Banks, sound: Sound) -> float | None:
        """Add ``sound`` to ``wave`` in place; return a snore's pulse rate (Hz), else ``None``.

        The sound is dry (no room, no microphone): what reaches each microphone of an
        earable, in-ear channel first.

        Args:
            rng: where every draw comes from (voice, channel gains, noise offsets).
            wave: ``(2, padded_samples)`` float32, in-ear channel first.
            bank: the noise to shape (:meth:`noise_banks`).
            sound: what to add; a snore also adds the breathing it rides on, 12-30 dB
                quieter.
        """
        return self._add(rng, wave, bank, sound)["f0_hz"]

    def _add(self, rng: Rng, wave: np.ndarray, bank: Banks, sound: Sound) -> dict[str, Any]:
        """:meth:`add_sound`, returning what was drawn (``f0_hz``, ``snore_type``, ``power_ratio``)."""
        drawn: dict[str, Any] = {"f0_hz": None, "snore_type": None, "power_ratio": None}
        if sound.kind == "cough":
            self._add_cough(rng, bank, wave, sound.level)
            return drawn
        if sound.envelopes is None:
            raise ValueError(f"a {sound.kind} sound needs breathing envelopes")
        if sound.kind == "breath":
            self._add_breath(rng, bank, wave, sound)
            return drawn
        if sound.kind != "snore":
            raise ValueError(f"sound kind must be breath, snore or cough, got {sound.kind!r}")
        drawn = self._add_snore(rng, bank, wave, sound)
        breath = sound._replace(level=sound.level * db_gain(-rng.uniform(12.0, 30.0)))
        self._add_breath(rng, bank, wave, breath)
        return drawn

    def _breath_env(self, rng: Rng, snore: bool) -> Envelopes:
        """Inhale and exhale envelopes (one value per envelope step, float32).

        10-22 breaths a minute; breathing is caught at any phase; a snore clip is placed
        so that its inhale (when snoring happens) overlaps the clip.
        """
        period = 60.0 / rng.uniform(10.0, 22.0)
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
        """Add turbulence noise under the inhale and exhale envelopes.

        Airborne, the inhale is 250-2500 Hz noise with a 1.2-6 kHz hiss and the exhale is
        shifted lower (part of it 60-450 Hz), both through one airway resonance (a -6..+12 dB
        peak at 0.3-2.5 kHz); in the ear, body-conducted low noise.
        """
        level, env = sound.level, sound.envelopes
        n = self.padded_samples
        o = int(rng.integers(BANK_SAMPLES))
        hiss = rng.uniform(0.0, 0.6)
        low = rng.uniform(0.3, 0.9)  # the exhale's low share
        if sound.wearer:  # body-conducted: strongest and lowest in the ear
            g_in, g_out = level, level * db_gain(-rng.uniform(2.0, 12.0))
        else:  # airborne to the outer mic, occluded in the ear
            g_in, g_out = level * db_gain(-rng.uniform(15.0, 30.0)), level
        air = bank["breath_air"][o : o + n]
        body = bank["breath_body"][o : o + n]
        # The airway's own resonance: a peak (or notch) somewhere in the breath's band.
        tract = self._curve(
            peak=(
                exp(rng.uniform(log(300.0), log(2500.0))),
                rng.uniform(-6.0, 12.0),
                rng.uniform(0.3, 1.5),
            )
        )
        air = _fft_filter(air, tract)
        inhale = (air + bank["breath_hiss"][o : o + n] * hiss) * g_out
        exhale = (air * sqrt(1.0 - low * low) + body * low) * g_out
        steps = (-1, _ENV_HOP)
        e_in, e_ex = env["inhale"][:, None], env["exhale"][:, None]
        wave[1] += (inhale.reshape(steps) * e_in + exhale.reshape(steps) * e_ex).reshape(-1)
        wave[0] += ((body * g_in).reshape(steps) * (e_in + e_ex)).reshape(-1)

    def _add_snore(self, rng: Rng, bank: Banks, wave: np.ndarray, sound: Sound) -> dict[str, Any]:
        """Add a jittered pulse train (and turbulence) through formant resonators.

        Returns ``f0_hz``, ``snore_type`` and ``power_ratio`` (airborne kernel power below
        750 Hz over above it; see the module docstring for the ranges and their sources).
        """
        level, env = sound.level, sound.envelopes
        sr = self.sample_rate
        n = self.padded_samples
        u = rng.random()
        kind, (f_lo, f_hi), (r_lo, r_hi), turbulence = _SNORE_TYPES[-1][0], *_SNORE_TYPES[-1][2:]
        for name, cum, f_range, r_range, share in _SNORE_TYPES:
            if u < cum:
                kind, (f_lo, f_hi), (r_lo, r_hi), turbulence = name, f_range, r_range, share
                break
        f0 = exp(rng.uniform(log(f_lo), log(f_hi)))
        t0 = sr / f0
        width = max(4, int(rng.uniform(0.4, 0.7) * t0))
        # 12 ms of formant ringing (bandwidths >= 60 Hz have decayed by 20 dB), faded out.
        ring = int(0.012 * sr)
        klen = max(width, ring)
        t = np.arange(klen) / sr
        glottal = np.zeros(klen)
        glottal[:width] = np.hanning(width + 2)[1:-1]
        f1 = min(max(560.0 + 170.0 * _normal(rng), 250.0), 1100.0)
        f2 = min(max(1500.0 + 450.0 * _normal(rng), f1 + 300.0), 2900.0)
        amps = (1.0, 0.6, 0.35) if kind != "tongue" else (0.6, 1.0, 0.6)
        formants = np.zeros(klen)
        for fc, amp in zip((f1, f2, rng.uniform(2300.0, 3400.0)), amps, strict=True):
            bw = rng.uniform(60.0, 250.0)
            formants += amp * np.exp(-np.pi * bw * t) * np.sin(2 * np.pi * fc * t)
        fade = ring // 4
        formants[ring:] = 0.0
        formants[ring - fade : ring] *= np.linspace(1.0, 0.0, fade)
        formants /= np.sqrt(np.sum(formants**2))
        glottal /= np.sqrt(np.sum(glottal**2))
        k_out, ratio = _kernel_at_ratio(
            glottal, formants, exp(rng.uniform(log(r_lo), log(r_hi))), sr
        )
        if sound.wearer:  # in the ear the pulse is body-conducted (its fundamental dominates)
            k_in = glottal + formants * rng.uniform(0.05, 0.3)
            g_in, g_out = level, level * db_gain(-rng.uniform(0.0, 10.0))
        else:  # occluded: only the low pulse reaches the ear, far weaker
            k_in = glottal
            g_in, g_out = level * db_gain(-rng.uniform(15.0, 30.0)), level
        # Pulse times with jitter; amplitudes follow the inhale envelope with shimmer.
        count = int(n / t0) + 3
        jitter = rng.uniform(0.02, 0.1) if kind != "tongue" else 0.3
        steps = t0 * (1.0 + jitter * rng.standard_normal(count)).clip(0.5, 1.5)
        times = (np.cumsum(steps) - (1.0 + rng.random()) * t0).astype(np.int64)
        times = times[(times > -klen) & (times < n)]
        amp = env["inhale"][np.maximum(times, 0) // _ENV_HOP].astype(np.float64)
        amp *= 1.0 + rng.uniform(0.05, 0.2) * rng.standard_normal(times.size)
        onset = rng.uniform(0.05, 0.25)  # airflow needed before the soft palate flutters
        keep = amp > onset
        times, amp = times[keep], amp[keep]
        voiced = sqrt(1.0 - turbulence * turbulence)
        if times.size:
            idx = ((times + klen)[:, None] + np.arange(klen)[None, :]).ravel()
            size = n + 2 * klen
            for ch, kernel, gain in ((0, k_in, g_in), (1, k_out, g_out)):
                # Unit kernel energy at f0 pulses/s gives unit RMS when fully voiced.
                scale = voiced * gain / np.sqrt(np.sum(kernel**2) * f0 / sr)
                w = (amp[:, None] * (kernel * scale)[None, :]).ravel()
                wave[ch] += np.bincount(idx, weights=w, minlength=size)[klen : klen + n]
        if turbulence:  # turbulence through the same tract, gated like the pulses
            gate = np.maximum(env["inhale"] - onset, 0.0) / max(1.0 - onset, 1e-6)
            o = int(rng.integers(BANK_SAMPLES))
            noise = bank["white"][o : o + n]
            size = 1 << int(np.ceil(np.log2(n + klen)))
            for ch, kernel, gain in ((0, k_in, g_in), (1, k_out, g_out)):
                shaped = np.fft.irfft(np.fft.rfft(noise, size) * np.fft.rfft(kernel, size), size)
                shaped = shaped[:n] * (turbulence * gain / np.sqrt(np.sum(kernel**2)))
                wave[ch] += (
                    (shaped.reshape(-1, _ENV_HOP) * gate[:, None]).reshape(-1).astype(np.float32)
                )
        return {"f0_hz": float(f0), "snore_type": kind, "power_ratio": ratio}

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


def _unit(x: np.ndarray) -> np.ndarray:
    """``x`` scaled to unit RMS."""
    return x / np.sqrt(np.mean(np.square(x, dtype=np.float64)))


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def _rms_active(x: np.ndarray, frame: int = 512) -> float:
    """RMS over the 32-ms frames within 10 dB of the loudest: a sound's level while it sounds."""
    m = x.size // frame * frame
    power = np.mean(np.square(x[:m].reshape(-1, frame), dtype=np.float64), axis=1)
    loud = power >= 0.1 * power.max() if power.size else power
    return float(np.sqrt(power[loud].mean())) if power.size else _rms(x)


def _hp(f: np.ndarray, corner: float) -> np.ndarray:
    """Second-order Butterworth high-pass magnitude at ``f``."""
    r = (f / corner) ** 2
    return r / np.sqrt(1.0 + r * r)


def _lp(f: np.ndarray, corner: float, order: int = 4) -> np.ndarray:
    """Butterworth low-pass magnitude of ``order`` at ``f``."""
    return 1.0 / np.sqrt(1.0 + (f / corner) ** (2 * order))


def _fft_filter(x: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """``x`` through the zero-phase magnitude response ``curve`` (its rFFT bins), float32."""
    return np.fft.irfft(np.fft.rfft(x) * curve, x.size).astype(np.float32)


def _normal(rng: Rng) -> float:
    """One standard normal draw (Box-Muller from two uniforms: scalar draws stay cheap)."""
    return sqrt(-2.0 * log(1.0 - rng.random())) * cos(2.0 * pi * rng.random())


def _kernel_at_ratio(
    glottal: np.ndarray, formants: np.ndarray, target: float, sample_rate: int
) -> tuple[np.ndarray, float]:
    """``glottal + a * formants`` whose power below 750 Hz over above it is nearest ``target``.

    ``a`` is searched on a log grid (and formants alone); returns the kernel and its ratio.
    """
    size = 1 << int(np.ceil(np.log2(glottal.size * 4)))
    below = np.fft.rfftfreq(size, 1.0 / sample_rate) < 750.0
    g, f = np.fft.rfft(glottal, size), np.fft.rfft(formants, size)
    best = (np.inf, glottal, 0.0)
    for a in [*np.logspace(-2.0, 2.0, 33), None]:
        spec = f if a is None else g + a * f
        p = np.abs(spec) ** 2
        ratio = float(p[below].sum() / max(p[~below].sum(), 1e-30))
        miss = abs(log(ratio) - log(target))
        if miss < best[0]:
            best = (miss, formants if a is None else glottal + a * formants, ratio)
    return best[1], best[2]
