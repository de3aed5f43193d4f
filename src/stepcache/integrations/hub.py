"""Schedules and calibrations on the Hugging Face Hub, or in a model folder: the user-facing doors.

The mechanics (finding a file in a file, a folder or a Hub repo; uploading one) live in
:mod:`stepcache._hub`, below the values, which inherit them as ``from_pretrained`` /
``save_pretrained`` / ``push_to_hub``. This module adds the loaders that name a value, and what the
front doors (:func:`stepcache.cache`, :class:`~stepcache.SmoothCacheConfig`) accept as a schedule
(:func:`resolve_schedule`) or a guidance plan (:func:`resolve_guidance`), read into values before
the runtime sees them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .._hub import CALIBRATION_FILE, SCHEDULE_FILE, push_to_hub, resolve_file, save_pretrained
from ..calibration import Calibration
from ..errors import ScheduleError
from ..guidance import GuidanceReuse
from ..schedule import Schedule

__all__ = [
    "CALIBRATION_FILE",
    "SCHEDULE_FILE",
    "load_calibration",
    "load_schedule",
    "push_to_hub",
    "resolve_file",
    "resolve_guidance",
    "resolve_schedule",
    "save_pretrained",
]


def load_schedule(spec: str | os.PathLike[str], filename: str = SCHEDULE_FILE, **kwargs: Any) -> Schedule:
    """The :class:`~stepcache.Schedule` in a file, a folder or a Hub repo (see :func:`resolve_file`)."""
    return Schedule.from_pretrained(spec, filename, **kwargs)


def load_calibration(
    spec: str | os.PathLike[str], filename: str = CALIBRATION_FILE, **kwargs: Any
) -> Calibration:
    """The :class:`~stepcache.Calibration` in a file, a folder or a Hub repo (see :func:`resolve_file`)."""
    return Calibration.from_pretrained(spec, filename, **kwargs)


def resolve_schedule(spec: Schedule | str | os.PathLike[str]) -> Schedule:
    """A :class:`~stepcache.Schedule` from a schedule, a schedule file, a folder or a Hub repo id.

    What ``stepcache.cache(pipe, spec)`` accepts as its schedule: a file is read whatever its name,
    a folder or repo must hold :data:`SCHEDULE_FILE`.
    """
    if isinstance(spec, Schedule):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise ScheduleError(
            f"schedule must be a stepcache.Schedule, a schedule file, a folder or a hub repository id; "
            f"got {type(spec).__name__}."
        )
    path = Path(spec).expanduser()
    if path.is_file():
        return Schedule.load(path)
    return load_schedule(spec)


def resolve_guidance(spec: Any) -> Any:
    """A guidance plan read from its file; anything else as given (:class:`~stepcache.CacheConfig`
    checks it). What ``stepcache.cache(..., guidance=spec)`` accepts."""
    if isinstance(spec, (str, os.PathLike)):
        return GuidanceReuse.load(os.fspath(spec))
    return spec
