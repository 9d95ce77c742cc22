"""The whole pipeline as one ONNX file: two-channel audio in, class probabilities out.

``<backbone>.audio.onnx`` takes ``audio`` float32 ``(batch, 2, samples)`` at the front
end's sample rate (16 kHz for both presets) and returns ``probabilities`` ``(batch, K)``
(softmax, in the order of the ``earsleep.class_names`` metadata), so a phone or a host
runs it with ``onnxruntime`` alone: no numpy front end, no torch.

What the graph computes is :class:`data.features.LogMelFrontEnd` followed by the
checkpoint's :class:`~models.classifier.Classifier` (band standardisation, backbone) and
a softmax, in standard ONNX operators only (``Pad``, ``Slice``, ``Conv``, ``MatMul``,
``Log``, ``ReduceMax``…):

- **channels**: ``stereo`` uses both; ``mono`` their mean; ``in_ear`` channel 0. A mono
  recording is passed as the same channel twice, which is what ``LogMelFrontEnd`` does
  with a one-channel clip (``stereo`` duplicates it, ``mono`` averages it to itself).
- **length**: any number of samples ≥ 1 is accepted and, as in ``LogMelFrontEnd``,
  zero-padded at the end or cropped from the start to the clip length (``clip_seconds``
  · ``sample_rate``: 16,000 samples for ``native``, 80,000 for ``reference``). The
  graph does not resample: feed audio at the model's rate.
- **frames**: centred (``n_fft // 2`` samples of ``reflect`` or zero padding, an ONNX
  ``Pad``), and the short-time DFT is one ``Conv`` whose kernels are the Hann window
  times the DFT's cosines and sines (only the frequency bins some mel filter uses). This
  is exact, not an approximation of the FFT, and every ONNX runtime has ``Conv``;
  ``torch.stft`` (ONNX ``STFT``) and ``torch.fft.rfft`` (``DFT``) export too at torch
  2.11, but fewer runtimes (mobile execution providers, converters) implement those
  operators, and neither came out closer to ``LogMelFrontEnd`` in development. The
  kernel is rebuilt in the graph from its cosine and sine tables, the window and the bin
  indices, and the mel filters from their non-zero entries (about 20 KB instead of
  880 KB of float32 for ``native``); ONNX Runtime folds both once when the session is
  created.
- **scale**: ``log(mel + eps)``, or dB relative to each clip's maximum (``ReduceMax``)
  floored at -80 dB for the ``reference`` preset.
- **no checks**: a graph cannot refuse its input, so NaN or inf samples give NaN
  probabilities; ONNX Runtime itself refuses another rank or channel count.

The file is composed, not traced as a whole: the front end alone is exported by
:func:`export_front_end` and joined (:func:`compose_audio_model`) to the features-in file
the exporter already wrote and checked, with a ``Softmax`` after it. The classifier part
is therefore the same graph as ``<backbone>.onnx``, and joining the front end to
``<backbone>.int8.onnx`` gives ``<backbone>.audio.int8.onnx``, whose backbone is the
quantised (and guarded) one while its front end stays float.

:func:`export_audio_onnx` writes the fp32 file of a classifier; :func:`audio_parity`
measures it against the PyTorch pipeline (front end → classifier → softmax) on
synthetic-corpus audio of three lengths (:func:`parity_audio`); :func:`export_audio_checked`
does both for ``python -m util.deploy --audio_in true``.

Besides the features-in file's metadata (:mod:`util.deploy.metadata`, whose
``input_shape`` stays the features' ``[C, F, T]``), the file carries ``earsleep.input``
(``"audio"``), ``earsleep.output`` (``"probabilities"``), ``earsleep.audio_shape`` (JSON
``[2, clip_samples]``: the channels it takes and the length it pads or crops to) and
``earsleep.sample_rate`` (JSON int).

Why about 640 lines in one module: the exportable front end, the export with its two
constant rebuilds, the composition and the checks make one file format that the CLI
writes in one step, and no other module uses the pieces; about half is docstrings.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import compose, helper, version_converter
from torch import nn

from data.features import DB_AMIN, DB_TOP, FRONT_END_VERSION, LogMelFrontEnd
from data.sources.synthetic import Synthetic
from models.classifier import Classifier
from util.deploy.errors import ExportError, ParityError
from util.deploy.graph import set_metadata, strip_debug_info
from util.deploy.onnx import INPUT_NAME, OUTPUT_NAME, export_onnx, run_exporter
from util.deploy.runtime import ort_session

__all__ = [
    "AUDIO_CHANNELS",
    "AUDIO_INPUT",
    "DEFAULT_AUDIO_TOLERANCE",
    "PROBABILITIES",
    "AudioFrontEnd",
    "audio_parity",
    "compose_audio_model",
    "export_audio_checked",
    "export_audio_onnx",
    "export_front_end",
    "front_end_from_config",
    "model_front_end",
    "parity_audio",
]

log = logging.getLogger("util.deploy")

#: The audio-in file's input: float32 ``(batch, 2, samples)``.
AUDIO_INPUT = "audio"
#: The audio-in file's output: softmax probabilities ``(batch, K)``.
PROBABILITIES = "probabilities"
#: Channels of the ``audio`` input (in-ear and outer microphone).
AUDIO_CHANNELS = 2
#: Largest |probability difference| from the PyTorch pipeline that counts as equal.
DEFAULT_AUDIO_TOLERANCE = 1e-4
#: Prefix of the front end's tensor and node names inside the composed graph.
_PREFIX = "audio_in/"


def front_end_from_config(config: dict[str, Any]) -> LogMelFrontEnd:
    """The :class:`LogMelFrontEnd` whose :meth:`~LogMelFrontEnd.config` is ``config``.

    Raises:
        ExportError: ``config`` is not a LogMelFrontEnd configuration of this version, or
            rebuilding it gives another configuration.
    """
    if not isinstance(config, dict) or config.get("class") != LogMelFrontEnd.__name__:
        raise ExportError(f"not a LogMelFrontEnd configuration: {config!r}")
    if config.get("version") != FRONT_END_VERSION:
        raise ExportError(
            f"front end version {config.get('version')!r} is not this project's "
            f"({FRONT_END_VERSION}); export with the project version that trained the model"
        )
    options = {k: v for k, v in config.items() if k not in ("class", "version")}
    try:
        front_end = LogMelFrontEnd(**options)
    except (TypeError, ValueError) as err:
        raise ExportError(f"cannot rebuild the front end from {config}: {err}") from err
    if front_end.config() != config:
        raise ExportError(f"the front end rebuilt from {config} differs: {front_end.config()}")
    return front_end


class AudioFrontEnd(nn.Module):
    """:class:`LogMelFrontEnd` in operators that export to standard ONNX.

    ``forward`` maps ``(B, 2, S)`` float32 audio, any ``S ≥ 1``, to the same features
    ``(B, C, n_mels, T)`` (float32 rounding apart) as ``front_end`` does; see the module
    docstring for channels, padding and cropping.

    Args:
        front_end: the front end to reproduce (its window and mel filters are copied).
    """

    def __init__(self, front_end: LogMelFrontEnd) -> None:
        super().__init__()
        cfg = front_end.config()
        self.channels: str = cfg["channels"]
        self.scale: str = cfg["scale"]
        self.eps: float = float(cfg["eps"])
        self.clip_samples: int = front_end.clip_samples
        self.hop: int = int(cfg["hop_length"])
        self.half: int = int(cfg["n_fft"]) // 2
        self.offset: int = (int(cfg["n_fft"]) - int(cfg["win_length"])) // 2
        self.frames: int = front_end.output_shape[-1]
        self.reflect: bool = cfg["pad_mode"] == "reflect"
        n_fft, win = int(cfg["n_fft"]), int(cfg["win_length"])
        filters = front_end.mel.mel_scale.fb.detach().to(torch.float64)  # (n_freqs, n_mels)
        used = torch.nonzero(filters.abs().sum(dim=1) > 0).flatten()
        if len(used) == 0:
            raise ExportError(f"the front end's mel filters are all zero: {cfg}")
        lo, hi = int(used[0]), int(used[-1]) + 1  # bins outside add 0 to every band
        angle = (2.0 * math.pi / n_fft) * torch.arange(n_fft, dtype=torch.float64)
        #: What the DFT kernel is made of (see :meth:`dft_kernel`).
        self.parts = {
            "cos": torch.cos(angle).to(torch.float32),
            "sin": torch.sin(angle).to(torch.float32),
            "window": front_end.mel.spectrogram.window.detach().to(torch.float32).clone(),
            "bins": torch.arange(lo, hi, dtype=torch.int64)[:, None],
            "taps": torch.arange(win, dtype=torch.int64)[None, :],
            "n_fft": torch.tensor(n_fft, dtype=torch.int64),
        }
        self.register_buffer("dft", self.dft_kernel(self.parts))  # (2K, 1, win)
        self.register_buffer("mel_t", filters[lo:hi].T.contiguous().to(torch.float32))
        self.bins = hi - lo

    @staticmethod
    def dft_kernel(parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The windowed DFT kernel ``(2K, 1, win)``: cosines, then sines, of the used bins.

        Row ``k``, tap ``t`` is ``cos(2π·((k·t) mod n_fft)/n_fft)·window[t]``: the angle's
        integer part is exact, the tables are float32 roundings of float64 values, and the
        product is one float32 multiplication, so the ONNX graph that rebuilds the kernel
        from the same parts (``_dft_in_graph``, 12 KB instead of 816 KB for ``native``)
        gets the same bits. The window starts the DFT buffer instead of sitting in its
        centre, as in ``LogMelFrontEnd._log_mel``: a circular shift, which the power
        spectrum ignores.
        """
        phase = torch.remainder(parts["bins"] * parts["taps"], parts["n_fft"])
        cos = parts["cos"][phase] * parts["window"]
        sin = parts["sin"][phase] * parts["window"]
        return torch.cat([cos, sin])[:, None, :]

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """``(C, n_mels, T)`` of one clip's features."""
        return (2 if self.channels == "stereo" else 1, int(self.mel_t.shape[0]), self.frames)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """Features ``(B, C, n_mels, T)`` of audio ``(B, 2, S)``."""
        x = audio
        if self.channels == "mono":
            x = x.mean(dim=1, keepdim=True)
        elif self.channels == "in_ear":
            x = x[:, :1]
        b, c = x.shape[0], x.shape[1]
        n = self.clip_samples
        x = F.pad(x, (0, n))[..., :n]  # zero-pad at the end, or crop from the start
        x = x.reshape(b * c, 1, n)
        x = F.pad(x, (self.half, self.half), mode="reflect" if self.reflect else "constant")
        spec = F.conv1d(x[..., self.offset :], self.dft, stride=self.hop)[..., : self.frames]
        power = spec[:, : self.bins].square() + spec[:, self.bins :].square()  # (N, K, T)
        mel = torch.matmul(self.mel_t, power)  # (N, n_mels, T)
        if self.scale == "log":
            return torch.log(mel + self.eps).reshape(b, c, mel.shape[1], self.frames)
        db = (10.0 * torch.log10(mel.clamp(min=DB_AMIN))).reshape(b, c, mel.shape[1], -1)
        peak = db.amax(dim=(1, 2, 3), keepdim=True)
        return (db - peak).clamp(min=-DB_TOP)


def export_front_end(front_end: LogMelFrontEnd, path: str | Path, opset: int | None = None) -> Path:
    """Export :class:`AudioFrontEnd` of ``front_end`` alone: ``audio`` in, ``features`` out.

    Batch and sample axes are dynamic. Used by :func:`export_audio_onnx`; useful on its
    own to compute features on a device.

    Raises:
        ExportError: the exporter fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = AudioFrontEnd(front_end).eval()
    # batch 2 and an odd length: sizes 0/1 and the clip length itself get specialised
    example = torch.randn(2, AUDIO_CHANNELS, front_end.clip_samples + 7)
    dims = {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("samples", min=1)}
    try:
        program = run_exporter(net, example, dims, AUDIO_INPUT, INPUT_NAME, opset)
    except Exception as err:
        raise ExportError(
            f"cannot export the audio front end: {type(err).__name__}: {err}"[:400]
        ) from err
    if program is None:  # pragma: no cover - only when f= is given
        raise ExportError("the exporter returned no program for the audio front end")
    program.save(str(path))
    proto = onnx.load(str(path))
    strip_debug_info(proto)
    del proto.metadata_props[:]
    _dft_in_graph(proto, net)
    _mel_in_graph(proto, net)
    onnx.save(proto, str(path))
    return path


def _dft_in_graph(proto: onnx.ModelProto, net: AudioFrontEnd) -> None:
    """Replace the DFT kernel initializer with nodes that compute it from its small parts.

    ``Mul`` and ``Mod`` give each tap's phase index, ``Gather`` its cosine and sine, a
    ``Mul`` the window: :meth:`AudioFrontEnd.dft_kernel` step by step, on the same float32
    parts, hence the same values. ONNX Runtime folds these constant nodes once when the
    session is created, so running costs nothing more.
    """
    graph = proto.graph
    found = [i for i in graph.initializer if i.name == "dft"]
    if len(found) != 1 or list(found[0].dims) != list(net.dft.shape):
        raise ExportError("the exported front end has no DFT kernel initializer 'dft'")
    graph.initializer.remove(found[0])

    def name(part: str) -> str:
        return f"dft/{part}"  # composing prefixes it: audio_in/dft/...

    for key, value in net.parts.items():
        graph.initializer.append(onnx.numpy_helper.from_array(value.numpy(), name(key)))
    shape = np.asarray(net.dft.shape, dtype=np.int64)
    graph.initializer.append(onnx.numpy_helper.from_array(shape, name("shape")))
    nodes = [
        helper.make_node("Mul", [name("bins"), name("taps")], [name("product")]),
        helper.make_node("Mod", [name("product"), name("n_fft")], [name("phase")]),
        helper.make_node("Gather", [name("cos"), name("phase")], [name("cos_taps")]),
        helper.make_node("Gather", [name("sin"), name("phase")], [name("sin_taps")]),
        helper.make_node("Mul", [name("cos_taps"), name("window")], [name("cos_rows")]),
        helper.make_node("Mul", [name("sin_taps"), name("window")], [name("sin_rows")]),
        helper.make_node("Concat", [name("cos_rows"), name("sin_rows")], [name("rows")], axis=0),
        helper.make_node("Reshape", [name("rows"), name("shape")], ["dft"]),
    ]
    for node in reversed(nodes):
        graph.node.insert(0, node)


def _mel_in_graph(proto: onnx.ModelProto, net: AudioFrontEnd) -> None:
    """Store the mel filters ``mel_t`` ``(n_mels, K)`` as their non-zero entries.

    Each frequency bin lies in at most two triangles, so about 500 of the 16,320 native
    entries are not zero: ``ScatterElements`` puts those values (the same float32 numbers)
    into zeros, which ONNX Runtime folds once at session creation (about 6 KB instead of
    65 KB).
    """
    graph = proto.graph
    found = [i for i in graph.initializer if i.name == "mel_t"]
    if len(found) != 1 or list(found[0].dims) != list(net.mel_t.shape):
        raise ExportError("the exported front end has no mel filter initializer 'mel_t'")
    graph.initializer.remove(found[0])
    dense = net.mel_t.numpy().reshape(-1)
    where = np.flatnonzero(dense)
    parts = {
        "mel/size": np.asarray([dense.size], dtype=np.int64),
        "mel/indices": where.astype(np.int64),
        "mel/values": dense[where].astype(np.float32),
        "mel/shape": np.asarray(net.mel_t.shape, dtype=np.int64),
    }
    graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in parts.items())
    zero = helper.make_tensor("zero", onnx.TensorProto.FLOAT, [1], [0.0])
    nodes = [
        helper.make_node("ConstantOfShape", ["mel/size"], ["mel/zeros"], value=zero),
        helper.make_node(
            "ScatterElements", ["mel/zeros", "mel/indices", "mel/values"], ["mel/flat"], axis=0
        ),
        helper.make_node("Reshape", ["mel/flat", "mel/shape"], ["mel_t"]),
    ]
    for node in reversed(nodes):
        graph.node.insert(0, node)


def compose_audio_model(
    front_end: onnx.ModelProto, classifier: onnx.ModelProto, metadata: dict[str, str]
) -> onnx.ModelProto:
    """Join a front end (``audio`` → ``features``) to a classifier file and a softmax.

    Args:
        front_end: the model :func:`export_front_end` wrote.
        classifier: a features-in file of the exporter (fp32 or int8): ``features`` in,
            ``logits`` out. Its metadata is kept.
        metadata: keys set over the classifier's metadata.

    Returns:
        ``audio`` ``(batch, 2, samples)`` in, ``probabilities`` ``(batch, K)`` out.

    Raises:
        ExportError: the two graphs do not have the expected inputs and outputs.
    """
    fe, clf = copy.deepcopy(front_end), copy.deepcopy(classifier)
    if [o.name for o in fe.graph.output] != [INPUT_NAME]:
        raise ExportError(f"the front end must have one output {INPUT_NAME!r}")
    names = ([i.name for i in clf.graph.input], [o.name for o in clf.graph.output])
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise ExportError(
            f"the classifier file must take {INPUT_NAME!r} and return {OUTPUT_NAME!r}"
        )
    kept = {p.key: p.value for p in clf.metadata_props}
    del clf.metadata_props[:]
    del fe.metadata_props[:]
    del clf.graph.metadata_props[:]
    del fe.graph.metadata_props[:]
    opset = _default_opset(clf)
    if opset and _default_opset(fe) != opset:
        fe = version_converter.convert_version(fe, opset)
    fe.ir_version = clf.ir_version
    fe = compose.add_prefix(fe, _PREFIX, rename_inputs=False)
    merged = compose.merge_models(fe, clf, io_map=[(_PREFIX + INPUT_NAME, INPUT_NAME)])
    graph = merged.graph
    logits = graph.output[0]
    classes = logits.type.tensor_type.shape.dim[1]
    graph.node.append(helper.make_node("Softmax", [OUTPUT_NAME], [PROBABILITIES], axis=-1))
    out = helper.make_tensor_value_info(PROBABILITIES, onnx.TensorProto.FLOAT, ["batch", None])
    dim = out.type.tensor_type.shape.dim[1]
    if classes.HasField("dim_value"):
        dim.dim_value = classes.dim_value
    del graph.output[:]
    graph.output.append(out)
    dims = graph.input[0].type.tensor_type.shape.dim
    for d, name in zip(dims, ("batch", None, "samples"), strict=True):
        if name:
            d.dim_param = name
    graph.name = "earsleep_audio_in"
    opsets = {o.domain or "": o.version for o in merged.opset_import}  # one entry a domain
    del merged.opset_import[:]
    merged.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(opsets.items()))
    set_metadata(merged, {**kept, **metadata})
    onnx.checker.check_model(merged)
    return merged


def _default_opset(proto: onnx.ModelProto) -> int:
    """The model's opset of the default (``ai.onnx``) domain; 0 when it imports none."""
    return {o.domain or "": o.version for o in proto.opset_import}.get("", 0)


def _audio_metadata(front_end: LogMelFrontEnd) -> dict[str, str]:
    return {
        "earsleep.input": AUDIO_INPUT,
        "earsleep.output": PROBABILITIES,
        "earsleep.audio_shape": json.dumps([AUDIO_CHANNELS, front_end.clip_samples]),
        "earsleep.sample_rate": json.dumps(front_end.sample_rate),
    }


def model_front_end(model: Classifier, front_end: LogMelFrontEnd | None = None) -> LogMelFrontEnd:
    """``front_end``, or the one the model records; checked against the model's input shape.

    Raises:
        ExportError: no front end is given or recorded, or its output is not the model's input.
    """
    if front_end is None:
        if not model.feature_config:
            raise ExportError(
                "the model records no front end (features); pass the LogMelFrontEnd it was "
                "trained on"
            )
        front_end = front_end_from_config(model.feature_config)
    if tuple(front_end.output_shape) != tuple(model.input_shape):
        raise ExportError(
            f"the front end gives features {list(front_end.output_shape)}, but the model "
            f"takes {list(model.input_shape)}"
        )
    return front_end


def export_audio_onnx(
    model: Classifier,
    path: str | Path,
    classifier_onnx: str | Path | None = None,
    front_end: LogMelFrontEnd | None = None,
    opset: int | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write the audio-in file of ``model``: audio in, class probabilities out.

    Args:
        model: the classifier (its ``feature_config`` gives the front end unless
            ``front_end`` is given).
        path: the ``.audio.onnx`` file to write.
        classifier_onnx: the features-in file to join the front end to (fp32, or the
            int8 file); default: ``model`` exported afresh with
            :func:`util.deploy.onnx.export_onnx`.
        front_end: the front end the model was trained on (default: the recorded one).
        opset: ONNX opset of a fresh export (the classifier file's opset wins).
        metadata: extra metadata keys.

    Returns:
        ``path``.

    Raises:
        ExportError: no front end, a front end that does not fit the model, or an
            exporter failure.
    """
    front_end = model_front_end(model, front_end)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="earsleep-audio-") as tmp:
        if classifier_onnx is None:
            classifier_onnx = export_onnx(
                model, Path(tmp) / "classifier.onnx", model.input_shape, opset=opset
            )
        classifier = onnx.load(str(classifier_onnx))
        # the front end in the classifier's opset where the exporter writes it (18 and up)
        wanted = _default_opset(classifier)
        fe_path = export_front_end(
            front_end, Path(tmp) / "front_end.onnx", wanted if wanted >= 18 else None
        )
        proto = compose_audio_model(
            onnx.load(str(fe_path)), classifier, {**_audio_metadata(front_end), **(metadata or {})}
        )
    onnx.save(proto, str(path))
    return path


def parity_audio(front_end: LogMelFrontEnd, clips: int = 8, seed: int = 0) -> list[np.ndarray]:
    """Synthetic-corpus audio ``(clips, 2, S)`` in three batches: clip length, shorter, longer.

    Sleep sounds (breathing, snoring, room noise; :class:`data.sources.synthetic.Synthetic`)
    at the front end's rate, so that padding and cropping are exercised too.
    """
    out = []
    n = front_end.clip_samples
    for i, samples in enumerate((n, int(0.6 * n), int(1.3 * n))):
        source = Synthetic(
            seed=seed + i,
            sample_rate=front_end.sample_rate,
            duration_s=samples / front_end.sample_rate,
        )
        out.append(np.stack([source.synthesize("test", k).waveform for k in range(clips)]))
    return [a.astype(np.float32) for a in out]


def audio_parity(
    model: nn.Module,
    front_end: LogMelFrontEnd,
    session: ort.InferenceSession,
    batches: Sequence[np.ndarray],
    tolerance: float | None = DEFAULT_AUDIO_TOLERANCE,
) -> dict[str, float]:
    """Compare the audio-in file with the PyTorch pipeline (front end → model → softmax).

    Args:
        model: the classifier (features in, logits out), on CPU.
        front_end: its :class:`LogMelFrontEnd`.
        session: an ONNX Runtime session of the audio-in file.
        batches: float32 audio ``(B, 2, S)``.
        tolerance: the largest allowed |probability difference|; ``None`` only measures.

    Returns:
        ``max_abs_diff`` (probabilities), ``clips``, ``argmax_agreement`` and ``tolerance``.

    Raises:
        ParityError: the difference exceeds ``tolerance`` (or is NaN).
    """
    net = copy.deepcopy(model).cpu().eval()
    worst, clips, agree = 0.0, 0, 0
    with torch.inference_mode():
        for audio in batches:
            audio = np.ascontiguousarray(audio, dtype=np.float32)
            logits = net(front_end(torch.from_numpy(audio))).double()
            ref = torch.softmax(logits, dim=-1).numpy()
            got = session.run([PROBABILITIES], {AUDIO_INPUT: audio})[0].astype(np.float64)
            diff = np.abs(got - ref)
            worst = max(worst, float("inf") if np.isnan(diff).any() else float(diff.max()))
            agree += int((got.argmax(axis=1) == ref.argmax(axis=1)).sum())
            clips += len(audio)
    if clips == 0:
        raise ExportError("no audio to check the audio-in file on")
    if tolerance is not None and not worst <= tolerance:
        raise ParityError(
            f"the audio-in file's probabilities differ from the PyTorch pipeline's by up to "
            f"{worst:.3g} on {clips} clips (tolerance {tolerance:g})",
            max_abs_diff=worst,
            tolerance=tolerance,
        )
    return {
        "max_abs_diff": worst,
        "clips": clips,
        "argmax_agreement": agree / clips,
        "tolerance": tolerance,
    }


def export_audio_checked(
    model: Classifier,
    fp32_path: str | Path,
    path: str | Path,
    front_end: LogMelFrontEnd | None = None,
    int8_path: str | Path | None = None,
    tolerance: float = DEFAULT_AUDIO_TOLERANCE,
    clips: int = 8,
    seed: int = 0,
    threads: int = 0,
) -> dict[str, Any]:
    """Write ``<stem>.audio.onnx`` (and ``.audio.int8.onnx``) and check them: the CLI's step.

    The fp32 file joins the front end to ``fp32_path`` and must equal the PyTorch
    pipeline within ``tolerance`` on :func:`parity_audio` clips; if not, it is kept as
    ``<stem>.audio.parity_failed.onnx`` and :class:`ParityError` is raised. The int8 file
    joins it to ``int8_path``; it is compared with ``int8_path`` run on the PyTorch front
    end's features (the same quantised classifier: the difference is the float front
    end's rounding, amplified where a feature crosses a quantisation step), and only
    measured.

    Args:
        model: the classifier.
        fp32_path: its checked features-in fp32 file.
        path: the ``.audio.onnx`` file to write.
        front_end: the run's front end (default: the model's recorded one).
        int8_path: its accepted int8 file, if any.
        tolerance: the largest allowed |probability difference| of the fp32 file.
        clips: clips per length in :func:`parity_audio` (three lengths).
        seed: seed of those clips.
        threads: ONNX Runtime threads (0: all cores).

    Returns:
        The report's ``audio_in`` section: ``input``, ``sample_rate``, ``clip_samples``
        and, per file (``fp32``, ``int8``), ``path``, ``bytes`` and the comparison.

    Raises:
        ExportError: the export fails; ParityError: the fp32 file is not equal.
    """
    front_end = model_front_end(model, front_end)
    path = Path(path)
    batches = parity_audio(front_end, clips, seed)
    export_audio_onnx(model, path, fp32_path, front_end)
    try:
        parity = audio_parity(model, front_end, ort_session(path, threads), batches, tolerance)
    except ParityError as err:
        failed = path.with_name(path.name.replace(".onnx", ".parity_failed.onnx"))
        path.replace(failed)
        raise ParityError(
            f"{err} (kept as {failed})", max_abs_diff=err.max_abs_diff, tolerance=err.tolerance
        ) from None
    log.info(
        "audio-in: max |probability diff| from PyTorch %.3g over %d clips",
        parity["max_abs_diff"],
        parity["clips"],
    )
    section: dict[str, Any] = {
        "input": f"{AUDIO_INPUT} float32 (batch, {AUDIO_CHANNELS}, samples)",
        "output": f"{PROBABILITIES} (batch, K)",
        "sample_rate": front_end.sample_rate,
        "clip_samples": front_end.clip_samples,
        "fp32": {"path": str(path), "bytes": path.stat().st_size, "parity": parity},
    }
    if int8_path is not None:
        int8_audio = path.with_name(path.name.replace(".onnx", ".int8.onnx"))
        export_audio_onnx(model, int8_audio, int8_path, front_end)
        section["int8"] = {
            "path": str(int8_audio),
            "bytes": int8_audio.stat().st_size,
            "vs_int8_features_file": _int8_agreement(
                front_end,
                ort_session(int8_audio, threads),
                ort_session(int8_path, threads),
                batches,
            ),
        }
    return section


def _int8_agreement(
    front_end: LogMelFrontEnd,
    audio_session: ort.InferenceSession,
    features_session: ort.InferenceSession,
    batches: Sequence[np.ndarray],
) -> dict[str, float]:
    """The int8 audio file against the int8 features file fed PyTorch features."""
    worst, agree, clips = 0.0, 0, 0
    for audio in batches:
        with torch.inference_mode():
            x = front_end(torch.from_numpy(audio)).numpy()
        logits = features_session.run([OUTPUT_NAME], {INPUT_NAME: x})[0].astype(np.float64)
        ref = np.exp(logits - logits.max(axis=1, keepdims=True))
        ref /= ref.sum(axis=1, keepdims=True)
        got = audio_session.run([PROBABILITIES], {AUDIO_INPUT: audio})[0]
        worst = max(worst, float(np.abs(got - ref).max()))
        agree += int((got.argmax(axis=1) == ref.argmax(axis=1)).sum())
        clips += len(audio)
    return {"max_abs_diff": worst, "argmax_agreement": agree / clips, "clips": clips}
