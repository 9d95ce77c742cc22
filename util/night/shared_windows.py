"""TinyCNN over overlapping windows, with the work the windows share computed once.

Windows every ``hop`` frames over a night overlap (1-s windows every 0.5 s share half
their frames), and a convolution is the same along time, so a TinyCNN layer can run once
over the long stream of frames instead of once per window. What differs is the edges:
each window is zero-padded on its own (and the front end's first and last frames are the
window's own), so near its ends a window's maps are not the stream's. The result must be
the per-window one, so :class:`SharedWindowRunner` keeps, per window, the few columns at
each end that differ (its *patches*) and recomputes just those, layer by layer, from
narrow slabs: the window's own columns where they differ, the stream's where they are
the same. The interior comes from the stream. Everything agrees with running
:class:`models.classifier.Classifier` on each window to float rounding.

Where a pooling stride does not divide the hop (0.5 s is 50 frames: 25 after the first
pool, odd, so the second pool pairs columns differently in odd and even windows), the
layer's conv still runs on the stream, is pooled in both phases, and the windows are cut
out there; the remaining layers run per window. A hop that is a multiple of 8 frames
(0.48 s) can share all three layers. The runner shares the layers of the plan it
estimates fastest (:func:`plan_layers`, :func:`plan_cost`): the recomputed edges stay 2-3
columns wide while the windows halve, and building the stream and the slabs costs numpy
work, so at the default 0.5 s sharing would save 3 % and every layer runs per window; at
0.48 s on one thread all three layers are shared (12 % less time), at 0.16 s 47 % less.
The shared convs run on one thread, the per-window pieces on ``workers`` side by side,
so with several workers sharing must save more to win.

Only a plain TinyCNN qualifies (:func:`util.night.tinycnn_graphs.supports_tinycnn`):
TinyCNN-CBAM's attention and CRNN's recurrent head look at a whole window at once, so
they keep the per-window path (:class:`util.deploy.runtime.OnnxRuntimeRunner`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from models.task import Task
from util.deploy.errors import ParityError
from util.night.tinycnn_graphs import (
    ConvLayer,
    session,
    stack_graph,
    supports_tinycnn,
    tinycnn_layers,
)

__all__ = ["LayerStep", "SharedWindowRunner", "layer_weights", "plan_cost", "plan_layers"]


@dataclasses.dataclass(frozen=True)
class LayerStep:
    """How one TinyCNN layer runs for windows of width ``width`` every ``hop`` columns.

    ``mode``: ``stream`` (conv and pool on the shared stream), ``phases`` (conv on the
    stream, pooled in both phases, windows cut out after it), or ``windows`` (windows cut
    out before it). ``left``/``right``: columns at each end of the layer's input that
    differ from the stream.
    """

    mode: str
    width: int
    hop: int
    left: int
    right: int

    @property
    def out_left(self) -> int:
        """Columns at the left end of the pooled output that differ from the stream."""
        return -(-(self.left + 1) // 2)

    @property
    def right_start(self) -> int:
        """First pooled output column, from the right, that differs from the stream."""
        return (self.width - self.right - 1) // 2

    @property
    def out_right(self) -> int:
        """Columns at the right end of the pooled output that differ from the stream."""
        return self.width // 2 - self.right_start


def plan_layers(
    width: int,
    hop: int,
    left: int,
    right: int,
    weights: Sequence[float],
    depth: int | None = None,
    workers: int = 1,
) -> list[LayerStep]:
    """The steps for TinyCNN layers over windows ``width`` columns wide.

    ``weights``: each layer's share of the per-window time (:func:`layer_weights`), one
    per layer. With ``depth``, the first ``depth`` layers are shared where their slabs fit
    inside the window; otherwise the plan of least :func:`plan_cost` (for ``workers``
    per-window threads) among sharing one layer, two, …, all of them, and per window
    unless that saves at least :data:`MIN_SAVING`. Sharing ends at the first layer whose slabs do not fit (it and
    the rest run per window: ``windows``) or whose hop is odd (``phases``: the rest run
    per window after it); with every layer shared, windows are cut from the final maps.
    """
    n = len(weights)
    if depth is not None:
        return _steps(width, hop, left, right, n, depth)
    best, best_cost = _steps(width, hop, left, right, n, 0), 1.0 - MIN_SAVING
    for d in range(1, n + 1):
        steps = _steps(width, hop, left, right, n, d)
        cost = plan_cost(steps, weights, workers)
        if cost < best_cost:
            best, best_cost = steps, cost
    return best


def _steps(width: int, hop: int, left: int, right: int, layers: int, depth: int) -> list[LayerStep]:
    steps = []
    for i in range(layers):
        probe = LayerStep("stream", width, hop, left, right)
        fits = (
            2 * probe.out_left + 1 <= width - right  # left slab: stream columns inside
            and 2 * probe.right_start - 1 >= left  # right slab too
            and probe.out_left + probe.out_right < width // 2
            and hop < width
        )
        if not (fits and i < depth):
            steps.append(dataclasses.replace(probe, mode="windows"))
            return steps
        if hop % 2:
            steps.append(dataclasses.replace(probe, mode="phases"))
            return steps
        steps.append(probe)
        width, hop, left, right = width // 2, hop // 2, probe.out_left, probe.out_right
    return steps


def plan_cost(steps: Sequence[LayerStep], weights: Sequence[float], workers: int = 1) -> float:
    """Estimated time of a plan, as a fraction of running every layer per window.

    A shared layer costs its weight times its stream columns per window (``hop``, times
    :data:`PHASES_COST` when pooled in both phases) and the conv columns of its two edge
    slabs, over the window's columns; a layer per window costs its weight; building the
    stream, the slabs and the cut windows costs :data:`GLUE` (``(base, per shared
    layer)``). Fitted to ``benchmarks/shared_windows.py`` on the stock TinyCNN (within
    0.04 of every measured plan, 0.1-0.5-s hops). With ``workers`` > 1 it is wall time:
    the per-window layers run on that many threads side by side, the shared ones on one
    (a 1-h night at 0.48 s on two workers and two idle cores: 8.8 s per window, 10.0 s
    with all three layers shared, on 5 % less CPU time).
    """
    shared_cost, windows_cost, shared = 0.0, 0.0, 0
    for i, step in enumerate(steps):
        if step.mode == "windows":
            windows_cost = sum(weights[i:])
            break
        edges = 2 * step.out_left + step.width - 2 * step.right_start
        columns = step.hop * (PHASES_COST if step.mode == "phases" else 1.0) + edges
        shared_cost += weights[i] * columns / step.width
        shared += 1
        if step.mode == "phases":
            windows_cost = sum(weights[i + 1 :])
            break
    if not shared:
        return 1.0
    shared_cost += GLUE[0] + GLUE[1] * shared
    return shared_cost * max(1, int(workers)) + windows_cost


def layer_weights(layers: Sequence[ConvLayer], input_shape: Sequence[int]) -> list[float]:
    """Each TinyCNN layer's share of the per-window time: its multiply-adds, each
    costing ``1 + 1/C_in`` (a conv with few input channels runs further from the core's
    peak: the first layer, 2 channels in, took 17 % of the stock TinyCNN's time for 11 %
    of its multiply-adds)."""
    _, freq, time = input_shape
    costs = []
    for layer in layers:
        c_out, c_in = layer.weight.shape[:2]
        costs.append(c_out * c_in * freq * time * (1.0 + 1.0 / c_in))
        freq, time = freq // 2, time // 2
    return [c / sum(costs) for c in costs]


#: Run per window unless the cheapest shared plan is estimated at least this much faster
#: (the estimate is within a few percent of what is measured; at the default 0.5-s hop
#: sharing two layers was 0.97-0.99 of the per-window time, not worth its numpy work).
MIN_SAVING = 0.05
#: Relative cost per stream column of a conv pooled in both phases (two pools).
PHASES_COST = 1.15
#: Numpy work of a shared plan, as a fraction of the per-window time: a base (the stream
#: assembled and checked, windows cut out) and a part per shared layer (its slabs).
GLUE = (0.085, 0.045)


#: Windows per ONNX Runtime run of the per-window graphs (a batch is run in pieces this
#: size). ONNX Runtime's CPU arena keeps the largest activations it has served, so its
#: memory follows the piece, not the batch: 8 windows held 4 MB where 64 held 52 MB, and
#: ran no slower per window (0.20-0.23 ms against 0.24 ms, 1 thread, Zen 5), their
#: activations staying in cache. Each window's logits do not depend on its neighbours.
WINDOWS_PER_RUN = 8


class SharedWindowRunner:
    """TinyCNN logits for a batch of consecutive overlapping windows, shared work once.

    Called with features ``(K, C, F, T)`` of windows ``hop_frames`` frames apart (a batch
    of :class:`data.recordings.RecordingWindows`), returns logits ``(K, classes)`` equal
    (to float rounding) to the task's forward on each window. Which frames a window
    shares with the stream is read off the batch itself: the stream is assembled from
    the windows' middles and every window is compared with it, so a frame that differs
    (the front end's edge frames) is a patch, never assumed. A batch of one window, or
    one whose windows do not overlap as promised, runs per window. Runs on ONNX Runtime
    (:mod:`util.night.tinycnn_graphs`).

    Args:
        model: a TinyCNN task (:func:`util.night.tinycnn_graphs.supports_tinycnn`).
        hop_frames: frames between window starts; ``None`` when the batches are not
            windows of one stream (every batch then runs per window).
        threads: ONNX Runtime intra-op threads of each run.
        workers: per-window runs at once. A batch's per-window graphs run in pieces of
            :data:`WINDOWS_PER_RUN` windows, each piece independent of the others, so
            ``workers`` > 1 runs that many pieces side by side, each on its own thread
            (ONNX Runtime lets go of the GIL), instead of splitting every convolution
            over intra-op threads that meet at each operator
            (:class:`util.callbacks.PredictEngine` says what it gains).
            Call :meth:`close` when done to stop the threads.
        tolerance: the largest |logit difference| from PyTorch allowed by the check
            at construction (random windows, shared and per-window paths).
        depth: share exactly the first ``depth`` layers where they fit, instead of
            those that pay (:func:`plan_layers`; for benchmarks).

    Raises:
        ValueError: the model is not a plain TinyCNN task, or ``hop_frames`` < 1.
        ParityError: the check fails (the message gives the difference).
    """

    def __init__(
        self,
        model: Task,
        hop_frames: int | None,
        threads: int = 1,
        tolerance: float = 1e-4,
        depth: int | None = None,
        workers: int = 1,
    ) -> None:
        reason = supports_tinycnn(model)
        if reason is not None:
            raise ValueError(f"shared windows need a plain TinyCNN: {reason}")
        if hop_frames is not None and int(hop_frames) < 1:
            raise ValueError(f"hop_frames must be at least 1, got {hop_frames}")
        #: Frames between windows (``None``: every batch per window).
        self.hop = None if hop_frames is None else int(hop_frames)
        self.depth = depth
        self.input_shape = tuple(int(d) for d in model.input_shape)
        self.layers, head_w, head_b = tinycnn_layers(model)
        #: Each layer's share of the per-window time (:func:`layer_weights`).
        self.weights = layer_weights(self.layers, self.input_shape)
        std = None
        if model.normalize:
            std = tuple(t.detach().float().cpu().numpy() for t in (model.band_mean, model.band_std))
        n = len(self.layers)
        graphs = {}
        for i in range(n):
            first = std if i == 0 else None
            graphs[("pool", i)] = stack_graph(self.layers[i : i + 1], [True], standardize=first)
            graphs[("edge", i)] = stack_graph(
                self.layers[i : i + 1], [True], standardize=first, pad_time=False
            )
            graphs[("phases", i)] = stack_graph(
                self.layers[i : i + 1], [False], standardize=first, phases=True
            )
        for j in range(n + 1):
            graphs[("tail", j)] = stack_graph(
                self.layers[j:], [True] * (n - j), (head_w, head_b), std if j == 0 else None
            )
        self._graphs = graphs
        #: Per layer, the column that stands for the conv's zero padding in an edge slab:
        #: zero, or before the first layer's standardisation the band means (zero after).
        self._pads = [np.zeros(1, np.float32)] * n
        if std is not None:
            self._pads[0] = np.ascontiguousarray(std[0].reshape(std[0].shape[:2]), np.float32)
        self._threads = int(threads)
        if int(workers) < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        #: Per-window pieces run at once (``workers``).
        self.workers = int(workers)
        self._pool = None
        if self.workers > 1:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="earsleep-model")
        self._sessions: dict = {}
        self.num_outputs = int(head_w.shape[0])
        #: Batches run shared and per window since construction (the check's excluded).
        self.counts = {"shared": 0, "per_window": 0}
        self.parity = self._check(model, tolerance)
        self.counts = {"shared": 0, "per_window": 0}

    def _run(self, key: tuple[str, int], x: np.ndarray) -> list[np.ndarray]:
        if key not in self._sessions:
            self._sessions[key] = session(self._graphs[key], self._threads)
        run = self._sessions[key].run
        if key[0] != "tail" or len(x) <= WINDOWS_PER_RUN:
            return run(None, {"x": np.ascontiguousarray(x, np.float32)})

        # Per-window graphs in pieces (see WINDOWS_PER_RUN): the same logits, a small
        # arena; side by side on the workers' threads where there are several.
        def piece(i: int) -> np.ndarray:
            chunk = np.ascontiguousarray(x[i : i + WINDOWS_PER_RUN], np.float32)
            return run(None, {"x": chunk})[0]

        starts = range(0, len(x), WINDOWS_PER_RUN)
        pieces = self._pool.map(piece, starts) if self._pool else map(piece, starts)
        return [np.concatenate(list(pieces))]

    def close(self) -> None:
        """Stop the workers' threads (a later call runs its pieces in turn)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def plan(self, width: int, left: int, right: int) -> list[LayerStep]:
        """The layer steps for windows of ``width`` frames with ``left``/``right`` own
        frames at their ends (:func:`plan_layers`)."""
        if self.hop is None:
            return []
        return plan_layers(width, self.hop, left, right, self.weights, self.depth, self.workers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        windows = x.detach().to("cpu", torch.float32).numpy()
        if len(windows) == 0:
            return torch.zeros(0, self.num_outputs)
        return torch.from_numpy(self.logits(windows))

    def logits(self, windows: np.ndarray) -> np.ndarray:
        """Logits ``(K, classes)`` of float32 windows ``(K, C, F, T)`` (numpy in and out)."""
        k, _, _, width = windows.shape
        shared = None
        # Building and checking the stream costs a little: only where sharing can pay
        # with the front end's usual two own frames at each end.
        hopeful = self.plan(width, 2, 2)
        if k > 1 and hopeful and hopeful[0].mode != "windows":
            shared = self._stream(windows)
        steps = self.plan(width, *shared[1:]) if shared is not None else []
        if not steps or steps[0].mode == "windows":
            self.counts["per_window"] += 1
            return self._run(("tail", 0), windows)[0]
        self.counts["shared"] += 1
        stream, left, right = shared
        lpatch, rpatch = windows[..., :left], windows[..., width - right :]
        hop = self.hop  # window k starts at column k·hop of this layer's stream
        for i, step in enumerate(steps):
            if step.mode == "windows":
                cut = _cut([stream], k, hop, step.width, lpatch, rpatch)
                return self._run(("tail", i), cut)[0]
            lnext, rnext = self._patches(i, step, stream, k, lpatch, rpatch)
            if step.mode == "phases":
                phases = [p[0] for p in self._run(("phases", i), stream[None])]
                cut = _cut(phases, k, hop, step.width // 2, lnext, rnext)
                return self._run(("tail", i + 1), cut)[0]
            stream = self._run(("pool", i), stream[None])[0][0]
            hop, lpatch, rpatch = hop // 2, lnext, rnext
        cut = _cut([stream], k, hop, steps[-1].width // 2, lpatch, rpatch)
        return self._run(("tail", len(self.layers)), cut)[0]

    def _stream(self, windows: np.ndarray) -> tuple[np.ndarray, int, int] | None:
        """The shared stream ``(C, F, N)`` and the own columns at each window end.

        Window ``k``'s columns ``[c, c + hop)`` (``c`` centred) are the stream's at
        ``k·hop + c``; the first window gives the stream's start, the last its end. Each
        window is then compared with the stream, exactly: ``left``/``right`` are the
        widest runs at its ends that hold any difference, and everything between them
        equals the stream. ``None`` when the differences reach the middles: not
        windows of one stream.
        """
        k, c, f, width = windows.shape
        hop = self.hop
        core = (width - hop) // 2
        total = (k - 1) * hop + width
        stream = np.empty((c, f, total), np.float32)
        middles = windows[..., core : core + hop].transpose(1, 2, 0, 3)
        stream[..., core : core + k * hop] = middles.reshape(c, f, k * hop)
        stream[..., :core] = windows[0, ..., :core]
        stream[..., core + k * hop :] = windows[-1, ..., core + hop :]
        # The middles are the stream's by construction, and so are the first window's
        # start and the last one's end: compare the rest.
        tail = width - core - hop
        heads = windows[1:, ..., :core] != _columns(stream, hop, hop, k - 1, core)
        ends = windows[:-1, ..., core + hop :] != _columns(stream, core + hop, hop, k - 1, tail)
        lefts = np.flatnonzero(heads.reshape(-1, core).any(axis=0))
        rights = np.flatnonzero(ends.reshape(-1, tail).any(axis=0))
        left = int(lefts[-1]) + 1 if len(lefts) else 0
        right = tail - int(rights[0]) if len(rights) else 0
        if left >= core or right >= tail:  # different right up to the middles
            return None
        return stream, left, right

    def _patches(
        self,
        i: int,
        step: LayerStep,
        stream: np.ndarray,
        count: int,
        lpatch: np.ndarray,
        rpatch: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Layer ``i``'s pooled output at the windows' ends, from narrow slabs.

        The slabs run a conv that pads frequency only (``("edge", i)``), so each gives
        just the conv columns it holds both neighbours of; the window's zero padding is
        an explicit column. Left: that column, then the window's columns
        ``[0, 2·out_left + 1)`` (its own, then the stream's): conv columns
        ``[0, 2·out_left)``. Right: the window's columns from ``2·right_start - 1`` to its
        end, then the padding column: conv columns from ``2·right_start`` to the end.
        """
        width, left, right = step.width, step.left, step.right
        pad = self._pads[i][..., None]
        lwidth = 2 * step.out_left + 1
        rfrom = 2 * step.right_start - 1
        hop, inner = step.hop, width - right - rfrom
        lslab = np.empty((count, *stream.shape[:2], lwidth + 1), np.float32)
        lslab[..., :1] = pad
        lslab[..., 1 : 1 + left] = lpatch
        lslab[..., 1 + left :] = _columns(stream, left, hop, count, lwidth - left)
        rslab = np.empty((count, *stream.shape[:2], width - rfrom + 1), np.float32)
        rslab[..., :inner] = _columns(stream, rfrom, hop, count, inner)
        rslab[..., inner:-1] = rpatch
        rslab[..., -1:] = pad
        return self._run(("edge", i), lslab)[0], self._run(("edge", i), rslab)[0]

    def _check(self, model: Task, tolerance: float) -> dict[str, float]:
        """Compare shared and per-window logits with PyTorch's on random windows."""
        c, f, width = self.input_shape
        rng = np.random.default_rng(0)
        k, hop = 5, self.hop or width
        signal = rng.standard_normal((c, f, (k - 1) * hop + width), dtype=np.float32)
        windows = sliding_window_view(signal, width, axis=-1)[..., ::hop, :][..., :k, :]
        windows = np.ascontiguousarray(windows.transpose(2, 0, 1, 3))
        edge = min(2, width // 4)  # own frames at the ends, as the front end's
        windows[..., :edge] += 1.0
        windows[..., width - edge :] -= 1.0
        # The task itself in eval mode (a deep copy, metrics and all, took a second), and
        # without oneDNN: the same logits (to 3e-8), and none of the 19 MB of oneDNN
        # convolution code it would page in for these few windows only.
        training, onednn = model.training, torch.backends.mkldnn.enabled
        model.eval()
        torch.backends.mkldnn.enabled = False
        try:
            with torch.inference_mode():
                device = next(model.parameters()).device
                ref = model(torch.from_numpy(windows).to(device)).double().cpu().numpy()
        finally:
            torch.backends.mkldnn.enabled = onednn
            model.train(training)
        worst = 0.0
        for got in (self.logits(windows), self._run(("tail", 0), windows)[0]):
            diff = np.abs(got.astype(np.float64) - ref)
            worst = max(worst, float("inf") if np.isnan(diff).any() else float(diff.max()))
        if not worst <= tolerance:
            raise ParityError(
                f"shared-window TinyCNN logits differ from PyTorch's by up to {worst:.3g} "
                f"(tolerance {tolerance:g}); predict with --predict_engine.runtime torch",
                max_abs_diff=worst,
                tolerance=tolerance,
            )
        return {"max_abs_diff": worst, "tolerance": tolerance}


def _columns(stream: np.ndarray, first: int, hop: int, count: int, width: int) -> np.ndarray:
    """``(count, C, F, width)`` view: columns ``[first + k·hop, … + width)`` of the stream."""
    view = sliding_window_view(stream, width, axis=-1)[..., first::hop, :][..., :count, :]
    return view.transpose(2, 0, 1, 3)


def _cut(
    streams: list[np.ndarray],
    count: int,
    hop: int,
    width: int,
    lpatch: np.ndarray,
    rpatch: np.ndarray,
) -> np.ndarray:
    """Per-window maps ``(count, C, F, width)``: stream columns, the patches over them.

    Window ``k`` starts at column ``k·hop`` of ``streams[0]``; or, given the two pooled
    phases of a stream with an odd ``hop``, even windows start at ``(k/2)·hop`` of the
    first and odd ones at ``((k-1)/2)·hop + hop // 2 + 1`` of the second (whose first
    column pools the padding with column 0, :func:`~util.night.tinycnn_graphs.stack_graph`).
    """
    if len(streams) == 1:
        out = np.ascontiguousarray(_columns(streams[0], 0, hop, count, width))
    else:
        out = np.empty((count, *streams[0].shape[:2], width), np.float32)
        out[0::2] = _columns(streams[0], 0, hop, (count + 1) // 2, width)
        out[1::2] = _columns(streams[1], hop // 2 + 1, hop, count // 2, width)
    out[..., : lpatch.shape[-1]] = lpatch
    out[..., width - rpatch.shape[-1] :] = rpatch
    return out
