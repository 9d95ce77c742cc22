"""A folder tree of labelled audio files: each file placed in a split, then read as a clip.

Shared by the sources that read folders (:class:`~data.sources.audiofolder.AudioFolder`,
an extracted :class:`~data.sources.dreamcatcher.DreamCatcher`): the split and the label
come from the folders above a file (:func:`place_files`), or the label alone when the
source derives the splits itself (:func:`label_files`), and every file is either read
or skipped with a reason, never passed over.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from data.audio import AudioDecodeError, decode
from data.sources.base import SPLITS, Clip, SkippedClip


@dataclass(frozen=True)
class TreeFile:
    """One file of a folder tree, placed in a split.

    Attributes:
        rel: its path relative to the tree's root (``/``-separated): the ``clip_id``.
        path: its path.
        split: the split whose folder holds it.
        label: the folder below the split folder (or ``""`` for a file directly in it).
        reason: ``None`` when it is to be read as a clip, else the skip reason:
            ``misspelled_split`` (``Train/``), ``misplaced`` (not at
            ``<split>/<label>/<file>``, or not below a label folder when the tree is
            read recursively) or ``not_audio`` (another file suffix).
    """

    rel: str
    path: Path
    split: str
    label: str
    reason: str | None


def place_files(
    root: Path, suffixes: tuple[str, ...], top_level: bool, recursive: bool = False
) -> tuple[dict[str, list[TreeFile]], list[str]]:
    """Place every file under ``root`` in a split, or list it as outside every split.

    A file belongs to the split named by the nearest folder above it whose name is a
    split's in any letter case (``top_level``: only the first folder below ``root``
    counts). It is read when that folder is spelled exactly, the file sits at
    ``<split>/<label>/<file>`` (``recursive``: anywhere below ``<split>/<label>/``, the
    label still the folder directly below the split's) and its name ends in one of
    ``suffixes`` (any case); otherwise it gets a skip reason, so no file under a split
    is passed over unseen.

    Returns:
        per split, its files sorted by ``rel``; and the ``rel`` of every file that is
        in no split's folder (sorted).
    """
    placed: dict[str, list[TreeFile]] = {s: [] for s in SPLITS}
    outside: list[str] = []
    for path, rel in _walk(root):
        fname = path.name
        parts = rel.split("/")
        n = len(parts)
        candidates = [0] if top_level else range(n - 2, -1, -1)
        k = next((i for i in candidates if i < n - 1 and parts[i].lower() in SPLITS), None)
        if k is None:
            outside.append(rel)
            continue
        split = parts[k].lower()
        label = parts[k + 1] if k + 1 < n - 1 else ""
        if parts[k] != split:
            reason: str | None = "misspelled_split"
        elif k > n - 3 or (k != n - 3 and not recursive):
            reason = "misplaced"
        elif not fname.lower().endswith(suffixes):
            reason = "not_audio"
        else:
            reason = None
        placed[split].append(TreeFile(rel, path, split, label, reason))
    for files in placed.values():
        files.sort(key=lambda f: f.rel)
    return placed, sorted(outside)


def label_files(root: Path, suffixes: tuple[str, ...]) -> list[TreeFile]:
    """Every file of a tree laid out as ``<root>/<label>/**/<file>``, sorted, split unset.

    For a source that derives the splits itself: the label is the folder directly
    below ``root``; a file directly in ``root`` is ``misplaced``, one whose name ends in
    none of ``suffixes`` is ``not_audio``. ``split`` is ``""`` until the source sets it.
    """
    files: list[TreeFile] = []
    for path, rel in _walk(root):
        fname = path.name
        parts = rel.split("/")
        if len(parts) < 2:
            reason: str | None = "misplaced"
        elif not fname.lower().endswith(suffixes):
            reason = "not_audio"
        else:
            reason = None
        files.append(TreeFile(rel, path, "", parts[0] if len(parts) > 1 else "", reason))
    files.sort(key=lambda f: f.rel)
    return files


def read_tree_file(file: TreeFile, labels: Collection[str] | None = None) -> Clip | SkippedClip:
    """Decode one placed file of a tree into a clip, or a skip with its reason.

    The skip reasons, in order: the file's own placement reason (:class:`TreeFile`),
    ``unknown_label`` when ``labels`` is given and lacks its label, the decoder's
    (``truncated``, ``corrupt``), and ``corrupt`` when the file cannot be read.
    """
    rel, split, label = file.rel, file.split, file.label
    if file.reason is not None:
        return SkippedClip(rel, split, label, file.reason)
    if labels is not None and label not in labels:
        return SkippedClip(rel, split, label, "unknown_label")
    try:
        waveform, sr = decode(file.path.read_bytes())
    except AudioDecodeError as err:
        return SkippedClip(rel, split, label, err.reason)
    except OSError:
        return SkippedClip(rel, split, label, "corrupt")
    return Clip(waveform, sr, label, rel, split)


def _walk(root: Path) -> Iterator[tuple[Path, str]]:
    """Every file below ``root`` as ``(path, rel)`` (``rel``: posix, from ``root``), sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        for fname in sorted(filenames):
            path = here / fname
            yield path, path.relative_to(root).as_posix()
