"""WaveGen: a provenance-exact, tiered generation cache whose hit rates tell the memory what to internalize."""

from .cache import CacheEntry, CacheTier, TieredCache
from .controller import WaveController
from .extraction import ExtractedCircuit, extract
from .observe import Recorder, StepObservation, Trajectory
from .speculative import accept

__all__ = [
    "CacheEntry",
    "CacheTier",
    "ExtractedCircuit",
    "Recorder",
    "StepObservation",
    "TieredCache",
    "Trajectory",
    "WaveController",
    "accept",
    "extract",
]
