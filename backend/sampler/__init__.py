"""The metrics sampler: every running capsule's guest and host figures, once per second, kept
for 10 min / 2 h / 24 h (see sampler.py). No Textual here: the dashboard subscribes."""

from backend.runtime.base import BalloonStats
from backend.sampler.models import RANGES, SERIES, Sample, SamplerStats, Target, Tick
from backend.sampler.sampler import Sampler
from backend.sampler.sources import ManagerSource, StaticSource, TargetSource

__all__ = [
    "RANGES",
    "SERIES",
    "BalloonStats",
    "ManagerSource",
    "Sample",
    "Sampler",
    "SamplerStats",
    "StaticSource",
    "Target",
    "TargetSource",
    "Tick",
]
