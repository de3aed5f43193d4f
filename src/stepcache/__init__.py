"""stepcache: make diffusion transformers generate faster by reusing what barely changes.

The whole public API::

    comps = stepcache.discover(pipe)                          # what can be cached
    cal = stepcache.calibrate(pipe, inputs=[...], num_inference_steps=50)
    schedule = stepcache.Schedule.from_calibration(cal, alpha=0.1)   # SmoothCache's rule
    schedule = stepcache.Schedule.optimal(cal, 0.35)                  # or: exact DP for a budget
    schedule = stepcache.tune(pipe, run, 0.35, calibration=cal)       # or: closed-loop, the best
    with stepcache.cache(pipe, schedule) as handle:           # apply it
        images = pipe(...)
    print(handle.stats)
"""

from ._version import __version__
from .cache import CacheHandle, CacheStats, TypeStats, cache, disable, enable
from .calibration import Calibration, calibrate
from .discovery import COMPONENT_TYPES, Component, discover, register_layout
from .errors import CalibrationError, DiscoveryError, ScheduleError, ScheduleLengthError, StepCacheError
from .layouts import BlockLayout
from .schedule import Schedule
from .sensitivity import sensitivity
from .tuning import tune

__all__ = [
    "COMPONENT_TYPES",
    "BlockLayout",
    "CacheHandle",
    "CacheStats",
    "Calibration",
    "CalibrationError",
    "Component",
    "DiscoveryError",
    "Schedule",
    "ScheduleError",
    "ScheduleLengthError",
    "StepCacheError",
    "TypeStats",
    "__version__",
    "cache",
    "calibrate",
    "disable",
    "discover",
    "enable",
    "register_layout",
    "sensitivity",
    "tune",
]
