"""Where clips come from: DreamCatcher, a folder of audio, a hub dataset, a synthetic corpus;
any of them with augmented train copies.

Every source honours the clip contract of :mod:`data.sources.base`. The writer of the
synthetic corpus as DreamCatcher tarballs is :mod:`data.fixtures`.
"""

from data.sources.audiofolder import AudioFolder, DerivedSplits
from data.sources.augmented import Augmented
from data.sources.base import DREAMCATCHER_LABELS, SPLITS, Clip, Segment, SkippedClip, Source
from data.sources.dreamcatcher import ArchiveError, DatasetAccessError, DreamCatcher
from data.sources.hub import HubAudioDataset
from data.sources.synthetic import Synthetic

__all__ = [
    "DREAMCATCHER_LABELS",
    "SPLITS",
    "ArchiveError",
    "AudioFolder",
    "Augmented",
    "Clip",
    "DatasetAccessError",
    "DerivedSplits",
    "DreamCatcher",
    "HubAudioDataset",
    "Segment",
    "SkippedClip",
    "Source",
    "Synthetic",
]
