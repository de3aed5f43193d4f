"""What every peer adapter shares: restoring the model exactly, quieting what the peers print.

* :func:`restore_modules` undoes, on exit, every attribute, child, parameter or buffer a peer set on
  any submodule (after the library's own removal ran);
* :func:`quiet_loggers` raises the peers' log levels while they run;
* :class:`StdoutSilencer` discards stdout during a model call (dit-smoothcache prints per call);
* :func:`step_tracker` drives a peer from stepcache's own step tracker (the same reading of
  timesteps as stepcache's cache), :func:`peer_errors` translates its errors.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from stepcache.errors import ScheduleLengthError, StepCacheError
from stepcache.runtime import Session, StepTracker, track_steps

from . import PeerError

logger = logging.getLogger(__name__)


class Discard(io.TextIOBase):
    """A text sink (SmoothCacheHelper prints one line per wrapped call)."""

    def write(self, s: str) -> int:
        return len(s)


class StdoutSilencer:
    """Discards stdout between :meth:`enter` and :meth:`exit` (a model call), and only then.

    Tolerates an ``exit`` without ``enter`` (a pre-hook that raised before entering).
    """

    def __init__(self) -> None:
        self._redirect: contextlib.redirect_stdout[Any] | None = None

    def enter(self) -> None:
        if self._redirect is None:
            self._redirect = contextlib.redirect_stdout(Discard())
            self._redirect.__enter__()

    def exit(self) -> None:
        if self._redirect is not None:
            redirect, self._redirect = self._redirect, None
            redirect.__exit__(None, None, None)


def step_tracker(model: nn.Module, num_steps: int) -> tuple[StepTracker, Session]:
    """stepcache's step tracker for a peer set up for ``num_steps`` steps, and the session driving it.

    The session (:func:`stepcache.runtime.track_steps`: a pre-hook that runs first, a post-hook that
    runs even when the call raises) reads the ``timestep`` argument of each model call. It is built
    here, before the peer replaces any ``forward``, and entered after the peer is enabled. Peers
    register on the tracker what to do at a new generation (``on_generation``: reset their state) and
    around each call (``on_call_begin`` / ``on_call_end``: diffusers' cache context, silencing).

    A generation that runs a different number of steps than set up warns once (step-indexed settings
    are then misaligned); one that runs more raises in the tracker (see :func:`peer_errors`).
    """
    tracker = StepTracker(num_steps)
    try:
        session = track_steps(model, tracker, timestep_arg="timestep")
    except StepCacheError as e:
        raise PeerError(
            f"peer caches need the reference loop's model(hidden_states=..., timestep=..., class_labels=...) "
            f"calls: {e}"
        ) from e
    warned = False

    def check_length() -> None:  # runs before the next generation starts: step is the last one's
        nonlocal warned
        if tracker.step >= 0 and tracker.step + 1 != num_steps and not warned:
            warned = True
            warnings.warn(
                f"a generation ran {tracker.step + 1} steps but the peer was set up for "
                f"num_inference_steps={num_steps}; step-indexed settings (warm-up, MagCache ratios, "
                "SmoothCache schedules) are then misaligned.",
                stacklevel=2,
            )

    tracker.on_generation.append(check_length)
    return tracker, session


@contextmanager
def peer_errors(num_steps: int) -> Iterator[None]:
    """Turn the tracker's error for a generation longer than set up into a :class:`PeerError`."""
    try:
        yield
    except ScheduleLengthError as e:
        raise PeerError(
            f"a generation ran more steps than num_inference_steps={num_steps}: pass the number of steps "
            f"sample() runs to apply_peer(). ({e})"
        ) from e


_MODULE_DICTS = ("_modules", "_parameters", "_buffers")


@contextmanager
def restore_modules(model: nn.Module) -> Iterator[None]:
    """On exit, undo every attribute, child, parameter or buffer set on any submodule meanwhile.

    Runs after the library's own removal; it catches what that leaves behind (an instance ``forward``,
    ``_diffusers_hook`` registries, cache-dit's ``_norm1_emb`` child and ``_is_patched`` flag).
    Hook dictionaries are left alone: the peers use none, and a caller's own hooks must survive.
    """
    saved = []
    for module in model.modules():
        attrs = dict(vars(module))
        inner = {key: dict(attrs[key]) for key in _MODULE_DICTS if key in attrs}
        saved.append((module, attrs, inner))
    try:
        yield
    finally:
        cleaned = []
        for module, attrs, inner in saved:
            current = vars(module)
            for key in [k for k in current if k not in attrs]:
                del current[key]
                cleaned.append(f"{type(module).__name__}.{key}")
            for key, value in attrs.items():
                if current.get(key, _MISSING) is not value:
                    current[key] = value
                    cleaned.append(f"{type(module).__name__}.{key}")
            for key, before in inner.items():
                now = current[key]
                if list(now) != list(before) or any(now[k] is not before[k] for k in now):
                    now.clear()
                    now.update(before)
                    cleaned.append(f"{type(module).__name__}.{key}")
        if cleaned:
            logger.debug("restored after peer: %s", sorted(set(cleaned)))


_MISSING = object()


@contextmanager
def quiet_loggers(prefixes: Sequence[str], level: int = logging.ERROR) -> Iterator[None]:
    """Raise the level of the named loggers (and their existing children) for the duration."""
    manager = logging.Logger.manager
    names = [
        name
        for name in list(manager.loggerDict)
        if any(name == p or name.startswith(p + ".") for p in prefixes)
    ]
    names += [p for p in prefixes if p not in names]
    loggers = [logging.getLogger(name) for name in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.level))
    try:
        yield
    finally:
        for lg, old in zip(loggers, before, strict=True):
            lg.setLevel(old)
