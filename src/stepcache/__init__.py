"""stepcache: make diffusion transformers generate faster by reusing what barely changes.

The whole public API::

    comps = stepcache.discover(pipe)                          # what can be cached
    cal = stepcache.calibrate(pipe, inputs=[...], num_inference_steps=50)
    schedule = stepcache.from_calibration(cal, alpha=0.1)         # SmoothCache's rule
    schedule = stepcache.optimal_schedule(cal, 0.35)              # or: exact DP for a budget
    schedule = stepcache.tune(pipe, run, 0.35, calibration=cal)   # or: closed loop, the best
    with stepcache.cache(pipe, schedule) as handle:           # apply it
        images = pipe(...)
    print(handle.stats)                                       # or stepcache.summary(pipe)

Data flows one way: model -> :mod:`~stepcache.discovery` -> :mod:`~stepcache.calibration` ->
:mod:`~stepcache.policies` -> :class:`Schedule` -> :mod:`~stepcache.runtime`. See
docs/architecture.md.
"""

from ._logging import set_verbosity
from ._version import __version__
from .api import CacheConfig, cache
from .calibration import (
    Calibration,
    GuidanceCalibration,
    calibrate,
    calibrate_guidance,
    response,
    sensitivity,
)
from .discovery import COMPONENT_TYPES, Component, discover, register_layout
from .errors import (
    CalibrationError,
    DiscoveryError,
    ReferenceWeightsError,
    ScheduleError,
    ScheduleLengthError,
    StepCacheError,
    StepCacheWarning,
)
from .guidance import GuidanceReuse
from .integrations.diffusers_hooks import SmoothCacheConfig, apply_smoothcache, remove_smoothcache
from .layouts import BlockLayout
from .policies import (
    fit_forecasts,
    for_compute_fraction,
    fora,
    from_calibration,
    optimal_schedule,
    tune,
    tune_guidance,
)
from .runtime import CacheHandle, CacheStats, TypeStats, disable, summary
from .schedule import PlanValue, Schedule

__all__ = [
    "COMPONENT_TYPES",
    "BlockLayout",
    "CacheConfig",
    "CacheHandle",
    "CacheStats",
    "Calibration",
    "CalibrationError",
    "Component",
    "DiscoveryError",
    "GuidanceCalibration",
    "GuidanceReuse",
    "PlanValue",
    "ReferenceWeightsError",
    "Schedule",
    "ScheduleError",
    "ScheduleLengthError",
    "SmoothCacheConfig",
    "StepCacheError",
    "StepCacheWarning",
    "TypeStats",
    "__version__",
    "apply_smoothcache",
    "cache",
    "calibrate",
    "calibrate_guidance",
    "disable",
    "discover",
    "fit_forecasts",
    "for_compute_fraction",
    "fora",
    "from_calibration",
    "optimal_schedule",
    "register_layout",
    "remove_smoothcache",
    "response",
    "sensitivity",
    "set_verbosity",
    "summary",
    "tune",
    "tune_guidance",
]
