"""Which denoising step and guidance branch a denoiser call belongs to.

:class:`StepTracker` turns the stream of denoiser calls into (generation, step, branch) coordinates,
read from the timestep the denoiser receives. A *step* is one denoiser evaluation at one timestep;
further calls at the same timestep are further *branches* (split classifier-free guidance: cond and
uncond as two calls); a timestep that goes up starts a new generation. So a schedule is indexed by
denoising step, never by forward call, and every generation starts afresh.
"""

from __future__ import annotations

import functools
import inspect
import logging
import numbers
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..discovery import unwrap
from ..errors import ScheduleLengthError, StepCacheError, StepCacheWarning

__all__ = [
    "TIMESTEP_NAMES",
    "SchedulerWatch",
    "StepTracker",
    "calling_pipeline",
    "on_device",
    "pipeline_steps",
    "read_timestep",
    "timestep_slot",
]

logger = logging.getLogger(__name__)

# Parameter names under which denoisers receive their noise level, most common first.
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas", "time", "noise_level")


def timestep_slot(module: nn.Module, timestep_arg: str | None) -> tuple[str, int | None] | None:
    """Where the timestep arrives in ``module.forward``: (keyword name, positional index or None).

    torch.compile's wrapper takes ``(*args, **kwargs)``: the model's own signature is read."""
    module = unwrap(module)
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    names = (timestep_arg,) if timestep_arg else TIMESTEP_NAMES
    for name in names:
        for i, p in enumerate(params):
            if p.name == name:
                positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                return name, (i if positional else None)
    if timestep_arg:
        raise StepCacheError(
            f"timestep_arg={timestep_arg!r}: {type(module).__name__}.forward has no such parameter "
            f"(it takes {[p.name for p in params]})."
        )
    return None


def on_device(value: Any) -> bool:
    """Whether reading ``value`` on the host would wait for the device (a CUDA/XPU/MPS tensor)."""
    return isinstance(value, torch.Tensor) and not value.is_cpu


def read_timestep(value: Any) -> float | None:
    """The step's noise level. The maximum, not the first element: Wan 2.2 TI2V passes per-token
    timesteps that are 0 on the conditioning frame's tokens and t elsewhere. A device tensor costs
    a host sync here: the tracker avoids calling this for one when it can count steps instead."""
    if isinstance(value, torch.Tensor):
        n = value.numel()
        if n == 0:
            return None
        if n <= 64 and value.is_cpu:  # a batch of timesteps: cheapest read in Python
            if value.dim() == 0:
                return float(value.item())
            return float(max(value.tolist() if value.dim() == 1 else value.reshape(-1).tolist()))
        return float(value.max())
    if isinstance(value, (int, float)):
        return float(value)
    return None


class StepTracker:
    """Which denoising step and guidance branch the current denoiser call belongs to.

    ``num_steps`` (when known) lets the tracker tell a longer run from a new generation and raise a
    clear error. ``manual`` mode ignores timesteps: the caller sets steps through :meth:`set_step`
    (for models that receive no timestep, or are called through a path the hooks cannot see).

    Generation boundaries: a timestep that goes up starts a new generation; so does ``boundary()``
    returning True (a pipeline that set up its scheduler again: see :class:`SchedulerWatch`), which makes
    an interrupted generation unable to leak into the next one whatever its first timestep.

    One generation at a time: a call from another thread while a generation is in progress is an
    error (its steps would interleave with the running one's and both would be wrong).

    Sync-free stepping: reading a timestep that lives on the GPU waits for the GPU, which on every
    call would stall a launch-bound run and break CUDA-graph replay. When ``position`` is set (a
    pipeline's scheduler: how many ``scheduler.step`` calls this generation has made, counted on
    the host), a call whose timestep is a device tensor is placed by that count instead: a new
    count is the next step, the same count another guidance branch. The timestep is never read.
    """

    def __init__(self, num_steps: int | None = None) -> None:
        self.num_steps = num_steps
        self.step = -1
        self.branch = 0
        self.generation = -1
        self.manual = False
        self._t: float | None = None
        self._in_call = False
        self._thread: int | None = None  # the thread whose generation is running
        # Asked at each call: must a new generation start here (e.g. the pipeline set up its scheduler)?
        self.boundary: Callable[[], bool] | None = None
        # Listeners: a generation is about to begin; a step began; a denoiser call (any branch) began,
        # after the step and branch are known; a call ended; state was dropped after a failure.
        self.on_generation: list[Callable[[], None]] = []
        self.on_step: list[Callable[[int], None]] = []
        self.on_call_begin: list[Callable[[], None]] = []
        self.on_call_end: list[Callable[[], None]] = []
        self.on_reset: list[Callable[[], None]] = []
        self.compiled = False  # set by compiled calls (a side effect dynamo replays after the graph)
        # Steps taken this generation, counted on the host (None: unknown). See the class docstring.
        self.position: Callable[[], int | None] | None = None
        self._counted = False  # the current call was placed by the count, its timestep unread
        # Plain loops: the timesteps of this generation's steps, and of the last generation that reached
        # its last step (its grid), which tells a continuation from a new start (:meth:`_departs`).
        self._times: list[float] = []
        self._grid: list[float] | None = None

    @property
    def timestep(self) -> float | None:
        """The timestep of the current (or last) denoiser call; ``None`` in manual mode and for a
        call placed by the host-side step count (its timestep was never read)."""
        return None if self._counted else self._t

    # -- automatic mode -------------------------------------------------------------------------
    def in_progress(self) -> bool:
        """A generation has started and not yet reached its last step (or a call is running)."""
        if self._in_call:
            return True
        if self.step < 0:
            return False
        return self.num_steps is None or self.step + 1 < self.num_steps

    def check_free(self) -> None:
        """Raise unless this thread may start or continue a generation: another (live) thread's
        generation is running. Changes nothing, so a refused caller disturbs nothing."""
        owner = self._thread
        if owner is not None and owner != threading.get_ident() and self.in_progress() and _alive(owner):
            raise StepCacheError(
                "a second thread called the cached model while another thread's generation is running. "
                "A cache follows one generation at a time: give each worker thread its own model (or its "
                "own process), or batch the requests into one generation."
            )

    def _check_thread(self) -> None:
        self.check_free()
        self._thread = threading.get_ident()

    def begin_call(self, t: float | None, device_timestep: Any = None) -> None:
        """A denoiser call begins at timestep ``t``; or, when ``t`` is None and ``device_timestep``
        is given (a timestep tensor on a device, not read yet), wherever the host-side step count
        places it, reading the tensor (a sync) only when no count is available."""
        self._check_thread()
        if self._in_call:
            logger.debug("previous denoiser call raised; starting the next generation afresh")
            self.reset()
        if self.boundary is not None and self.boundary():
            self.reset()
        if self.manual:
            self._in_call = True
            self._notify_call()
            return
        if t is None and device_timestep is not None:
            # after the boundary check: a new scheduler's count starts at 0 there
            position = self.position() if self.position is not None else None
            self._counted = position is not None
            t = -float(position) if position is not None else read_timestep(device_timestep)
        else:
            self._counted = False
        if t is None:
            raise StepCacheError(
                "stepcache could not read a timestep from this denoiser call. Pass timestep_arg='<name>' "
                "to cache()/calibrate(), or drive steps yourself with handle.set_step(i)."
            )
        if self.step >= 0 and t == self._t:
            self.branch += 1
        elif self.step < 0 or self._t is None or t > self._t or self._departs(t):
            self._new_generation()
        elif self.num_steps is not None and self.step + 1 >= self.num_steps:
            raise ScheduleLengthError(
                f"the schedule has {self.num_steps} steps but this generation made more denoising steps "
                f"({'a further step' if self._counted else f'timestep {t:g}'} after step {self.step + 1}). Use a schedule for this step count, or "
                "schedule.resample(n) for the run's step count."
            )
        else:
            self._advance(self.step + 1)
        if self.branch == 0 and not self._counted:
            self._times.append(t)
            if self.num_steps is not None and self.step + 1 == self.num_steps:
                self._grid = list(self._times)  # a whole generation: its timesteps are the grid
        self._t = t
        self._in_call = True
        self._notify_call()

    def _departs(self, t: float) -> bool:
        """A lower timestep that does not continue this generation: it stopped between two calls (a
        plain loop's exception, Ctrl-C or ``break``, which no call sees) and another generation
        began below where it stopped. Told by the grid of the last whole generation, when this one
        followed it so far: the next timestep is the grid's next one, anything else is a new start
        (after two steps on the grid; after one, only a later point of the grid, since other grids
        often share the first timestep). Without a whole generation seen, a limit: handle.reset()."""
        grid, seen = self._grid, self._times
        if self._counted or grid is None or not seen or len(seen) >= len(grid):
            return False
        k = len(seen)
        if seen != grid[:k] or t == grid[k]:
            return False
        return k >= 2 or t in grid[k + 1 :]

    def _notify_call(self) -> None:
        for fn in self.on_call_begin:
            fn()

    def end_call(self, failed: bool = False) -> None:
        """The denoiser call returned; ``failed``: it raised, so this generation is over."""
        if self._thread is not None and self._thread != threading.get_ident():
            return  # a call refused by _check_thread: it never began, the running one goes on
        if failed:
            logger.debug("a denoiser call raised; the next call starts a new generation")
            self.reset()
            return
        self._in_call = False
        for fn in self.on_call_end:
            fn()

    # -- manual mode ----------------------------------------------------------------------------
    def set_step(self, step: int, branch: int = 0) -> None:
        for label, value in (("step", step), ("branch", branch)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise StepCacheError(f"set_step: {label} must be an integer >= 0, got {value!r}.")
        step, branch = int(step), int(branch)
        if branch > 15:
            raise StepCacheError(
                f"set_step: branch {branch} is not a guidance branch (0 and 1; a few more at most)."
            )
        self.manual = True
        if self.num_steps is not None and not 0 <= step < self.num_steps:
            raise ScheduleLengthError(
                f"set_step({step}): the schedule has {self.num_steps} steps (0..{self.num_steps - 1})."
            )
        if step == 0 and branch == 0 and (self.step != 0 or self.branch != 0):
            self._new_generation()
        elif step != self.step:
            self._advance(step)
        self.branch = branch

    # -- shared ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the current generation: the next call starts a new one."""
        self.step, self.branch, self._t, self._in_call, self._thread = -1, 0, None, False, None
        self._times = []
        for fn in self.on_reset:
            fn()

    def check_complete(self) -> None:
        """Warn when the current generation stopped before the schedule's last step."""
        if self.step >= 0 and self.num_steps is not None and self.step + 1 < self.num_steps:
            warnings.warn(
                f"a generation ended after {self.step + 1} of the schedule's {self.num_steps} steps "
                "(interrupted, or a run with fewer steps than the schedule: use a schedule for the run's "
                "step count, or schedule.resample(n)).",
                StepCacheWarning,
                stacklevel=3,
            )

    def _new_generation(self) -> None:
        self.check_complete()
        self._times = []
        self.generation += 1
        for fn in self.on_generation:
            fn()
        self.branch = 0
        self._advance(0)

    def _advance(self, step: int) -> None:
        self.step, self.branch = step, 0
        for fn in self.on_step:
            fn(step)


def _alive(ident: int) -> bool:
    """Whether the thread ``ident`` still runs (a dead thread's generation holds nothing up)."""
    return any(t.ident == ident for t in threading.enumerate())


class SchedulerWatch:
    """Generation boundaries from a pipeline: every diffusers pipeline calls its scheduler's
    ``set_timesteps`` once at the start of a generation (and ReferencePipeline makes a new
    scheduler). Seeing either means the next denoiser call starts a new generation, so nothing of
    an interrupted one (an exception, Ctrl-C, a ``break``, diffusers' interrupt flag) can leak into
    it, whatever its first timestep. The wrappers are instance attributes, removed exactly on close.

    It also counts the generation's ``scheduler.step`` calls on the host (:meth:`position`): the
    step tracker places a denoiser call whose timestep lives on the GPU by that count instead of
    reading the tensor, which would wait for the GPU on every call.

    ``guard`` runs before the scheduler is set up and may refuse it (raise): a second thread's
    pipeline call while another thread's generation runs is refused *before* it resets the shared
    scheduler under the running generation.
    """

    def __init__(
        self, pipeline: Any, on_setup: Callable[[], None], guard: Callable[[], None] | None = None
    ) -> None:
        self._pipeline = pipeline
        self._on_setup = on_setup
        self._guard = guard
        self._scheduler: Any = None
        self._saved: dict[str, Any] = {}
        self._pending: int | None = None  # the thread that set up a scheduler since the last call
        self._steps: int | None = None  # scheduler.step calls since set_timesteps (None: not set up)

    def install(self) -> None:
        scheduler = getattr(self._pipeline, "scheduler", None)
        if scheduler is None or not callable(getattr(scheduler, "set_timesteps", None)):
            return
        self._scheduler = scheduler
        self._saved = {name: scheduler.__dict__.get(name, _MISSING) for name in ("set_timesteps", "step")}
        original = scheduler.set_timesteps

        @functools.wraps(original)  # pipelines inspect its signature (Flux checks for `sigmas`)
        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            if self._guard is not None:
                self._guard()  # refused here, nothing of the running generation was touched
            self._pending = threading.get_ident()
            self._steps = 0
            self._on_setup()
            return original(*args, **kwargs)

        scheduler.set_timesteps = set_timesteps
        take_step = getattr(scheduler, "step", None)
        if callable(take_step):

            @functools.wraps(take_step)
            def step(*args: Any, **kwargs: Any) -> Any:
                out = take_step(*args, **kwargs)
                if self._steps is not None:
                    self._steps += 1
                return out

            scheduler.step = step

    def remove(self) -> None:
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is None:
            return
        for name, saved in self._saved.items():
            if saved is _MISSING:
                scheduler.__dict__.pop(name, None)
            else:
                setattr(scheduler, name, saved)
        self._saved, self._pending, self._steps = {}, None, None

    def position(self) -> int | None:
        """Scheduler steps this generation has taken, or None when no pipeline set one up."""
        return self._steps

    def new_generation(self) -> bool:
        """Asked at each denoiser call: did this thread's pipeline set up a generation since?"""
        if self._pipeline is None:
            return False
        current = getattr(self._pipeline, "scheduler", None)
        if current is not self._scheduler and self._scheduler is not None:
            self.remove()  # the pipeline got a new scheduler: watch that one from now on
            self.install()
            self._steps = 0  # it was set up before it was watched: its generation starts now
            return True
        if self._pending is not None and self._pending == threading.get_ident():
            self._pending = None
            return True
        return False


_MISSING = object()


def pipeline_steps(pipeline: Any) -> int | None:
    """Distinct timesteps the pipeline's scheduler is set up for (known once the generation starts)."""
    timesteps = getattr(getattr(pipeline, "scheduler", None), "timesteps", None)
    if timesteps is None or len(timesteps) == 0:
        return None
    return 1 + int((timesteps[1:] != timesteps[:-1]).sum())


def drives(owner: Any, models: list[nn.Module]) -> bool:
    """Whether ``owner`` looks like a pipeline (a scheduler that sets up timesteps) of one of
    ``models``; any object up the stack may be asked, so nothing it raises counts."""
    wanted = {id(unwrap(m)) for m in models}
    try:
        scheduler = getattr(owner, "scheduler", None)
        if not callable(getattr(scheduler, "set_timesteps", None)):
            return False
        found = (getattr(owner, a, None) for a in ("transformer", "transformer_2"))
        return any(isinstance(m, nn.Module) and id(unwrap(m)) in wanted for m in found)
    except Exception:
        return False


def calling_frame(
    matches: Callable[[Any], bool], *, method: str | None = None, depth: int = 48
) -> tuple[Any, dict[str, Any]] | None:
    """The innermost method call up the stack whose ``self`` (not a module) ``matches``: that object
    and the call's locals, or None. ``method``: only calls of that name (``"__call__"``: the
    pipeline call itself, whose locals hold what a generation was asked for)."""
    frame: Any = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            break
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self" and method in (None, code.co_name):
            owner = frame.f_locals.get("self")
            if owner is not None and not isinstance(owner, nn.Module) and matches(owner):
                return owner, dict(frame.f_locals)
        frame = frame.f_back
    return None


def calling_pipeline(models: list[nn.Module], depth: int = 48) -> Any:
    """The pipeline whose code is calling one of ``models`` right now (a ``self`` up the call stack
    with a scheduler and ``models[i]`` as its ``transformer``), or None (a plain loop).

    For a cache put on the transformer itself (``apply_smoothcache(pipe.transformer, ...)``), which is
    not told the pipeline: with it, each generation learns the step count the pipeline's scheduler
    is set up for, exactly as ``stepcache.cache(pipe, ...)`` does. Asked once per generation."""
    found = calling_frame(lambda owner: drives(owner, models), depth=depth)
    return None if found is None else found[0]
