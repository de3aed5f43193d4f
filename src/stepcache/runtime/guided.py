"""Guidance reuse at run time: compute a component for the conditional branch only.

Under classifier-free guidance each component runs twice per step: for the conditional input and for
the unconditional one, either in one call on a stacked batch (``"cond-first"`` / ``"uncond-first"``:
DiT, PixArt, SD3 pipelines) or in two calls (``"split"``: Wan, Flux true CFG). At a step the
:class:`~stepcache.guidance.GuidanceReuse` plan marks for a component, :class:`Guide` runs the
component on the conditional half only and stands in for the unconditional half with

* ``"reuse"``: the unconditional output of the component's last full computation (plain per-branch
  reuse, half the work of the step);
* ``"difference"``: the conditional output just computed plus the difference (unconditional minus
  conditional) kept from the last full computation: FasterCache's observation that the gap between
  the branches drifts more slowly than either branch.

Anything a full computation did not leave (the first step, a new batch size) makes it compute in full,
so a plan can never make an output up from nothing. Eager calls only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree

from ..discovery import Component
from ..errors import ScheduleError
from .introspect import first_tensor_shape

__all__ = ["Guide", "guidance_batch", "guided_steps"]


def guided_steps(
    guidance: Any, num_steps: int, components: Sequence[Component]
) -> dict[str, tuple[bool, ...]]:
    """Component name -> the steps at which a :class:`~stepcache.guidance.GuidanceReuse` plan has it
    stand in for the unconditional branch (components it never does are left out; none without a plan).

    Raises:
        ScheduleError: the plan has another step count than the schedule (``num_steps``).
    """
    if guidance is None:
        return {}
    if guidance.num_steps != num_steps:
        raise ScheduleError(
            f"the guidance plan has {guidance.num_steps} steps, the schedule {num_steps}: build both "
            "for the same step count."
        )
    return {name: plan for name, plan in guidance.resolve(components).items() if any(plan)}


def guidance_batch(args: tuple, kwargs: dict) -> bool:
    """Whether a denoiser call's input is a stacked classifier-free guidance batch: every pipeline
    stacks the same latents twice (``torch.cat([latents] * 2)``), so its two halves are equal. A
    generation without guidance (guidance scale 1) passes distinct latents; an even batch of them
    must not be split into branches. One comparison (a host sync on a GPU) per generation."""
    x = next(
        (kwargs[k] for k in ("hidden_states", "sample", "x") if isinstance(kwargs.get(k), torch.Tensor)), None
    )
    if x is None:
        x = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    if x is None or x.dim() == 0 or x.shape[0] % 2:
        return False
    h = x.shape[0] // 2
    return bool(torch.equal(x[:h], x[h:]))


def _batch(args: tuple, kwargs: dict) -> int | None:
    """The batch size of the call: the first dimension of its first tensor argument."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


def _rows(tree: Any, n: int, rows: slice) -> Any:
    """Every tensor of ``tree`` whose first dimension is the batch ``n``, cut to ``rows``."""
    return _pytree.tree_map(
        lambda t: t[rows] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n else t, tree
    )


class Guide:
    """One component's guidance state: the plan (per step, whether the unconditional branch is
    stood in for), and what its last full computation left to stand in with.

    ``halved`` after :meth:`call`: 1 when the call computed the conditional half only (stacked
    batch), 0 when it computed in full; ``skipped`` (split calls): the unconditional call did not
    compute at all. ``active``: False for a generation whose batch is not a stacked guidance batch
    (:func:`guidance_batch`): every call then computes in full.
    """

    __slots__ = (
        "active",
        "cond",
        "halved",
        "kept",
        "kept_bytes",
        "layout",
        "mode",
        "shape",
        "skip",
        "skipped",
        "uncond_branch",
    )

    def __init__(self, skip: tuple[bool, ...], mode: str, layout: str, uncond_branch: int = 1) -> None:
        self.skip, self.mode, self.layout, self.uncond_branch = skip, mode, layout, uncond_branch
        self.kept: Any = None  # the difference (mode "difference") or the unconditional output ("reuse")
        self.cond: Any = None  # split calls: this step's conditional output (or the last full one's)
        self.shape: tuple[int, ...] | None = None
        self.halved = self.skipped = False
        self.kept_bytes = 0  # what ``kept`` holds (the slot adds it to its stored bytes)
        self.active = True

    def clear(self) -> None:
        self.kept = self.cond = self.shape = None
        self.kept_bytes = 0

    def _hold(self, kept: Any, shape: tuple[int, ...] | None) -> None:
        self.kept, self.shape = kept, shape
        self.kept_bytes = sum(t.nbytes for t in _pytree.tree_leaves(kept) if isinstance(t, torch.Tensor))

    def call(self, original: Callable[..., Any], args: tuple, kwargs: dict, step: int, branch: int) -> Any:
        self.halved = self.skipped = False
        if self.layout == "split":
            return self._split(original, args, kwargs, step, branch)
        n = _batch(args, kwargs)
        if n is None or n % 2 or not self.active:
            return original(*args, **kwargs)  # not a stacked guidance batch: nothing to halve
        h = n // 2
        cond, uncond = (
            (slice(0, h), slice(h, n)) if self.layout == "cond-first" else (slice(h, n), slice(0, h))
        )
        shape = first_tensor_shape(args, kwargs)
        if self.skip[step] and self.kept is not None and self.shape == shape:
            out_c = original(*_rows(args, n, cond), **_rows(kwargs, n, cond))
            stand_in = _combine(out_c, self.kept, self.mode)
            self.halved = True
            first, second = (out_c, stand_in) if self.layout == "cond-first" else (stand_in, out_c)
            return _pytree.tree_map(functools.partial(_join, h), first, second)
        out = original(*args, **kwargs)
        if any(self.skip[step + 1 :]):  # a later step stands in: keep what it needs
            out_c, out_u = _rows(out, n, cond), _rows(out, n, uncond)
            self._hold(_keep(out_c, out_u, self.mode), shape)
        return out

    def _split(self, original: Callable[..., Any], args: tuple, kwargs: dict, step: int, branch: int) -> Any:
        shape = first_tensor_shape(args, kwargs)
        if branch != self.uncond_branch:  # the conditional call always computes; the other reads it
            out = original(*args, **kwargs)
            self.cond = out
            return out
        cond, self.cond = self.cond, None  # held from the conditional call to this one only
        if self.skip[step] and self.kept is not None and self.shape == shape and cond is not None:
            self.skipped = True
            return _combine(cond, self.kept, self.mode)
        out = original(*args, **kwargs)
        if any(self.skip[step + 1 :]) and cond is not None:
            self._hold(_keep(cond, out, self.mode), shape)
        return out


def _join(h: int, a: Any, b: Any) -> Any:
    """One output of the two halves: stacked when it has the half batch, else the computed half's."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() > 0 and a.shape[0] == h:
        return torch.cat([a, b])
    return a


def _keep(cond: Any, uncond: Any, mode: str) -> Any:
    if mode == "reuse":
        return _pytree.tree_map(lambda u: u.clone() if isinstance(u, torch.Tensor) else u, uncond)
    return _pytree.tree_map(lambda c, u: u - c if isinstance(u, torch.Tensor) else u, cond, uncond)


def _combine(cond: Any, kept: Any, mode: str) -> Any:
    if mode == "reuse":
        return kept
    return _pytree.tree_map(lambda c, d: c + d if isinstance(c, torch.Tensor) else c, cond, kept)
