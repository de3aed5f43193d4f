"""Room in dynamo's recompile limit for the graphs a cache adds, while a cache is open.

Dynamo counts compiled variants per *code object*, and every block of one class shares its
``forward``'s code: a model whose blocks come in three shapes (SD3.5: dual-attention blocks,
plain ones, a context-pre-only last one) already uses three of the default eight. Under a cache
the few things that stay Python per generation multiply that: the first call of a generation
(nothing kept yet: a plain compute) and each guidance branch (split classifier-free guidance
keeps one output per branch) get graphs of their own. That is bounded (shapes x branches x 2),
independent of steps, layers and the schedule, but it can pass eight, after which dynamo would
silently run those blocks uncompiled. So while any cache is open the limit is raised to
``FACTOR`` times what it was, and put back when the last one closes (unless the user changed it
in between, which is then left alone). A cache that is never closed releases its hold when its
handle is garbage collected (a ``weakref.finalize`` the handle sets up: once its model is dropped),
so a leaked cache does not leave the limit raised for the rest of the process.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

__all__ = ["FACTOR", "acquire", "release"]

logger = logging.getLogger(__name__)

FACTOR = 6  # first call or not (2) x up to 3 guidance branches

_lock = threading.Lock()
_state: dict[str, Any] = {"holders": 0, "saved": None, "raised": None}


def _config() -> Any:
    try:
        import torch._dynamo.config as config
    except Exception:  # pragma: no cover - dynamo is part of every supported torch
        return None
    return config if hasattr(config, "recompile_limit") else None


def acquire() -> None:
    """A cache opened: make sure the limit has room for its graphs."""
    config = _config()
    if config is None:
        return
    with _lock:
        _state["holders"] += 1
        if _state["holders"] > 1:
            return
        before = config.recompile_limit
        _state["saved"], _state["raised"] = before, before * FACTOR
        config.recompile_limit = before * FACTOR
        logger.debug("dynamo recompile_limit %d -> %d while a cache is open", before, before * FACTOR)


def release() -> None:
    """A cache closed: the last one puts the limit back (if nobody else changed it meanwhile)."""
    config = _config()
    if config is None:
        return
    with _lock:
        if _state["holders"] == 0:
            return
        _state["holders"] -= 1
        if _state["holders"] == 0:
            if config.recompile_limit == _state["raised"]:
                config.recompile_limit = _state["saved"]
            _state["saved"] = _state["raised"] = None
