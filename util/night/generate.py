"""A synthetic night: hours of two-channel sleep sounds in a sleep-cycle-like order, with its truth.

``python -m util.night.generate --hours 8 --out night.wav --seed 0`` writes the
recording block by block (never whole in memory) and ``night.csv`` beside it, the
ground-truth events ``start_s,end_s,label,kind,snr_db``.

**The plan** (:func:`night_plan`) walks ~90-minute sleep cycles (80-110 min).
Snore bouts of 5-60 minutes, with 1-5 minutes of audible breathing after each,
come mostly in the first 60 % of a cycle (non-REM sleep), more often early in the
night; the rest of the night is quiet stretches (1-15 min), breathing (1-10 min)
and the bed partner's sounds (``non_wearer``: their snoring 2-10 min, breathing
1-4 min, or a single cough). Exactly one label holds at any time, on a grid of
whole seconds. ``scale`` multiplies every duration, so a few minutes of test night
can hold the whole variety.

**The sound** reuses the public sound primitives of the synthetic corpus
(:meth:`data.sources.synthetic.Synthetic.add_sound`, its noise banks and breathing
envelopes), so a model trained on that corpus hears the same sounds here. What the night
adds is continuity: one room for the whole night (level drifting slowly within ±3 dB
around a level drawn in the corpus's range; its noise colour drawn like the corpus's but
with less white noise, since bedrooms hum more than they hiss), a breathing rhythm whose
phase runs on across seconds, and a signal-to-noise ratio per segment (5-20 dB, inside
the corpus's ranges). The night is an earable night (in-ear and outer microphone; no
bedside recorder, reverberation or recording gain, which only the corpus adds). Each
second of an event is rendered by the primitives with its own draws (voice, channel
gains) like one training clip and joined to the next with a 64 ms equal-power crossfade.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from jsonargparse import ArgumentError, ArgumentParser

from data.sources.synthetic import (
    BANK_SAMPLES,
    Envelopes,
    Sound,
    Synthetic,
    breath_envelopes,
    db_gain,
)
from util.errors import condense

#: Labels of the night (those of the synthetic corpus) and their kinds.
KINDS: dict[str, str] = {
    "breath": "breathe",
    "snore": "snore",
    "partner_snore": "non_wearer",
    "partner_breath": "non_wearer",
    "partner_cough": "non_wearer",
}
#: Columns of the ground-truth CSV.
TRUTH_COLUMNS = ("start_s", "end_s", "label", "kind", "snr_db")
#: Seconds of audio assembled and written at a time.
_BLOCK_S = 60
#: Crossfade between consecutive seconds of an event.
_FADE_S = 0.064


@dataclass(frozen=True)
class Segment:
    """One stretch of the night with a single label.

    Attributes:
        start_s: onset (whole seconds).
        end_s: offset (whole seconds).
        label: ``quiet``, ``breathe``, ``snore`` or ``non_wearer``.
        kind: ``quiet``, ``breath``, ``snore``, ``partner_snore``, ``partner_breath``
            or ``partner_cough``.
        snr_db: event level over the room noise (outer microphone).
    """

    start_s: int
    end_s: int
    label: str
    kind: str
    snr_db: float = 0.0


def night_plan(hours: float, seed: int = 0, scale: float = 1.0) -> list[Segment]:
    """The night's segments: contiguous, covering ``[0, round(hours · 3600))`` seconds.

    Args:
        hours: length of the night.
        seed: seed of the plan (and of the sound).
        scale: factor on every segment duration (< 1 packs more events into a short night).
    """
    total = int(round(hours * 3600))
    if total < 1 or scale <= 0:
        raise ValueError(f"need hours >= 1/3600 and scale > 0, got {hours}, {scale}")
    rng = np.random.default_rng([seed, 101])
    minutes = 60.0 * scale

    def span(lo: float, hi: float) -> int:
        return max(1, int(round(rng.uniform(lo, hi) * minutes)))

    out: list[Segment] = []
    t = 0
    cycle_start, cycle_len = 0, span(80, 110)

    def add(kind: str, length: int) -> None:
        nonlocal t
        end = min(total, t + length)
        if end > t:
            label = KINDS.get(kind, "quiet")
            snr = 0.0 if kind == "quiet" else float(rng.uniform(5.0, 20.0))
            out.append(Segment(t, end, label, kind, snr))
            t = end

    while t < total:
        while t >= cycle_start + cycle_len:
            cycle_start, cycle_len = cycle_start + cycle_len, span(80, 110)
        phase = (t - cycle_start) / cycle_len
        progress = t / total
        p_snore = 0.2 * (1.0 - 0.5 * progress) if phase < 0.6 else 0.03
        u = rng.random()
        if u < p_snore:
            add("snore", span(5, 60))
            add("breath", span(1, 5))
        elif u < p_snore + 0.3:
            add("breath", span(1, 10))
        elif u < p_snore + 0.42:
            v = rng.random()
            if v < 0.4:
                add("partner_snore", span(2, 10))
            elif v < 0.7:
                add("partner_breath", span(1, 4))
            else:
                add("partner_cough", 1)
            add("quiet", span(0.5, 3))
        else:
            add("quiet", span(2, 20))
    return _merge(out)


def _merge(segments: Sequence[Segment]) -> list[Segment]:
    """Join neighbours of one kind (two quiet stretches in a row are one)."""
    out: list[Segment] = []
    for s in segments:
        if out and out[-1].kind == s.kind and out[-1].end_s == s.start_s:
            out[-1] = Segment(out[-1].start_s, s.end_s, s.label, s.kind, out[-1].snr_db)
        else:
            out.append(s)
    return out


def truth_events(segments: Sequence[Segment]) -> list[Segment]:
    """The ground-truth events: every segment but quiet, neighbours of one label joined.

    A partner's snoring right after a partner's breathing is one ``non_wearer``
    event, as a detector of labels (not kinds) would see it.
    """
    out: list[Segment] = []
    for s in segments:
        if s.label == "quiet":
            continue
        if out and out[-1].label == s.label and out[-1].end_s == s.start_s:
            prev = out[-1]
            out[-1] = Segment(prev.start_s, s.end_s, s.label, f"{prev.kind}+{s.kind}", prev.snr_db)
        else:
            out.append(s)
    return out


def write_truth_csv(segments: Sequence[Segment], path: str | os.PathLike[str]) -> int:
    """Write the ground-truth events of ``segments``; return how many."""
    events = truth_events(segments)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TRUTH_COLUMNS)
        for e in events:
            w.writerow([f"{e.start_s:.3f}", f"{e.end_s:.3f}", e.label, e.kind, f"{e.snr_db:.1f}"])
    return len(events)


class _Voices:
    """The synthetic corpus's sounds, driven second by second with the night's envelopes."""

    def __init__(self, seed: int, sample_rate: int) -> None:
        self.sr = sample_rate
        self.fade = max(32, int(round(_FADE_S * sample_rate / 32)) * 32)
        # One "clip" is one second of the night plus the crossfade into the next.
        self.syn = Synthetic(
            seed=seed, sample_rate=sample_rate, duration_s=(sample_rate + self.fade) / sample_rate
        )
        self.n = sample_rate + self.fade
        self.bank = self.syn.noise_banks("night")
        ramp = np.sin(0.5 * np.pi * (np.arange(self.fade) + 0.5) / self.fade).astype(np.float32)
        self.window = np.ones(self.n, np.float32)
        self.window[: self.fade] = ramp  # equal-power: sin² + cos² = 1 across the overlap
        self.window[-self.fade :] = ramp[::-1]

    def render(
        self, rng: np.random.Generator, kind: str, env: Envelopes, level: float
    ) -> np.ndarray:
        """One second (+ fade) of the night's ``kind`` at ``level``, windowed."""
        wave = np.zeros((2, self.syn.padded_samples), np.float32)
        sound = kind.removeprefix("partner_")
        self.syn.add_sound(rng, wave, self.bank, Sound(sound, level, sound == kind, env))
        return wave[:, : self.n] * self.window


class _Breathing:
    """A breathing rhythm whose phase carries on from second to second."""

    def __init__(self, rng: np.random.Generator, t_env: np.ndarray) -> None:
        self.rate = rng.uniform(12.0, 18.0) / 60.0  # breaths per second
        self.drift = rng.uniform(0.0, 2 * np.pi)
        self.phase0 = rng.random()
        self.p_in = rng.uniform(0.3, 0.45)
        self.p_ex = rng.uniform(0.35, 0.5)
        self.exhale_gain = rng.uniform(0.4, 1.0)
        self.t_env = t_env

    def phase(self, t: np.ndarray) -> np.ndarray:
        # rate · (1 + 0.1 sin(2π t / 20 min)), integrated: a slowly wandering pace.
        w = 2 * np.pi / 1200.0
        cycles = self.rate * (t - 0.1 / w * (np.cos(w * t + self.drift) - np.cos(self.drift)))
        return (self.phase0 + cycles) % 1.0

    def envelopes(self, second: int) -> Envelopes:
        phi = self.phase(second + self.t_env)
        return breath_envelopes(phi, self.p_in, self.p_ex, self.exhale_gain)


class _Room:
    """One room for the whole night: noise banks read continuously, level drifting slowly."""

    def __init__(self, rng: np.random.Generator, bank: dict[str, np.ndarray]) -> None:
        self.bank = bank
        self.room_db = float(rng.uniform(-60.0, -45.0))
        self.drift = rng.uniform(0.0, 2 * np.pi)
        # White, pink, brown weights as the corpus draws them, with less white: a
        # bedroom hums (ventilation, traffic) more than it hisses.
        colour = rng.standard_exponential(3) * np.array([0.3, 1.0, 1.0])
        self.colour = colour / np.sqrt(np.sum(colour**2))
        self.self_noise = float(db_gain(rng.uniform(-88.0, -78.0)))
        self.occlusion_db = float(rng.uniform(6.0, 16.0))
        pb = rng.uniform(0.2, 1.0)
        self.inear_mix = np.array([pb, 1.0 - pb]) / math.hypot(pb, 1.0 - pb)
        self.offsets = rng.integers(0, BANK_SAMPLES, size=5)

    def level(self, t_s: np.ndarray | float) -> np.ndarray | float:
        """Outer-microphone room RMS at ``t_s`` seconds (±3 dB over 37 minutes)."""
        return db_gain(self.room_db) * 10.0 ** (
            3.0 * np.sin(2 * np.pi * t_s / 2220.0 + self.drift) / 20.0
        )

    def render(self, start: int, n: int, sr: int) -> np.ndarray:
        """Room noise for samples ``[start, start + n)`` of the night."""

        def read(i: int, kind: str) -> np.ndarray:
            """``n`` samples of a bank from the night's position, wrapping around its end."""
            pos = int(self.offsets[i] + start) % BANK_SAMPLES
            bank = self.bank[kind][:BANK_SAMPLES]
            pieces, left = [], n
            while left:
                take = min(left, BANK_SAMPLES - pos)
                pieces.append(bank[pos : pos + take])
                pos, left = 0, left - take
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

        gain = float(self.level(start / sr + n / sr / 2))  # the drift is far slower than a block
        out = np.empty((2, n), np.float32)
        white, pink, brown = read(0, "white"), read(1, "pink"), read(2, "brown")
        # Python floats keep the float32 arrays float32 (NumPy scalars would promote them).
        c = [float(v) * gain for v in self.colour]
        np.multiply(white, math.hypot(c[0], self.self_noise), out=out[1])
        out[1] += pink * c[1]
        out[1] += brown * c[2]
        g_in = gain * db_gain(-self.occlusion_db)
        np.multiply(read(3, "white"), self.self_noise, out=out[0])
        out[0] += read(4, "pink") * (g_in * float(self.inear_mix[0]))
        out[0] += brown * (g_in * float(self.inear_mix[1]))
        return out


def write_night(
    out: str | os.PathLike[str],
    hours: float = 8.0,
    seed: int = 0,
    scale: float = 1.0,
    sample_rate: int = 16000,
    subtype: str = "PCM_16",
    truth: str | os.PathLike[str] | None = None,
) -> tuple[Path, Path, list[Segment]]:
    """Write a synthetic night and its ground truth.

    Args:
        out: the audio file (``.wav`` or ``.flac``: soundfile picks the format).
        hours: length of the night.
        seed: one seed for the plan and the sound; the same seed gives the same file.
        scale: factor on every segment duration (see :func:`night_plan`).
        sample_rate: samples per second (the models expect 16000).
        subtype: soundfile subtype (``PCM_16``: 8 h of two channels is 1.8 GB as WAV;
            a ``.flac`` name gives a smaller file, written more slowly).
        truth: the ground-truth CSV; default ``out`` with suffix ``.csv``.

    Returns:
        ``(audio path, truth path, segments)``.
    """
    out = Path(out)
    truth_path = Path(truth) if truth is not None else out.with_suffix(".csv")
    segments = night_plan(hours, seed, scale)
    total = segments[-1].end_s
    sr = int(sample_rate)
    voices = _Voices(seed, sr)
    rng_room = np.random.default_rng([seed, 202])
    room = _Room(rng_room, voices.bank)
    wearer = _Breathing(rng_room, voices.syn.envelope_times)
    partner = _Breathing(rng_room, voices.syn.envelope_times)
    label_at = np.empty(total, dtype=object)
    snr_at = np.zeros(total)
    for s in segments:
        label_at[s.start_s : s.end_s] = s.kind
        snr_at[s.start_s : s.end_s] = s.snr_db
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    fade = voices.fade
    carry = np.zeros((2, fade), np.float32)
    with sf.SoundFile(str(tmp), "w", samplerate=sr, channels=2, subtype=subtype) as f:
        for block_start in range(0, total, _BLOCK_S):
            seconds = min(_BLOCK_S, total - block_start)
            buf = np.zeros((2, seconds * sr + fade), np.float32)
            buf[:, :fade] += carry
            for i in range(seconds):
                second = block_start + i
                kind = label_at[second]
                if kind == "quiet":
                    continue
                rng = np.random.default_rng([seed, 303, second])
                breathing = partner if kind.startswith("partner") else wearer
                snr = snr_at[second] + rng.uniform(-1.5, 1.5)
                level = float(room.level(second + 0.5)) * db_gain(snr)
                buf[:, i * sr : i * sr + voices.n] += voices.render(
                    rng, kind, breathing.envelopes(second), level
                )
            carry = buf[:, seconds * sr :].copy()
            block = buf[:, : seconds * sr] + room.render(block_start * sr, seconds * sr, sr)
            np.clip(block, -1.0, 1.0 - 2.0**-15, out=block)
            f.write(block.T)
    os.replace(tmp, out)
    write_truth_csv(segments, truth_path)
    return out, truth_path, segments


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m util.night.generate --hours 8 --out night.wav --seed 0``; the exit status.

    The options are :func:`write_night`'s arguments (jsonargparse, like ``main.py``:
    ``--help`` shows each with its default); a bad option is one ``error:`` line.
    """
    parser = ArgumentParser(
        prog="python -m util.night.generate",
        description=__doc__.split("\n\n")[0],
        exit_on_error=False,
    )
    parser.add_function_arguments(write_night, fail_untyped=True)
    parser.set_defaults(out="night.wav")
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except ArgumentError as err:
        print(f"error: {condense(str(err))} (options: {parser.prog} --help)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    audio, truth, segments = write_night(**args.as_dict())
    events = truth_events(segments)
    minutes = {
        label: sum(e.end_s - e.start_s for e in events if e.label == label) / 60.0
        for label in ("breathe", "snore", "non_wearer")
    }
    print(
        f"wrote {audio} ({segments[-1].end_s / 3600:.2f} h, 2 channels, {args.sample_rate} Hz) and "
        f"{truth} ({len(events)} events; minutes "
        + ", ".join(f"{k} {v:.1f}" for k, v in minutes.items())
        + f") in {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
