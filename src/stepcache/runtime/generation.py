"""A schedule chosen per generation: :class:`GenerationPlanner`, and what it sees, :class:`GenerationStart`.

A :class:`~.handle.CacheHandle` given a planner instead of a :class:`~stepcache.Schedule` asks it, when
each generation starts (the first denoiser call after the pipeline set up its scheduler, before any
component runs), which schedule that generation follows. The runtime knows nothing of where the
schedule comes from: :mod:`stepcache.auto` (above the calibration and the policies) looks up a stored
calibration for the generation's key, or records one while the generation runs uncached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from ..discovery import Component
from ..schedule import COMPUTE, Schedule

if TYPE_CHECKING:
    from .handle import CacheHandle

__all__ = ["OPEN_STEPS", "GenerationPlanner", "GenerationStart", "compute_all"]

# Steps an uncached generation of unknown length may make (a plain denoising loop, no scheduler to ask):
# its plans are set once, at a cost linear in this length.
OPEN_STEPS = 1000


@dataclass(frozen=True, eq=False)
class GenerationStart:
    """What is known when a generation starts, before any component runs.

    Attributes:
        target: what the cache is on (a pipeline or a denoiser module).
        pipeline: the pipeline whose scheduler was set up (None: the cache is on a module).
        module: the denoiser this first call goes to.
        args, kwargs: the arguments of that call (the latents, the timestep, the conditioning).
        steps: the denoising steps the pipeline's scheduler is set up for (None: unknown).
    """

    target: Any
    pipeline: Any
    module: nn.Module
    args: tuple
    kwargs: dict
    steps: int | None


class GenerationPlanner:
    """Chooses the schedule of each generation of a :class:`~.handle.CacheHandle`.

    The handle calls :meth:`bind` once it is built, :meth:`wrap` for each component when its
    interception is installed (the callable the component runs when it computes), :meth:`plan` when a
    generation starts and :meth:`close` when the cache is removed.
    """

    def bind(self, handle: CacheHandle) -> None:
        """The handle this planner serves (its components, tracker and config are set)."""

    def wrap(self, comp: Component, original: Callable[..., Any]) -> Callable[..., Any]:
        """What ``comp`` runs when its plan says compute (default: the component itself)."""
        return original

    def plan(self, start: GenerationStart) -> Schedule | None:
        """The schedule of the generation starting now; None: every component computes, and the
        step count is open (the generation runs exactly uncached)."""
        return None

    def close(self) -> None:
        """The cache was removed: finish what is pending."""


def compute_all(components: list[Component], num_steps: int) -> Schedule:
    """A schedule under which every component of ``components`` computes at every step."""
    plan = (COMPUTE,) * num_steps
    return Schedule(num_steps, {kind: plan for kind in sorted({c.type for c in components})})
