"""A cache on one pipeline or denoiser: :class:`CacheHandle`.

The handle binds a :class:`~stepcache.Schedule` and a :class:`~.config.CacheConfig` (values) to a
target: it checks the schedule against the model, makes one :class:`~.slot.Slot` per cached
component when the session installs its interception, follows generations and steps through the
:class:`~.steps.StepTracker`, and reports what the slots did (:attr:`CacheHandle.stats`). Given a
:class:`~.generation.GenerationPlanner` instead of a schedule, it asks the planner for each
generation's schedule when that generation starts (:mod:`stepcache.auto`: caching without a schedule).
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ..discovery import DEFAULT_TYPES, Component, denoisers_of, discover, unwrap
from ..distributed import check_schedule_agreement
from ..errors import ScheduleError, ScheduleLengthError, StepCacheError, StepCacheWarning
from ..schedule import Schedule, liveness
from . import headroom
from .config import CacheConfig, configure
from .generation import OPEN_STEPS, GenerationPlanner, GenerationStart, compute_all
from .guided import Guide, guidance_batch, guided_steps
from .introspect import DIGEST_PREFIX, fingerprint, model_class, weights_state
from .offload import Offloader, OffloadStats
from .session import Installer, Session, hook_state
from .slot import Bytes, Slot
from .stats import CacheStats, TypeStats
from .steps import SchedulerWatch, StepTracker, calling_pipeline, pipeline_steps
from .storage import resolve_storage_dtype

__all__ = ["LAST_STATS", "CacheHandle"]

logger = logging.getLogger(__name__)

# Stats of the last cache closed on each denoiser. Values are frozen stats, which hold no reference
# to the model, so this never keeps a model alive.
LAST_STATS: weakref.WeakKeyDictionary[nn.Module, CacheStats] = weakref.WeakKeyDictionary()


class CacheHandle:
    """A cache on one pipeline or denoiser. A context manager; ``close()`` restores the model exactly.

    :func:`stepcache.cache` makes one and opens it. A handle built directly, from a
    :class:`~stepcache.Schedule` and a :class:`~stepcache.CacheConfig` (values: files and repository
    ids are read at the front door), opens when its ``with`` block is entered (or on :meth:`open`).
    The schedule is checked against the model when the handle is built (its fingerprint, the
    components it covers, the guidance plan's step count), so a bad schedule fails before anything
    is installed. ``installer`` puts the hooks in place (diffusers' ``HookRegistry`` for
    :func:`~stepcache.integrations.diffusers_hooks.apply_smoothcache`; plain torch hooks by default).

    ``schedule`` may be a :class:`~.generation.GenerationPlanner` instead: every discovered component
    is cached, and each generation follows the schedule the planner chooses when it starts
    (:attr:`running_schedule`; every component computes when it chooses none). The planner is
    :attr:`planner` (None for a fixed schedule).
    """

    def __init__(
        self,
        target: Any,
        schedule: Schedule | GenerationPlanner,
        config: CacheConfig | None = None,
        *,
        installer: Installer | None = None,
    ) -> None:
        planner = schedule if isinstance(schedule, GenerationPlanner) else None
        if planner is None and not isinstance(schedule, Schedule):
            raise ScheduleError(
                f"CacheHandle takes a stepcache.Schedule, got {type(schedule).__name__}: stepcache.cache "
                "reads one from a schedule file, a folder or a hub repository id."
            )
        self.config = config = configure(config, {})
        if planner is not None and config.guidance is not None:
            raise StepCacheError(
                "guidance= is a plan for one schedule's steps: give the schedule too, or drop guidance=."
            )
        self.planner = planner
        self._open: Schedule | None = None  # every component computing, for a generation of open length
        self._call: tuple[nn.Module, tuple, dict] | None = None  # the call starting a generation
        self._storage = resolve_storage_dtype(config.storage_dtype)
        self._offloader: Offloader | None = None
        self.models = [m for _, m in denoisers_of(target)]
        self.model = self.models[0]
        if isinstance(schedule, Schedule):
            if config.auto:
                raise StepCacheError(
                    "compute_fraction and calibration_runs are for caching without a schedule (the cache "
                    "then calibrates itself); this schedule fixes its own compute fraction "
                    f"({schedule.compute_fraction:.3f}): drop one or the other."
                )
            want = schedule.meta.get("fingerprint")
            if config.strict and want and want != fingerprint(target):
                raise ScheduleError(
                    f"this schedule was calibrated on {schedule.meta.get('model_class')} (fingerprint {want}), not on "
                    f"this {model_class(target)} (fingerprint {fingerprint(target)}). Calibrate this model, "
                    "or pass strict=False to apply it anyway."
                )
        types = config.types
        if planner is not None:
            found = discover(target, blocks=config.blocks, components=config.components, types=types)
            schedule = compute_all(found, 1)  # until the first generation starts
        else:
            assert isinstance(schedule, Schedule)
            _warn_if_changed(schedule, target)
            if types is None:
                types = ("block",) if "block" in schedule.plans else DEFAULT_TYPES
            found = discover(target, blocks=config.blocks, components=config.components, types=types)
        plans = schedule.resolve(found)
        if not plans:
            raise ScheduleError(
                "the schedule covers none of the discovered components; nothing would be cached."
            )
        second = sorted(name for name, plan in plans.items() if liveness(plan)[1] > 1)
        if config.offload and second:
            raise StepCacheError(
                f"offload=True does not support second-order forecasts (plan values 3 and 4), which keep "
                f"three outputs per component; {len(second)} component(s) use them (e.g. {second[0]}). "
                "Use first-order forecasts (schedule.with_forecast()) or copies with offload, or drop offload."
            )
        self.components = [c for c in found if c.name in plans]
        self.guidance = config.guidance
        self._guides = guided_steps(config.guidance, schedule.num_steps, self.components)
        self.schedule = schedule  # always the schedule given: resampling never replaces it
        self._running = schedule  # the one the current generation follows (resampled if need be)
        self._gains = schedule.gains_of(self.components)  # per component: its forecast gains
        self._pipeline = None if isinstance(target, nn.Module) else target
        self.tracker = StepTracker(num_steps=None if planner else schedule.num_steps)
        self._boundary = SchedulerWatch(self._pipeline, self._relocate, guard=self.tracker.check_free)
        self.tracker.boundary = self._boundary.new_generation
        self.tracker.position = self._boundary.position
        self._slots: dict[str, Slot] = {}
        self._bytes: dict[str, Bytes] = {}  # per component type, shared by its slots
        self._bytes_all = Bytes()
        self._plans = plans
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
            timestep_arg=config.timestep_arg,
            installer=installer,
            allow_other_caches=config.allow_other_caches,
        )
        self._session.owner = self
        self._warned_resample = False
        self._warned_replaced: set[tuple[int, ...]] = set()
        self._headroom: weakref.finalize | None = None  # gives dynamo's recompile limit back
        self._guide_objects: list[Guide] = []
        self._warned_unguided = False
        if self._guides and self.guidance.layout != "split":
            self._session.inspect = self._check_guidance_batch
        if planner is not None:
            self._session.probe = self._probe
            self.tracker.on_call_begin.append(self._forget_call)
            planner.bind(self)

    # ---------------------------------------------------------------- life cycle
    def _make_forward(self, comp: Component, original: Callable[..., Any]) -> Callable[..., Any]:
        kind = self._bytes.setdefault(comp.type, Bytes())
        guide = None
        if comp.name in self._guides:
            g = self.guidance
            guide = Guide(self._guides[comp.name], g.mode, g.layout, g.uncond_branch)
            self._guide_objects.append(guide)
        if self.planner is not None:
            original = self.planner.wrap(comp, original)
        slot = Slot(
            comp,
            self._plans[comp.name],
            original,
            self.tracker,
            self.config.count_macs,
            kind,
            self._bytes_all,
            storage=self._storage,
            guide=guide,
            gains=self._gains.get(comp.name),
        )
        self._slots[comp.name] = slot
        return slot.forward

    def open(self) -> CacheHandle:
        """Install the cache (a no-op when it is already active). All or nothing: on any failure
        nothing stays installed."""
        if self._session.open:
            return self
        check_schedule_agreement(self._plans, self.schedule.num_steps)  # ranks agree, or all raise
        message = f"cache enabled on {len(self.components)} components " + (
            "(a schedule per generation)"
            if self.planner is not None
            else f"(compute fraction {self.schedule.compute_fraction:.3f})"
        )
        self.tracker.reset()
        try:
            self._session.install()
            self._boundary.install()
            if self.config.offload:
                slots = [self._slots[c.name] for c in self.components]  # call order: discovery order
                self._offloader = Offloader(slots, self.config.offload_lead)
                self._offloader.set_plans([s.plan for s in slots])
                for slot in slots:
                    slot.offload = self._offloader
        except BaseException:
            self._boundary.remove()
            self._session.remove()
            raise
        headroom.acquire()
        # Given back by close(), or, for a cache never closed, when this handle is garbage collected
        # (its model dropped): a leaked cache must not leave dynamo's limit raised for good.
        self._headroom = weakref.finalize(self, headroom.release)
        logger.debug(message)
        return self

    def close(self) -> None:
        """Remove every hook and stored output; the model is exactly as before."""
        was_open = self._session.open
        self._boundary.remove()
        self._session.remove()
        if self._headroom is not None:
            self._headroom()  # headroom.release(), once
            self._headroom = None
        if was_open:
            self.tracker.check_complete()  # a run shorter than the schedule gets a warning
        self._clear()  # drop stored outputs; counters stay readable through .stats
        if was_open:
            stats = self.stats
            for model in self.models:
                LAST_STATS[model] = stats
        if self.planner is not None:
            self.planner.close()

    @property
    def running_schedule(self) -> Schedule:
        """The schedule the current generation follows: :attr:`schedule`, or (with
        ``on_length_mismatch="resample"``) it resampled to the run's step count."""
        return self._running

    @property
    def pipeline(self) -> Any:
        """The pipeline this cache is on (None: it is on a module)."""
        return self._pipeline

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
            # Other models altogether: they carry none of this cache's hooks and run uncached.
            seen = tuple(id(unwrap(m)) for m in current)
            if seen not in self._warned_replaced:
                self._warned_replaced.add(seen)
                warnings.warn(
                    f"pipe.transformer was replaced while a cache is open: the new "
                    f"{type(unwrap(current[0])).__name__} runs uncached (the cache stays on the model it was "
                    "enabled on). Close the cache and enable it again on the pipeline "
                    "(stepcache.cache(pipe, schedule)) to cache the new transformer.",
                    StepCacheWarning,
                    stacklevel=3,
                )
            return
        if [hook_state(m) for m in current] != self._session.hooked:
            logger.info("the transformer was compiled after the cache was enabled: moving its step hooks")
            self._session.rehook(current)

    def _check_guidance_batch(self, args: tuple, kwargs: dict) -> None:
        """At each generation's first call: is its batch a stacked guidance batch? A generation
        without guidance (scale 1) would otherwise have half of its batch taken for a branch."""
        if self.tracker.step != 0 or self.tracker.branch != 0:
            return
        guided = guidance_batch(args, kwargs)
        for guide in self._guide_objects:
            guide.active = guided
        if not guided and not self._warned_unguided:
            self._warned_unguided = True
            warnings.warn(
                f"the guidance plan (layout={self.guidance.layout!r}) expects stacked classifier-free "
                "guidance batches, but this generation's input is not a classifier-free guidance batch "
                "(no two equal halves: guidance scale 1, or no guidance): its guidance reuse is skipped "
                "and every call computes in full. Drop guidance= for generations without guidance.",
                StepCacheWarning,
                stacklevel=2,
            )

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

    def set_forecast_gains(self, gains: Any) -> None:
        """Scale every forecast weight of the running plans by per-step ``gains`` (``num_steps`` rows of
        ``(g_alpha, g_beta)``), or by per-component gains (a mapping component name -> such rows;
        components it leaves out keep the plain weights); None: the schedule's own. Tensors may carry
        gradients: this is how :func:`stepcache.fit_forecasts` differentiates the final samples with
        respect to the gains (eager calls only; compiled graphs read the weights as plain numbers)."""
        n = self._running.num_steps
        if gains is None:
            per = self._running.gains_of(self.components)
        elif isinstance(gains, Mapping):
            unknown = sorted(set(gains) - set(self._slots))
            if unknown:
                raise ScheduleError(f"gains name component(s) {unknown[:3]} that this cache does not run.")
            per = {name: gains.get(name) for name in self._slots}
        else:
            per = {name: gains for name in self._slots}
        for rows in per.values():
            if rows is not None and len(rows) != n:
                raise ScheduleError(f"gains have {len(rows)} rows but the running schedule has {n} steps.")
        self._gains = per
        for name, slot in self._slots.items():
            slot.set_plan(slot.plan, per.get(name))

    # ---------------------------------------------------------------- stats
    @property
    def stats(self) -> CacheStats:
        by_type: dict[str, list[Slot]] = {}
        for slot in self._slots.values():
            by_type.setdefault(slot.type, []).append(slot)
        out = {}
        for kind, slots in by_type.items():
            macs = (
                None
                if any(s.macs is None for s in slots if s.reused or s.halved)
                else sum((s.reused + 0.5 * s.halved) * (s.macs or 0) for s in slots)
            )
            held = self._bytes.get(kind) or Bytes()
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

    def _probe(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._call = (module, args, kwargs)  # held until the call begins (_forget_call)

    def _forget_call(self) -> None:
        self._call = None

    def _planned(self) -> None:
        """A generation starts: follow the schedule the planner chooses for it."""
        assert self.planner is not None
        module, args, kwargs = self._call or (self.model, (), {})
        start = GenerationStart(
            self._pipeline or self.model, self._pipeline, module, args, kwargs, pipeline_steps(self._pipeline)
        )
        schedule = self.planner.plan(start)
        self.tracker.num_steps = None if schedule is None else schedule.num_steps
        if schedule is None:  # uncached, of open length: one such schedule, its plans set once
            if self._open is None:
                self._open = compute_all(self.components, OPEN_STEPS)
            schedule = self._open
        if schedule is self._running:
            return
        self._running = schedule
        plans = schedule.resolve(self.components)
        self._gains = schedule.gains_of(self.components)
        everything = (1,) * schedule.num_steps
        for name, slot in self._slots.items():
            slot.set_plan(plans.get(name, everything), self._gains.get(name))

    def _on_generation(self) -> None:
        self._clear()
        if self.planner is not None:
            self._planned()
            if self._offloader is not None:
                self._offloader.set_plans([s.plan for s in self._offloader.slots])
                self._offloader.reset()
            self._generations += 1
            return
        # A cache on the transformer itself (apply_smoothcache) finds the pipeline calling it, so it
        # resamples (or refuses) from the pipeline's step count exactly as a cache on the pipeline.
        pipeline = self._pipeline if self._pipeline is not None else calling_pipeline(self.models)
        n = pipeline_steps(pipeline)
        if n is None and self.config.on_length_mismatch == "resample" and not self._warned_resample:
            self._warned_resample = True
            warnings.warn(
                "on_length_mismatch='resample' resamples each generation to the step count its pipeline's "
                "scheduler is set up for, but this model is called from a plain loop, which tells no step "
                "count: the schedule runs as given. Give the loop a schedule for its step count "
                "(schedule.resample(n)), or cache the pipeline.",
                StepCacheWarning,
                stacklevel=2,
            )
        want = self.schedule.num_steps if n is None else n
        if want != self._running.num_steps:
            if want != self.schedule.num_steps and self.config.on_length_mismatch != "resample":
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
            self._gains = self._running.gains_of(self.components)
            for name, slot in self._slots.items():
                slot.set_plan(plans[name], self._gains.get(name))
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
    digest = recorded["weights_digest"]
    old = isinstance(digest, str) and not digest.startswith(DIGEST_PREFIX)  # written before order counted
    now = weights_state(target, digest_version=1 if old else 2)
    changed = [k for k, v in recorded.items() if v is not None and now.get(k) != v]
    if changed:
        what = ", ".join(f"{k} {recorded[k]} -> {now[k]}" for k in changed)
        warnings.warn(
            f"the model changed since this schedule's calibration ({what}): a LoRA added or fused, another "
            "checkpoint or dtype changes which steps can be reused. Recalibrate for the best schedule.",
            StepCacheWarning,
            stacklevel=4,
        )
