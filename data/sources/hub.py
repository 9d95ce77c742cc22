"""Any audio dataset in parquet form, on the hub or in a local folder, through ``datasets``.

``datasets`` decodes audio with torchcodec and a system FFmpeg since version 4;
this source never asks it to: the audio column is cast to ``Audio(decode=False)``
and its bytes are decoded with soundfile (:func:`data.audio.decode`), in any format
soundfile reads (WAV, FLAC, OGG Vorbis/Opus, MP3, AIFF...).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data.audio import AudioDecodeError, decode
from data.hashing import head_tail_digest, lines_sha256
from data.sources.base import SPLITS, Clip, Segment, SkippedClip, Source, Windowing
from data.sources.dreamcatcher import _TOKEN_REFUSED

_BATCH = 256


class HubAudioDataset(Source):
    """A dataset with an audio column and a label column, read with ``datasets.load_dataset``.

    ``path`` is a hub repository id (``owner/name``) or a local folder of parquet
    files. In a folder, the files of dataset split ``s`` are every ``*.parquet``
    below it whose name is ``s``, starts with ``s-`` or ``s_``, or that sits in a
    folder named ``s`` (``train.parquet``, ``data/train-00000-of-00002.parquet``,
    ``train/0.parquet``...). Labels are the names of a ``ClassLabel`` column, or the
    values of a string column (any other value is used as its ``str``); a missing
    label (``None`` or ``-1``) is skipped with reason ``unknown_label``, audio
    soundfile cannot decode (in any format) with reason ``corrupt``. ``clip_id`` is
    ``<dataset split>/<row index>``, followed by ``/<file name>`` when the audio
    records one. With ``segment`` each row's audio is one recording cut into windows
    of the front end's clip length (see :class:`~data.sources.base.Segment`), whose
    ids add ``#t=<start seconds>`` (``train/7/night.flac#t=12.50``); a row's windows
    stay in the row's split.

    Args:
        path: hub dataset id or local folder of parquet files.
        audio_column: column holding the audio (``{"bytes", "path"}`` records).
        label_column: column holding the label.
        splits: our split name -> the dataset's split name (default: the same
            names, ``train``, ``validation``, ``test``).
        revision: hub commit, branch or tag (hub datasets only).
        segment: cut each row's audio into clip-length windows, e.g. ``{hop_s: 0.5,
            min_s: 0.25}``; ``None`` (default) yields each row as one clip.
        token: not accepted: a token given here would be saved with the run's
            config (config.yaml); the hub token comes from ``HF_TOKEN`` or the saved
            login (``hf auth login``). Any value is refused with a message saying so.

    Raises:
        ValueError: a ``token`` is given.
    """

    name = "hub"

    def __init__(
        self,
        path: str,
        audio_column: str = "audio",
        label_column: str = "label",
        splits: dict[str, str] | None = None,
        revision: str | None = None,
        token: str | None = None,
        segment: Segment | None = None,
    ) -> None:
        self.path = path
        self.audio_column = audio_column
        self.label_column = label_column
        self.splits = dict(splits) if splits is not None else {s: s for s in SPLITS}
        if token is not None:
            raise ValueError(_TOKEN_REFUSED.format(source="HubAudioDataset"))
        self.revision = revision
        self.windowing = Windowing(segment, "HubAudioDataset")
        self.segment = self.windowing.segment
        self._local = Path(path).is_dir()
        self._datasets: dict[str, Any] = {}
        self._labels: tuple[str, ...] | None = None

    # -- Source API -----------------------------------------------------------------

    @property  # type: ignore[override]
    def labels(self) -> tuple[str, ...]:
        """ClassLabel names, or the sorted distinct string labels of every mapped split."""
        if self._labels is None:
            names: set[str] = set()
            for split in self.splits:
                ds = self._dataset(split)
                names_of = _class_names(ds.features[self.label_column])
                if names_of is not None:
                    self._labels = tuple(names_of)
                    return self._labels
                names.update(str(v) for v in ds.unique(self.label_column) if v is not None)
            self._labels = tuple(sorted(names))
        return self._labels

    def use_clip_seconds(self, seconds: float) -> None:
        """Make windows ``seconds`` long (the front end's clip length; see ``segment``)."""
        self.windowing.use_clip_seconds(seconds)

    def iter_clips(self, split: str) -> Iterator[Clip | SkippedClip]:
        """Yield every row (or window of a row) of ``split`` in the dataset's row order."""
        if self.segment is not None:
            _ = self.windowing.window_s  # fails before any reading when the length is unknown
        ds = self._dataset(split)
        ds_split = self.splits[split]
        names = _class_names(ds.features[self.label_column])
        columns = ds.select_columns([self.audio_column, self.label_column])
        for start in range(0, len(columns), _BATCH):
            batch = columns[start : start + _BATCH]
            rows = zip(batch[self.audio_column], batch[self.label_column], strict=True)
            for offset, (audio, value) in enumerate(rows):
                data, file_name = _audio_payload(audio)
                clip_id = f"{ds_split}/{start + offset}"
                if file_name:
                    clip_id += f"/{os.path.basename(file_name)}"
                label = _label_name(value, names)
                if label is None:
                    yield SkippedClip(clip_id, split, "", "unknown_label")
                    continue
                try:
                    if data is None:
                        raise AudioDecodeError("no audio bytes in the row")
                    waveform, sr = decode(data)
                except AudioDecodeError as err:
                    yield SkippedClip(clip_id, split, label, err.reason)
                    continue
                yield from self.windowing.cut(Clip(waveform, sr, label, clip_id, split))

    def fingerprint(self, split: str) -> dict[str, str]:
        """Local: size and head/tail hash of each parquet file. Hub: ``datasets``' fingerprint."""
        ds_split = self._split_name(split)
        common = {
            "source": self.name,
            "split": split,
            "dataset_split": ds_split,
            "audio_column": self.audio_column,
            "label_column": self.label_column,
            **self.windowing.fingerprint(),
        }
        if self._local:
            files = self._local_files(ds_split)
            listing = []
            for f in files:
                digest = head_tail_digest(f)
                rel = f.relative_to(self.path).as_posix()
                listing.append(f"{rel}\0{digest['size']}\0{digest['head_tail_sha256']}")
            return {**common, "files": str(len(files)), "files_sha256": lines_sha256(listing)}
        # Built from the resolved data files (hub commit included): stable across loads.
        return {
            **common,
            "path": self.path,
            "revision": self.revision or "",
            "data_fingerprint": self._dataset(split)._fingerprint,
        }

    def size_hint(self, split: str) -> int | None:
        """Number of rows of ``split``; unknown (``None``) with ``segment`` until read."""
        return len(self._dataset(split)) if self.segment is None else None

    # -- loading --------------------------------------------------------------------

    def _split_name(self, split: str) -> str:
        if split not in self.splits:
            raise KeyError(f"split {split!r} is not mapped; splits={self.splits}")
        return self.splits[split]

    def _local_files(self, ds_split: str) -> list[Path]:
        root = Path(self.path)
        files = sorted(
            f
            for f in root.rglob("*.parquet")
            if f.stem == ds_split
            or f.stem.startswith((f"{ds_split}-", f"{ds_split}_"))
            or f.parent.name == ds_split
        )
        if not files:
            raise FileNotFoundError(
                f"no parquet files for split {ds_split!r} under {root} (expected "
                f"{ds_split}.parquet, {ds_split}-*.parquet or {ds_split}/*.parquet)"
            )
        return files

    def _dataset(self, split: str) -> Any:
        ds_split = self._split_name(split)
        if ds_split not in self._datasets:
            import datasets  # heavy; only this source needs it

            if self._local:
                files = [str(f) for f in self._local_files(ds_split)]
                ds = datasets.load_dataset("parquet", data_files={ds_split: files}, split=ds_split)
            else:
                # no token: datasets reads HF_TOKEN or the saved login
                ds = datasets.load_dataset(self.path, split=ds_split, revision=self.revision)
            for column in (self.audio_column, self.label_column):
                if column not in ds.column_names:
                    raise KeyError(f"column {column!r} not in {self.path} ({ds.column_names})")
            # datasets >= 4 decodes Audio with torchcodec: keep the bytes, decode them here.
            if isinstance(ds.features[self.audio_column], datasets.Audio):
                ds = ds.cast_column(self.audio_column, datasets.Audio(decode=False))
            self._datasets[ds_split] = ds
        return self._datasets[ds_split]


def _class_names(feature: Any) -> list[str] | None:
    names = getattr(feature, "names", None)
    return list(names) if isinstance(names, list) else None


def _label_name(value: Any, names: list[str] | None) -> str | None:
    if value is None:
        return None
    if names is not None:
        return names[value] if isinstance(value, int) and 0 <= value < len(names) else None
    return str(value)


def _audio_payload(audio: Any) -> tuple[bytes | str | None, str | None]:
    """Bytes (or a readable local path) of one audio cell, and its file name if any."""
    if isinstance(audio, bytes | bytearray):
        return bytes(audio), None
    if isinstance(audio, dict):
        path = audio.get("path")
        data = audio.get("bytes")
        if data is None and path and os.path.isfile(path):
            return path, path
        return data, path
    return None, None
