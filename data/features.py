"""The log-mel front end shared by cache building and prediction.

One :class:`LogMelFrontEnd` turns batches of waveforms into spectrograms. It does
no normalisation: per-band statistics come from the train cache and are applied by
the model, so the cache holds the front end's raw output and inference computes
exactly what training saw.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torchaudio.transforms as T
from torch import nn

from data.hashing import json_sha256

Preset = Literal["native", "reference"]
ChannelMode = Literal["stereo", "mono", "in_ear"]
Scale = Literal["log", "db"]

#: Bump when the computation changes without any parameter changing, so old caches
#: get a new key instead of being reused.
FRONT_END_VERSION = 1

#: ``amin`` and ``top_db`` of librosa's ``power_to_db``, which the dB scale follows.
DB_AMIN = 1e-10
DB_TOP = 80.0

#: Samples per piece when a CPU batch is computed piecewise (see forward).
_CPU_CHUNK_SAMPLES = 1 << 19

#: Mel bands per product in the filter bank's banded matmul (see :func:`band_groups`).
BANDS_PER_GROUP = 16

_COMMON: dict[str, Any] = {
    "sample_rate": 16000,
    "n_fft": 512,
    "win_length": 400,
    "hop_length": 160,
    "n_mels": 64,
    "f_min": 20.0,
    "f_max": 8000.0,
    "eps": 1e-6,
}

#: Every parameter of each preset; an explicit argument overrides one value.
PRESETS: dict[str, dict[str, Any]] = {
    "native": {
        **_COMMON,
        "clip_seconds": 1.0,
        "channels": "stereo",
        "scale": "log",
        "mel_scale": "htk",
        "mel_norm": "none",
        "pad_mode": "reflect",
    },
    # librosa.feature.melspectrogram + power_to_db(ref=np.max) defaults, as in the
    # published benchmark: Slaney mel scale and area norm, zero padding when centring.
    "reference": {
        **_COMMON,
        "clip_seconds": 5.0,
        "channels": "mono",
        "scale": "db",
        "mel_scale": "slaney",
        "mel_norm": "slaney",
        "pad_mode": "constant",
    },
}


class LogMelFrontEnd(nn.Module):
    """Waveforms ``(B, C_in, S)`` to log-mel spectrograms ``(B, C_out, n_mels, T)``.

    The input is adapted to the channel mode, zero-padded or cropped (from the start)
    to the clip length, then turned into a power mel spectrogram (Hann window,
    centred frames) and log-scaled. ``T = 1 + clip_samples // hop_length``:
    the ``native`` preset gives ``2×64×101``, ``reference`` gives ``1×64×501``.

    Args:
        preset: ``native`` (both channels, 1 s, ``log(mel + eps)``) or ``reference``
            (mono downmix, 5 s, dB relative to each clip's maximum with an 80 dB
            floor, librosa mel filters: the published TinyCNN/CRNN input).
            Every other argument left as ``None`` takes the preset's value.
        sample_rate: expected sample rate in Hz; other rates are resampled before
            the front end (the cache does it and counts it).
        n_fft: FFT size.
        win_length: Hann window length in samples.
        hop_length: hop between frames in samples.
        n_mels: number of mel bands.
        f_min: lowest mel filter edge in Hz.
        f_max: highest mel filter edge in Hz.
        clip_seconds: clip length; shorter input is zero-padded, longer is cropped.
        channels: ``stereo`` (in-ear and outer microphone; a one-channel input is
            duplicated), ``mono`` (mean of the channels) or ``in_ear`` (channel 0).
        scale: ``log`` = ``log(mel + eps)``; ``db`` = ``10·log10`` power relative to
            each clip's maximum (which maps to 0 dB), floored at -80 dB.
        eps: offset inside the natural log of the ``log`` scale.
        mel_scale: ``htk`` (torchaudio's default) or ``slaney`` (librosa's default).
        mel_norm: ``none`` or ``slaney`` (area normalisation, librosa's default).
        pad_mode: padding at the clip's edges when centring frames: ``reflect``
            (torchaudio's default) or ``constant`` zeros (librosa ≥ 0.10's default).
    """

    def __init__(
        self,
        preset: Preset = "native",
        sample_rate: int | None = None,
        n_fft: int | None = None,
        win_length: int | None = None,
        hop_length: int | None = None,
        n_mels: int | None = None,
        f_min: float | None = None,
        f_max: float | None = None,
        clip_seconds: float | None = None,
        channels: ChannelMode | None = None,
        scale: Scale | None = None,
        eps: float | None = None,
        mel_scale: Literal["htk", "slaney"] | None = None,
        mel_norm: Literal["none", "slaney"] | None = None,
        pad_mode: Literal["reflect", "constant"] | None = None,
    ) -> None:
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        given = {
            "sample_rate": sample_rate,
            "n_fft": n_fft,
            "win_length": win_length,
            "hop_length": hop_length,
            "n_mels": n_mels,
            "f_min": f_min,
            "f_max": f_max,
            "clip_seconds": clip_seconds,
            "channels": channels,
            "scale": scale,
            "eps": eps,
            "mel_scale": mel_scale,
            "mel_norm": mel_norm,
            "pad_mode": pad_mode,
        }
        cfg = {k: (PRESETS[preset][k] if v is None else v) for k, v in given.items()}
        for key in ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels"):
            cfg[key] = int(cfg[key])
        for key in ("f_min", "f_max", "clip_seconds", "eps"):
            cfg[key] = float(cfg[key])
        _check_choice("channels", cfg["channels"], ("stereo", "mono", "in_ear"))
        _check_choice("scale", cfg["scale"], ("log", "db"))
        _check_choice("mel_scale", cfg["mel_scale"], ("htk", "slaney"))
        _check_choice("mel_norm", cfg["mel_norm"], ("none", "slaney"))
        _check_choice("pad_mode", cfg["pad_mode"], ("reflect", "constant"))
        if cfg["win_length"] > cfg["n_fft"]:
            raise ValueError(f"win_length {cfg['win_length']} exceeds n_fft {cfg['n_fft']}")
        if not 0 <= cfg["f_min"] < cfg["f_max"] <= cfg["sample_rate"] / 2:
            raise ValueError(
                f"need 0 <= f_min < f_max <= sample_rate/2, got {cfg['f_min']}, {cfg['f_max']}"
            )
        if cfg["clip_seconds"] <= 0:
            raise ValueError(f"clip_seconds must be positive, got {cfg['clip_seconds']}")
        self.preset = preset
        self._cfg = cfg
        self.sample_rate: int = cfg["sample_rate"]
        self.hop_length: int = cfg["hop_length"]
        self.n_mels: int = cfg["n_mels"]
        self.channels: str = cfg["channels"]
        self.scale: str = cfg["scale"]
        self.eps: float = cfg["eps"]
        self.mel = T.MelSpectrogram(
            sample_rate=cfg["sample_rate"],
            n_fft=cfg["n_fft"],
            win_length=cfg["win_length"],
            hop_length=cfg["hop_length"],
            f_min=cfg["f_min"],
            f_max=cfg["f_max"],
            n_mels=cfg["n_mels"],
            power=2.0,
            center=True,
            pad_mode=cfg["pad_mode"],
            norm=None if cfg["mel_norm"] == "none" else cfg["mel_norm"],
            mel_scale=cfg["mel_scale"],
        )
        self._groups_key: tuple | None = None
        self._groups: list[tuple[int, int, int, int]] = []

    @property
    def clip_samples(self) -> int:
        """Samples per clip after padding or cropping."""
        return int(round(self._cfg["clip_seconds"] * self.sample_rate))

    @property
    def out_channels(self) -> int:
        """Channels of the output: 2 for ``stereo``, 1 otherwise."""
        return 2 if self.channels == "stereo" else 1

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """``(C, n_mels, T)`` of one clip's features."""
        return (self.out_channels, self.n_mels, 1 + self.clip_samples // self.hop_length)

    def config(self) -> dict[str, Any]:
        """Every resolved parameter (JSON-able); what the cache key is made of."""
        return {
            "class": type(self).__name__,
            "version": FRONT_END_VERSION,
            "preset": self.preset,
            **self._cfg,
        }

    def config_hash(self) -> str:
        """sha256 (hex) of :meth:`config` as sorted-key JSON."""
        return json_sha256(self.config())

    def adapt(self, wave: torch.Tensor) -> torch.Tensor:
        """Adapt ``(B, C_in, S)`` to ``(B, C_out, clip_samples)``: channel mode, then pad/crop."""
        wave = self._adapt_channels(wave)
        n = self.clip_samples
        if wave.shape[-1] >= n:
            return wave[..., :n]
        return nn.functional.pad(wave, (0, n - wave.shape[-1]))

    def _adapt_channels(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.ndim != 3:
            raise ValueError(
                f"expected a batch (B, channels, samples), got shape {tuple(wave.shape)}"
            )
        c_in = wave.shape[1]
        if not 1 <= c_in <= 2:
            raise ValueError(f"expected 1 or 2 channels, got {c_in}")
        if self.channels == "stereo":
            return wave.expand(-1, 2, -1) if c_in == 1 else wave
        if self.channels == "mono":
            return wave.mean(dim=1, keepdim=True)
        return wave[:, :1]  # in_ear

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """Features ``(B, C_out, n_mels, T)`` of float waveforms ``(B, C_in, S)``."""
        # Power spectra span many decades: keep float32 even inside a model's autocast.
        with torch.autocast(device_type=wave.device.type, enabled=False):
            return self._features(self.adapt(wave.float()))

    def windows(self, signal: torch.Tensor, hop_samples: int, count: int) -> torch.Tensor:
        """Features of ``count`` clips cut every ``hop_samples`` samples from one signal.

        The same values (to float rounding) as :meth:`forward` on the stacked clips
        ``signal[:, k·hop_samples : k·hop_samples + clip_samples]``, computed with less
        work when the clips overlap: if ``hop_samples`` is a whole number of frame hops,
        every frame that lies wholly inside a clip is one frame of the long signal, so it
        is computed once for all the clips that share it; only the few frames at each
        clip's ends, which reach into the clip's own edge padding, are computed per clip.
        One-second clips every 0.5 s then cost about half of :meth:`forward`. Other hops
        fall back to :meth:`forward`.

        Args:
            signal: ``(C_in, S)`` waveform with ``S ≥ (count - 1)·hop_samples + clip_samples``.
            hop_samples: samples between clip starts.
            count: number of clips.

        Returns:
            ``(count, C_out, n_mels, T)``.
        """
        clip = self.clip_samples
        span = (count - 1) * hop_samples + clip
        if signal.ndim != 2 or count < 1 or hop_samples < 1 or signal.shape[-1] < span:
            raise ValueError(
                f"need a (channels, samples) signal of at least {span} samples for {count} "
                f"clips every {hop_samples} samples, got shape {tuple(signal.shape)}"
            )
        with torch.autocast(device_type=signal.device.type, enabled=False):
            x = self._adapt_channels(signal[None, :, :span].float())[0]
            plan = self._shared_frame_plan(hop_samples)
            if plan is None or count == 1:
                return self._features(x.unfold(-1, clip, hop_samples).transpose(0, 1))
            return self._finish(self._shared_windows(x, hop_samples, count, *plan))

    def _shared_frame_plan(self, hop_samples: int) -> tuple[int, int] | None:
        """``(first, last)`` frame indices lying wholly inside a clip, or ``None``.

        ``None`` when clips cannot share frames: the hop is not a whole number of frame
        hops, clips do not overlap, or no frame lies inside a clip.
        """
        hop, win, lead = self.hop_length, self._win_length, self._lead
        clip = self.clip_samples
        if hop_samples % hop or hop_samples >= clip:
            return None
        first = -(-lead // hop)  # frame t covers [t·hop - lead, t·hop - lead + win)
        last = min((clip + lead - win) // hop, clip // hop)
        return (first, last) if first <= last else None

    def _shared_windows(
        self, x: torch.Tensor, hop_samples: int, count: int, first: int, last: int
    ) -> torch.Tensor:
        """Unscaled log features ``(count, C, n_mels, T)`` of the overlapping clips of ``x``."""
        hop, win, lead, half = self.hop_length, self._win_length, self._lead, self._half
        clip, n_frames = self.clip_samples, 1 + self.clip_samples // self.hop_length
        c, stride = x.shape[0], hop_samples // hop
        out = x.new_empty(count, c, self.n_mels, n_frames)
        # Inner frames: frame g of the signal is frame g - k·stride of clip k.
        n_shared = (count - 1) * stride + last - first + 1
        frames = x[:, first * hop - lead :].unfold(-1, win, hop)[:, :n_shared]
        shared = x.new_empty(c, n_shared, self.n_mels)
        step = max(1, _CPU_CHUNK_SAMPLES // (c * self._n_fft)) if x.is_cpu else n_shared
        for g in range(0, n_shared, step):
            self._log_mel(frames[:, g : g + step], out=shared[:, g : g + step])
        inner = shared.unfold(1, last - first + 1, stride)  # (C, count, n_mels, inner)
        out[..., first : last + 1] = inner.transpose(0, 1)
        # Edge frames, per clip, from the clip's own padding.
        reflect = self._cfg["pad_mode"] == "reflect"
        if first > 0:
            head_len = (first - 1) * hop + win - lead
            if reflect:
                head_len = max(head_len, half + 1)
            heads = x.unfold(-1, head_len, hop_samples)[:, :count]  # (C, count, head_len)
            padded = x.new_empty(c, count, half + head_len)
            padded[..., half:] = heads
            padded[..., :half] = heads[..., 1 : half + 1].flip(-1) if reflect else 0.0
            view = padded[..., self._offset :].unfold(-1, win, hop)[..., :first, :]
            mel = self._log_mel(view.reshape(c * count, first, win))
            out[..., :first] = mel.view(c, count, first, self.n_mels).permute(1, 0, 3, 2)
        n_tail = n_frames - 1 - last
        if n_tail > 0:
            begin = (last + 1) * hop - lead  # where the first tail frame starts in a clip
            start = min(begin, clip - half - 1) if reflect else begin
            tails = x[:, start:].unfold(-1, clip - start, hop_samples)[:, :count]
            padded = x.new_empty(c, count, clip - start + half)
            padded[..., : clip - start] = tails
            padded[..., clip - start :] = tails[..., -half - 1 : -1].flip(-1) if reflect else 0.0
            view = padded[..., begin - start :].unfold(-1, win, hop)[..., :n_tail, :]
            mel = self._log_mel(view.reshape(c * count, n_tail, win))
            out[..., last + 1 :] = mel.view(c, count, n_tail, self.n_mels).permute(1, 0, 3, 2)
        return out

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled features ``(B, C, n_mels, T)`` of clips ``(B, C, S)``."""
        b, c, s = x.shape
        flat = x.reshape(b * c, s)
        frames = 1 + s // self.hop_length
        out = torch.empty(b * c, self.n_mels, frames, dtype=x.dtype, device=x.device)
        rows = b * c
        if x.device.type == "cpu":
            # Small pieces keep every temporary under glibc's mmap threshold, so memory is
            # reused instead of page-faulted in afresh on every call (measured 1.5-2x).
            rows = max(1, _CPU_CHUNK_SAMPLES // s)
        for start in range(0, b * c, rows):
            view = self._frames(flat[start : start + rows])
            self._log_mel(view, out=out[start : start + rows].transpose(1, 2))
        return self._finish(out.view(b, c, self.n_mels, frames))

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        """Apply the scale's per-clip step in place: dB relative to each clip's peak."""
        if self.scale == "log":
            return out
        out.mul_(10.0)
        peak = out.amax(dim=(1, 2, 3), keepdim=True)
        return out.sub_(peak).clamp_(min=-DB_TOP)

    @property
    def _n_fft(self) -> int:
        return int(self.mel.spectrogram.n_fft)

    @property
    def _win_length(self) -> int:
        return int(self.mel.spectrogram.window.shape[0])

    @property
    def _half(self) -> int:
        """Padding on each side of a clip when centring frames."""
        return self._n_fft // 2

    @property
    def _offset(self) -> int:
        """Where a frame's window starts in its n_fft span (torch.stft centres it there)."""
        return (self._n_fft - self._win_length) // 2

    @property
    def _lead(self) -> int:
        """Samples a frame's window starts before its centre sample."""
        return self._half - self._offset

    def _frames(self, x: torch.Tensor) -> torch.Tensor:
        """Windows ``(N, T, win_length)`` (a strided view) of centred frames of ``(N, S)``.

        The signals are padded by ``n_fft // 2`` on each side (``pad_mode``) as
        ``torch.stft(center=True)`` pads them; ``T = 1 + S // hop_length``.
        """
        half, hop, win = self._half, self.hop_length, self._win_length
        n, s = x.shape
        padded = x.new_empty(n, s + 2 * half)
        padded[:, half : half + s] = x
        if self._cfg["pad_mode"] == "reflect":
            if s <= half:
                raise ValueError(f"reflect padding needs more than {half} samples, got {s}")
            padded[:, :half] = x[:, 1 : half + 1].flip(-1)
            padded[:, half + s :] = x[:, s - half - 1 : s - 1].flip(-1)
        else:
            padded[:, :half] = 0.0
            padded[:, half + s :] = 0.0
        return padded[:, self._offset :].unfold(-1, win, hop)[:, : 1 + s // hop]

    def _log_mel(self, frames: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Log power mel ``(N, T, n_mels)`` of windows ``(N, T, win_length)``, into ``out``.

        Numerically the same as ``self.mel`` with the same window and filter bank (a test
        holds it to that), about twice as fast on CPU: frames are windowed straight into
        a zero-padded FFT buffer and the power is re² + im², never complex ``abs``. The
        window sits at the start of the n_fft buffer instead of its centre, a circular
        shift that leaves the power spectrum unchanged. The filter bank is applied in
        groups of bands, each to the frequency bins its bands cover (:func:`band_groups`):
        the same products and sums as the whole matmul, 2.6x faster on the development CPU.
        ``log`` scale: ``log(mel + eps)``; ``db``: ``log10(max(mel, amin))`` (scaled per
        clip by :meth:`_finish`).
        """
        n, t, win = frames.shape
        buf = frames.new_empty(n, t, self._n_fft)
        buf[..., win:] = 0.0
        torch.mul(frames, self.mel.spectrogram.window, out=buf[..., :win])
        parts = torch.view_as_real(torch.fft.rfft(buf)).square_()
        power = (parts[..., 0] + parts[..., 1]).view(n * t, -1)
        fb = self.mel.mel_scale.fb
        mel = power.new_zeros(n * t, self.n_mels)
        for j0, j1, lo, hi in self._band_groups(fb):
            torch.matmul(power[:, lo:hi], fb[lo:hi, j0:j1], out=mel[:, j0:j1])
        mel = mel.view(n, t, self.n_mels)
        if self.scale == "log":
            return torch.log(mel.add_(self.eps), out=out)
        return torch.log10(mel.clamp_(min=DB_AMIN), out=out)

    def _band_groups(self, fb: torch.Tensor) -> list[tuple[int, int, int, int]]:
        """:func:`band_groups` of ``fb``, worked out again whenever the filter bank changes
        (a loaded state dict, a move to another device)."""
        key = (fb.data_ptr(), fb._version, fb.device, tuple(fb.shape))
        if key != self._groups_key:
            self._groups = band_groups(fb)
            self._groups_key = key
        return self._groups

    def extra_repr(self) -> str:
        shape = "×".join(str(d) for d in self.output_shape)
        return f"preset={self.preset}, channels={self.channels}, scale={self.scale}, out={shape}"


def band_groups(fb: torch.Tensor, bands: int = BANDS_PER_GROUP) -> list[tuple[int, int, int, int]]:
    """``(first band, end band, first bin, end bin)`` per group of ``bands`` mel bands of
    the filter bank ``fb`` ``(bins, n_mels)``: the bins outside a group's range are zero
    for all its bands, so ``power[:, lo:hi] @ fb[lo:hi, j0:j1]`` is exactly those bands
    of ``power @ fb``. A mel band covers a few neighbouring bins, so the groups together
    multiply about a quarter of the whole bank (64 bands, 257 bins: 4,240 of 16,448
    weights); a group whose bands are all zero is left out (its bands stay zero).
    """
    used = (fb != 0).cpu()
    groups = []
    for j0 in range(0, fb.shape[1], bands):
        j1 = min(fb.shape[1], j0 + bands)
        rows = used[:, j0:j1].any(dim=1).nonzero()
        if len(rows):
            groups.append((j0, j1, int(rows[0]), int(rows[-1]) + 1))
    return groups


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
