"""Offloading kept outputs to host memory, on a transfer schedule computed from the static plan.

A plan says, before anything runs, when each kept output is created, at which later calls it is
read, and when it is dropped. So the transfers can be planned too (:func:`transfer_schedule`):

* the timeline is one *tick* per component call, in call order (step ``s``, position ``p`` among
  ``N`` components: tick ``s * N + p``), for one guidance branch (split guidance runs the same
  schedule on each branch);
* an output whose next read is more than ``lead`` ticks away is **evicted** (copied to host, its
  device copy released) right after the call that stored or read it, and **fetched** back at the
  start of the call ``lead`` ticks before the read, so the copy overlaps ``lead`` calls of compute;
* an output no later call reads (a copy plan's output after the last reuse of its run, kept until
  the component computes again) is **discarded** after its last read when it would otherwise sit
  on the device for more than ``lead`` ticks.

``lead = N`` (the default) fetches each output one step before it is read, as in the plan's own
unit; smaller leads (a few blocks' worth of calls) keep fewer outputs resident at once and leave
less time per transfer. :class:`Offloader` follows the schedule in the runtime. On CUDA the copies
run on a side stream into pinned host buffers with ``non_blocking=True`` and events order them
against the compute stream; elsewhere (CPU) the "host copy" is a plain tensor copy, so the same
bookkeeping runs and is tested, with no speed meaning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import StepCacheError
from ..schedule import COMPUTE, FORECAST, liveness
from .storage import Packed

__all__ = ["OffloadStats", "Offloader", "TransferSchedule", "nbytes", "transfer_schedule"]

LAST, PREV = 1, 2  # which output of a component's store: the last computed, or the one before


@dataclass
class _Item:
    """One kept output of one component: created at step ``born``, read at ``reads``, made the
    previous output at step ``aged`` (forecasting plans), dropped at step ``dropped``."""

    born: int
    reads: list[int] = field(default_factory=list)
    aged: int | None = None
    dropped: int | None = None


def _items(plan: Sequence[int]) -> list[_Item]:
    """The kept outputs of one plan, replaying the runtime's slot (see ``liveness``)."""
    keep, history = liveness(tuple(plan))
    if history > 1:
        raise StepCacheError(
            "offload does not support second-order forecasts (plan values 3 and 4, three kept outputs)."
        )
    items: list[_Item] = []
    last: _Item | None = None
    prev: _Item | None = None
    for s, v in enumerate(plan):
        if v != COMPUTE and last is not None:  # a reuse reads the last output; a forecast both
            last.reads.append(s)
            if v == FORECAST and prev is not None:
                prev.reads.append(s)
            continue
        if prev is not None:
            prev.dropped = s
        if keep[s]:
            new = _Item(s)
            items.append(new)
            if keep[s] > 1 and last is not None:
                last.aged = s
                prev = last
            else:
                if last is not None:
                    last.dropped = s
                prev = None
            last = new
        else:
            if last is not None:
                last.dropped = s
            last = prev = None
    return items


@dataclass(frozen=True)
class TransferSchedule:
    """Which outputs move when, for plans in call order.

    Events are per guidance branch (each branch runs them on its own calls) and name ``(position,
    role)``: the component at ``position`` in call order, its last (``LAST`` = 1) or previous
    (``PREV`` = 2) output.

    Attributes:
        lead: ticks (component calls of one branch) between a fetch and the read it serves.
        components: ``N``, components per step.
        fetch: ``fetch[s]`` = ``(issued at position q, (position, role))``: at the start of step
            ``s``'s call of component ``q``, start copying that output to the device.
        evict: ``evict[s]`` = ``(position, role)`` moved off the device after that component's call
            at ``s`` (copied to host the first time; later its host copy is still there).
        discard: ``discard[s]`` = ``(position, role)`` released after that call (never read again).
        resident: ``resident[s]`` = the most outputs (bytes, when ``sizes`` were given) on the
            device at once during step ``s``, all branches together.
        kept: the same without offloading (the runtime's liveness rule).
        to_device, to_host: per step, outputs (bytes with ``sizes``) copied each way, all branches.
    """

    lead: int
    components: int
    fetch: tuple[tuple[tuple[int, tuple[int, int]], ...], ...]
    evict: tuple[tuple[tuple[int, int], ...], ...]
    discard: tuple[tuple[tuple[int, int], ...], ...]
    resident: tuple[int, ...]
    kept: tuple[int, ...]
    to_device: tuple[int, ...]
    to_host: tuple[int, ...]


def transfer_schedule(
    plans: Sequence[Sequence[int]],
    lead: int | None = None,
    *,
    sizes: Sequence[int] | None = None,
    branches: int = 1,
) -> TransferSchedule:
    """The transfer schedule of ``plans`` (one per component, in call order): see the module doc.

    Args:
        plans: per-component plans (``Schedule.resolve(components)`` values, in call order).
        lead: component calls between a fetch and its read, >= 1 (default: one step, ``len(plans)``).
        sizes: bytes per output of each component: ``resident``, ``kept``, ``to_device`` and
            ``to_host`` are then bytes instead of output counts.
        branches: guidance branches run one after the other each step (2 for split guidance): the
            events are the same for each, the counts add up over them.
    """
    n_comp = len(plans)
    if not n_comp:
        raise StepCacheError("transfer_schedule needs at least one plan.")
    n = len(plans[0])
    if any(len(p) != n for p in plans):
        raise StepCacheError("all plans of a transfer schedule must have the same number of steps.")
    lead = n_comp if lead is None else lead
    if isinstance(lead, bool) or not isinstance(lead, int) or lead < 1:
        raise StepCacheError(f"lead must be a positive number of component calls, got {lead!r}.")
    if isinstance(branches, bool) or not isinstance(branches, int) or branches < 1:
        raise StepCacheError(f"branches must be a positive integer, got {branches!r}.")
    weight = [1] * n_comp if sizes is None else [int(v) for v in sizes]
    if len(weight) != n_comp:
        raise StepCacheError(f"sizes has {len(weight)} entries for {n_comp} plans.")
    fetch: list[list[tuple[int, tuple[int, int]]]] = [[] for _ in range(n)]
    evict: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    discard: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    to_device, to_host = [0] * n, [0] * n
    end = n * n_comp
    # Device occupancy over the timeline of all branches: branch b's tick s*N+p is global tick
    # (s*B + b)*N + p. A span starts at tick a and ends after tick b (`after`: moved off after that
    # call) or at tick b (replaced during that call, or the end of the generation).
    total = n * branches * n_comp
    resident_delta = [0] * (total + 1)
    kept_delta = [0] * (total + 1)

    def at(t: int, br: int) -> int:
        return total if t >= end else ((t // n_comp) * branches + br) * n_comp + t % n_comp

    def span(delta: list[int], a: int, b: int, w: int, after: bool) -> None:
        for br in range(branches):
            ga, gb = at(a, br), at(b, br) + (1 if after else 0)
            if gb > ga:
                delta[ga] += w
                delta[gb] -= w

    for p, plan in enumerate(plans):
        w = weight[p]
        for item in _items(plan):
            born = item.born * n_comp + p
            aged = None if item.aged is None else item.aged * n_comp + p
            gone = end if item.dropped is None else item.dropped * n_comp + p  # replaced in that call

            def role(t: int, after: bool, p: int = p, aged: int | None = aged) -> tuple[int, int]:
                old = aged is not None and (t >= aged if after else t > aged)
                return (p, PREV if old else LAST)

            span(kept_delta, born, gone, w, False)
            start = touched = born  # on the device since `start`; last stored or read at `touched`
            on_host = False
            for r in (s * n_comp + p for s in item.reads):
                if r - touched > lead:  # not read for a while: off the device now, back `lead` calls before
                    span(resident_delta, start, touched, w, True)
                    evict[touched // n_comp].append(role(touched, True))
                    if not on_host:
                        to_host[touched // n_comp] += w * branches
                        on_host = True
                    start = r - lead
                    fetch[start // n_comp].append((start % n_comp, role(start, False)))
                    to_device[start // n_comp] += w * branches
                touched = r
            if gone - touched > lead:  # never read again and held a while: release it now
                span(resident_delta, start, touched, w, True)
                discard[touched // n_comp].append(role(touched, True))
            else:
                span(resident_delta, start, gone, w, False)
    per_step = branches * n_comp
    return TransferSchedule(
        lead=lead,
        components=n_comp,
        fetch=tuple(tuple(f) for f in fetch),
        evict=tuple(tuple(e) for e in evict),
        discard=tuple(tuple(d) for d in discard),
        resident=_per_step_max(resident_delta, n, per_step),
        kept=_per_step_max(kept_delta, n, per_step),
        to_device=tuple(to_device),
        to_host=tuple(to_host),
    )


def _per_step_max(delta: list[int], n: int, ticks: int) -> tuple[int, ...]:
    out, now = [], 0
    for s in range(n):
        most = 0
        for t in range(s * ticks, (s + 1) * ticks):
            now += delta[t]
            most = max(most, now)
        out.append(most)
    return tuple(out)


class _Host:
    """A kept output living in host memory (``host``), or released (``host is None``: never read
    again). ``device`` and ``event`` hold a fetch in flight."""

    __slots__ = ("device", "event", "host", "nbytes", "where")

    def __init__(self, host: Any, nbytes: int, where: torch.device) -> None:
        self.host, self.nbytes, self.where = host, nbytes, where
        self.device: Any = None
        self.event: Any = None


def nbytes(value: Any) -> int:
    """Bytes of a stored value: a tensor's, a packed one's (:class:`~.storage.Packed`) or an offloaded
    one's ``nbytes``, summed through tuples (0 for anything else)."""
    if isinstance(value, (torch.Tensor, Packed, _Host)):
        return value.nbytes
    if isinstance(value, tuple):
        return sum(nbytes(v) for v in value)
    return 0


def _map(value: Any, fn: Any) -> Any:
    """``fn`` on every tensor of a stored value (tuples, fp8-packed tensors)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Packed):
        return Packed(fn(value.data), None if value.scale is None else fn(value.scale), value.dtype)
    if isinstance(value, tuple):
        return tuple(_map(v, fn) for v in value)
    return value


def _first_device(value: Any) -> torch.device:
    found: list[torch.device] = []

    def see(t: torch.Tensor) -> torch.Tensor:
        found.append(t.device)
        return t

    _map(value, see)
    return found[0] if found else torch.device("cpu")


@dataclass(frozen=True)
class OffloadStats:
    """What offloading did over the last generation (one per branch counted together).

    Attributes:
        resident: per step, the most kept outputs on the device at once.
        fetched_bytes, evicted_bytes: bytes copied to the device / to the host, all steps.
        late_fetches: reads that found their output still on the host (fetched synchronously).
        events: ``(step, position of the call, kind, position, role)`` in the order they ran; kind is
            ``"fetch"``, ``"evict"`` or ``"discard"``.
    """

    resident: tuple[int, ...]
    fetched_bytes: int
    evicted_bytes: int
    late_fetches: int
    events: tuple[tuple[int, int, str, int, int], ...]


class Offloader:
    """Follows a :class:`TransferSchedule` while the cache runs (eager calls only).

    The cache's slots call :meth:`begin` when their call starts (issue the fetches planned there),
    :meth:`read` for every stored output a reuse reads, :meth:`stored` when their store changed, and
    :meth:`end` when their call is done (evictions and releases planned there).
    """

    def __init__(self, slots: Sequence[Any], lead: int | None = None) -> None:
        self.slots = list(slots)
        self.position = {id(s): i for i, s in enumerate(self.slots)}
        self.lead = lead
        self.schedule: TransferSchedule | None = None
        self._cuda = torch.cuda.is_available()
        self._stream: Any = None
        self.reset()

    def set_plans(self, plans: Sequence[Sequence[int]]) -> None:
        self.schedule = transfer_schedule(plans, self.lead)
        sched = self.schedule
        self._fetch: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for s, items in enumerate(sched.fetch):
            for q, target in items:
                self._fetch.setdefault((s, q), []).append(target)
        self._after: dict[tuple[int, int], list[tuple[str, int]]] = {}
        for kind, table in (("evict", sched.evict), ("discard", sched.discard)):
            for s, after in enumerate(table):
                for p, role in after:
                    self._after.setdefault((s, p), []).append((kind, role))

    def reset(self) -> None:
        """A new generation: counters back to zero (the stores are cleared by the cache)."""
        self.now = 0
        self.resident: dict[int, int] = {}
        self.fetched = self.evicted = self.late = 0
        self.events: list[tuple[int, int, str, int, int]] = []

    @property
    def stats(self) -> OffloadStats:
        n = 0 if self.schedule is None else len(self.schedule.resident)
        return OffloadStats(
            tuple(self.resident.get(s, 0) for s in range(n)),
            self.fetched,
            self.evicted,
            self.late,
            tuple(self.events),
        )

    # ---------------------------------------------------------------- device residency
    @staticmethod
    def on_device(entry: Any) -> int:
        """Outputs of a store entry ``(shape, last, previous)`` that are on the device."""
        if entry is None:
            return 0
        return sum(
            1
            for part in entry[1:]
            if part is not None and (not isinstance(part, _Host) or part.device is not None)
        )

    def stored(self, before: Any, after: Any) -> None:
        self.now += self.on_device(after) - self.on_device(before)

    def _note(self, step: int) -> None:
        if self.now > self.resident.get(step, 0):
            self.resident[step] = self.now

    # ---------------------------------------------------------------- the slot's call
    def begin(self, slot: Any, step: int, branch: int) -> None:
        q = self.position[id(slot)]
        for p, role in self._fetch.get((step, q), ()):
            entry = self.slots[p].kept(branch)
            part = None if entry is None else entry[role]
            if isinstance(part, _Host) and part.host is not None and part.device is None:
                part.device, part.event = self._to_device(part.host, part.where)
                self.fetched += part.nbytes
                self.now += 1
                self.events.append((step, q, "fetch", p, role))

    def read(self, part: Any, slot: Any, branch: int, role: int) -> Any:
        """The device value of a stored output, waiting for its fetch (or fetching it now)."""
        if not isinstance(part, _Host):
            return part
        if part.host is None:
            raise StepCacheError(
                f"{slot.name}: a released output was read; the transfer schedule and the plan disagree."
            )
        if part.device is None:  # not fetched in time: fetch now, synchronously
            part.device, part.event = self._to_device(part.host, part.where)
            self.fetched += part.nbytes
            self.late += 1
            self.now += 1
        if part.event is not None:  # the copy runs on the side stream: the compute stream waits for it
            stream = torch.cuda.current_stream()
            stream.wait_event(part.event)
            _map(part.device, lambda t: t.record_stream(stream) or t)
            part.event = None
        return part.device  # the entry keeps the host copy too: a later eviction copies nothing

    def end(self, slot: Any, step: int, branch: int) -> None:
        self._note(step)
        p = self.position[id(slot)]
        for kind, role in self._after.get((step, p), ()):
            entry = slot.kept(branch)
            part = None if entry is None else entry[role]
            if part is None or (isinstance(part, _Host) and part.device is None):
                continue  # not on the device
            if isinstance(part, _Host):  # fetched earlier: its host copy is still there
                part.device = part.event = None
                if kind == "discard":
                    part.host = None
            else:
                size = nbytes(part)
                if kind == "evict":
                    moved = _Host(self._to_host(part), size, _first_device(part))
                    self.evicted += size
                else:
                    moved = _Host(None, size, _first_device(part))
                slot.store[branch] = tuple(moved if i == role else e for i, e in enumerate(entry))
            self.now -= 1
            self.events.append((step, p, kind, p, role))

    # ---------------------------------------------------------------- copies
    def _side(self) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _to_host(self, value: Any) -> Any:
        def move(t: torch.Tensor) -> torch.Tensor:
            if not t.is_cuda:
                return t.clone()  # CPU: a copy stands for the host buffer
            side = self._side()
            side.wait_stream(torch.cuda.current_stream())  # the output is computed
            with torch.cuda.stream(side):
                host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
                host.copy_(t, non_blocking=True)
            t.record_stream(side)  # its memory is reused only once the copy is done
            return host

        return _map(value, move)

    def _to_device(self, value: Any, where: torch.device) -> tuple[Any, Any]:
        if where.type != "cuda":
            return _map(value, lambda t: t.clone()), None
        side = self._side()
        with torch.cuda.stream(side):
            out = _map(value, lambda t: t.to(where, non_blocking=True))
            event = torch.cuda.Event()
            event.record(side)
        return out, event
