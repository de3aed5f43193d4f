"""One cached component at run time: the per-step decision and the outputs it keeps.

The decision for a step is read from the plan (eager calls, per call) or filled into tensors once
when the step starts (compiled calls, :mod:`.compiled`), so the intercepted call only reads a flag
and a list: near-zero overhead, nothing printed. Nothing in the intercepted call mutates a Python
number under ``torch.compile`` either: compiled calls are counted after each denoiser call, outside
the hot path. So the hot path adds no graph break and no value-dependent recompilation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..discovery import Component
from ..schedule import COMPUTE, FORECASTS, REUSE, forecast_coefficients, forecast_sources, liveness
from .compiled import Traced
from .extrapolate import extrapolate, extrapolate2
from .guided import Guide
from .introspect import count_macs, first_tensor_shape
from .offload import Offloader, nbytes
from .steps import StepTracker
from .storage import pack, unpack

__all__ = ["Bytes", "Slot"]


class Bytes:
    """Bytes held in the stores of a group of slots (one component type, or all): now and at peak.

    Shared by the slots of the group; a slot updates it only when its store changes."""

    __slots__ = ("now", "peak")

    def __init__(self) -> None:
        self.now = self.peak = 0


class Slot:
    """Runtime state of one cached component: what it does at each step, and what it keeps.

    ``store[branch]`` is ``(input shape, last output, previous output or None, the one before or None)``
    or None: the most recent computed outputs (a list, not a dict: dynamo guards on one list item
    where it would guard on a dict's whole key set, which multiplied compiled graphs), so a reuse
    step can copy the last one or extrapolate from two or three. What to do at the current step
    (``mode``) and the extrapolation weights (``coef``, :func:`stepcache.schedule.forecast_coefficients`)
    are set once per step.
    ``held`` is the bytes the store holds; eager calls update it (and the shared ``bytes_type`` and
    ``bytes_all``) when they change the store, compiled ones on the host after each denoiser call.

    Collaborators it holds: ``storage`` (the dtype kept outputs are packed in, :mod:`.storage`),
    ``offload`` (an :class:`~.offload.Offloader` moving them to host memory and back), ``guide`` (a
    :class:`~.guided.Guide`: the guided half-call) and ``traced`` (a :class:`~.compiled.Traced`:
    under ``torch.compile`` the decision is data, chosen by ``torch.cond``).
    """

    __slots__ = (
        "bytes_all",
        "bytes_type",
        "coef",
        "coefs",
        "coefs1",
        "computed",
        "count",
        "guide",
        "halved",
        "held",
        "history",
        "keep",
        "macs",
        "mode",
        "module",
        "name",
        "offload",
        "original",
        "plan",
        "reused",
        "storage",
        "store",
        "traced",
        "tracker",
        "type",
    )

    def __init__(
        self,
        comp: Component,
        plan: tuple[int, ...],
        original: Callable[..., Any],
        tracker: StepTracker,
        count: bool,
        bytes_type: Bytes | None = None,
        bytes_all: Bytes | None = None,
        *,
        storage: torch.dtype | None = None,
        guide: Guide | None = None,
        gains: Any = None,
    ):
        self.name, self.type, self.module = comp.name, comp.type, comp.module
        self.original, self.tracker, self.count = original, tracker, count
        self.held = 0
        self.storage = storage  # kept outputs stored in this dtype (None: as computed)
        self.offload: Offloader | None = None  # moves kept outputs to host memory and back
        self.bytes_type = Bytes() if bytes_type is None else bytes_type
        self.bytes_all = Bytes() if bytes_all is None else bytes_all
        self.set_plan(plan, gains)
        self.mode, self.coef = COMPUTE, (0.0, 0.0)
        self.store: list[tuple[tuple[int, ...] | None, Any, Any, Any] | None] = [None, None]
        self.computed = self.reused = self.halved = 0
        self.guide = guide  # guidance reuse (stepcache.guidance), eager calls only
        self.macs: float | None = None
        self.traced = Traced()  # the compiled path

    def set_plan(self, plan: tuple[int, ...], gains: Any = None) -> None:
        """Follow ``plan``; ``gains`` (per step ``(g_alpha, g_beta)``, floats or rows of a tensor, which
        may carry gradients for :func:`stepcache.fit_forecasts`) scale its forecast weights."""
        self.plan = plan
        self.keep, self.history = liveness(plan)
        # Extrapolation weights per step, from the last computes a > b > c before it (0 where none):
        # the plan's own (coefs), and first order (coefs1, when a store lacks the oldest output).
        self.coefs = [(0.0, 0.0)] * len(plan)
        self.coefs1 = [0.0] * len(plan)
        for s, v, a, b, c in forecast_sources(plan):
            if v in FORECASTS:
                alpha, beta = forecast_coefficients(v, s, a, b, c)
                alpha1 = forecast_coefficients(REUSE if b is None else 2, s, a, b)[0]
                if gains is not None:
                    g_alpha, g_beta = gains[s][0], gains[s][1]
                    alpha, beta, alpha1 = g_alpha * alpha, g_beta * beta, g_alpha * alpha1
                self.coefs[s] = (alpha, beta)
                self.coefs1[s] = alpha1

    def start_step(self, step: int) -> None:
        """Compiled graphs read the step's plan from tensors: fill them (eager calls read the plan)."""
        self.mode, self.coef = self.plan[step], self.coefs[step]
        self.traced.start_step(self.mode, self.coef)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return self.traced.forward(self, args, kwargs)
        tracker = self.tracker
        step, branch = tracker.step, tracker.branch  # eager: the plan is read here, per call
        mode = self.plan[step]
        off = self.offload
        if off is not None:
            off.begin(self, step, branch)
        store = self.store
        entry = store[branch] if branch < len(store) else None
        if mode != COMPUTE and entry is not None and entry[0] == first_tensor_shape(args, kwargs):
            # The shape check refuses an output kept for a differently shaped input (a new batch size).
            self.reused += 1
            if mode == REUSE or entry[2] is None:
                if off is not None or self.storage is not None:
                    return self._read(entry, step, branch, 0)
                return entry[1]
            depth = 2 if self.history == 2 and entry[3] is not None else 1
            if off is not None or self.storage is not None:
                return self._read(entry, step, branch, depth)
            if depth == 2:
                alpha, beta = self.coefs[step]
                return extrapolate2(entry[1], entry[2], entry[3], alpha, beta)
            return extrapolate(
                entry[1], entry[2], self.coefs1[step] if self.history == 2 else self.coefs[step][0]
            )
        guide = self.guide
        if guide is not None:  # may compute the conditional half only, or stand in for this branch
            was = guide.kept_bytes
            out = guide.call(self.original, args, kwargs, step, branch)
            if guide.kept_bytes != was:
                self._change(guide.kept_bytes - was)
            if guide.skipped:
                self.reused += 1
            else:
                self.computed += 1
                self.halved += guide.halved
        elif self.count and self.macs is None:
            self.computed += 1
            out, self.macs = count_macs(self.original, *args, **kwargs)
        else:
            self.computed += 1
            out = self.original(*args, **kwargs)
        held = self.keep[step]
        if not held:  # nothing reads it: hold no memory (and drop what is held)
            if entry is not None:
                store[branch] = None
                self._change(-nbytes(entry[1]) - nbytes(entry[2]) - nbytes(entry[3]))
            if off is not None:
                off.stored(entry, None)
                off.end(self, step, branch)
            return out
        shape = first_tensor_shape(args, kwargs)
        previous = before = None
        if held > 1 and entry is not None and entry[0] == shape:
            previous = entry[1]
            before = entry[2] if held > 2 else None
        kept = out if self.storage is None else pack(out, self.storage)
        self.put(branch, (shape, kept, previous, before))
        # Bytes: the new output in, what the entry held and no longer holds out (the last output
        # stays as the previous one in a forecasting plan, and so on). Replacing an output by one of
        # the same size changes nothing.
        delta = kept.nbytes if type(kept) is torch.Tensor else nbytes(kept)
        if entry is not None:
            if entry[3] is not None:
                delta -= nbytes(entry[3])
            if before is None and entry[2] is not None:
                delta -= nbytes(entry[2])
            if previous is None:
                last = entry[1]
                delta -= last.nbytes if type(last) is torch.Tensor else nbytes(last)
        if delta:
            self._change(delta)
        if off is not None:
            off.stored(entry, self.store[branch])
            off.end(self, step, branch)
        return out

    def _read(self, entry: tuple, step: int, branch: int, depth: int) -> Any:
        """A reuse step's output when kept outputs are packed or offloaded: fetched, unpacked;
        extrapolated from ``depth`` earlier outputs (0: a copy)."""
        off = self.offload
        last = entry[1] if off is None else off.read(entry[1], self, branch, 1)
        out = unpack(last)
        if depth:
            prev = unpack(entry[2] if off is None else off.read(entry[2], self, branch, 2))
            if depth == 2:  # offload refuses second-order plans: only packed outputs get here
                alpha, beta = self.coefs[step]
                out = extrapolate2(out, prev, unpack(entry[3]), alpha, beta)
            else:
                out = extrapolate(out, prev, self.coefs1[step] if self.history == 2 else self.coefs[step][0])
        if off is not None:
            off.end(self, step, branch)
        return out

    def kept(self, branch: int) -> tuple[tuple[int, ...] | None, Any, Any, Any] | None:
        """What this component keeps for ``branch`` (None: nothing)."""
        store = self.store
        return store[branch] if branch < len(store) else None

    def put(self, branch: int, entry: tuple[tuple[int, ...] | None, Any, Any, Any]) -> None:
        if branch >= len(self.store):  # a third guidance branch (rare): grow once
            self.store.extend([None] * (branch + 1 - len(self.store)))
        self.store[branch] = entry

    def _change(self, delta: int) -> None:
        """The store's bytes changed by ``delta`` (eager code only: traced code counts nothing)."""
        self.held += delta
        kind, every = self.bytes_type, self.bytes_all
        kind.now += delta
        if kind.now > kind.peak:
            kind.peak = kind.now
        every.now += delta
        if every.now > every.peak:
            every.peak = every.now

    def recount(self) -> None:
        """Count the store's bytes afresh (on the host, after a compiled denoiser call)."""
        held = sum(nbytes(e[1]) + nbytes(e[2]) + nbytes(e[3]) for e in self.store if e is not None)
        if held != self.held:
            self._change(held - self.held)

    def tally(self, branch: int) -> None:
        """After a denoiser call: count a call its compiled graph made (:meth:`.Traced.count`)."""
        self.traced.count(self, branch)

    def clear(self) -> None:
        """Drop every stored output (the bytes held go back to zero; peaks stay)."""
        self.store[:] = [None] * len(self.store)
        self.traced.seen.clear()
        if self.guide is not None:
            self.guide.clear()
        self.mode = COMPUTE
        if self.held:
            self._change(-self.held)
