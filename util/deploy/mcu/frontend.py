"""The log-mel front end as a Cortex-M computes it: CMSIS-DSP, in f32, q31 or q15.

:class:`CmsisLogMel` rebuilds :class:`data.features.LogMelFrontEnd` from the library a
microcontroller runs, through its Python bindings (``cmsisdsp``: the same C code, the same
RFFT tables and fixed-point arithmetic). Per frame and channel:

- ``f32``: window (``arm_mult_f32``) into a zero-padded ``n_fft`` buffer, real FFT
  (``arm_rfft_fast_f32``), power (``arm_cmplx_mag_squared_f32``), each mel band as a dot
  product over its non-zero filter weights (``arm_dot_prod_f32``), ``log(mel + eps)``
  (``arm_offset_f32`` + ``arm_vlog_f32``).
- ``q31`` (the fixed-point front end to ship on a core without an FPU): 16-bit PCM samples
  widened to q31 (``arm_q15_to_q31``) and shifted up so the frame's peak fills 31 bits
  (``arm_absmax_no_idx_q31`` + ``arm_shift_q31``: block floating point), windowed
  (``arm_mult_q31``) and transformed (``arm_rfft_q31``, which scales by ``1/n_fft``). The
  spectrum is shifted up again to full scale (block floating point once more: the RFFT's
  scaling leaves it ``log2 n_fft`` bits low, bits the products' ``>> 31`` and ``>> 14`` below
  would drop), and each mel band is ``Σ w·(re² + im²)`` with 64-bit sums: the band's bins
  times its q31 weights (``arm_cmplx_mult_real_q31``), dotted with the same bins
  (``arm_dot_prod_q31``). Measured on the demo's 718 validation clips: p99 < 1e-5, max
  1e-4 to 1e-3 (log units) from ``LogMelFrontEnd`` fed the same 16-bit samples, so what
  differs from float audio is the 16-bit rounding of the samples, not the arithmetic.
- ``q15`` (the smallest RAM: 16-bit FFT buffers): the frame shifted up to use all 15 bits
  (``arm_absmax_no_idx_q15`` + ``arm_shift_q15``), windowed (``arm_mult_q15``), transformed
  (``arm_rfft_q15``, which scales by ``1/n_fft``: bins 40 dB or more below a frame's loudest
  keep only a few bits), widened to q31 (``arm_q15_to_q31``) for the power
  (``arm_cmplx_mag_squared_q31``) and the mel dot products (``arm_dot_prod_q31``).

In both fixed-point paths ``eps`` is added in the integer scale of the 64-bit mel sums, each
sum is normalised to a q31 mantissa (a count-leading-zeros shift on the device) and
``arm_vlog_q31`` (accurate to 3e-8 over its range, measured) gives its log in Q26; the
shifts come back as whole multiples of ``ln 2`` in Q26.

Glue that costs nothing on a device (choosing a channel, padding the clip's edges, reading a
frame out of a buffer, the final Q26 to float conversion) is numpy. :meth:`memory` gives the
RAM and flash the device needs, :meth:`ops_per_frame` the arithmetic per frame behind a
cycles estimate (see :func:`cycles_per_frame`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from data.features import DB_AMIN, DB_TOP, LogMelFrontEnd

__all__ = ["PRECISIONS", "CmsisLogMel", "cycles_per_frame", "import_cmsisdsp", "pcm16"]

Precision = Literal["f32", "q31", "q15"]
PRECISIONS: tuple[str, ...] = ("f32", "q31", "q15")

#: ``ln 2`` in Q26, the format of ``arm_vlog_q31``'s output.
_LN2_Q26 = round(math.log(2.0) * (1 << 26))
#: q15 path: mel64 = mel · 2^(2·shift + _MEL_Q): q15 input (2^15), ``arm_rfft_q15``
#: (2^-log2 n_fft), q15→q31 (2^16), ``arm_cmplx_mag_squared_q31`` (>> 33), q31 weights
#: (2^31), ``arm_dot_prod_q31`` (>> 14). The n_fft term is added per instance.
_MEL_Q_FIXED = 2 * (15 + 16) - 33 + 31 - 14
#: q31 path: spectrum = FFT · 2^(_AMP_Q31 + shifts - log2 n_fft): q15 input widened to q31
#: (2^31), the q31 window (``arm_mult_q31``: · 2^31 >> 31).
_AMP_Q31 = 31


def import_cmsisdsp() -> Any:
    """The ``cmsisdsp`` module, or a one-line ImportError saying how to install it."""
    try:
        import cmsisdsp
    except ImportError as err:  # pragma: no cover - the extra is installed in CI
        raise ImportError(
            "the CMSIS-DSP front end needs the cmsisdsp package: pip install -e '.[mcu]'"
        ) from err
    return cmsisdsp


def pcm16(waves: np.ndarray) -> np.ndarray:
    """The audio the fixed-point paths read: ``waves`` in [-1, 1] rounded to 16-bit PCM.

    ``arm_float_to_q15`` (saturating at full scale), returned as float32 again.
    """
    x = np.ascontiguousarray(waves, dtype=np.float32)
    q = import_cmsisdsp().arm_float_to_q15(x.reshape(-1))
    return (q.astype(np.float32) / np.float32(32768.0)).reshape(x.shape)


@dataclass(frozen=True)
class _Bands:
    """The mel filter bank in sparse form: each band's first bin and its non-zero weights."""

    starts: np.ndarray  # (n_mels,) int
    weights: list[np.ndarray]  # n_mels arrays of float64

    @classmethod
    def of(cls, fb: np.ndarray) -> _Bands:
        """Sparse bands of a ``(n_freqs, n_mels)`` filter bank (an all-zero band keeps one bin)."""
        starts, weights = [], []
        for band in fb.T:
            nz = np.flatnonzero(band)
            lo, hi = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 1)
            starts.append(lo)
            weights.append(band[lo:hi].astype(np.float64))
        return cls(np.asarray(starts), weights)

    @property
    def nonzero(self) -> int:
        """Stored weights (one multiply-accumulate each per frame)."""
        return int(sum(w.size for w in self.weights))


class CmsisLogMel:
    """:class:`~data.features.LogMelFrontEnd`'s features computed with CMSIS-DSP.

    Args:
        front_end: the model's front end (its window, filter bank, frames and scale).
        precision: ``f32`` (Cortex-M4F/M7/M55 with an FPU), ``q31`` (16-bit PCM, q31
            FFT and 64-bit mel sums, for a core without one) or ``q15`` (16-bit PCM and a
            q15 FFT: half the FFT RAM, less precise).

    Raises:
        ValueError: an unknown precision, or an ``n_fft`` the CMSIS RFFT has no tables for.
    """

    def __init__(self, front_end: LogMelFrontEnd, precision: Precision = "f32") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        dsp = import_cmsisdsp()
        self.dsp = dsp
        self.front_end = front_end.eval()
        self.precision = precision
        cfg = front_end.config()
        self.n_fft = int(cfg["n_fft"])
        if self.n_fft not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(
                f"CMSIS-DSP real FFTs take n_fft 32..4096 (a power of 2), got {self.n_fft}"
            )
        self.win_length = int(cfg["win_length"])
        self.hop_length = int(cfg["hop_length"])
        self.n_mels = int(cfg["n_mels"])
        self.scale = str(cfg["scale"])
        self.eps = float(cfg["eps"])
        self.pad_mode = str(cfg["pad_mode"])
        window = front_end.mel.spectrogram.window.detach().double().numpy()
        self.bands = _Bands.of(front_end.mel.mel_scale.fb.detach().double().numpy())
        self._window_f32 = window.astype(np.float32)
        if precision == "f32":
            self._rfft = dsp.arm_rfft_fast_instance_f32()
            status = dsp.arm_rfft_fast_init_f32(self._rfft, self.n_fft)
            self._weights = [w.astype(np.float32) for w in self.bands.weights]
        elif precision == "q31":
            self._rfft = dsp.arm_rfft_instance_q31()
            status = dsp.arm_rfft_init_q31(self._rfft, self.n_fft, 0, 1)
            self._window_q31 = dsp.arm_float_to_q31(self._window_f32)
            self._weights = [dsp.arm_float_to_q31(w.astype(np.float32)) for w in self.bands.weights]
        else:
            self._rfft = dsp.arm_rfft_instance_q15()
            status = dsp.arm_rfft_init_q15(self._rfft, self.n_fft, 0, 1)
            self._window_q15 = dsp.arm_float_to_q15(self._window_f32)
            self._weights = [dsp.arm_float_to_q31(w.astype(np.float32)) for w in self.bands.weights]
            self._mel_q = _MEL_Q_FIXED - 2 * int(math.log2(self.n_fft))
        if status != 0:
            raise ValueError(f"CMSIS-DSP cannot set up a {self.n_fft}-point real FFT")

    # --- frames -------------------------------------------------------------------------

    def frames(self, signal: np.ndarray) -> np.ndarray:
        """``(T, win_length)`` frames of one channel ``(clip_samples,)``, centred as torch.stft.

        The clip is padded by ``n_fft // 2`` at both ends (reflect or zeros, the front
        end's ``pad_mode``); frame ``t`` is the window-long span the front end multiplies
        by its window (the window's place in the ``n_fft`` span does not change the power).
        """
        half = self.n_fft // 2
        mode = "reflect" if self.pad_mode == "reflect" else "constant"
        padded = np.pad(signal, half, mode=mode)
        offset = (self.n_fft - self.win_length) // 2
        n_frames = 1 + signal.shape[-1] // self.hop_length
        starts = offset + self.hop_length * np.arange(n_frames)
        return padded[starts[:, None] + np.arange(self.win_length)]

    # --- one frame ----------------------------------------------------------------------

    def log_mel_f32(self, frame: np.ndarray) -> np.ndarray:
        """``log(mel + eps)`` (natural log, float32) of one float frame ``(win_length,)``."""
        dsp = self.dsp
        buf = np.zeros(self.n_fft, dtype=np.float32)
        buf[: self.win_length] = dsp.arm_mult_f32(frame.astype(np.float32), self._window_f32)
        packed = dsp.arm_rfft_fast_f32(self._rfft, buf, 0)
        # packed: [re0, re(N/2), re1, im1, ...]; the DC and Nyquist bins are real
        power = np.empty(self.n_fft // 2 + 1, dtype=np.float32)
        power[1:-1] = dsp.arm_cmplx_mag_squared_f32(packed[2:])
        power[0], power[-1] = packed[0] * packed[0], packed[1] * packed[1]
        mel = np.array(
            [
                dsp.arm_dot_prod_f32(power[s : s + w.size], w)
                for s, w in zip(self.bands.starts, self._weights, strict=True)
            ],
            dtype=np.float32,
        )
        if self.scale == "log":
            return dsp.arm_vlog_f32(dsp.arm_offset_f32(mel, np.float32(self.eps)))
        return dsp.arm_vlog_f32(np.maximum(mel, np.float32(DB_AMIN)))

    def _floor(self) -> float:
        """What the log adds to (``log``) or clamps at (``db``) before taking the log."""
        return self.eps if self.scale == "log" else DB_AMIN

    def _silence(self) -> np.ndarray:
        """Q26 logs of a digitally silent frame: every band is eps (or amin) alone."""
        return np.full(self.n_mels, round(math.log(self._floor()) * (1 << 26)), dtype=np.int64)

    def _log_q26(self, sums: list[int], exponent: int) -> np.ndarray:
        """Natural logs (Q26) of 64-bit mel sums ``mel · 2^exponent``, the floor included.

        The floor (``eps`` or ``amin``) is added (or clamped at) in the sums' own scale; each
        value is normalised to a q31 mantissa in ``[2^30, 2^31)`` by its leading-zero count,
        one ``arm_vlog_q31`` takes the logs of all bands, and each band's shift comes back
        as a whole multiple of ``ln 2``.
        """
        floor_int = round(self._floor() * 2.0**exponent)
        mantissas = np.empty(self.n_mels, dtype=np.int32)
        shifts = np.empty(self.n_mels, dtype=np.int64)
        for band, mel64 in enumerate(sums):
            value = mel64 + floor_int if self.scale == "log" else max(mel64, floor_int)
            value = max(value, 1)
            bits = value.bit_length()
            mantissas[band] = value << (31 - bits) if bits <= 31 else value >> (bits - 31)
            shifts[band] = bits - exponent
        return self.dsp.arm_vlog_q31(mantissas).astype(np.int64) + shifts * _LN2_Q26

    def log_mel_q31(self, frame: np.ndarray) -> np.ndarray:
        """Natural log of the mel energies (Q26 int64, the eps included) of a q15 frame."""
        dsp = self.dsp
        x = dsp.arm_q15_to_q31(frame)
        peak = int(dsp.arm_absmax_no_idx_q31(x))
        if peak == 0:
            return self._silence()
        shift = 31 - peak.bit_length()  # the peak lands in [2^30, 2^31)
        x = dsp.arm_shift_q31(x, shift) if shift else x
        buf = np.zeros(self.n_fft, dtype=np.int32)
        buf[: self.win_length] = dsp.arm_mult_q31(x, self._window_q31)
        spectrum = dsp.arm_rfft_q31(self._rfft, buf)[: self.n_fft + 2]  # bins 0..N/2
        top = int(dsp.arm_absmax_no_idx_q31(spectrum))
        boost = 31 - top.bit_length() if top else 0  # win back the RFFT's 1/n_fft
        spectrum = dsp.arm_shift_q31(spectrum, boost) if boost else spectrum
        # spectrum = FFT · 2^amp; w·bin >> 31 keeps 2^amp, the dot product's >> 14 the rest
        amp = _AMP_Q31 + shift + boost - int(math.log2(self.n_fft))
        sums = []
        for s, w in zip(self.bands.starts, self._weights, strict=True):
            bins = spectrum[2 * s : 2 * (s + w.size)]  # (re, im) pairs of the band
            sums.append(int(dsp.arm_dot_prod_q31(dsp.arm_cmplx_mult_real_q31(bins, w), bins)))
        return self._log_q26(sums, 2 * amp - 14)

    def log_mel_q15(self, frame: np.ndarray) -> np.ndarray:
        """Natural log of the mel energies (Q26 int64, the eps included) of a q15 frame."""
        dsp = self.dsp
        peak = int(dsp.arm_absmax_no_idx_q15(frame))
        if peak == 0:
            return self._silence()
        shift = 15 - peak.bit_length()  # the peak lands in [2^14, 2^15)
        x = dsp.arm_shift_q15(frame, shift) if shift else frame
        buf = np.zeros(self.n_fft, dtype=np.int16)
        buf[: self.win_length] = dsp.arm_mult_q15(x, self._window_q15)
        spectrum = dsp.arm_rfft_q15(self._rfft, buf)[: self.n_fft + 2]  # bins 0..N/2
        power = dsp.arm_cmplx_mag_squared_q31(dsp.arm_q15_to_q31(spectrum))
        sums = [
            int(dsp.arm_dot_prod_q31(power[s : s + w.size], w))
            for s, w in zip(self.bands.starts, self._weights, strict=True)
        ]
        return self._log_q26(sums, 2 * shift + self._mel_q)  # mel64 = mel · 2^exponent

    # --- clips --------------------------------------------------------------------------

    def __call__(self, waves: np.ndarray | torch.Tensor) -> np.ndarray:
        """Features ``(B, C_out, n_mels, T)`` float32 of waveforms ``(B, C_in, S)`` in [-1, 1].

        The channel mode and the clip's pad/crop are the front end's own
        (:meth:`~data.features.LogMelFrontEnd.adapt`); the fixed-point paths first round
        the samples to 16-bit PCM, as a microphone delivers them.
        """
        wave = torch.as_tensor(np.asarray(waves, dtype=np.float32))
        with torch.inference_mode():
            clips = self.front_end.adapt(wave).numpy()
        b, c, _ = clips.shape
        t = self.front_end.output_shape[-1]
        out = np.empty((b, c, self.n_mels, t), dtype=np.float32)
        for i in range(b):
            for ch in range(c):
                out[i, ch] = self.channel(clips[i, ch]).T
        if self.scale == "db":
            out *= np.float32(10.0 / math.log(10.0))
            out -= out.max(axis=(1, 2, 3), keepdims=True)
            np.maximum(out, -DB_TOP, out=out)
        return out

    def channel(self, signal: np.ndarray) -> np.ndarray:
        """``(T, n_mels)`` natural-log mel energies of one channel ``(clip_samples,)``."""
        if self.precision == "f32":
            frames = self.frames(signal.astype(np.float32))
            return np.stack([self.log_mel_f32(f) for f in frames])
        pcm = self.dsp.arm_float_to_q15(signal.astype(np.float32))
        frame_log = self.log_mel_q31 if self.precision == "q31" else self.log_mel_q15
        rows = [frame_log(f) for f in self.frames(pcm)]
        return (np.stack(rows).astype(np.float64) / (1 << 26)).astype(np.float32)

    # --- cost on the device -------------------------------------------------------------

    def memory(self) -> dict[str, int]:
        """Bytes the device needs, per channel stream (RAM) and once (flash constants).

        RAM: the frame history (``win_length`` input samples, 16-bit PCM in the fixed-point
        paths, refreshed by ``hop_length`` each frame), the zero-padded FFT input, the FFT
        output, the power spectrum (f32, q15; q31 weights the spectrum band by band into a
        scratch as long as the widest band instead) and the mel energies; the RFFT works out
        of those buffers. Flash: the window and the sparse filter bank (weights plus a
        first-bin and a length per band, 16-bit each); CMSIS's own twiddle and bit-reversal
        tables are not counted. The feature map the model reads is its input tensor, counted
        in the interpreter's arena.
        """
        n, bins, precision = self.n_fft, self.n_fft // 2 + 1, self.precision
        word = 2 if precision == "q15" else 4  # FFT buffers and window
        ram = {
            "frame_history": self.win_length * (4 if precision == "f32" else 2),
            "fft_input": n * word,
            # q15/q31: the binding's output is n complex values; f32 is packed in place
            "fft_output": n * 4 if precision == "f32" else 2 * n * word,
        }
        if precision == "q31":
            ram["band_scratch"] = 2 * max(w.size for w in self.bands.weights) * 4
        else:
            ram["power"] = bins * 4  # q31 or f32
        ram["mel"] = self.n_mels * (4 if precision == "f32" else 8)  # fixed point: 64-bit sums
        flash = {
            "window": self.win_length * word,
            "filterbank": self.bands.nonzero * 4 + self.n_mels * 2 * 2,
        }
        return {
            **{f"ram_{k}": v for k, v in ram.items()},
            "ram_total": sum(ram.values()),
            **{f"flash_{k}": v for k, v in flash.items()},
            "flash_total": sum(flash.values()),
        }

    def ops_per_frame(self) -> dict[str, int]:
        """Arithmetic per frame and channel, by stage (multiplies and adds counted alike).

        ``normalise``: the block-floating-point peak search and shift (q15: the frame; q31:
        the frame and the spectrum). ``rfft``: the library's algorithm, an ``n/2``-point
        complex FFT (``(n/4)·log2(n/2)`` radix-2 butterflies of 10 operations) and the real
        split (about 10 per bin pair). ``mel``: a multiply-accumulate per weight (f32, q15,
        after 3 operations per bin for the power); q31: per weight, two multiplies for the
        weighted bin and two multiply-accumulates for its dot product with the bin.
        """
        n, bins, precision = self.n_fft, self.n_fft // 2 + 1, self.precision
        normalise = {"f32": 0, "q15": 2 * self.win_length, "q31": 2 * (self.win_length + 2 * bins)}
        ops = {
            "normalise": normalise[precision],
            "window": self.win_length,
            "rfft": (n // 4) * int(math.log2(n // 2)) * 10 + (n // 2) * 10,
            "power": 0 if precision == "q31" else 3 * bins,
            "mel": (6 if precision == "q31" else 2) * self.bands.nonzero,
            "log": 30 * self.n_mels,  # the vlog polynomial and its range reduction
        }
        return {**ops, "total": sum(ops.values())}


def cycles_per_frame(ops: dict[str, int], cycles_per_op: float = 1.0) -> float:
    """Estimated cycles per frame: ``ops['total'] × cycles_per_op``.

    An analytic estimate, not a measurement: one cycle per operation is the single-issue
    rate of a Cortex-M4F/M7 FPU or of the q15/q31 multiply-accumulate instructions; loads,
    stores and loop overhead add to it (the benchmark reports ×1 and a ×2 margin).
    """
    return float(ops["total"]) * cycles_per_op
