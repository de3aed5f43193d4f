"""dit-smoothcache's ``SmoothCacheHelper`` (the original SmoothCache runtime) with a given schedule."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from torch import nn

from stepcache.runtime import StepTracker

from . import SMOOTHCACHE, PeerError, PeerMethod, _require
from ._common import StdoutSilencer


def enable(
    method: PeerMethod, model: nn.Module, tracker: StepTracker, n: int, stack: contextlib.ExitStack
) -> None:
    smoothcache = _require(SMOOTHCACHE)
    from diffusers.models.attention import BasicTransformerBlock

    schedule = method.params.get("schedule")
    if not isinstance(schedule, Mapping) or not schedule:
        raise PeerError('SmoothCacheHelper needs params["schedule"] = {"attn1": [1, 0, ...], "ff": [...]}.')
    schedule = {str(k): [int(v) for v in plan] for k, plan in schedule.items()}
    for key, plan in schedule.items():
        if len(plan) != n or any(v not in (0, 1) for v in plan) or plan[0] != 1:
            raise PeerError(
                f"SmoothCache plan {key!r} must be {n} values of 0/1 starting with 1 (num_inference_steps={n})."
            )
    components = sorted({k.split("-")[0] for k in schedule})
    block = next((m for m in model.modules() if isinstance(m, BasicTransformerBlock)), None)
    missing = [c for c in components if block is None or getattr(block, c, None) is None]
    if missing:
        raise PeerError(f"SmoothCache schedule names {missing}, which the model's blocks do not have.")
    helper = smoothcache.SmoothCacheHelper(model, BasicTransformerBlock, components, schedule)
    helper.enable()
    stack.callback(helper.disable)
    # The helper counts steps per wrapped call and never resets them itself.
    tracker.on_generation.append(helper.reset_state)
    silencer = StdoutSilencer()
    tracker.on_call_begin.append(silencer.enter)
    tracker.on_call_end.append(silencer.exit)
