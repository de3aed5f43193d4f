"""What every peer adapter shares: restoring the model exactly, quieting what the peers print.

* :func:`restore_modules` undoes, on exit, every attribute, child, parameter or buffer a peer set on
  any submodule (after the library's own removal ran);
* :func:`quiet_loggers` raises the peers' log levels while they run;
* :class:`StdoutSilencer` discards stdout during a model call (dit-smoothcache prints per call).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

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


class _StepTracker:
    """A pre-hook on the model that follows the reference loop: one call per step, timesteps descending.

    Each call either starts a generation (first call, or the timestep went up) or is the next step of
    the current one. Peers register what to do at a new generation (reset their state) and around
    each step (set diffusers' cache context, silence prints).
    """

    def __init__(self, num_steps: int) -> None:
        self.num_steps = num_steps
        self.timestep: float = float("nan")
        self.step_index = -1
        self.generations = 0
        self._previous: float | None = None
        self._warned = False
        self.on_generation: list[Callable[[], None]] = []
        self.before_step: list[Callable[[], None]] = []
        self.after_step: list[Callable[[], None]] = []

    def current_timestep(self) -> int:
        return int(self.timestep)

    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is None:
            raise PeerError(
                "the model was called without a timestep; peer caches need the reference loop's "
                "model(hidden_states=..., timestep=..., class_labels=...) calls."
            )
        t = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)
        if self._previous is None or t > self._previous:
            if self._previous is not None and self.step_index + 1 != self.num_steps and not self._warned:
                self._warned = True
                warnings.warn(
                    f"a generation ran {self.step_index + 1} steps but the peer was set up for "
                    f"num_inference_steps={self.num_steps}; step-indexed settings (warm-up, MagCache ratios, "
                    "SmoothCache schedules) are then misaligned.",
                    stacklevel=2,
                )
            self.step_index = 0
            self.generations += 1
            for fn in self.on_generation:
                fn()
        else:
            self.step_index += 1
            if self.step_index >= self.num_steps:
                raise PeerError(
                    f"step {self.step_index + 1} of a generation set up for num_inference_steps="
                    f"{self.num_steps}: pass the number of steps sample() runs to apply_peer()."
                )
        self._previous = t
        self.timestep = t
        for fn in self.before_step:
            fn()

    def _post(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        for fn in self.after_step:
            fn()

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[_StepTracker]:
        pre = model.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True)
        post = model.register_forward_hook(self._post, with_kwargs=True, always_call=True)
        try:
            yield self
        finally:
            pre.remove()
            post.remove()


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
