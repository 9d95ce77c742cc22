"""One build of one split: source items in, checksummed rows and counts out, resumable.

Why about 480 lines: the builder's state (counts, band sums, the hash of the items
stored so far), the partial file it checkpoints that state into, and the loop that
fills it are one resumable unit: resuming is correct only because each checkpoint
writes the rows, then the state, then flushes, in that order, and the loop re-hashes
the stored items' ids against the state before it goes on. Kept whole so that order
is read in one place.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from data.audio import check_waveform, resample
from data.cache.errors import CacheSpaceError
from data.cache.format import (
    DIGEST_BYTES,
    FORMAT_VERSION,
    REPAIR_NAMES,
    ROW_DATASETS,
    STATE_ATTRS,
    attr_str,
    create_datasets,
)
from data.cache.prefetch import Prefetch, with_digests
from data.cache.space import SPACE_MARGIN, free_bytes, is_disk_full, mb, reserve, row_bytes
from data.cache.store import finite_rows
from data.features import LogMelFrontEnd
from data.sources.base import Clip, SkippedClip, Source
from data.system import usable_cpus

log = logging.getLogger(__name__)


class ResumeMismatch(RuntimeError):
    """The source no longer yields the items a partial file recorded."""


class Builder:
    """One build of one split: source items in, rows and counts out."""

    def __init__(
        self,
        source: Source,
        split: str,
        front_end: LogMelFrontEnd,
        classes: tuple[str, ...],
        payload: dict[str, Any],
        key: str,
        batch_size: int,
        min_duration_s: float,
        progress: bool,
    ) -> None:
        self.source = source
        self.split = split
        self.front_end = front_end
        self.classes = classes
        self.class_index = {c: i for i, c in enumerate(classes)}
        self.known_labels = set(source.labels)
        self.payload = payload
        self.key = key
        self.batch_size = batch_size
        self.min_duration_s = float(min_duration_s)
        self.progress = progress
        self.with_stats = split == "train"
        self.shape = front_end.output_shape
        self.clip_samples = front_end.clip_samples
        self.in_channels = 2 if front_end.channels == "stereo" else 1
        self._batch: np.ndarray | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.workers = usable_cpus()
        #: Complete caches of other splits to look for this split's audio in.
        self.others: dict[str, Path] = {}
        self.row_bytes = row_bytes(front_end)

    # -- state ------------------------------------------------------------------

    def _reset_state(self) -> None:
        self.items = 0  # source items consumed and recorded
        self.rows = 0
        self.n_skipped = 0
        self.class_counts = Counter({c: 0 for c in self.classes})
        self.other = Counter()
        self.skip_counts = Counter()
        self.repairs = Counter({r: 0 for r in REPAIR_NAMES})
        self.prefix_hash = hashlib.sha256().hexdigest()
        c, fbins, _ = self.shape
        self.band_sum = np.zeros((c, fbins), np.float64)
        self.band_sumsq = np.zeros((c, fbins), np.float64)

    def _state_json(self) -> str:
        return json.dumps(
            {
                "items": self.items,
                "rows": self.rows,
                "n_skipped": self.n_skipped,
                "class_counts": self.class_counts,
                "other": self.other,
                "skip_counts": self.skip_counts,
                "repairs": self.repairs,
                "prefix_hash": self.prefix_hash,
            }
        )

    def _load_state(self, f: h5py.File) -> None:
        s = json.loads(f.attrs["_state"])
        self.items, self.rows, self.n_skipped = s["items"], s["rows"], s["n_skipped"]
        self.class_counts = Counter(s["class_counts"])
        self.other = Counter(s["other"])
        self.skip_counts = Counter(s["skip_counts"])
        self.repairs = Counter(s["repairs"])
        self.prefix_hash = s["prefix_hash"]
        if self.with_stats:
            self.band_sum = np.array(f.attrs["_band_sum"], np.float64)
            self.band_sumsq = np.array(f.attrs["_band_sumsq"], np.float64)
        # Rows written after the last checkpoint are not counted: drop them.
        for name in ROW_DATASETS:
            f[name].resize(self.rows, axis=0)
        f["skipped"].resize(self.n_skipped, axis=0)

    # -- file -------------------------------------------------------------------

    def _open(self, partial: Path, resume: bool) -> h5py.File:
        if partial.exists() and resume:
            f = None
            try:
                f = h5py.File(partial, "r+")
                found = attr_str(f.attrs.get("cache_key", ""))
                if found == self.key and "_state" in f.attrs:
                    self._load_state(f)
                    log.info(
                        "resuming %s: %d source items (%d rows) already stored",
                        partial,
                        self.items,
                        self.rows,
                    )
                    return f
                log.warning(
                    "discarding partial cache %s: built with key %s, expected %s%s",
                    partial,
                    found[:16] or "(none)",
                    self.key[:16],
                    "" if found != self.key else " (but it holds no resume state)",
                )
            except Exception as err:  # unreadable or damaged (e.g. killed mid-write)
                log.warning("discarding unreadable partial cache %s (%s)", partial, err)
            if f is not None:
                f.close()
        partial.unlink(missing_ok=True)
        self._reset_state()
        f = h5py.File(partial, "w")
        create_datasets(f, self.shape)
        p = self.payload
        f.attrs["cache_key"] = self.key
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["split"] = self.split
        f.attrs["feature_config"] = json.dumps(p["feature_config"], sort_keys=True)
        f.attrs["feature_hash"] = self.front_end.config_hash()
        f.attrs["source_name"] = self.source.name
        f.attrs["source_fingerprint"] = json.dumps(p["source_fingerprint"], sort_keys=True)
        f.attrs["classes"] = json.dumps(list(self.classes))
        f.attrs["min_duration_s"] = self.min_duration_s
        try:
            self._checkpoint(f)
        except CacheSpaceError:
            f.close()
            raise
        return f

    def _checkpoint(self, f: h5py.File) -> None:
        # Rows are already written; the counter comes after them, then the flush.
        if self.with_stats:
            f.attrs["_band_sum"] = self.band_sum
            f.attrs["_band_sumsq"] = self.band_sumsq
        f.attrs["_state"] = self._state_json()
        f.flush()
        self._reserve(f, SPACE_MARGIN)  # HDF5's flush truncates the file, freeing reserved room

    def _reserve(self, f: h5py.File, nbytes: int) -> None:
        """Make sure the next ``nbytes`` of ``f`` fit on its disk, or stop the build.

        Stopping here leaves the last checkpoint on disk and the room it reserved for
        HDF5 to close the file: the partial file resumes once there is space.
        """
        path = Path(f.filename)
        if reserve(path, nbytes):
            return
        raise CacheSpaceError(
            errno.ENOSPC,
            f"the disk holding {path.parent} is full: {mb(free_bytes(path.parent))} free, the "
            f"{self.split} cache needs {mb(nbytes)} more to go on; its {self.rows} rows so "
            f"far are kept in {path} to resume; free some space or set cache_dir to "
            "another disk, then run again",
        )

    def _finish(self, f: h5py.File, member_hash: str) -> None:
        f.attrs["source_items"] = self.items
        f.attrs["class_counts"] = json.dumps({c: self.class_counts[c] for c in self.classes})
        f.attrs["other_label_counts"] = json.dumps(dict(sorted(self.other.items())))
        f.attrs["skip_counts"] = json.dumps(dict(sorted(self.skip_counts.items())))
        f.attrs["repair_counts"] = json.dumps({r: self.repairs[r] for r in REPAIR_NAMES})
        self._record_leakage(f)
        if self.with_stats:
            frames = max(self.rows * self.shape[2], 1)
            mean = self.band_sum / frames
            var = np.maximum(self.band_sumsq / frames - mean**2, 0.0)
            if self.rows == 0:
                mean = np.full_like(mean, np.nan)
                var = np.full_like(var, np.nan)
            for name, value in (("band_mean", mean), ("band_std", np.sqrt(var))):
                if name in f:  # a finished build that was stopped before its rename
                    del f[name]
                f.create_dataset(name, data=value.astype(np.float32))
        # The completeness marker goes last: without it a file is never read as complete.
        f.attrs["member_list_hash"] = member_hash
        for name in STATE_ATTRS:
            if name in f.attrs:
                del f.attrs[name]
        f.flush()

    def _record_leakage(self, f: h5py.File) -> None:
        """Find stored clips whose samples equal another row's, here or in ``others``."""
        digests = [bytes(d) for d in f["content_hash"][()]]
        ids = f["clip_ids"].asstr()[()]
        f.attrs["duplicate_content_rows"] = len(digests) - len(set(digests))
        leakage: dict[str, dict[str, Any]] = {}
        pairs: list[tuple[str, str, str]] = []
        for other, other_path in sorted(self.others.items()):
            if not other_path.exists():
                continue
            with h5py.File(other_path, "r") as g:
                theirs = g["content_hash"][()]
                their_ids = g["clip_ids"].asstr()[()]
                their_key = attr_str(g.attrs.get("cache_key", ""))
            first = {bytes(d): j for j, d in reversed(list(enumerate(theirs)))}
            found = [
                (str(ids[i]), other, str(their_ids[first[d]]))
                for i, d in enumerate(digests)
                if d in first
            ]
            leakage[other] = {"cache_key": their_key, "path": str(other_path), "rows": len(found)}
            pairs += found
        f.attrs["leakage"] = json.dumps(leakage, sort_keys=True)
        if "leaked" in f:  # a finished build that was stopped before its rename
            del f["leaked"]
        f.create_dataset(
            "leaked",
            data=np.array(pairs, dtype=object).reshape(-1, 3),
            dtype=h5py.string_dtype("utf-8"),
        )

    # -- the build ---------------------------------------------------------------

    def run(self, partial: Path, checkpoint_every: int, resume: bool) -> None:
        f = self._open(partial, resume)
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="features") as pool:
                self._pool = pool
                self._fill(f, checkpoint_every)
        except BaseException as err:
            self._pool = None
            if not is_disk_full(err) or isinstance(err, CacheSpaceError):
                f.close()
                raise
            # HDF5 met the full disk itself: its file can no longer be closed normally
            # (a close then a segfault at exit). Truncating the file gives HDF5 room to
            # finish closing it; the partial file is lost, not the process.
            os.truncate(partial, 0)
            with contextlib.suppress(Exception):  # it may still report the full disk
                f.close()
            partial.unlink(missing_ok=True)
            raise CacheSpaceError(
                errno.ENOSPC,
                f"the disk holding {partial.parent} is full ({mb(free_bytes(partial.parent))} "
                f"free): the {self.split} cache needs about {self.row_bytes // 1024} KiB a "
                "clip; free some space or set cache_dir to another disk, then run again",
            ) from None
        else:
            self._pool = None
            f.close()

    def _features(self, batch: torch.Tensor) -> np.ndarray:
        """float16 features of ``batch``: its slices computed by the pool's threads at once."""

        def work(part: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():  # thread-local: set in the worker
                return self.front_end(part).to(torch.float16)

        parts = [p for p in batch.tensor_split(self.workers) if len(p)]
        if self._pool is None or len(parts) == 1:
            return work(batch).numpy()
        return torch.cat(list(self._pool.map(work, parts))).numpy()

    def _fill(self, f: h5py.File, checkpoint_every: int) -> None:
        done = self.items
        hasher = hashlib.sha256()
        bar = tqdm(
            total=self.source.size_hint(self.split),
            desc=f"cache {self.source.name}/{self.split}",
            unit="clip",
            disable=not self.progress,
            mininterval=0.5,
            smoothing=0.1,
        )
        pending: list[_Pending] = []
        skipped: list[tuple[str, str]] = []
        batches = 0
        seen = 0
        ids: set[bytes] = set()  # digests of every clip_id so far, to find repeated ones
        items = Prefetch(
            with_digests(self.source.iter_clips(self.split), set(self.classes)),
            2 * self.batch_size,
        )
        try:
            for item, digest in items:
                clip_id = item.clip_id.encode("utf-8", "surrogateescape")
                hasher.update(clip_id + b"\n")
                seen += 1
                id_digest = hashlib.blake2b(clip_id, digest_size=16).digest()
                repeated = id_digest in ids
                ids.add(id_digest)
                if seen <= done:  # stored by the interrupted build: only re-hash its id
                    bar.update(1)
                    if seen == done and hasher.hexdigest() != self.prefix_hash:
                        raise ResumeMismatch(
                            f"the first {done} items of the source differ from the stored ones"
                        )
                    continue
                if repeated:
                    skipped.append((item.clip_id, "duplicate_id"))
                    self.skip_counts["duplicate_id"] += 1
                else:
                    self._sort(item, digest, pending, skipped)
                if len(pending) >= self.batch_size:
                    self._write(f, pending, skipped, seen)
                    bar.update(seen - bar.n)
                    pending, skipped = [], []
                    self.prefix_hash = hasher.hexdigest()
                    batches += 1
                    if batches % checkpoint_every == 0:
                        self._checkpoint(f)
                        bar.set_postfix(skipped=self.n_skipped, refresh=False)
            if seen < done:
                raise ResumeMismatch(f"the source yields {seen} items, {done} were stored")
            self._write(f, pending, skipped, seen)
            bar.update(seen - bar.n)
            self.prefix_hash = hasher.hexdigest()
            self._checkpoint(f)
            self._finish(f, hasher.hexdigest())
        finally:
            items.close()
            bar.close()

    def _sort(
        self,
        item: Clip | SkippedClip,
        digest: bytes | None,
        pending: list[_Pending],
        skipped: list[tuple[str, str]],
    ) -> None:
        """File one source item: other label, skipped, or a (repaired) pending row."""
        label = item.label
        if label not in self.class_index and (label in self.known_labels or isinstance(item, Clip)):
            self.other[label] += 1
            return
        if isinstance(item, SkippedClip):
            skipped.append((item.clip_id, item.reason))
            self.skip_counts[item.reason] += 1
            return
        wave, sr = item.waveform, item.sample_rate
        reason = check_waveform(wave, sr, self.min_duration_s)
        if reason is not None:
            skipped.append((item.clip_id, reason))
            self.skip_counts[reason] += 1
            return
        if sr != self.front_end.sample_rate:
            wave = resample(np.asarray(wave, np.float32), sr, self.front_end.sample_rate)
            self.repairs["resampled"] += 1
        if wave.shape[0] == 1 and self.in_channels == 2:
            self.repairs["mono"] += 1
        n = wave.shape[1]
        if n < self.clip_samples:
            self.repairs["padded"] += 1
        elif n > self.clip_samples:
            self.repairs["cropped"] += 1
        assert digest is not None  # computed for every clip of a class
        pending.append((wave, self.class_index[label], item.clip_id, digest))

    def _waves_to_batch(self, pending: list[_Pending]) -> np.ndarray:
        """Stack clips as the front end adapts them: channel mode, zero-pad/crop at the end."""
        n = self.clip_samples
        if self._batch is None or len(self._batch) < len(pending):
            # Reused across batches: a fresh 32 MB buffer per batch costs its page faults.
            self._batch = np.zeros((len(pending), self.in_channels, n), np.float32)
        batch = self._batch[: len(pending)]
        mode = self.front_end.channels
        for row, (wave, *_) in zip(batch, pending, strict=True):
            m = min(n, wave.shape[1])
            if mode == "stereo":
                row[:, :m] = wave[:, :m]  # broadcasts a mono clip onto both channels
            elif mode == "mono" and wave.shape[0] == 2:
                np.add(wave[0, :m], wave[1, :m], out=row[0, :m])
                row[0, :m] *= 0.5
            else:  # mono of a mono clip, or in_ear
                row[0, :m] = wave[0, :m]
            row[:, m:] = 0.0
        return batch

    def _accumulate_stats(self, feats: np.ndarray) -> None:
        """Add the float64 band sums and sums of squares of stored (float16) rows."""
        c, fbins, _ = self.shape
        flat = torch.from_numpy(feats).flatten(1, 2)  # (B, C·F, T)
        # A few rows at a time keeps the float64 copy small; reducing the contiguous frame
        # axis first is 1.5x faster than dim=(0, 3).
        for part in flat.split(32):
            x = part.to(torch.float64)
            self.band_sum += x.sum(dim=-1).sum(dim=0).view(c, fbins).numpy()
            self.band_sumsq += x.square_().sum(dim=-1).sum(dim=0).view(c, fbins).numpy()

    def _write(
        self,
        f: h5py.File,
        pending: list[_Pending],
        skipped: list[tuple[str, str]],
        items: int,
    ) -> None:
        """Append ``pending`` rows and ``skipped`` pairs; account for ``items`` source items."""
        self._reserve(f, len(pending) * self.row_bytes + SPACE_MARGIN)
        if pending:
            feats = self._features(torch.from_numpy(self._waves_to_batch(pending)))
            finite = finite_rows(feats)
            if not finite.all():  # e.g. samples of 1e30 overflow the power spectrum
                for i in np.flatnonzero(~finite):
                    skipped.append((pending[i][2], "nonfinite_features"))
                    self.skip_counts["nonfinite_features"] += 1
                keep = np.flatnonzero(finite)
                feats, pending = feats[keep], [pending[i] for i in keep]
        if pending:
            k = len(pending)
            lo, hi = self.rows, self.rows + k
            for name in ROW_DATASETS:
                f[name].resize(hi, axis=0)
            f["features"][lo:hi] = feats
            labels = np.fromiter((p[1] for p in pending), np.int64, count=k)
            f["labels"][lo:hi] = labels
            f["clip_ids"][lo:hi] = np.array([p[2] for p in pending], dtype=object)
            digests = b"".join(p[3] for p in pending)
            f["content_hash"][lo:hi] = np.frombuffer(digests, np.uint8).reshape(k, DIGEST_BYTES)
            self.rows = hi
            for i, count in enumerate(np.bincount(labels, minlength=len(self.classes))):
                self.class_counts[self.classes[i]] += int(count)
            if self.with_stats:
                self._accumulate_stats(feats)
        if skipped:
            ds = f["skipped"]
            ds.resize(self.n_skipped + len(skipped), axis=0)
            ds[self.n_skipped :] = np.array(skipped, dtype=object)
            self.n_skipped += len(skipped)
        self.items = items


#: A clip waiting for its features: waveform, label index, clip_id, content digest.
_Pending = tuple[np.ndarray, int, str, bytes]
