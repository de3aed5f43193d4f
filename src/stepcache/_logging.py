"""stepcache logs through the ``stepcache`` logger namespace, so one call sets its verbosity.

Until :func:`set_verbosity` is called, stepcache follows diffusers' verbosity when diffusers is in
use (``diffusers.utils.logging.set_verbosity_info()`` shows stepcache's info messages too), and
otherwise Python's logging defaults (warnings and errors). Under torchrun or accelerate every rank
runs the same code: only rank 0 logs below warning level, so a run on eight processes does not say
everything eight times (warnings and errors still come from every rank: they may be that rank's own).
"""

from __future__ import annotations

import logging
import sys

from .distributed import rank
from .errors import StepCacheError

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
            raise StepCacheError(f"unknown log level {level!r}; use debug, info, warning or error.")
        level = value
    logging.getLogger(ROOT).setLevel(level)
    _explicit = True


def follow_diffusers() -> None:
    """Adopt diffusers' verbosity unless :func:`set_verbosity` was called, and keep ranks other than
    0 at warning level (cheap; called on entry points such as :func:`stepcache.cache` and
    :func:`stepcache.calibrate`)."""
    if _explicit:
        return
    root = logging.getLogger(ROOT)
    if "diffusers" in sys.modules:
        try:
            from diffusers.utils import logging as diffusers_logging
        except ImportError:  # pragma: no cover - a broken diffusers install
            pass
        else:
            root.setLevel(diffusers_logging.get_verbosity())
    quiet_other_ranks()


def quiet_other_ranks() -> None:
    """On a rank other than 0 (of torch.distributed, or ``RANK`` set by a launcher), raise the
    stepcache loggers to warning level unless :func:`set_verbosity` chose a level."""
    if _explicit or rank() == 0:
        return
    root = logging.getLogger(ROOT)
    if root.getEffectiveLevel() < logging.WARNING:
        root.setLevel(logging.WARNING)
