"""The compiled path of a cached component: the step's decision as data, chosen by ``torch.cond``.

Under ``torch.compile`` a slot (:mod:`.slot`) hands its call to its :class:`Traced` collaborator.
``pred``, ``coef_t`` and ``beta_t`` are tensors filled on the host when a step starts and read by
``torch.cond`` when the graph runs, so dynamo never specialises a graph on the plan. One graph then
serves every step and every layer, whatever the schedule (per type or per layer), and no recompile
limit is reached. Calls are counted after each denoiser call, on the host (:meth:`Traced.count`):
dynamo would guard on counters read inside the graph.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch

from ..schedule import COMPUTE
from .extrapolate import extrapolate, extrapolate2
from .introspect import first_tensor_shape

if TYPE_CHECKING:
    from .slot import Slot

__all__ = ["Traced"]


class Traced:
    """One slot's compiled path: the step's decision as tensors, on the host (``torch.cond`` reads
    its predicate there, so no device sync), and what the graphs ran since the last count.

    ``used``: a graph has run this slot (from then on :meth:`start_step` fills the tensors);
    ``called``: since the last :meth:`count`; ``seen``: the branches already counted this generation.
    """

    __slots__ = ("beta_t", "called", "coef_t", "pred", "seen", "used")

    def __init__(self) -> None:
        self.used = self.called = False
        self.seen: dict[int, bool] = {}
        self.pred = torch.ones((), dtype=torch.bool)
        self.coef_t = torch.zeros((), dtype=torch.float32)
        self.beta_t = torch.zeros((), dtype=torch.float32)

    def start_step(self, mode: int, coef: tuple[float, float]) -> None:
        """Fill the step's decision (once a graph has run this slot: eager calls read the plan)."""
        if self.used:
            self.pred.fill_(mode == COMPUTE)
            self.coef_t.fill_(coef[0])
            self.beta_t.fill_(coef[1])

    def forward(self, slot: Slot, args: tuple, kwargs: dict) -> Any:
        """The forward dynamo traces for ``slot``: compute or reuse chosen by ``torch.cond`` on ``self.pred``.

        Only what is fixed for a whole generation is Python here (the guidance branch, whether an
        output is kept for this input shape, the plan's forecast order), so the number of graphs
        is bounded by those few cases, never by layers, steps or the plan's values.
        """
        self.used = self.called = slot.tracker.compiled = True
        branch = slot.tracker.branch
        entry = slot.store[branch] if branch < len(slot.store) else None
        shape = first_tensor_shape(args, kwargs)
        if entry is None or entry[0] != shape:  # nothing kept for this input: compute (a static case)
            out = slot.original(*args, **kwargs)
            # Kept as the later graphs' cond outputs will be (contiguous), so their guards on the
            # kept tensors' strides hold from the first reuse on: no recompile per layout. A
            # forecasting plan keeps copies as its earlier outputs too (the weights are 0 until
            # enough computations exist), so the graphs never depend on how many outputs are kept yet.
            history = slot.history
            slot.put(
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
        _warm_signature_cache(slot.module)
        args = tuple(_pin_layout(a) for a in args)
        kwargs = {k: _pin_layout(v) for k, v in kwargs.items()}

        def compute() -> Any:
            return _own(slot.original(*args, **kwargs))

        if not slot.history:
            out = torch.cond(self.pred, compute, lambda: _clone(last), ())
            slot.put(branch, (shape, out, None, None))
            return out
        # Forecasting plans keep two outputs (three for second order). torch.cond only chooses
        # compute or copy, as for copy plans; the extrapolation and the update of the kept outputs
        # are plain elementwise code after it (inductor miscompiled the three-output branch form):
        # the weights coef_t and beta_t are 0 except at a forecasting reuse, so a computed or copied
        # output passes through unchanged.
        before = last if prev is None else prev
        out = torch.cond(self.pred, compute, lambda: _clone(last), ())
        if slot.history == 1:
            out = extrapolate(out, _sub(last, before), self.coef_t, difference=True)
            slot.put(branch, (shape, _where(self.pred, out, last), _where(self.pred, last, before), None))
            return out
        earlier = before if prev2 is None else prev2
        out = extrapolate2(
            out, _sub(last, before), _sub(before, earlier), self.coef_t, self.beta_t, difference=True
        )
        slot.put(
            branch,
            (
                shape,
                _where(self.pred, out, last),
                _where(self.pred, last, before),
                _where(self.pred, before, earlier),
            ),
        )
        return out

    def count(self, slot: Slot, branch: int) -> None:
        """After a denoiser call whose graph ran this component: count it on ``slot``. (Eager calls
        count themselves; a compiled call cannot, as dynamo would guard on the counters' values. The
        first call of a branch in a generation computes whatever the plan says.)"""
        if not self.called:
            return
        self.called = False
        if self.seen.get(branch) is None or slot.mode == COMPUTE:
            slot.computed += 1
        else:
            slot.reused += 1
        self.seen[branch] = True


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
