"""DreamCatcher: the gated hub tarballs, a local copy of them, or their extracted tree.

The hub dataset ``THU-PI-Sensing/DreamCatcher`` is built by a loading script that
``datasets`` >= 4 no longer runs, so this source reads its audio directly: the
tarballs ``data/{train,validation,test}.tar.gz`` at a pinned revision, streamed
member by member (nothing is extracted to disk). Inside, each clip sits at
``<long prefix>/data/<split>/<label>/<file>.wav``; the split and the label are the
two folders directly above the file, and nothing else is read as a label.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

from data.audio import AudioDecodeError, decode
from data.sources.base import DREAMCATCHER_LABELS, SPLITS, Clip, SkippedClip, Source

try:  # ISA-L's inflate is about 2.3x zlib's; the standard library's gzip reads the same files.
    from isal import igzip as _fast_gzip
    from isal.isal_zlib import error as _fast_inflate_error
except ImportError:  # isal is a dependency; this keeps platforms without its wheels working
    _fast_gzip = None
    _fast_inflate_error = zlib.error

DEFAULT_REPO_ID = "THU-PI-Sensing/DreamCatcher"
DEFAULT_REVISION = "56226e293f6d6252d441d7403360280f3b912949"
#: Bump when the reading rules change (layout, skip reasons), so caches rebuild.
READER_VERSION = 1
#: Read size of tarfile's stream. 64 KiB measured fastest: tarfile re-joins its
#: whole buffer on each read, so much larger sizes copy more than they save.
_TAR_BUFSIZE = 1 << 16
#: Errors of a damaged gzip stream, from either inflater.
_GZIP_ERRORS = (tarfile.ReadError, zlib.error, _fast_inflate_error, gzip.BadGzipFile, EOFError)
_MIB = 1 << 20


class DatasetAccessError(RuntimeError):
    """The hub refused the download (gated dataset, no token, or no access yet)."""


class ArchiveError(RuntimeError):
    """A tarball is truncated or not a gzip-compressed tar."""


def file_digest(path: str | os.PathLike[str]) -> dict[str, str]:
    """Cheap, stable identity of a local file: its size and a sha256 of its first and last MiB."""
    size = os.path.getsize(path)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        sha.update(f.read(_MIB))
        if size > 2 * _MIB:
            f.seek(size - _MIB)
            sha.update(f.read(_MIB))
        elif size > _MIB:
            sha.update(f.read())
    return {"size": str(size), "head_tail_sha256": sha.hexdigest()}


def is_unsafe_member(name: str) -> bool:
    """True when an archive member path is absolute or climbs with ``..``."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return True
    return ".." in _parts(name)


class DreamCatcher(Source):
    """The DreamCatcher earable sleep-sound dataset (NeurIPS 2024), 9 labels.

    With ``root`` unset, each split's tarball is downloaded once into the hub cache
    with ``huggingface_hub`` (the dataset is gated: request access on its page, then
    log in with ``hf auth login`` or set ``HF_TOKEN``). With ``root`` set, the split
    is read from ``root/data/{split}.tar.gz`` or ``root/{split}.tar.gz`` when one
    exists, otherwise from the WAV files anywhere below ``root`` whose path ends in
    ``<split>/<label>/<file>.wav`` (an extracted tree).

    Clips keep their decoded sample rate and channels (the cache resamples and
    judges them). Members that are not ``.wav`` files (folders, metadata) are not
    clips and are passed over. A ``.wav`` member is skipped with a reason when its
    path is absolute or holds ``..`` (``unsafe_path``), when it is not a regular
    file (``unsafe_path``: links are never followed), when the folder two above it
    is not the tarball's split (``wrong_split``), when the folder above it is not a
    DreamCatcher label (``unknown_label``) and when soundfile cannot decode it
    (``corrupt``). ``clip_id`` is the member path (in a tree: the path relative to
    ``root``, which equals the member path when a tarball was extracted there).
    Tarballs are streamed in archive order without extracting anything; one that
    is cut short or is not a gzip tar raises :class:`ArchiveError`, never a
    quietly shorter split. Trees are read in sorted path order.

    The cache computes the member-list hash for its fingerprint from the
    ``clip_id`` of every yielded record (clips and skipped members alike);
    :meth:`member_list_hash` gives the same after a complete iteration.

    Args:
        root: local folder holding the tarballs or the extracted tree; ``None``
            downloads from the hub.
        repo_id: hub dataset repository.
        revision: pinned commit of the repository.
        token: hub token; ``None`` uses ``HF_TOKEN`` or the saved login.
        download_dir: hub cache folder for the tarballs (default: the hub's own).
    """

    name = "dreamcatcher"
    labels = DREAMCATCHER_LABELS

    def __init__(
        self,
        root: str | None = None,
        repo_id: str = DEFAULT_REPO_ID,
        revision: str = DEFAULT_REVISION,
        token: str | None = None,
        download_dir: str | None = None,
    ) -> None:
        self.root = None if root is None else Path(root)
        self.repo_id = repo_id
        self.revision = revision
        self.token = token
        self.download_dir = download_dir
        if self.root is not None and not self.root.is_dir():
            raise FileNotFoundError(f"DreamCatcher root {self.root} is not a folder")
        self._tree: dict[str, list[tuple[str, Path]]] | None = None
        self._member_hashes: dict[str, str] = {}

    # -- Source API -----------------------------------------------------------------

    def iter_clips(self, split: str) -> Iterator[Clip | SkippedClip]:
        """Yield every ``.wav`` member of ``split``: a Clip, or a SkippedClip with its reason."""
        _check_split(split)
        sha = hashlib.sha256()
        tarball = self._tarball(split)
        records = self._iter_tar(tarball, split) if tarball else self._iter_tree(split)
        for record in records:
            sha.update(record.clip_id.encode("utf-8", "surrogateescape") + b"\n")
            yield record
        self._member_hashes[split] = sha.hexdigest()

    def fingerprint(self, split: str) -> dict[str, str]:
        """Hub: repo, revision and file name. Local tarball: size and head/tail hash.

        Extracted tree: a hash of the split's file list with sizes.
        """
        _check_split(split)
        common = {"source": self.name, "reader_version": str(READER_VERSION), "split": split}
        if self.root is None:
            return {
                **common,
                "repo_id": self.repo_id,
                "revision": self.revision,
                "filename": _hub_filename(split),
            }
        tarball = self._local_tarball(split)
        if tarball is not None:
            return {**common, "kind": "tarball", "filename": tarball.name, **file_digest(tarball)}
        files = self._tree_files(split)
        sha = hashlib.sha256()
        for rel, path in files:
            sha.update(f"{rel}\0{path.stat().st_size}\n".encode("utf-8", "surrogateescape"))
        return {
            **common,
            "kind": "tree",
            "files": str(len(files)),
            "listing_sha256": sha.hexdigest(),
        }

    def size_hint(self, split: str) -> int | None:
        """Number of WAV files of an extracted tree; ``None`` for tarballs (unknown until read)."""
        if self.root is None or self._local_tarball(split) is not None:
            return None
        return len(self._tree_files(split))

    def member_list_hash(self, split: str) -> str | None:
        """sha256 of the ``clip_id`` of every record yielded by the last complete iteration.

        Each id is followed by a newline. ``None`` when ``split`` was never read to its end.
        """
        return self._member_hashes.get(split)

    # -- locating -------------------------------------------------------------------

    def _tarball(self, split: str) -> Path | None:
        if self.root is None:
            return self._download(split)
        tarball = self._local_tarball(split)
        if tarball is None and not self._tree_files(split):
            raise FileNotFoundError(
                f"no DreamCatcher {split!r} split under {self.root}: expected "
                f"data/{split}.tar.gz, {split}.tar.gz or WAV files at .../{split}/<label>/*.wav"
            )
        return tarball

    def _local_tarball(self, split: str) -> Path | None:
        assert self.root is not None
        for candidate in (self.root / _hub_filename(split), self.root / f"{split}.tar.gz"):
            if candidate.is_file():
                return candidate
        return None

    def _download(self, split: str) -> Path:
        try:
            path = hf_hub_download(
                repo_id=self.repo_id,
                filename=_hub_filename(split),
                repo_type="dataset",
                revision=self.revision,
                token=self.token,
                cache_dir=self.download_dir,
            )
        except (GatedRepoError, RepositoryNotFoundError) as err:
            raise DatasetAccessError(self._access_message(err)) from err
        except HfHubHTTPError as err:
            status = getattr(getattr(err, "response", None), "status_code", None)
            if status in (401, 403):
                raise DatasetAccessError(self._access_message(err)) from err
            raise
        return Path(path)

    def _access_message(self, err: Exception) -> str:
        return (
            f"cannot download {self.repo_id} ({type(err).__name__}): the dataset is gated; "
            f"request access on https://huggingface.co/datasets/{self.repo_id}, then run "
            "`hf auth login` (or `huggingface-cli login`) or set HF_TOKEN"
        )

    def _tree_files(self, split: str) -> list[tuple[str, Path]]:
        """``(path relative to root, path)`` of every ``.../<split>/<label>/*.wav``, sorted."""
        if self._tree is None:
            assert self.root is not None
            tree: dict[str, list[tuple[str, Path]]] = {s: [] for s in SPLITS}
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames.sort()
                here = Path(dirpath)
                grand = here.parent.name
                if grand not in tree:
                    continue
                for fname in sorted(filenames):
                    if fname.lower().endswith(".wav"):
                        path = here / fname
                        tree[grand].append((path.relative_to(self.root).as_posix(), path))
            self._tree = {s: sorted(files) for s, files in tree.items()}
        return self._tree.get(split, [])

    # -- reading --------------------------------------------------------------------

    def _iter_tree(self, split: str) -> Iterator[Clip | SkippedClip]:
        for rel, path in self._tree_files(split):
            label = path.parent.name
            if label not in self.labels:
                yield SkippedClip(rel, split, label, "unknown_label")
                continue
            try:
                waveform, sr = decode(path.read_bytes())
            except (AudioDecodeError, OSError):
                yield SkippedClip(rel, split, label, "corrupt")
                continue
            yield Clip(waveform, sr, label, rel, split)

    def _iter_tar(self, tarball: Path, split: str) -> Iterator[Clip | SkippedClip]:
        try:
            with (
                gzip_module().open(tarball, "rb") as stream,
                tarfile.open(fileobj=stream, mode="r|", bufsize=_TAR_BUFSIZE) as tar,
            ):
                for member in tar:
                    record = self._member_record(tar, member, split)
                    if record is not None:
                        yield record
                _check_complete(stream)
        except _GZIP_ERRORS as err:
            raise ArchiveError(
                f"{tarball} is truncated or not a .tar.gz ({err}); delete it and fetch it again"
            ) from err

    def _member_record(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, split: str
    ) -> Clip | SkippedClip | None:
        name = member.name
        if not name.lower().endswith(".wav") or member.isdir():
            return None
        parts = _parts(name)
        label = parts[-2] if len(parts) >= 2 else ""
        if is_unsafe_member(name) or not member.isfile():
            return SkippedClip(name, split, label, "unsafe_path")
        if len(parts) < 3 or parts[-3] != split:
            return SkippedClip(name, split, label, "wrong_split")
        if label not in self.labels:
            return SkippedClip(name, split, label, "unknown_label")
        fobj = tar.extractfile(member)
        try:
            waveform, sr = decode(fobj.read() if fobj is not None else b"")
        except AudioDecodeError:
            return SkippedClip(name, split, label, "corrupt")
        return Clip(waveform, sr, label, name, split)


def gzip_module() -> ModuleType:
    """The gzip reader for tarballs: ISA-L's ``igzip`` when installed, else the standard one."""
    return _fast_gzip if _fast_gzip is not None else gzip


def _check_complete(stream: gzip.GzipFile) -> None:
    """Raise EOFError when the gzip ``stream`` under a tarfile stopped before its end.

    tarfile ends the iteration quietly when the data stops inside a member header,
    so a cut-off download would otherwise lose clips without a word. Reading the
    rest (only the end-of-archive padding) makes the gzip reader check that it saw
    the end-of-stream marker; it raises EOFError when it did not.
    """
    while stream.read(_TAR_BUFSIZE):
        pass


def _parts(name: str) -> list[str]:
    """Folders and file name of an archive path (``/`` or ``\\`` separated, ``.`` dropped)."""
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def _hub_filename(split: str) -> str:
    return f"data/{split}.tar.gz"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; DreamCatcher has {SPLITS}")
