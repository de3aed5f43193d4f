"""stepcache logs through the ``stepcache`` logger namespace, so one call sets its verbosity.

Until :func:`set_verbosity` is called, stepcache follows diffusers' verbosity when diffusers is in
use (``diffusers.utils.logging.set_verbosity_info()`` shows stepcache's info messages too), and
otherwise Python's logging defaults (warnings and errors).
"""

from __future__ import annotations

import logging
import sys

__all__ = ["get_logger", "set_verbosity"]

ROOT = "stepcache"
_explicit = False


def get_logger(name: str) -> logging.Logger:
    """The logger for a stepcache module (``__name__``), under the ``stepcache`` namespace."""
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")


def set_verbosity(level: int | str) -> None:
    """Set the level of every stepcache logger (``"info"``, ``logging.DEBUG``, ...)."""
    global _explicit
    if isinstance(level, str):
        value = logging.getLevelName(level.upper())
        if not isinstance(value, int):
            from .errors import StepCacheError

            raise StepCacheError(f"unknown log level {level!r}; use debug, info, warning or error.")
        level = value
    logging.getLogger(ROOT).setLevel(level)
    _explicit = True


def follow_diffusers() -> None:
    """Adopt diffusers' verbosity unless :func:`set_verbosity` was called (cheap; called on entry
    points such as :func:`stepcache.cache` and :func:`stepcache.calibrate`)."""
    if _explicit or "diffusers" not in sys.modules:
        return
    try:
        from diffusers.utils import logging as diffusers_logging
    except ImportError:  # pragma: no cover - a broken diffusers install
        return
    logging.getLogger(ROOT).setLevel(diffusers_logging.get_verbosity())
