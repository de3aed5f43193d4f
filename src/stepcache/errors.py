"""Errors stepcache raises.

Every error says what was wrong and what to do about it. They all derive from
:class:`StepCacheError` (a ``ValueError``), so callers can catch one type.
"""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "DiscoveryError",
    "DistributedError",
    "ReferenceWeightsError",
    "ScheduleError",
    "ScheduleLengthError",
    "ScheduleMismatchError",
    "StepCacheError",
    "StepCacheWarning",
    "StoreError",
]


class StepCacheError(ValueError):
    """Base class of every error stepcache raises on bad input or misuse."""


class DiscoveryError(StepCacheError):
    """No cacheable blocks or components could be found, or an override names nothing."""


class ScheduleError(StepCacheError):
    """A schedule is malformed, unreadable, or does not fit the model it is applied to."""


class ScheduleLengthError(ScheduleError):
    """The run made a different number of denoising steps than the schedule has."""


class DistributedError(StepCacheError):
    """The ranks of a process group disagree, or not all of them took part in a step they share."""


class ScheduleMismatchError(DistributedError, ScheduleError):
    """Ranks enabled caches with different schedules (under context parallelism they would hang)."""


class CalibrationError(StepCacheError):
    """A calibration is malformed, unreadable, or was recorded on a different model."""


class StoreError(StepCacheError):
    """The calibration store (``$STEPCACHE_HOME``) cannot be read or written, or holds no such entry."""


class ReferenceWeightsError(StepCacheError):
    """A shipped reference-model weights or config file is missing, corrupt, or does not fit the model."""


class StepCacheWarning(UserWarning):
    """Something works but is probably not what was meant (a generation shorter than its schedule, a
    lossy export); the message says what to do."""
