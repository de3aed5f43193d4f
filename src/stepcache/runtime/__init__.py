"""The runtime: apply a schedule while a model generates. It takes values (a :class:`~stepcache.Schedule`,
a :class:`CacheConfig`); reading them from files or the hub is the front door's job (:mod:`stepcache.api`).

* :mod:`.steps`: which denoising step and guidance branch each denoiser call belongs to, and the
  pipeline's generation boundaries (its scheduler);
* :mod:`.session`: installing the interception on a model and removing it exactly;
* :mod:`.config`: a cache's options (:class:`CacheConfig`), checked once;
* :mod:`.handle`: a cache on one target (:class:`CacheHandle`), one slot per component;
* :mod:`.slot`: one cached component's per-step decision and kept outputs, with its collaborators
  :mod:`.storage` (dtype packing), :mod:`.offload` (host memory), :mod:`.guided` (the guided
  half-call) and :mod:`.compiled` (the ``torch.cond`` path);
* :mod:`.cache`: the runtime's door (:func:`cache` from values, :func:`disable`, :func:`summary`);
* :mod:`.stats`: what the cache did;
* :mod:`.introspect`: model identity (fingerprint), MAC counting, final samples of a replay.
"""

from .cache import cache, disable, summary
from .config import CacheConfig
from .handle import CacheHandle
from .introspect import MacShares, fingerprint, mac_shares
from .session import Session, track_steps
from .stats import CacheStats, TypeStats
from .steps import StepTracker

__all__ = [
    "CacheConfig",
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
