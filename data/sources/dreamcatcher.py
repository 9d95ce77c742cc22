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
import logging
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from data.audio import AudioDecodeError, decode
from data.hashing import head_tail_digest, lines_sha256
from data.sources.base import DREAMCATCHER_LABELS, SPLITS, Clip, SkippedClip, Source
from data.sources.tree import TreeFile, place_files, read_tree_file

try:  # ISA-L's inflate is about 2.3x zlib's; the standard library's gzip reads the same files.
    from isal import igzip as _fast_gzip
    from isal.isal_zlib import error as _fast_inflate_error
except ImportError:  # isal is a dependency; this keeps platforms without its wheels working
    _fast_gzip = None
    _fast_inflate_error = zlib.error

DEFAULT_REPO_ID = "THU-PI-Sensing/DreamCatcher"
DEFAULT_REVISION = "56226e293f6d6252d441d7403360280f3b912949"
#: Bump when the reading rules change (layout, skip reasons), so caches rebuild.
READER_VERSION = 2
#: Read size of tarfile's stream. 64 KiB measured fastest: tarfile re-joins its
#: whole buffer on each read, so much larger sizes copy more than they save.
_TAR_BUFSIZE = 1 << 16
#: Errors of a damaged gzip stream, from either inflater.
_GZIP_ERRORS = (tarfile.ReadError, zlib.error, _fast_inflate_error, gzip.BadGzipFile, EOFError)
#: Why a source refuses a token argument (shared with the hub source).
_TOKEN_REFUSED = (
    "{source}: a hub token is not accepted as a config value (it would be saved with the "
    "run's config.yaml); remove `token` and set HF_TOKEN or run `hf auth login`"
)

log = logging.getLogger(__name__)


class DatasetAccessError(RuntimeError):
    """The hub refused the download (gated dataset, no token, or no access yet)."""


class ArchiveError(RuntimeError):
    """A tarball is truncated or not a gzip-compressed tar."""


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
    judges them). Folders and files outside the label folders (metadata) are not
    clips and are passed over; any other file in a label folder is skipped as
    ``not_audio``. A ``.wav`` member is skipped with a reason when its
    path is absolute or holds ``..`` (``unsafe_path``), when it is not a regular
    file (``unsafe_path``: links are never followed), when the folder two above it
    is not the tarball's split (``wrong_split``), when the folder above it is not a
    DreamCatcher label (``unknown_label``), when it is a WAV cut short
    (``truncated``) and when soundfile cannot decode it (``corrupt``). ``clip_id``
    is the member path (in a tree: the path relative to ``root``, which equals the
    member path when a tarball was extracted there). Tarballs are streamed in
    archive order without extracting anything; one that is cut short, holds a
    damaged member header or is not a gzip tar raises :class:`ArchiveError` naming
    the member and byte offset, never a quietly shorter split. Trees are read in
    sorted path order, and every file in them is accounted for: a file under a
    split folder spelled in other case (``Train/``) is skipped as
    ``misspelled_split``, one not at ``<split>/<label>/<file>`` as ``misplaced``;
    files in no split folder are counted in the fingerprint and logged.

    The cache hashes the ``clip_id`` of every yielded record (clips and skipped
    members alike) into its member-list hash.

    Args:
        root: local folder holding the tarballs or the extracted tree; ``None``
            downloads from the hub.
        repo_id: hub dataset repository.
        revision: pinned commit of the repository.
        token: not accepted: a token given here would be saved with the run's
            config (config.yaml) and travel with it; the hub token comes from
            ``HF_TOKEN`` or the saved login (``hf auth login``). Any value is refused
            with a message saying so.
        download_dir: hub cache folder for the tarballs (default: the hub's own).

    Raises:
        ValueError: a ``token`` is given.
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
        if token is not None:
            raise ValueError(_TOKEN_REFUSED.format(source="DreamCatcher"))
        self.root = None if root is None else Path(root)
        self.repo_id = repo_id
        self.revision = revision
        self.download_dir = download_dir
        if self.root is not None and not self.root.is_dir():
            raise FileNotFoundError(f"DreamCatcher root {self.root} is not a folder")
        self._tree: dict[str, list[TreeFile]] | None = None
        self._outside: list[str] = []

    # -- Source API -----------------------------------------------------------------

    def iter_clips(self, split: str) -> Iterator[Clip | SkippedClip]:
        """Yield every ``.wav`` member of ``split``: a Clip, or a SkippedClip with its reason."""
        _check_split(split)
        tarball = self._tarball(split)
        yield from self._iter_tar(tarball, split) if tarball else self._iter_tree(split)

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
            return {
                **common,
                "kind": "tarball",
                "filename": tarball.name,
                **head_tail_digest(tarball),
            }
        files = self._tree_files(split)
        return {
            **common,
            "kind": "tree",
            "files": str(len(files)),
            "listing_sha256": lines_sha256(f"{f.rel}\0{f.path.stat().st_size}" for f in files),
            "outside_splits": str(len(self._outside)),
        }

    def size_hint(self, split: str) -> int | None:
        """Number of WAV files of an extracted tree; ``None`` for tarballs (unknown until read)."""
        if self.root is None or self._local_tarball(split) is not None:
            return None
        return len(self._tree_files(split))

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
                token=None,  # huggingface_hub reads HF_TOKEN or the saved login
                cache_dir=self.download_dir,
            )
        except (GatedRepoError, RepositoryNotFoundError) as err:
            raise DatasetAccessError(self._access_message(err)) from err
        except LocalEntryNotFoundError as err:  # offline, or the hub unreachable, and not cached
            raise DatasetAccessError(self._offline_message(split)) from err
        except HfHubHTTPError as err:
            status = getattr(getattr(err, "response", None), "status_code", None)
            if status in (401, 403):
                raise DatasetAccessError(self._access_message(err)) from err
            raise
        return Path(path)

    def _offline_message(self, split: str) -> str:
        why = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the hub is unreachable"
        return (
            f"cannot download {_hub_filename(split)} of {self.repo_id} ({why}) and it is not in "
            "the hub cache: connect to the internet, or fetch the tarballs elsewhere and pass "
            "their folder as --data.source.init_args.root"
        )

    def _access_message(self, err: Exception) -> str:
        return (
            f"cannot download {self.repo_id} ({type(err).__name__}): the dataset is gated; "
            f"request access on https://huggingface.co/datasets/{self.repo_id}, then run "
            "`hf auth login` (or `huggingface-cli login`) or set HF_TOKEN"
        )

    def _tree_files(self, split: str) -> list[TreeFile]:
        """Every file of ``split``'s folders in the extracted tree, sorted (see ``place_files``)."""
        if self._tree is None:
            assert self.root is not None
            self._tree, self._outside = place_files(self.root, (".wav",), top_level=False)
            if self._outside:
                log.warning(
                    "%d file(s) under %s sit in no split folder and are not read, e.g. %s",
                    len(self._outside),
                    self.root,
                    ", ".join(self._outside[:3]),
                )
        return self._tree.get(split, [])

    # -- reading --------------------------------------------------------------------

    def _iter_tree(self, split: str) -> Iterator[Clip | SkippedClip]:
        for file in self._tree_files(split):
            yield read_tree_file(file, self.labels)

    def _iter_tar(self, tarball: Path, split: str) -> Iterator[Clip | SkippedClip]:
        index, last = 0, "(none)"  # members read so far, and the last one's name
        try:
            with (
                gzip_module().open(tarball, "rb") as stream,
                tarfile.open(
                    fileobj=stream, mode="r|", bufsize=_TAR_BUFSIZE, tarinfo=_CheckedTarInfo
                ) as tar,
            ):
                for member in tar:
                    index, last = index + 1, member.name
                    record = self._member_record(tar, member, split)
                    if record is not None:
                        yield record
                _check_complete(tar, stream)
        except _BadTarHeader as err:
            if err.truncated:
                raise ArchiveError(
                    f"{tarball} is truncated or not a .tar.gz: the tar stream stops without "
                    f"its end-of-archive block after {index} members (last {last!r}), at byte "
                    f"{err.offset} of the decompressed tar; delete it and fetch it again"
                ) from None
            raise ArchiveError(
                f"{tarball} is damaged: the tar header of member {index} (from 0; after "
                f"{last!r}) at byte {err.offset} of the decompressed tar is invalid "
                f"({err.why}); the members after it cannot be read; delete it and fetch it again"
            ) from None
        except _GZIP_ERRORS as err:
            raise ArchiveError(
                f"{tarball} is truncated or not a .tar.gz ({err}); delete it and fetch it again"
            ) from err

    def _member_record(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, split: str
    ) -> Clip | SkippedClip | None:
        name = member.name
        if member.isdir():
            return None
        parts = _parts(name)
        if not name.lower().endswith(".wav"):
            if member.isfile() and len(parts) >= 3 and parts[-3] == split:
                return SkippedClip(name, split, parts[-2], "not_audio")  # in a label folder
            return None  # metadata beside the clips
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
        except AudioDecodeError as err:
            return SkippedClip(name, split, label, err.reason)
        return Clip(waveform, sr, label, name, split)


def gzip_module() -> ModuleType:
    """The gzip reader for tarballs: ISA-L's ``igzip`` when installed, else the standard one."""
    return _fast_gzip if _fast_gzip is not None else gzip


class _BadTarHeader(Exception):
    """A tar header that is neither a member's nor the end-of-archive block.

    Deliberately not a ``tarfile.HeaderError``: tarfile ends its iteration quietly
    on those (after the first member), which would make the rest of a split vanish.
    """

    def __init__(self, offset: int, why: str, truncated: bool = False) -> None:
        super().__init__(f"{why} at byte {offset}")
        self.offset, self.why, self.truncated = offset, why, truncated


class _CheckedTarInfo(tarfile.TarInfo):
    """TarInfo whose reader lets only a real end-of-archive block end the iteration."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:  # a zero block: the end-of-archive marker
            raise
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError) as err:
            raise _BadTarHeader(tarfile_.offset, str(err), truncated=True) from None
        except tarfile.HeaderError as err:  # bad checksum, bad number field...
            raise _BadTarHeader(tarfile_.offset, str(err)) from None


def _check_complete(tar: tarfile.TarFile, stream: gzip.GzipFile) -> None:
    """Check that a tar iteration stopped at the end of the archive, not before it.

    tarfile ends the iteration quietly at a zero block and when the data stops inside
    a member header (the latter :class:`_CheckedTarInfo` turns into an error). After
    the end-of-archive block only zero padding may follow: anything else means a
    zeroed header hid the members after it. Reading that rest to its end also makes
    the gzip reader check its end-of-stream marker (EOFError when missing).
    """
    end = tar.offset  # where the zero block that ended the iteration starts
    pos = end + tarfile.BLOCKSIZE
    while block := tar.fileobj.read(_TAR_BUFSIZE):  # type: ignore[union-attr]
        if block.count(0) != len(block):
            first = pos + next(i for i, b in enumerate(block) if b)
            raise _BadTarHeader(
                end,
                f"a zero block ends the archive but data follows it at byte {first} "
                "(a zeroed member header)",
            )
        pos += len(block)
    while stream.read(_TAR_BUFSIZE):  # at its end already: the gzip trailer was checked
        pass


def _parts(name: str) -> list[str]:
    """Folders and file name of an archive path (``/`` or ``\\`` separated, ``.`` dropped)."""
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def _hub_filename(split: str) -> str:
    return f"data/{split}.tar.gz"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; DreamCatcher has {SPLITS}")
