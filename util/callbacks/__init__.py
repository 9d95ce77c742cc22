"""Lightning callbacks: confusion matrices, latency profiling, run artifacts."""

from util.callbacks.artifacts import RunArtifacts
from util.callbacks.confusion import ConfusionMatrixLogger
from util.callbacks.latency import LatencyProfiler

__all__ = ["ConfusionMatrixLogger", "LatencyProfiler", "RunArtifacts"]
