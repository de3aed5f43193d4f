"""What a user names, read into the values the runtime takes.

A schedule may be given as a :class:`~stepcache.Schedule`, a schedule file, a folder holding
``stepcache_schedule.json`` or a hub repository id; a guidance plan as a
:class:`~stepcache.guidance.GuidanceReuse` or its file. Both front doors (:func:`stepcache.cache`
and :class:`~stepcache.integrations.diffusers_hooks.SmoothCacheConfig`) read them here, before the
runtime sees them.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import ScheduleError
from ..guidance import GuidanceReuse
from ..schedule import Schedule
from .hub import resolve_schedule

__all__ = ["guidance_value", "schedule_value"]


def schedule_value(spec: Any) -> Schedule:
    """A Schedule as given, or read from a file, a folder or a hub repository."""
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        if os.path.isfile(spec):
            return Schedule.load(os.fspath(spec))
        return resolve_schedule(spec)
    raise ScheduleError(
        f"schedule must be a stepcache.Schedule, a schedule file, a folder or a hub repository id; "
        f"got {type(spec).__name__}."
    )


def guidance_value(spec: Any) -> Any:
    """A guidance plan read from its file; anything else as given (the config checks it)."""
    if isinstance(spec, (str, os.PathLike)):
        return GuidanceReuse.load(os.fspath(spec))
    return spec
