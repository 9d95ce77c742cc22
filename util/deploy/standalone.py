"""Run an exported earsleep ONNX file with only onnxruntime, numpy and its own metadata.

Copy this one file next to a ``.onnx`` written by the exporter (fp32 or int8) and run,
on any machine with ``onnxruntime`` and ``numpy``::

    python standalone.py tinycnn.onnx clip.wav          # one "class<TAB>probability" a line
    python standalone.py tinycnn.onnx clip.wav --json   # {"quiet": 0.91, ...}

or from Python::

    model = StandaloneModel("tinycnn.onnx")
    probs = model.probabilities(waveform, sample_rate)  # (K,), in model.class_names order

It imports nothing of the project (no torch, torchaudio, lightning, no YAML): the file's
``metadata_props`` (see :func:`read_metadata`) carry the front end's configuration, the
class names, the input shape and the band statistics, and :class:`FrontEnd` recomputes
:class:`data.features.LogMelFrontEnd` in numpy from that configuration. A configuration
option or value it does not implement (a newer front end) is refused in one line, never
approximated.

Numpy works in float64 and the front end in float32, so features agree to float32
rounding. Measured max |numpy − LogMelFrontEnd| on synthetic-corpus clips and noise, over
both presets and non-default options (mono/in-ear, Slaney scale and norm, other FFT
sizes, zero padding, cropping and padding): 3.6e-5 on the ``log`` scale (values about
-14…5) and 9.2e-5 dB on the ``db`` scale (-80…0); class probabilities of an fp32 file
agree with the PyTorch pipeline (front end → Classifier → softmax) to 3e-7.

Why about 500 lines in one module: it is meant to be copied alone, so the metadata
reader, the front end, the model and the command line live together. For the same reason
it repeats a few lines of :class:`data.features.LogMelFrontEnd` (its shape properties)
instead of importing the project; ``tests/test_standalone_onnx.py`` holds the two equal.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import math
import os
import sys
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

__all__ = [
    "METADATA_PREFIX",
    "FrontEnd",
    "StandaloneError",
    "StandaloneModel",
    "main",
    "read_metadata",
    "read_wav",
]

#: Every key the exporter writes starts with this; :func:`read_metadata` drops it.
METADATA_PREFIX = "earsleep."
#: Metadata fields stored as JSON (the others are plain strings).
JSON_FIELDS = frozenset(
    {
        "metadata_version",
        "class_names",
        "input_shape",
        "normalize",
        "standardized_in_graph",
        "band_mean",
        "band_std",
        "feature_config",
        "quantization",
    }
)
#: The :class:`data.features.LogMelFrontEnd` computation this file reimplements.
FRONT_END_CLASS = "LogMelFrontEnd"
FRONT_END_VERSIONS = (1,)
#: ``amin`` and floor (dB) of the ``db`` scale in front-end version 1.
DB_AMIN = 1e-10
DB_TOP = 80.0

_INT_OPTIONS = ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels")
_FLOAT_OPTIONS = ("f_min", "f_max", "clip_seconds", "eps")
_CHOICES: dict[str, tuple[str, ...]] = {
    "channels": ("stereo", "mono", "in_ear"),
    "scale": ("log", "db"),
    "mel_scale": ("htk", "slaney"),
    "mel_norm": ("none", "slaney"),
    "pad_mode": ("reflect", "constant"),
}
_KNOWN_OPTIONS = frozenset(
    {"class", "version", "preset", *_INT_OPTIONS, *_FLOAT_OPTIONS, *_CHOICES}
)


class StandaloneError(ValueError):
    """The file, its metadata or the input cannot be used as given; the message says why."""


# -- metadata -----------------------------------------------------------------------------


def read_metadata(source: str | os.PathLike[str] | ort.InferenceSession) -> dict[str, Any]:
    """The earsleep metadata of an ONNX file, parsed.

    Keys are the metadata keys without :data:`METADATA_PREFIX`: ``class_names`` (list),
    ``input_shape`` (``[C, F, T]``), ``normalize`` and ``standardized_in_graph`` (bool),
    ``band_mean`` / ``band_std`` (float32 arrays ``(C, F, 1)``), ``feature_config``
    (dict), ``quantization`` (dict, int8 files), and plain strings such as ``backbone``,
    ``model_class``, ``feature_hash`` and ``checkpoint``. Keys without the prefix are left
    out; a field that is absent from the file is absent from the dict.

    Args:
        source: an ``.onnx`` path or an open ``onnxruntime.InferenceSession``.

    Raises:
        StandaloneError: the file cannot be opened, or a field is malformed.
    """
    session = source if isinstance(source, ort.InferenceSession) else _open_session(source)
    raw = session.get_modelmeta().custom_metadata_map
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        if not key.startswith(METADATA_PREFIX):
            continue
        name = key[len(METADATA_PREFIX) :]
        if name in JSON_FIELDS:
            try:
                meta[name] = json.loads(value)
            except json.JSONDecodeError as err:
                raise StandaloneError(f"metadata {key} is not valid JSON ({err})") from None
        else:
            meta[name] = value
    for name in ("band_mean", "band_std"):
        if name in meta:
            meta[name] = _band_array(name, meta[name], meta.get("input_shape"))
    return meta


def _band_array(name: str, value: Any, input_shape: Any) -> np.ndarray:
    """``{"dtype": "<f4", "shape": [C, F], "base64": ...}`` to a float32 ``(C, F, 1)`` array."""
    try:
        shape = tuple(int(d) for d in value["shape"])
        if value["dtype"] != "<f4":
            raise ValueError(value["dtype"])
        array = np.frombuffer(base64.b64decode(value["base64"], validate=True), dtype="<f4")
        array = array.reshape(shape)
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise StandaloneError(
            f"metadata {METADATA_PREFIX}{name} is not a base64 float32 (C, F) array"
        ) from None
    if array.ndim != 2 or not np.isfinite(array).all():
        raise StandaloneError(
            f"metadata {METADATA_PREFIX}{name} must be finite numbers of shape (C, F), "
            f"got shape {array.shape}"
        )
    if isinstance(input_shape, list) and list(array.shape) != list(input_shape[:2]):
        raise StandaloneError(
            f"metadata {METADATA_PREFIX}{name} has shape {array.shape}, "
            f"but the input shape is {input_shape}"
        )
    return array.astype(np.float32)[..., None]  # a copy: frombuffer's array is read-only


# -- the front end ------------------------------------------------------------------------


class FrontEnd:
    """:class:`data.features.LogMelFrontEnd` in numpy, built from its ``config()`` dict.

    One clip ``(C_in, N)`` at the configured sample rate becomes ``(C_out, n_mels, T)``
    float32: channel mode, zero-pad or crop from the start to the clip length, centred
    frames (``pad_mode`` padding by ``n_fft // 2``), a periodic Hann window of
    ``win_length`` centred in ``n_fft``, power spectrum, torchaudio's triangular mel
    filters (``mel_scale``, ``mel_norm``), then ``log(mel + eps)`` or dB relative to the
    clip's maximum floored at -80 dB. The front end does not resample, so neither does
    this: a clip at another rate is refused.

    Args:
        config: the front end's configuration, as ``LogMelFrontEnd.config()`` returns it.

    Raises:
        StandaloneError: an option is missing, unknown, or has a value not implemented here.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        cfg = _checked_config(config)
        self.config = cfg
        self.sample_rate: int = cfg["sample_rate"]
        self.n_fft: int = cfg["n_fft"]
        self.win_length: int = cfg["win_length"]
        self.hop_length: int = cfg["hop_length"]
        self.n_mels: int = cfg["n_mels"]
        self.channels: str = cfg["channels"]
        self.scale: str = cfg["scale"]
        self.eps: float = cfg["eps"]
        self.pad_mode: str = cfg["pad_mode"]
        #: Samples per clip after padding or cropping (Python's round, as the front end).
        self.clip_samples = int(round(cfg["clip_seconds"] * self.sample_rate))
        if self.pad_mode == "reflect" and self.clip_samples <= self.n_fft // 2:
            raise StandaloneError(
                f"reflect padding needs clips longer than {self.n_fft // 2} samples, "
                f"the config gives {self.clip_samples}"
            )
        n = np.arange(self.win_length, dtype=np.float64)
        self.window = 0.5 - 0.5 * np.cos(2.0 * math.pi * n / self.win_length)  # periodic
        self.filters = mel_filters(
            n_freqs=self.n_fft // 2 + 1,
            f_min=cfg["f_min"],
            f_max=cfg["f_max"],
            n_mels=self.n_mels,
            sample_rate=self.sample_rate,
            mel_scale=cfg["mel_scale"],
            norm=cfg["mel_norm"],
        )

    @property
    def out_channels(self) -> int:
        """Channels of the output: 2 for ``stereo``, 1 otherwise."""
        return 2 if self.channels == "stereo" else 1

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """``(C, n_mels, T)`` of one clip's features."""
        return (self.out_channels, self.n_mels, 1 + self.clip_samples // self.hop_length)

    def __call__(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        """Features ``(C_out, n_mels, T)`` float32 of one float clip ``(C_in, N)``."""
        x = self._adapt(waveform, sample_rate)
        half, hop, win = self.n_fft // 2, self.hop_length, self.win_length
        mode = "reflect" if self.pad_mode == "reflect" else "constant"
        padded = np.pad(x, ((0, 0), (half, half)), mode=mode)
        offset = (self.n_fft - win) // 2  # where torch.stft puts the window in n_fft
        frames = np.lib.stride_tricks.sliding_window_view(padded[:, offset:], win, axis=-1)
        frames = frames[:, ::hop][:, : 1 + x.shape[-1] // hop]  # (C, T, win)
        # The window at the start of the n_fft buffer instead of its centre: a circular
        # shift, which leaves the power spectrum unchanged.
        spectrum = np.fft.rfft(frames * self.window, n=self.n_fft)
        power = spectrum.real**2 + spectrum.imag**2
        mel = np.swapaxes(power @ self.filters, 1, 2)  # (C, n_mels, T)
        if self.scale == "log":
            return np.log(mel + self.eps).astype(np.float32)
        db = 10.0 * np.log10(np.maximum(mel, DB_AMIN))
        return np.maximum(db - db.max(), -DB_TOP).astype(np.float32)

    def _adapt(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        """Check one clip and bring it to ``(C_out, clip_samples)`` float64."""
        wave_in = np.asarray(waveform)
        if wave_in.ndim != 2 or not 1 <= wave_in.shape[0] <= 2:
            raise StandaloneError(
                f"expected one clip (channels, samples) with 1 or 2 channels, "
                f"got shape {wave_in.shape}"
            )
        if not np.issubdtype(wave_in.dtype, np.floating):
            raise StandaloneError(
                f"expected float samples in [-1, 1], got dtype {wave_in.dtype}; "
                "scale integer PCM first (int16: divide by 32768)"
            )
        if int(sample_rate) != self.sample_rate:
            raise StandaloneError(
                f"the clip is {sample_rate} Hz but the model takes {self.sample_rate} Hz; "
                "resample it first (the front end does not resample)"
            )
        if wave_in.shape[1] == 0 or not np.isfinite(wave_in).all():
            raise StandaloneError("the clip is empty or holds NaN/inf samples")
        x = wave_in.astype(np.float32).astype(np.float64)  # what the front end's .float() sees
        if self.channels == "stereo":
            x = np.repeat(x, 2, axis=0) if x.shape[0] == 1 else x
        elif self.channels == "mono":
            x = x.mean(axis=0, keepdims=True)
        else:  # in_ear
            x = x[:1]
        n = self.clip_samples
        if x.shape[1] >= n:
            return x[:, :n]
        return np.pad(x, ((0, 0), (0, n - x.shape[1])))


def _checked_config(config: Any) -> dict[str, Any]:
    """``config`` with types checked; anything this file does not implement is refused."""
    if not isinstance(config, dict):
        raise StandaloneError(f"the feature config must be a JSON object, got {type(config)}")
    unknown = sorted(set(config) - _KNOWN_OPTIONS)
    if unknown:
        raise StandaloneError(
            f"feature config option {unknown[0]!r} is not implemented by standalone.py "
            f"(it implements {sorted(_KNOWN_OPTIONS)}); update standalone.py from the "
            "project that exported the file"
        )
    missing = sorted(_KNOWN_OPTIONS - {"preset"} - set(config))
    if missing:
        raise StandaloneError(f"the feature config lacks {missing}; re-export the model")
    version = config["version"]
    if (
        config["class"] != FRONT_END_CLASS
        or type(version) is not int
        or version not in FRONT_END_VERSIONS
    ):
        raise StandaloneError(
            f"front end {config['class']!r} version {config['version']!r} is not implemented "
            f"by standalone.py (it implements {FRONT_END_CLASS} versions {FRONT_END_VERSIONS}); "
            "update standalone.py from the project that exported the file"
        )
    cfg = dict(config)
    for name in _INT_OPTIONS:
        if isinstance(cfg[name], bool) or not isinstance(cfg[name], int) or cfg[name] < 1:
            raise StandaloneError(f"feature config {name} must be a positive integer")
    for name in _FLOAT_OPTIONS:
        if isinstance(cfg[name], bool) or not isinstance(cfg[name], (int, float)):
            raise StandaloneError(f"feature config {name} must be a number")
        cfg[name] = float(cfg[name])
    for name, choices in _CHOICES.items():
        if cfg[name] not in choices:
            raise StandaloneError(
                f"feature config {name}={cfg[name]!r} is not implemented by standalone.py "
                f"(it implements {choices})"
            )
    if cfg["win_length"] > cfg["n_fft"]:
        raise StandaloneError(f"win_length {cfg['win_length']} exceeds n_fft {cfg['n_fft']}")
    if not 0 <= cfg["f_min"] < cfg["f_max"] <= cfg["sample_rate"] / 2:
        raise StandaloneError(
            f"need 0 <= f_min < f_max <= sample_rate/2, got {cfg['f_min']}, {cfg['f_max']}"
        )
    if cfg["clip_seconds"] <= 0 or cfg["eps"] < 0:
        raise StandaloneError("feature config clip_seconds must be positive and eps >= 0")
    return cfg


def _hz_to_mel(hz: np.ndarray | float, mel_scale: str) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    if mel_scale == "htk":
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    # slaney: linear below 1 kHz (200/3 Hz a mel), logarithmic above
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    above = min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep
    return np.where(hz >= min_log_hz, above, hz / f_sp)


def _mel_to_hz(mel: np.ndarray, mel_scale: str) -> np.ndarray:
    if mel_scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    above = min_log_hz * np.exp(logstep * (np.maximum(mel, min_log_mel) - min_log_mel))
    return np.where(mel >= min_log_mel, above, f_sp * mel)


def mel_filters(
    n_freqs: int,
    f_min: float,
    f_max: float,
    n_mels: int,
    sample_rate: int,
    mel_scale: str,
    norm: str,
) -> np.ndarray:
    """Triangular mel filters ``(n_freqs, n_mels)`` as ``torchaudio.functional.melscale_fbanks``.

    Bin ``k`` sits at ``k · (sample_rate // 2) / (n_freqs - 1)`` Hz (torchaudio's integer
    Nyquist); band edges are equally spaced on the ``htk`` or ``slaney`` mel scale
    between ``f_min`` and ``f_max``; ``norm="slaney"`` divides each triangle by half its
    width in Hz (area normalisation).
    """
    freqs = np.linspace(0.0, float(sample_rate // 2), n_freqs)
    m_min, m_max = _hz_to_mel(f_min, mel_scale), _hz_to_mel(f_max, mel_scale)
    edges = _mel_to_hz(np.linspace(m_min, m_max, n_mels + 2), mel_scale)
    widths = np.diff(edges)
    slopes = edges[None, :] - freqs[:, None]
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    if norm == "slaney":
        filters *= 2.0 / (edges[2 : n_mels + 2] - edges[:n_mels])
    return filters


# -- the model ----------------------------------------------------------------------------


class StandaloneModel:
    """An exported classifier and its front end, from the ``.onnx`` file alone.

    Args:
        path: the ``.onnx`` file (fp32 or int8) written by the project's exporter.
        threads: ONNX Runtime intra-op threads (0: one per core).

    Attributes:
        metadata: the file's parsed metadata (:func:`read_metadata`).
        front_end: the numpy :class:`FrontEnd` of its ``feature_config``.

    Raises:
        StandaloneError: the file lacks the metadata needed, or it is inconsistent.
    """

    def __init__(self, path: str | os.PathLike[str], threads: int = 1) -> None:
        self.path = Path(path)
        self.session = _open_session(self.path, threads)
        self.metadata = read_metadata(self.session)
        if self.metadata.get("input") == "audio":
            raise StandaloneError(
                f"{self.path} takes audio, not features (an --audio_in export): run it with "
                "onnxruntime directly: session.run(['probabilities'], {'audio': audio[None]})"
            )
        for name in ("class_names", "input_shape", "feature_config"):
            if name not in self.metadata:
                raise StandaloneError(
                    f"{self.path} carries no {METADATA_PREFIX}{name} metadata; export it "
                    "again with the project's exporter (python -m util.deploy)"
                )
        self.front_end = FrontEnd(self.metadata["feature_config"])
        shape = [int(d) for d in self.metadata["input_shape"]]
        if list(self.front_end.output_shape) != shape:
            raise StandaloneError(
                f"the feature config gives inputs {list(self.front_end.output_shape)}, "
                f"but the model's input shape is {shape}"
            )
        self.normalize = bool(self.metadata.get("normalize", False))
        # Every earsleep export so far standardises inside the graph (Classifier.forward).
        in_graph = bool(self.metadata.get("standardized_in_graph", True))
        self._standardize = self.normalize and not in_graph
        if self._standardize and not {"band_mean", "band_std"} <= set(self.metadata):
            raise StandaloneError(
                f"{self.path} needs band standardisation but carries no band statistics"
            )
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name

    @property
    def class_names(self) -> list[str]:
        """Class names in the order of :meth:`probabilities`."""
        return list(self.metadata["class_names"])

    def features(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        """The front end's features ``(C, n_mels, T)`` of one clip ``(C_in, N)``."""
        return self.front_end(waveform, sample_rate)

    def logits(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        """Logits ``(K,)`` of one clip ``(C_in, N)`` float, at the model's sample rate."""
        x = self.features(waveform, sample_rate)[None]
        if self._standardize:
            x = (x - self.metadata["band_mean"]) / self.metadata["band_std"]
        out = self.session.run([self._output], {self._input: x.astype(np.float32)})[0]
        return np.asarray(out[0], dtype=np.float64)

    def probabilities(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        """Class probabilities ``(K,)`` (softmax of the logits) of one clip ``(C_in, N)``."""
        logits = self.logits(waveform, sample_rate)
        z = np.exp(logits - logits.max())
        return z / z.sum()


def _open_session(path: str | os.PathLike[str], threads: int = 1) -> ort.InferenceSession:
    if not Path(path).is_file():
        raise StandaloneError(f"no ONNX file at {path}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no optimiser chatter on stderr
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises several unrelated types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StandaloneError(f"ONNX Runtime cannot load {path}: {first}") from None


# -- WAV input and the command line -------------------------------------------------------


def read_wav(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV file as float32 ``(channels, samples)`` in [-1, 1) and its rate.

    Raises:
        StandaloneError: the file is not 16-bit PCM WAV (float, 24-bit, compressed…).
    """
    hint = "convert it to 16-bit PCM WAV first (e.g. sox in.wav -b 16 out.wav)"
    try:
        with wave.open(str(path), "rb") as f:
            width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
            data = f.readframes(f.getnframes())
    except (wave.Error, EOFError) as err:
        raise StandaloneError(f"{path} is not a 16-bit PCM WAV file ({err}); {hint}") from None
    if width != 2:
        raise StandaloneError(f"{path} holds {8 * width}-bit samples, not 16-bit PCM; {hint}")
    samples = np.frombuffer(data[: len(data) - len(data) % (2 * channels)], dtype="<i2")
    waveform = samples.reshape(-1, channels).T.astype(np.float32) / np.float32(32768.0)
    return waveform, rate


def main(argv: Sequence[str] | None = None) -> int:
    """Print the class probabilities of one WAV clip; 0 on success, 1 with one error line."""
    parser = argparse.ArgumentParser(
        prog="standalone.py",
        description="Class probabilities of a 16-bit PCM WAV clip from an earsleep ONNX file, "
        "with only onnxruntime and numpy.",
    )
    parser.add_argument("model", help="the exported .onnx file (fp32 or int8)")
    parser.add_argument("wav", help="a 16-bit PCM WAV clip at the model's sample rate")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (0: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    try:
        model = StandaloneModel(args.model, threads=args.threads)
        probs = model.probabilities(*read_wav(args.wav))
    except (StandaloneError, OSError) as err:
        print(f"standalone.py: error: {err}", file=sys.stderr)
        return 1
    pairs = dict(zip(model.class_names, (float(p) for p in probs), strict=True))
    if args.json:
        print(json.dumps(pairs))
    else:
        for name, p in pairs.items():
            print(f"{name}\t{p:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
