"""The runtime's door: open a cache from values, remove it, read what it did.

``stepcache.cache(target, schedule)`` (:mod:`stepcache.api`, the front door) reads a schedule or a
guidance plan named by a file, a folder or a hub repository id into values, then opens a
:class:`~.handle.CacheHandle`. :func:`cache` here is the same without the reading, for code below the
front door (policies, calibration): it takes a :class:`~stepcache.Schedule` and a
:class:`~.config.CacheConfig` (or its fields as keywords). On a compute step each cached component
runs and its output is kept (one per guidance branch); on a reuse step the kept output is returned
without running the component (:mod:`.slot`). The block's gates, residual additions and norms still
run, which is what makes reuse safe.
"""

from __future__ import annotations

from typing import Any

from .._logging import follow_diffusers
from ..discovery import denoisers_of
from ..errors import StepCacheError
from ..schedule import Schedule
from .config import CacheConfig, configure
from .handle import LAST_STATS, CacheHandle
from .session import active_session
from .stats import CacheStats

__all__ = ["CacheHandle", "cache", "disable", "summary"]


def cache(target: Any, schedule: Schedule, config: CacheConfig | None = None, **options: Any) -> CacheHandle:
    """Start caching ``target`` (a pipeline or denoiser module) with ``schedule``; returns the open handle.

    The runtime's own door, for code below the front door: ``schedule`` is a :class:`Schedule` and
    ``config.guidance`` a :class:`~stepcache.guidance.GuidanceReuse` (values, not files; use
    :func:`stepcache.cache` to name them by file, folder or repository id). ``options`` are
    :class:`CacheConfig` fields and replace ``config``'s (its defaults when there is no config).
    """
    follow_diffusers()
    return CacheHandle(target, schedule, configure(config, options)).open()


def disable(target: Any) -> None:
    """Remove the cache from ``target`` (a handle, pipeline or module). A no-op if none is active."""
    if isinstance(target, CacheHandle):
        target.close()
        return
    session = active_session(denoisers_of(target)[0][1])
    if session is not None:
        if isinstance(session.owner, CacheHandle):
            session.owner.close()
        else:
            session.remove()


def summary(target: Any) -> CacheStats:
    """The stats of the cache active on ``target`` (a pipeline, module or handle), or else of the
    last one closed on it: computed vs reused calls per type, compute fraction, MACs saved.

    Raises:
        StepCacheError: no cache has run on this target.
    """
    if isinstance(target, CacheHandle):
        return target.stats
    model = denoisers_of(target)[0][1]
    session = active_session(model)
    if session is not None and isinstance(session.owner, CacheHandle):
        return session.owner.stats
    if model in LAST_STATS:
        return LAST_STATS[model]
    raise StepCacheError(
        f"no stepcache cache has run on this {type(model).__name__}; call stepcache.cache(...) first."
    )
