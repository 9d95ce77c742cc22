"""Model windows over long recordings, and the predict loader that streams them.

:class:`RecordingWindows` cuts the blocks :func:`data.streaming.read_blocks` reads into
windows of the front end's clip length every ``hop_s`` seconds and turns each batch of
windows into features with the very front end the model was trained with;
:func:`recordings_loader` is the DataLoader ``predict`` uses over ``predict_audio``.
A recording that cannot be used (unreadable, zero-length, truncated, cut by a read
error, shorter than one window) is one batch with ``error``/``status`` set
(:data:`STATUSES`), so the other recordings go on. With ``prefetch`` the reading runs in
a background thread and the features on ``feature_threads`` more, a batch or two ahead of
the model (:func:`ahead`), which is how a night keeps every core busy without features
and model waiting on each other.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.malloc import keep_heap_flat, share_one_arena
from data.streaming import (
    DEFAULT_BLOCK_S,
    ExtraChannels,
    RecordingError,
    StreamState,
    find_recordings,
    probe,
    read_blocks,
)

#: ``status`` values of a recording, in the order they are decided.
STATUSES: dict[str, str] = {
    "ok": "every window processed",
    "error": "could not be opened or decoded at all (unreadable, zero-length)",
    "partial": "a read error part-way: the windows before it were processed",
    "truncated": "the file holds less data than its header promises; processed what is there",
    "too_short": "shorter than one window: no windows",
}


#: Batches the background thread may hold ready (``prefetch``): one being handed over and
#: one more, about 3 MB each at the demo's 64 windows.
PREFETCH_DEPTH = 2

T = TypeVar("T")


def ahead(
    jobs: Iterator[Any],
    make: Callable[[Any], T] | None = None,
    threads: int = 1,
    depth: int = PREFETCH_DEPTH,
) -> Iterator[T]:
    """``make(job)`` for each of ``jobs`` (the jobs themselves without ``make``), in order,
    computed in the background up to ``depth`` items ahead of the consumer.

    One thread walks ``jobs`` (for a recording: reading and cutting, which keep state);
    ``make`` runs on ``threads`` threads, each job on one of them, so that several items
    are made at once and handed over in the jobs' order. Every thread runs PyTorch with
    one intra-op thread (per thread under PyTorch's OpenMP backend, so the caller's
    setting stands). An exception in either is raised here, at the item where it
    happened; closing this generator early (``break``) stops the threads and closes
    ``jobs`` before returning, so nothing keeps running.
    """
    threads = max(1, int(threads))
    # Items in flight: depth handed over or ready, plus one per further thread at work.
    slots: queue.Queue = queue.Queue(maxsize=max(1, depth) + threads - 1)
    stop = threading.Event()
    pool = None
    if make is not None:  # one PyTorch intra-op thread each
        pool = ThreadPoolExecutor(threads, "earsleep-features", torch.set_num_threads, (1,))

    def hand_over(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        torch.set_num_threads(1)
        try:
            for job in jobs:
                entry = ("item", job) if pool is None else ("future", pool.submit(make, job))
                if not hand_over(entry):
                    return
            hand_over(("done", None))
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            hand_over(("error", err))
        finally:
            close = getattr(jobs, "close", None)
            if callable(close):
                close()

    walker = threading.Thread(target=produce, name="earsleep-prefetch", daemon=True)
    walker.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value.result() if kind == "future" else value
    finally:
        stop.set()
        walker.join()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def check_thread_count(name: str, value: Any, auto: bool = False) -> None:
    """Refuse a thread count that is not a number >= 1 (``True`` included; ``auto`` allows "auto")."""
    if auto and value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int):
        allowed = "'auto' or a number" if auto else "a number"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def window_count(samples: int, clip_samples: int, hop_samples: int) -> int:
    """Number of whole windows of ``clip_samples`` every ``hop_samples`` in ``samples``."""
    return 0 if samples < clip_samples else 1 + (samples - clip_samples) // hop_samples


class RecordingWindows(IterableDataset):
    """Batches of features of fixed-length windows over long recordings, in time order.

    Window ``k`` of a recording covers samples ``[k·hop, k·hop + clip)`` at the front
    end's rate (only whole windows: the last ``< hop`` seconds may be left out).
    Each item is one batch (use ``DataLoader(dataset, batch_size=None)``), a dict:

    * ``x``: float32 ``(B, C, F, T)``, the front end's raw output (``B`` may be 0 for
      a recording that gives no windows or fails);
    * ``recording``: the path (str); ``index``: int64 ``(B,)`` window indices;
      ``start_s``: float64 ``(B,)`` window starts in seconds;
    * ``last``: ``True`` on the recording's final item; then also ``n_windows``;
    * ``info``: recording metadata (rates, channels, window and hop, feature config
      hash, ``status``, ``error``, ``repairs``, ``duration_s``; final on the last item).

    Recordings come one after another, each from one process: with DataLoader
    workers (and DDP ranks) recordings are split between them, never a recording.

    Args:
        recordings: a file, a folder (recursive ``*.wav``/``*.flac``), a glob, or a
            list of these.
        front_end: the module that turns waveforms ``(B, C_in, S)`` into features
            (the model's own; needs ``sample_rate``, ``clip_samples``, ``out_channels``).
        hop_s: seconds between window starts (rounded to whole samples).
        batch_size: windows per item.
        extra_channels: ``error`` or ``first_two`` for files with more than two channels.
        block_s: seconds read from disk at a time.
        channels_last: hand ``x`` over in channels-last memory order (same values;
            CPU convolutions in PyTorch run about twice as fast on it; ONNX Runtime
            takes the default order, and :class:`util.callbacks.PredictEngine` turns
            this off when it runs the model there).
        prefetch: read the recordings in a background thread and compute the features
            on ``feature_threads`` more, up to :data:`PREFETCH_DEPTH` batches ahead of the
            model (:func:`ahead`; the same items in the same order). Applies in the main
            process only: DataLoader workers already run ahead of it.
        feature_threads: threads that compute batches' features at once with
            ``prefetch`` (each batch on one thread, one PyTorch intra-op thread each).
            :class:`util.callbacks.PredictEngine` sets it for a predict (its
            ``feature_threads``).
    """

    def __init__(
        self,
        recordings: str | Path | Sequence[str | Path],
        front_end: nn.Module,
        hop_s: float = 0.5,
        batch_size: int = 64,
        extra_channels: ExtraChannels = "error",
        block_s: float = DEFAULT_BLOCK_S,
        channels_last: bool = True,
        prefetch: bool = False,
        feature_threads: int = 1,
    ) -> None:
        super().__init__()
        if hop_s <= 0 or batch_size < 1:
            raise ValueError(f"need hop_s > 0 and batch_size >= 1, got {hop_s}, {batch_size}")
        if extra_channels not in ("error", "first_two"):
            raise ValueError(
                f"extra_channels must be 'error' or 'first_two', got {extra_channels!r}"
            )
        check_thread_count("feature_threads", feature_threads)
        self.paths = find_recordings(recordings)
        self.front_end = front_end.eval()
        self.sample_rate = int(front_end.sample_rate)
        self.clip_samples = int(front_end.clip_samples)
        self.hop_samples = max(1, int(round(hop_s * self.sample_rate)))
        self.batch_size = int(batch_size)
        self.extra_channels = extra_channels
        self.block_s = float(block_s)
        self.channels_last = channels_last
        self.prefetch = bool(prefetch)
        self.feature_threads = feature_threads
        self.in_channels = 1 if front_end.out_channels == 1 else 2
        config = getattr(front_end, "config", None)
        self.feature_config: dict[str, Any] = config() if callable(config) else {}
        hash_fn = getattr(front_end, "config_hash", None)
        self.feature_hash: str | None = hash_fn() if callable(hash_fn) else None
        self._len: int | None = None

    @property
    def hop_s(self) -> float:
        """Seconds between window starts, after rounding to whole samples."""
        return self.hop_samples / self.sample_rate

    @property
    def window_s(self) -> float:
        """Seconds per window (the front end's clip length)."""
        return self.clip_samples / self.sample_rate

    def my_paths(self) -> list[Path]:
        """The recordings this process handles (split by DDP rank, then by worker)."""
        paths = self.paths
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            paths = paths[rank::world]
        worker = get_worker_info()
        if worker is not None:
            paths = paths[worker.id :: worker.num_workers]
        return paths

    def __len__(self) -> int:
        """Items this process's loader yields, from the headers (for progress bars).

        Exact for intact files; for a file whose data ends before its header says, an
        upper bound (the loader then simply ends early).
        """
        if self._len is None:
            total = 0
            for path in self.my_paths():
                try:
                    info = probe(path)
                    samples = math.ceil(info.frames * self.sample_rate / info.sample_rate)
                    n = window_count(samples, self.clip_samples, self.hop_samples)
                    if info.channels > 2 and self.extra_channels == "error":
                        n = 0
                except RecordingError:
                    n = 0
                total += max(1, math.ceil(n / self.batch_size))
            self._len = total
        return self._len

    def __iter__(self) -> Iterator[dict[str, Any]]:
        keep_heap_flat()  # in the process that computes the features (main or worker)
        share_one_arena()  # its feature threads: 40 MB less peak RSS than an arena each
        batches = (b for path in self.my_paths() for b in self._recording_batches(path))
        if self.prefetch and get_worker_info() is None:
            yield from ahead(batches, self._item, threads=self.feature_threads)
        else:
            yield from map(self._item, batches)

    def iter_recording(self, path: str | Path) -> Iterator[dict[str, Any]]:
        """Items of one recording: its batches of windows, the last one flagged."""
        return map(self._item, self._recording_batches(path))

    def _recording_batches(self, path: str | Path) -> Iterator[_Batch]:
        """One recording's batches of samples, before features: read and cut in order."""
        path = Path(path)
        meta: dict[str, Any] = {
            "sample_rate": self.sample_rate,
            "window_s": self.window_s,
            "hop_s": self.hop_s,
            "feature_config_hash": self.feature_hash,
            "feature_config": self.feature_config,
            "status": "ok",
            "error": None,
        }
        state = StreamState()
        n_windows = 0
        final: tuple[int, torch.Tensor] | None = None
        try:
            info = probe(path)
            meta.update(
                source_sample_rate=info.sample_rate,
                source_channels=info.channels,
                source_format=info.format,
                source_duration_s=info.duration_s,
            )
            if info.declared_frames is not None:
                meta["status"] = "truncated"
                meta["error"] = (
                    f"{path}: truncated: the header promises "
                    f"{info.declared_frames / info.sample_rate:.1f} s, the file holds "
                    f"{info.duration_s:.1f} s; processed what is there"
                )
            blocks = read_blocks(
                info, self.sample_rate, self.in_channels, self.extra_channels, self.block_s, state
            )
            for first, segment, count, last in self._batches(blocks):
                if last:  # the stream has ended: state is final
                    final = (first, segment, count)
                else:
                    yield _Batch(path, dict(meta), first, segment, count, last=False)
                n_windows += count
        except RecordingError as err:
            state.error = str(err)
            meta["status"] = "error"
        if state.error:
            meta["error"] = state.error
            if meta["status"] != "error":
                meta["status"] = "partial"
        elif n_windows == 0 and meta["status"] == "ok":
            meta["status"] = "too_short"
            meta["error"] = (
                f"{path}: too short: {state.samples / self.sample_rate:.2f} s is less than "
                f"one {self.window_s:g} s window"
            )
        meta.update(
            duration_s=state.samples / self.sample_rate,
            nonfinite_samples=state.nonfinite_samples,
            repairs=list(state.repairs),
        )
        if final is None:
            final = (n_windows, torch.zeros(self.in_channels, 0), 0)
        yield _Batch(path, dict(meta), *final, last=True, n_windows=n_windows)

    def _batches(
        self, blocks: Iterator[np.ndarray]
    ) -> Iterator[tuple[int, torch.Tensor, int, bool]]:
        """``(first window index, segment, windows, last)`` per batch, in order.

        ``segment`` ``(C, samples)`` holds the batch's windows back to back, copied once
        out of the blocks it spans (:func:`_span`); the blocks are held as they came,
        never joined, and let go once no window needs them. One batch is held back so
        the final one can be flagged once the stream ends.
        """
        clip, hop, batch = self.clip_samples, self.hop_samples, self.batch_size
        held: list[np.ndarray] = []  # blocks (or the rest of one) still needed, in order
        start = 0  # global sample index of held[0][:, 0]
        size = 0  # samples held
        k = 0  # next window index
        pending: tuple[int, torch.Tensor] | None = None

        def windows_held() -> int:
            return window_count(start + size - k * hop, clip, hop) if size else 0

        for block in blocks:
            held.append(block)
            size += block.shape[1]
            while windows_held() >= batch:
                if pending is not None:
                    yield (*pending, False)
                pending = (k, _span(held, k * hop - start, (batch - 1) * hop + clip), batch)
                k += batch
                drop = min(k * hop - start, size)  # hop may exceed clip
                held, start, size = _let_go(held, drop), start + drop, size - drop
        rest = windows_held()
        if rest:
            if pending is not None:
                yield (*pending, False)
            pending = (k, _span(held, k * hop - start, (rest - 1) * hop + clip), rest)
        if pending is not None:
            yield (*pending, True)

    def _features(self, segment: torch.Tensor, count: int) -> torch.Tensor:
        """Features of the ``count`` windows in ``segment``.

        The front end's ``windows`` method when it has one (:class:`data.features.LogMelFrontEnd`
        computes frames shared by overlapping windows once), else its ``forward`` on the
        stacked windows: the same values either way.
        """
        windows = getattr(self.front_end, "windows", None)
        if callable(windows):
            return windows(segment, self.hop_samples, count)
        waves = segment.unfold(1, self.clip_samples, self.hop_samples).transpose(0, 1)
        return self.front_end(waves[:count])

    def _item(self, batch: _Batch) -> dict[str, Any]:
        """The item of one batch: its windows' features (the costly part) and labels."""
        path, meta, first, segment, count, last = batch[:6]
        n = count
        with torch.inference_mode():
            if n:
                x = self._features(segment, count)
                if self.channels_last and x.ndim == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
            else:
                x = torch.zeros(0, *self._feature_shape())
        index = torch.arange(first, first + n, dtype=torch.int64)
        return {
            "x": x,
            "recording": str(path),
            "index": index,
            "start_s": index.double() * self.hop_s,
            "last": last,
            "info": meta,
            **({} if batch.n_windows is None else {"n_windows": batch.n_windows}),
        }

    def _feature_shape(self) -> tuple[int, ...]:
        shape = getattr(self.front_end, "output_shape", None)
        if shape is None:
            with torch.inference_mode():
                shape = tuple(
                    self.front_end(torch.zeros(1, self.in_channels, self.clip_samples)).shape[1:]
                )
        return tuple(shape)


class _Batch(NamedTuple):
    """One batch of a recording before its features: what :meth:`RecordingWindows._item`
    turns into an item (``meta``: a copy, as it stood when the batch was cut)."""

    path: Path
    meta: dict[str, Any]
    first: int  # index of the first window
    segment: torch.Tensor  # (C, samples): the windows back to back
    count: int  # windows
    last: bool
    n_windows: int | None = None  # the recording's windows, on its last batch


def _span(blocks: list[np.ndarray], offset: int, length: int) -> torch.Tensor:
    """Samples ``[offset, offset + length)`` of ``blocks`` laid end to end, as one new
    contiguous ``(C, length)`` tensor: a copy, so that the batch keeps no block alive."""
    parts, skip, need = [], offset, length
    for block in blocks:
        if skip >= block.shape[1]:
            skip -= block.shape[1]
            continue
        part = block[:, skip : skip + need]
        parts.append(part)
        need -= part.shape[1]
        skip = 0
        if need == 0:
            break
    if len(parts) == 1:
        return torch.from_numpy(parts[0].copy())
    return torch.from_numpy(np.concatenate(parts, axis=1))


def _let_go(blocks: list[np.ndarray], samples: int) -> list[np.ndarray]:
    """``blocks`` without their first ``samples`` samples: whole blocks dropped, the next
    one sliced (a view)."""
    kept = list(blocks)
    while samples and kept:
        n = kept[0].shape[1]
        if samples >= n:
            samples -= n
            kept.pop(0)
        else:
            kept[0] = kept[0][:, samples:]
            samples = 0
    return kept


def recordings_loader(
    recordings: str | Path | Sequence[str | Path],
    front_end: nn.Module,
    hop_s: float = 0.5,
    batch_size: int = 64,
    extra_channels: ExtraChannels = "error",
    num_workers: int = 0,
    prefetch: bool = False,
) -> DataLoader:
    """The predict DataLoader over ``recordings``: :class:`RecordingWindows`, one batch an item.

    Args:
        recordings: a file, a folder (recursive ``*.wav``/``*.flac``), a glob, or a list.
        front_end: the module that turns waveforms into features (the model's own).
        hop_s: seconds between window starts.
        batch_size: windows per batch.
        extra_channels: ``error`` or ``first_two`` for files with more than two channels.
        num_workers: DataLoader worker processes; recordings are split between them.
        prefetch: with no workers, features in a background thread ahead of the model
            (:class:`RecordingWindows`).
    """
    windows = RecordingWindows(
        recordings,
        front_end,
        hop_s=hop_s,
        batch_size=batch_size,
        extra_channels=extra_channels,
        prefetch=prefetch and num_workers == 0,
    )
    return DataLoader(windows, batch_size=None, num_workers=num_workers)
