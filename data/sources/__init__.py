"""Where clips come from: DreamCatcher, a folder of audio, a hub dataset, a synthetic corpus.

Every source honours the clip contract of :mod:`data.sources.base`.
"""

from data.sources.audiofolder import AudioFolder
from data.sources.base import DREAMCATCHER_LABELS, SPLITS, Clip, SkippedClip, Source
from data.sources.dreamcatcher import ArchiveError, DatasetAccessError, DreamCatcher
from data.sources.hub import HubAudioDataset
from data.sources.synthetic import MALFORMED_MEMBERS, Synthetic, write_dreamcatcher_archive

__all__ = [
    "DREAMCATCHER_LABELS",
    "MALFORMED_MEMBERS",
    "SPLITS",
    "ArchiveError",
    "AudioFolder",
    "Clip",
    "DatasetAccessError",
    "DreamCatcher",
    "HubAudioDataset",
    "SkippedClip",
    "Source",
    "Synthetic",
    "write_dreamcatcher_archive",
]
