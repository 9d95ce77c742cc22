"""Window probabilities of live audio, as an earable would compute them: chunk in, windows out.

:class:`StreamingPredictor` is fed audio in chunks of any length (32 ms, one sample, a
minute) and returns each window's class probabilities as soon as the window's last
sample has arrived: the same windows (one every ``hop_s`` from the stream's first
sample, whole windows only), the same features (the model's own front end, built from
its checkpoint facts) and the same model as ``main.py predict`` on the recorded night,
so it emits the offline probabilities (to float rounding; ``tests/test_streaming.py``).
Its state is the last window's worth of samples (and the resampler's context when the
input rate is not the model's), so memory does not grow with the night.
``benchmarks/streaming.py`` reports the latency from a window's end to its probability
and the memory.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from torch import nn

from data.streaming import BlockResampler, unusable_samples
from models.task import Task
from util.deploy.audio_in import front_end_from_config
from util.night.shared_windows import SharedWindowRunner
from util.night.tinycnn_graphs import supports_tinycnn

__all__ = ["StreamingPredictor", "WindowResult"]


@dataclasses.dataclass(frozen=True)
class WindowResult:
    """One window's output.

    Attributes:
        index: the window's number (0 for the stream's first window).
        start_s: the window's start in stream seconds (``index · hop_s``).
        end_s: the window's end (``start_s`` plus the clip length).
        probabilities: float32 ``(classes,)``, in the model's class order.
        compute_s: wall seconds of the :meth:`StreamingPredictor.push` call that emitted it.
    """

    index: int
    start_s: float
    end_s: float
    probabilities: np.ndarray
    compute_s: float


class StreamingPredictor:
    """A stateful window predictor: :meth:`push` chunks of audio, get finished windows.

    Args:
        model: a trained task (its ``feature_config`` rebuilds the front end, as
            ``predict`` does from a checkpoint).
        hop_s: seconds between window starts (rounded to whole samples, as the offline
            path rounds ``--data.predict_hop_s``).
        sample_rate: the rate of the chunks; other than the front end's, the stream is
            resampled on the fly exactly as a recording at that rate would be.
        channels: channels per chunk (1 or 2; one is duplicated or mixed by the front
            end, as for a recording).
        runtime: ``onnxruntime`` (a TinyCNN's layers as ONNX graphs; other backbones fall
            back to torch) or ``torch``.
        threads: intra-op threads of whichever runtime runs.
        front_end: the front end, when not rebuilt from ``model.feature_config``.

    Raises:
        ValueError: bad ``hop_s``, ``channels`` or ``runtime``, or a model without a
            front-end configuration.
    """

    def __init__(
        self,
        model: Task,
        hop_s: float = 0.5,
        sample_rate: int | None = None,
        channels: int = 2,
        runtime: str = "onnxruntime",
        threads: int = 1,
        front_end: nn.Module | None = None,
    ) -> None:
        if runtime not in ("onnxruntime", "torch"):
            raise ValueError(f"runtime must be 'onnxruntime' or 'torch', got {runtime!r}")
        if channels not in (1, 2):
            raise ValueError(f"channels must be 1 or 2, got {channels}")
        if front_end is None:
            if not getattr(model, "feature_config", None):
                raise ValueError("the model has no feature_config: pass front_end")
            front_end = front_end_from_config(model.feature_config)
        self.front_end = front_end.eval()
        self.model = model.eval()
        self.rate = int(front_end.sample_rate)
        self.clip = int(front_end.clip_samples)
        self.hop = max(1, int(round(hop_s * self.rate)))
        if hop_s <= 0:
            raise ValueError(f"need hop_s > 0, got {hop_s}")
        self.channels = channels
        self.sample_rate = int(sample_rate or self.rate)
        self._resampler = (
            BlockResampler(self.sample_rate, self.rate) if self.sample_rate != self.rate else None
        )
        self._threads = int(threads)
        self._run = model
        if runtime == "onnxruntime" and supports_tinycnn(model) is None:
            self._run = SharedWindowRunner(model, None, threads=threads)
        self._buf = np.zeros((channels, 0), np.float32)
        self._buf_start = 0  # stream sample index of _buf[:, 0]
        self._next = 0  # index of the next window to emit
        #: Samples received (at the model's rate, after resampling).
        self.samples = 0

    @property
    def hop_s(self) -> float:
        """Seconds between window starts, after rounding to whole samples."""
        return self.hop / self.rate

    @property
    def state_bytes(self) -> int:
        """Bytes of audio the predictor holds between pushes (its state)."""
        held = self._buf.nbytes
        if self._resampler is not None and self._resampler._buf is not None:
            held += self._resampler._buf.nbytes
        return held

    def push(self, chunk: np.ndarray) -> list[WindowResult]:
        """Feed ``chunk`` ``(channels, n)`` (or ``(n,)`` for one channel) float samples.

        Non-finite samples, and those beyond :data:`data.streaming.MAX_ABS_SAMPLE`,
        become zero, as in the offline path. Returns the windows
        completed by this chunk, in order (often none).
        """
        t0 = time.perf_counter()
        block = np.asarray(chunk, np.float32)
        if block.ndim == 1:
            block = block[None]
        if block.ndim != 2 or block.shape[0] != self.channels:
            raise ValueError(
                f"expected a chunk of shape ({self.channels}, n), got {tuple(np.shape(chunk))}"
            )
        bad = unusable_samples(block)
        if bad.any():
            block = np.where(bad, np.float32(0.0), block)
        if self._resampler is not None:
            block = self._resampler.push(np.ascontiguousarray(block))
        return self._take(block, t0)

    def flush(self) -> list[WindowResult]:
        """End of the stream: the windows the resampler's last samples complete."""
        t0 = time.perf_counter()
        if self._resampler is None:
            return []
        tail = self._resampler.flush()
        return self._take(tail if tail.size else np.zeros((self.channels, 0), np.float32), t0)

    def _take(self, block: np.ndarray, t0: float) -> list[WindowResult]:
        self.samples += block.shape[1]
        self._buf = np.concatenate([self._buf, block], axis=1) if block.shape[1] else self._buf
        end = self._buf_start + self._buf.shape[1]
        count = (
            0
            if end < self._next * self.hop + self.clip
            else 1 + (end - self._next * self.hop - self.clip) // self.hop
        )
        if count == 0:
            return []
        first = self._next
        offset = first * self.hop - self._buf_start
        span = (count - 1) * self.hop + self.clip
        segment = torch.from_numpy(np.ascontiguousarray(self._buf[:, offset : offset + span]))
        with torch.inference_mode():
            windows = getattr(self.front_end, "windows", None)
            if callable(windows):
                x = windows(segment, self.hop, count)
            else:
                x = self.front_end(segment.unfold(1, self.clip, self.hop).transpose(0, 1))
            probs = self._run(x).softmax(dim=1).float().numpy()
        self._next += count
        keep = self._next * self.hop - self._buf_start  # the next window's first sample
        self._buf = self._buf[:, min(keep, self._buf.shape[1]) :].copy()
        self._buf_start += min(keep, end - self._buf_start)
        spent = time.perf_counter() - t0
        return [
            WindowResult(
                index=first + i,
                start_s=(first + i) * self.hop_s,
                end_s=(first + i) * self.hop_s + self.clip / self.rate,
                probabilities=probs[i],
                compute_s=spent,
            )
            for i in range(count)
        ]
