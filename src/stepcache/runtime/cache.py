"""The runtime cache: apply a schedule while a model generates.

``with stepcache.cache(target, schedule) as handle:`` intercepts every scheduled component. On a
compute step the component runs and its output is kept (one per guidance branch); on a reuse step
the kept output is returned without running the component. The block's gates, residual additions
and norms still run, which is what makes reuse safe.

The per-step decision is made once per step (when the step starts) and stored on each component's
slot, so the intercepted call only reads a flag and a dict: near-zero overhead, nothing printed.
Nothing in the intercepted call mutates a Python number either: calls are counted after each
denoiser call, outside the hot path, by checking which stored outputs were replaced. So under
``torch.compile`` the hot path adds no graph break and no value-dependent recompilation.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .._logging import follow_diffusers
from ..discovery import DEFAULT_TYPES, Component, denoisers_of, discover, unwrap
from ..distributed import check_schedule_agreement
from ..errors import ScheduleError, ScheduleLengthError, StepCacheError, StepCacheWarning
from ..schedule import COMPUTE, FORECASTS, REUSE, Schedule, forecast_coefficients, liveness
from . import headroom
from .guided import Guide
from .introspect import count_macs, fingerprint, first_tensor_shape, model_class, weights_state
from .offload import Offloader, OffloadStats, nbytes
from .session import Installer, Session, active_session, hook_state
from .stats import CacheStats, TypeStats
from .steps import SchedulerWatch, StepTracker, pipeline_steps
from .storage import pack, resolve_storage_dtype, unpack

__all__ = ["CacheHandle", "cache", "disable", "summary"]

logger = logging.getLogger(__name__)


class _Bytes:
    """Bytes held in the stores of a group of slots (one component type, or all): now and at peak.

    Shared by the slots of the group; a slot updates it only when its store changes."""

    __slots__ = ("now", "peak")

    def __init__(self) -> None:
        self.now = self.peak = 0


class _Slot:
    """Runtime state of one cached component.

    ``store[branch]`` is ``(input shape, last output, previous output or None, the one before or None)``
    or None: the most recent computed outputs (a list, not a dict: dynamo guards on one list item
    where it would guard on a dict's whole key set, which multiplied compiled graphs), so a reuse
    step can copy the last one or extrapolate from two or three. What to do at the current step
    (``mode``) and the extrapolation weights (``coef``, :func:`stepcache.schedule.forecast_coefficients`)
    are set once per step.
    ``held`` is the bytes the store holds; eager calls update it (and the shared ``bytes_type`` and
    ``bytes_all``) when they change the store, compiled ones on the host after each denoiser call.

    Under ``torch.compile`` the decision is data instead (:meth:`_traced`): ``pred``, ``coef_t``
    and ``beta_t`` are tensors filled on the host when a step starts and read by ``torch.cond`` when the graph
    runs, so dynamo never specialises a graph on the plan. One graph then serves every step and
    every layer, whatever the schedule (per type or per layer), and no recompile limit is reached.
    """

    __slots__ = (
        "beta_t",
        "bytes_all",
        "bytes_type",
        "coef",
        "coef_t",
        "coefs",
        "coefs1",
        "compiled",
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
        "pred",
        "reused",
        "seen",
        "storage",
        "store",
        "traced_call",
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
        bytes_type: _Bytes | None = None,
        bytes_all: _Bytes | None = None,
    ):
        self.name, self.type, self.module = comp.name, comp.type, comp.module
        self.original, self.tracker, self.count = original, tracker, count
        self.held = 0
        self.storage: torch.dtype | None = None  # kept outputs stored in this dtype (None: as computed)
        self.offload: Offloader | None = None  # moves kept outputs to host memory and back
        self.bytes_type = _Bytes() if bytes_type is None else bytes_type
        self.bytes_all = _Bytes() if bytes_all is None else bytes_all
        self.set_plan(plan)
        self.mode, self.coef = COMPUTE, (0.0, 0.0)
        self.store: list[tuple[tuple[int, ...] | None, Any, Any, Any] | None] = [None, None]
        self.seen: dict[int, bool] = {}  # compiled calls: branches already counted this generation
        self.computed = self.reused = self.halved = 0
        self.guide: Guide | None = None  # guidance reuse (stepcache.guidance), eager calls only
        self.macs: float | None = None
        # Compiled path: the step's decision as tensors, on the host (torch.cond reads its predicate
        # there, so no device sync).
        self.compiled = self.traced_call = False
        self.pred = torch.ones((), dtype=torch.bool)
        self.coef_t = torch.zeros((), dtype=torch.float32)
        self.beta_t = torch.zeros((), dtype=torch.float32)

    def set_plan(self, plan: tuple[int, ...]) -> None:
        self.plan = plan
        self.keep, self.history = liveness(plan)
        # Extrapolation weights per step, from the last computes a > b > c before it (0 where none):
        # the plan's own (coefs), and first order (coefs1, when a store lacks the oldest output).
        self.coefs = [(0.0, 0.0)] * len(plan)
        self.coefs1 = [0.0] * len(plan)
        a = b = c = None
        for s, v in enumerate(plan):
            if v == COMPUTE:
                a, b, c = s, a, b
            elif v in FORECASTS and a is not None:
                self.coefs[s] = forecast_coefficients(v, s, a, b, c)
                self.coefs1[s] = forecast_coefficients(REUSE if b is None else 2, s, a, b)[0]

    def start_step(self, step: int) -> None:
        """Compiled graphs read the step's plan from tensors: fill them (eager calls read the plan)."""
        self.mode, self.coef = self.plan[step], self.coefs[step]
        if self.compiled:
            self.pred.fill_(self.mode == COMPUTE)
            self.coef_t.fill_(self.coef[0])
            self.beta_t.fill_(self.coef[1])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return self._traced(args, kwargs)
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
                return _extrapolate2(entry[1], entry[2], entry[3], alpha, beta)
            return _extrapolate(
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
        self._put(branch, (shape, kept, previous, before))
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
                out = _extrapolate2(out, prev, unpack(entry[3]), alpha, beta)
            else:
                out = _extrapolate(out, prev, self.coefs1[step] if self.history == 2 else self.coefs[step][0])
        if off is not None:
            off.end(self, step, branch)
        return out

    def kept(self, branch: int) -> tuple[tuple[int, ...] | None, Any, Any, Any] | None:
        """What this component keeps for ``branch`` (None: nothing)."""
        store = self.store
        return store[branch] if branch < len(store) else None

    def _put(self, branch: int, entry: tuple[tuple[int, ...] | None, Any, Any, Any]) -> None:
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

    def _traced(self, args: tuple, kwargs: dict) -> Any:
        """The forward dynamo traces: compute or reuse chosen by ``torch.cond`` on ``self.pred``.

        Only what is fixed for a whole generation is Python here (the guidance branch, whether an
        output is kept for this input shape, the plan's forecast order), so the number of graphs
        is bounded by those few cases, never by layers, steps or the plan's values.
        """
        self.compiled = self.traced_call = self.tracker.compiled = True
        branch = self.tracker.branch
        entry = self.store[branch] if branch < len(self.store) else None
        shape = first_tensor_shape(args, kwargs)
        if entry is None or entry[0] != shape:  # nothing kept for this input: compute (a static case)
            out = self.original(*args, **kwargs)
            # Kept as the later graphs' cond outputs will be (contiguous), so their guards on the
            # kept tensors' strides hold from the first reuse on: no recompile per layout. A
            # forecasting plan keeps copies as its earlier outputs too (the weights are 0 until
            # enough computations exist), so the graphs never depend on how many outputs are kept yet.
            history = self.history
            self._put(
                branch,
                (
                    shape,
                    _own(out),
                    _clone(out) if history >= 1 else None,
                    _clone(out) if history >= 2 else None,
                ),
            )
            return out
        last, prev, prev2 = entry[1], entry[2], entry[3]
        _warm_signature_cache(self.module)
        args = tuple(_pin_layout(a) for a in args)
        kwargs = {k: _pin_layout(v) for k, v in kwargs.items()}

        def compute() -> Any:
            return _own(self.original(*args, **kwargs))

        if not self.history:
            out = torch.cond(self.pred, compute, lambda: _clone(last), ())
            self._put(branch, (shape, out, None, None))
            return out
        # Forecasting plans keep two outputs (three for second order). torch.cond only chooses
        # compute or copy, as for copy plans; the extrapolation and the update of the kept outputs
        # are plain elementwise code after it (inductor miscompiled the three-output branch form):
        # the weights coef_t and beta_t are 0 except at a forecasting reuse, so a computed or copied
        # output passes through unchanged.
        before = last if prev is None else prev
        out = torch.cond(self.pred, compute, lambda: _clone(last), ())
        if self.history == 1:
            out = _extrapolate(out, _sub(last, before), self.coef_t, difference=True)
            self._put(branch, (shape, _where(self.pred, out, last), _where(self.pred, last, before), None))
            return out
        earlier = before if prev2 is None else prev2
        out = _extrapolate2(
            out, _sub(last, before), _sub(before, earlier), self.coef_t, self.beta_t, difference=True
        )
        self._put(
            branch,
            (
                shape,
                _where(self.pred, out, last),
                _where(self.pred, last, before),
                _where(self.pred, before, earlier),
            ),
        )
        return out

    def tally(self, branch: int) -> None:
        """After a denoiser call whose graph ran this component: count it. (Eager calls count
        themselves; a compiled call cannot, as dynamo would guard on the counters' values. The first
        call of a branch in a generation computes whatever the plan says.)"""
        if not self.traced_call:
            return
        self.traced_call = False
        if self.seen.get(branch) is None or self.mode == COMPUTE:
            self.computed += 1
        else:
            self.reused += 1
        self.seen[branch] = True

    def clear(self) -> None:
        """Drop every stored output (the bytes held go back to zero; peaks stay)."""
        self.store[:] = [None] * len(self.store)
        self.seen.clear()
        if self.guide is not None:
            self.guide.clear()
        self.mode = COMPUTE
        if self.held:
            self._change(-self.held)


def _warm_signature_cache(module: Any) -> None:
    """diffusers' attention forwards call ``inspect.signature(self.processor.__call__)``. Dynamo
    caches that per graph; first traced inside one torch.cond branch, the cached value cannot be
    used inside the next (whole-model compile traces many attentions in one graph). Asking for it
    once in the graph itself, outside any branch, makes every branch reuse a valid entry."""
    processor = getattr(module, "processor", None)
    if processor is not None and callable(processor):
        inspect.signature(processor.__call__)


def _pin_layout(value: Any) -> Any:
    """A component's tensor input with its layout fixed before ``torch.cond``. Inductor compiles
    the branches for the input's traced strides, but may later give the buffer it passes in a
    layout of its own choosing (a norm output laid out like DiT's transposed patch tokens), which
    its generated code then rejects (``assert_size_stride``). Forcing the traced stride order
    (a no-op when it already holds, in eager and aot_eager too) closes that gap."""
    if isinstance(value, torch.Tensor):
        return torch.ops.prims.inductor_force_stride_order(value, value.stride())
    return value


def _own(value: Any) -> Any:
    """An output as torch.cond can merge it with a kept copy. The parts of a tuple (two-stream
    attention slices one concatenated tensor) may be views at an offset: they are copied out, so
    both branches return tensors at offset 0 (the offset cannot be read while tracing)."""
    if isinstance(value, tuple):
        return _clone(value)
    return value


def _clone(value: Any) -> Any:
    """A contiguous copy of a kept output (torch.cond's branches may not return their inputs
    themselves). Contiguous whatever the source's layout (inductor picks its own layouts), so
    every kept tensor has the same strides at every step and dynamo's stride guards never fail."""
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    return value.clone(memory_format=torch.contiguous_format) if isinstance(value, torch.Tensor) else value


def _extrapolate(last: Any, previous: Any, coef: float | torch.Tensor, difference: bool = False) -> Any:
    """last + coef * (last - previous), through tuples of tensors (two-stream attention); with
    ``difference``, ``previous`` already is the difference (last - previous)."""
    if isinstance(last, tuple):
        return tuple(_extrapolate(a, b, coef, difference) for a, b in zip(last, previous, strict=True))
    if isinstance(last, torch.Tensor):
        return last + coef * (previous if difference else last - previous)
    return last


def _extrapolate2(
    last: Any,
    previous: Any,
    earlier: Any,
    alpha: float | torch.Tensor,
    beta: float | torch.Tensor,
    difference: bool = False,
) -> Any:
    """(last + alpha * (last - previous)) + beta * (previous - earlier), through tuples of tensors;
    with ``difference``, ``previous`` and ``earlier`` already are those two differences. One order of
    operations for the eager and the compiled path, so they agree bit for bit."""
    if isinstance(last, tuple):
        return tuple(
            _extrapolate2(a, b, c, alpha, beta, difference)
            for a, b, c in zip(last, previous, earlier, strict=True)
        )
    if isinstance(last, torch.Tensor):
        if difference:
            return last + alpha * previous + beta * earlier
        return last + alpha * (last - previous) + beta * (previous - earlier)
    return last


def _sub(a: Any, b: Any) -> Any:
    """a - b through tuples of tensors."""
    if isinstance(a, tuple):
        return tuple(_sub(x, y) for x, y in zip(a, b, strict=True))
    return a - b if isinstance(a, torch.Tensor) else a


def _where(pred: torch.Tensor, a: Any, b: Any) -> Any:
    """Elementwise choice through tuples of tensors, as a fresh contiguous tensor (kept outputs
    keep one layout, so dynamo's stride guards on them hold)."""
    if isinstance(a, tuple):
        return tuple(_where(pred, x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.where(pred, a, b).contiguous()
    return a


class CacheHandle:
    """A cache on one pipeline or denoiser. A context manager; ``close()`` restores the model exactly.

    :func:`cache` makes one and opens it. A handle built directly opens when its ``with`` block is
    entered (or on :meth:`open`); everything is validated when it is built, so a bad schedule fails
    before anything is installed.
    """

    def __init__(
        self,
        target: Any,
        schedule: Schedule | str | os.PathLike[str],
        *,
        blocks: Any = None,
        components: Any = None,
        types: Iterable[str] | None = None,
        on_length_mismatch: str = "error",
        timestep_arg: str | None = None,
        strict: bool = True,
        count_macs: bool = False,
        allow_other_caches: bool = False,
        installer: Installer | None = None,
        storage_dtype: Any = None,
        offload: bool = False,
        offload_lead: int | None = None,
        guidance: Any = None,
    ) -> None:
        schedule = _resolve_schedule(schedule)
        self._storage = resolve_storage_dtype(storage_dtype)
        if not isinstance(offload, bool):
            raise StepCacheError(f"offload must be True or False, got {offload!r}.")
        if offload_lead is not None and (
            isinstance(offload_lead, bool) or not isinstance(offload_lead, int) or offload_lead < 1
        ):
            raise StepCacheError(
                f"offload_lead must be a positive number of component calls (or None), got {offload_lead!r}."
            )
        if offload_lead is not None and not offload:
            raise StepCacheError(
                "offload_lead is the prefetch distance of offload=True; pass offload=True too."
            )
        self._offload_on, self._offload_lead = offload, offload_lead
        self._offloader: Offloader | None = None
        if on_length_mismatch not in ("error", "resample"):
            raise StepCacheError(
                f"on_length_mismatch must be 'error' or 'resample', got {on_length_mismatch!r}."
            )
        self.models = [m for _, m in denoisers_of(target)]
        self.model = self.models[0]
        want = schedule.meta.get("fingerprint")
        if strict and want and want != fingerprint(target):
            raise ScheduleError(
                f"this schedule was calibrated on {schedule.meta.get('model_class')} (fingerprint {want}), not on "
                f"this {model_class(target)} (fingerprint {fingerprint(target)}). Calibrate this model, "
                "or pass strict=False to apply it anyway."
            )
        _warn_if_changed(schedule, target)
        if types is None:
            types = ("block",) if "block" in schedule.plans else DEFAULT_TYPES
        found = discover(target, blocks=blocks, components=components, types=types)
        plans = schedule.resolve(found)
        if not plans:
            raise ScheduleError(
                "the schedule covers none of the discovered components; nothing would be cached."
            )
        second = sorted(name for name, plan in plans.items() if liveness(plan)[1] > 1)
        if offload and second:
            raise StepCacheError(
                f"offload=True does not support second-order forecasts (plan values 3 and 4), which keep "
                f"three outputs per component; {len(second)} component(s) use them (e.g. {second[0]}). "
                "Use first-order forecasts (schedule.with_forecast()) or copies with offload, or drop offload."
            )
        cached = [c for c in found if c.name in plans]
        self.guidance, self._guides = _guidance_plans(
            guidance, schedule, cached, on_length_mismatch, storage_dtype, offload
        )
        self.schedule = schedule  # always the schedule given: resampling never replaces it
        self._running = schedule  # the one the current generation follows (resampled if need be)
        self.components = [c for c in found if c.name in plans]
        self._pipeline = None if isinstance(target, nn.Module) else target
        self._resample = on_length_mismatch == "resample"
        self.tracker = StepTracker(num_steps=schedule.num_steps)
        self._boundary = SchedulerWatch(self._pipeline, self._relocate)
        self.tracker.boundary = self._boundary.new_generation
        self.tracker.position = self._boundary.position
        self._slots: dict[str, _Slot] = {}
        self._bytes: dict[str, _Bytes] = {}  # per component type, shared by its slots
        self._bytes_all = _Bytes()
        self._plans = plans
        self._count = count_macs
        self._generations = 0
        self.tracker.on_step.append(self._on_step)
        self.tracker.on_generation.append(self._on_generation)
        self.tracker.on_reset.append(self._clear)
        self.tracker.on_call_end.append(self._tally)
        self._session = Session(
            self.models,
            self.components,
            self._make_forward,
            self.tracker,
            timestep_arg=timestep_arg,
            installer=installer,
            allow_other_caches=allow_other_caches,
        )
        self._session.owner = self

    # ---------------------------------------------------------------- life cycle
    def _make_forward(self, comp: Component, original: Callable[..., Any]) -> Callable[..., Any]:
        kind = self._bytes.setdefault(comp.type, _Bytes())
        slot = _Slot(comp, self._plans[comp.name], original, self.tracker, self._count, kind, self._bytes_all)
        slot.storage = self._storage
        if comp.name in self._guides:
            g = self.guidance
            slot.guide = Guide(self._guides[comp.name], g.mode, g.layout, g.uncond_branch)
        self._slots[comp.name] = slot
        return slot.forward

    def open(self) -> CacheHandle:
        """Install the cache (a no-op when it is already active). All or nothing: on any failure
        nothing stays installed."""
        if self._session.open:
            return self
        check_schedule_agreement(self._plans, self.schedule.num_steps)  # ranks agree, or all raise
        message = (
            f"cache enabled on {len(self.components)} components "
            f"(compute fraction {self.schedule.compute_fraction:.3f})"
        )
        self.tracker.reset()
        try:
            self._session.install()
            self._boundary.install()
            if self._offload_on:
                slots = [self._slots[c.name] for c in self.components]  # call order: discovery order
                self._offloader = Offloader(slots, self._offload_lead)
                self._offloader.set_plans([s.plan for s in slots])
                for slot in slots:
                    slot.offload = self._offloader
        except BaseException:
            self._boundary.remove()
            self._session.remove()
            raise
        headroom.acquire()
        logger.debug(message)
        return self

    def close(self) -> None:
        """Remove every hook and stored output; the model is exactly as before."""
        was_open = self._session.open
        self._boundary.remove()
        self._session.remove()
        if was_open:
            headroom.release()
        if was_open:
            self.tracker.check_complete()  # a run shorter than the schedule gets a warning
        self._clear()  # drop stored outputs; counters stay readable through .stats
        if was_open:
            stats = self.stats
            for model in self.models:
                _LAST_STATS[model] = stats

    @property
    def running_schedule(self) -> Schedule:
        """The schedule the current generation follows: :attr:`schedule`, or (with
        ``on_length_mismatch="resample"``) it resampled to the run's step count."""
        return self._running

    @property
    def offload_stats(self) -> OffloadStats | None:
        """With ``offload=True``: the transfers of the last generation and the outputs resident on the
        device at each step (else None)."""
        return None if self._offloader is None else self._offloader.stats

    @property
    def active(self) -> bool:
        return self._session.open

    def __enter__(self) -> CacheHandle:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _relocate(self) -> None:
        """At the start of a pipeline's generation (eager code): if the transformer was compiled since
        the cache was enabled (``pipe.transformer = torch.compile(...)``, ``transformer.compile()``),
        move the step-tracking hooks outside the compiled call before it is first traced."""
        if not self._session.open or self._pipeline is None:
            return
        current = [m for _, m in denoisers_of(self._pipeline)]
        if [unwrap(m) for m in current] != [unwrap(m) for m in self._session.models]:
            return  # other models altogether: the next call's checks will say so
        if [hook_state(m) for m in current] != self._session.hooked:
            logger.info("the transformer was compiled after the cache was enabled: moving its step hooks")
            self._session.rehook(current)

    # ---------------------------------------------------------------- explicit steps
    def set_step(self, step: int, branch: int = 0) -> None:
        """Declare the step (and guidance branch) of the next denoiser calls.

        For models that receive no timestep, or are called through a path the denoiser's hooks do
        not see (facebookresearch DiT's ``forward_with_cfg`` calls ``self.forward`` directly). Once
        used, timesteps are ignored for the rest of this handle's life; step 0, branch 0 starts a
        new generation.
        """
        self.tracker.set_step(step, branch)

    def reset(self) -> None:
        """Forget the current generation: the next call starts the schedule afresh."""
        self.tracker.reset()

    # ---------------------------------------------------------------- stats
    @property
    def stats(self) -> CacheStats:
        by_type: dict[str, list[_Slot]] = {}
        for slot in self._slots.values():
            by_type.setdefault(slot.type, []).append(slot)
        out = {}
        for kind, slots in by_type.items():
            macs = (
                None
                if any(s.macs is None for s in slots if s.reused or s.halved)
                else sum((s.reused + 0.5 * s.halved) * (s.macs or 0) for s in slots)
            )
            held = self._bytes.get(kind) or _Bytes()
            out[kind] = TypeStats(
                len(slots),
                sum(s.computed for s in slots),
                sum(s.reused for s in slots),
                macs,
                stored_bytes=held.now,
                peak_stored_bytes=held.peak,
                halved=sum(s.halved for s in slots),
            )
        return CacheStats(out, self._generations, total_peak_bytes=self._bytes_all.peak)

    # ---------------------------------------------------------------- tracker callbacks
    def _on_step(self, step: int) -> None:
        if not self.tracker.compiled:
            return  # eager calls read the plan themselves
        for slot in self._slots.values():
            slot.start_step(step)

    def _on_generation(self) -> None:
        self._clear()
        n = pipeline_steps(self._pipeline)
        want = self.schedule.num_steps if n is None else n
        if want != self._running.num_steps:
            if want != self.schedule.num_steps and not self._resample:
                raise ScheduleLengthError(
                    f"the schedule has {self.schedule.num_steps} steps but the pipeline is set up for {n}. Use a "
                    f"schedule made for {n} steps, or cache(..., on_length_mismatch='resample')."
                )
            if want != self.schedule.num_steps:
                logger.info("resampling the schedule from %d to %d steps", self.schedule.num_steps, want)
            # Always from the schedule given, never from an earlier resampling of it.
            self._running = self.schedule.resample(want)
            self.tracker.num_steps = want
            plans = self._running.resolve(self.components)
            for name, slot in self._slots.items():
                slot.set_plan(plans[name])
        if self._offloader is not None:
            self._offloader.set_plans([s.plan for s in self._offloader.slots])
            self._offloader.reset()
        self._generations += 1

    def _tally(self) -> None:
        if not self.tracker.compiled:
            return  # eager calls counted themselves
        if self._guides:
            raise StepCacheError(
                "guidance reuse (cache(..., guidance=...)) works on eager calls only: it changes the batch a "
                "component runs on, which a compiled graph fixes. Cache the uncompiled model, or drop guidance=."
            )
        if self._storage is not None or self._offloader is not None:
            raise StepCacheError(
                "storage_dtype and offload work on eager calls only: under torch.compile the kept outputs "
                "live inside the graph's torch.cond. Cache the uncompiled model, or drop those options."
            )
        branch = self.tracker.branch
        for slot in self._slots.values():
            slot.tally(branch)
            slot.recount()  # stored bytes, sampled after each compiled call

    def _clear(self) -> None:
        for slot in self._slots.values():
            slot.clear()


def _warn_if_changed(schedule: Schedule, target: Any) -> None:
    """A schedule is calibrated on weights: say so when they (or their dtype, or adapters) changed."""
    recorded = {k: schedule.meta.get(k) for k in ("dtype", "adapters", "weights_digest")}
    if all(v is None for v in recorded.values()):
        return
    now = weights_state(target)
    changed = [k for k, v in recorded.items() if v is not None and now.get(k) != v]
    if changed:
        what = ", ".join(f"{k} {recorded[k]} -> {now[k]}" for k in changed)
        warnings.warn(
            f"the model changed since this schedule's calibration ({what}): a LoRA added or fused, another "
            "checkpoint or dtype changes which steps can be reused. Recalibrate for the best schedule.",
            StepCacheWarning,
            stacklevel=4,
        )


def _resolve_schedule(schedule: Any) -> Schedule:
    """A Schedule as given, or read from a file, a folder or a hub repository."""
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, (str, os.PathLike)):
        if os.path.isfile(schedule):
            return Schedule.load(os.fspath(schedule))
        from ..integrations.hub import resolve_schedule

        return resolve_schedule(schedule)
    raise ScheduleError(
        f"schedule must be a stepcache.Schedule, a schedule file, a folder or a hub repository id; "
        f"got {type(schedule).__name__}."
    )


def cache(
    target: Any,
    schedule: Schedule | str | os.PathLike[str],
    *,
    blocks: Any = None,
    components: Any = None,
    types: Iterable[str] | None = None,
    on_length_mismatch: str = "error",
    timestep_arg: str | None = None,
    strict: bool = True,
    count_macs: bool = False,
    allow_other_caches: bool = False,
    storage_dtype: Any = None,
    offload: bool = False,
    offload_lead: int | None = None,
    guidance: Any = None,
) -> CacheHandle:
    """Start caching ``target`` (a pipeline or denoiser module) with ``schedule``; returns the handle.

    ``with stepcache.cache(pipe, schedule) as handle:`` caches inside the block; without ``with``,
    caching lasts until ``handle.close()`` or :func:`disable`.

    Args:
        target: a diffusers pipeline (its transformer(s) are cached) or an ``nn.Module`` denoiser.
        schedule: a :class:`Schedule`, a schedule file, a folder holding ``stepcache_schedule.json``
            (a model folder, say) or a hub repository id.
        blocks, components, types: discovery overrides (see :func:`stepcache.discover`).
        on_length_mismatch: ``"error"`` (default) or ``"resample"`` when a run makes a different
            number of steps than the schedule has.
        timestep_arg: the denoiser's timestep parameter, when it is not one of the usual names.
        strict: refuse a schedule calibrated on a different model.
        count_macs: measure each component's MACs on its first eager call, under torch's FLOP counter
            (for ``stats.macs_saved``; off by default: it slows that first call down).
        allow_other_caches: stack on top of another library's cache (diffusers' cache hooks,
            cache-dit) instead of refusing; its skipped calls then count as this cache's reuse.
        storage_dtype: keep outputs as ``"bf16"``, ``"fp16"`` or ``"fp8"`` (e4m3 with a per-tensor scale)
            and convert them back on read; None keeps them as computed. Eager calls only.
        offload: keep outputs in (pinned, on CUDA) host memory between their reads, moved on a transfer
            schedule computed from the plan (:func:`stepcache.runtime.offload.transfer_schedule`);
            ``handle.offload_stats`` reports what moved. Eager calls only.
        offload_lead: component calls between a fetch and its read (default: one step).
        guidance: a :class:`stepcache.guidance.GuidanceReuse` (or its file): at the compute steps it
            marks, a component computes the conditional guidance branch only and stands in for the
            unconditional one (its last output, or the kept guidance difference). Eager calls only.
    """
    follow_diffusers()
    return CacheHandle(
        target,
        schedule,
        blocks=blocks,
        components=components,
        types=types,
        on_length_mismatch=on_length_mismatch,
        timestep_arg=timestep_arg,
        strict=strict,
        count_macs=count_macs,
        allow_other_caches=allow_other_caches,
        storage_dtype=storage_dtype,
        offload=offload,
        offload_lead=offload_lead,
        guidance=guidance,
    ).open()


def _guidance_plans(
    guidance: Any,
    schedule: Schedule,
    components: list[Component],
    on_length_mismatch: str,
    storage: Any,
    offload: bool,
) -> tuple[Any, dict[str, tuple[bool, ...]]]:
    """The guidance plan (loaded if a file) and component name -> its steps (validated against the
    schedule and the other options)."""
    if guidance is None:
        return None, {}
    from ..guidance import GuidanceReuse

    if isinstance(guidance, (str, os.PathLike)):
        guidance = GuidanceReuse.load(os.fspath(guidance))
    if not isinstance(guidance, GuidanceReuse):
        raise StepCacheError(
            f"guidance must be a stepcache.guidance.GuidanceReuse (or its file), got {type(guidance).__name__}."
        )
    if guidance.num_steps != schedule.num_steps:
        raise ScheduleError(
            f"the guidance plan has {guidance.num_steps} steps, the schedule {schedule.num_steps}: build both "
            "for the same step count."
        )
    if on_length_mismatch == "resample":
        raise StepCacheError(
            "guidance reuse does not resample: pass on_length_mismatch='error' with guidance=."
        )
    if storage is not None or offload:
        raise StepCacheError(
            "guidance reuse keeps its outputs as computed: drop storage_dtype/offload with it."
        )
    return guidance, {name: plan for name, plan in guidance.resolve(components).items() if any(plan)}


def disable(target: Any) -> None:
    """Remove the cache from ``target`` (a handle, pipeline or module). A no-op if none is active."""
    if isinstance(target, CacheHandle):
        target.close()
        return
    session = active_session(denoisers_of(target)[0][1])
    if session is not None:
        if isinstance(session.owner, CacheHandle):
            session.owner.close()
        else:
            session.remove()


# Stats of the last cache closed on each denoiser. Values are frozen stats, which hold no reference
# to the model, so this never keeps a model alive.
_LAST_STATS: weakref.WeakKeyDictionary[nn.Module, CacheStats] = weakref.WeakKeyDictionary()


def summary(target: Any) -> CacheStats:
    """The stats of the cache active on ``target`` (a pipeline, module or handle), or else of the
    last one closed on it: computed vs reused calls per type, compute fraction, MACs saved.

    Raises:
        StepCacheError: no cache has run on this target.
    """
    if isinstance(target, CacheHandle):
        return target.stats
    model = denoisers_of(target)[0][1]
    session = active_session(model)
    if session is not None and isinstance(session.owner, CacheHandle):
        return session.owner.stats
    if model in _LAST_STATS:
        return _LAST_STATS[model]
    raise StepCacheError(
        f"no stepcache cache has run on this {type(model).__name__}; call stepcache.cache(...) first."
    )
