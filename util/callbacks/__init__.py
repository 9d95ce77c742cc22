"""Lightning callbacks: confusion matrices, latency profiling, run artifacts, night reports,
learning rates."""

from util.callbacks.artifacts import RunArtifacts
from util.callbacks.confusion import ConfusionMatrixLogger
from util.callbacks.latency import LatencyProfiler
from util.callbacks.learning_rate import LearningRates
from util.callbacks.night import NightWriter

__all__ = [
    "ConfusionMatrixLogger",
    "LatencyProfiler",
    "LearningRates",
    "NightWriter",
    "RunArtifacts",
]
