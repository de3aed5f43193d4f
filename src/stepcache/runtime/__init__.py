"""The runtime: apply a schedule while a model generates.

* :mod:`.steps`: which denoising step and guidance branch each denoiser call belongs to;
* :mod:`.session`: installing the interception on a model and removing it exactly;
* :mod:`.cache`: the cache itself (:func:`cache`, :class:`CacheHandle`), one slot per component;
* :mod:`.stats`: what the cache did;
* :mod:`.introspect`: model identity (fingerprint), MAC counting, final samples of a replay.
"""

from .cache import CacheHandle, cache, disable, summary
from .introspect import MacShares, fingerprint, mac_shares
from .session import Session, track_steps
from .stats import CacheStats, TypeStats
from .steps import StepTracker

__all__ = [
    "CacheHandle",
    "CacheStats",
    "MacShares",
    "Session",
    "StepTracker",
    "TypeStats",
    "cache",
    "disable",
    "fingerprint",
    "mac_shares",
    "summary",
    "track_steps",
]
