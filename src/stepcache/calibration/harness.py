"""What every calibration run shares: the generations to run (a callable, or a pipeline's inputs),
the interception of the discovered components with a step tracker, the progress bar, and the
(batch, features) view of a component's output. Used by :func:`~stepcache.calibration.calibrate`,
:func:`~stepcache.calibration.sensitivity` and :func:`~stepcache.calibration.calibrate_guidance`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..discovery import Component, denoisers_of
from ..errors import CalibrationError
from ..runtime.session import Installer, Session
from ..runtime.steps import StepTracker

__all__ = ["flatten", "generations", "intercepted", "progress"]


def generations(
    target: Any,
    run: Callable[[], Any] | None,
    inputs: Iterable[Mapping[str, Any]] | None,
    num_inference_steps: int | None,
    group: Any = None,
) -> tuple[Callable[[], Any], list[Mapping[str, Any]] | None]:
    """``(run, inputs)``: ``run`` as given, or a callable running each of ``inputs`` (this rank's share
    of them under ``group``) through the pipeline ``target``; raises for a combination that is neither."""
    if run is not None:
        if inputs is not None:
            raise CalibrationError("pass either run= or inputs=, not both.")
        return run, None
    if inputs is None:
        raise CalibrationError(
            "pass run=<callable doing one or more generations>, or a pipeline and inputs=[{...}]."
        )
    if isinstance(target, nn.Module) or not callable(target):
        raise CalibrationError("inputs=[...] needs a callable pipeline as target; for a module pass run=.")
    share = list(inputs)
    if not share:
        raise CalibrationError("inputs is empty: give at least one set of call kwargs.")
    share = distributed.shard(share, group) if group is not None else share
    extra = {} if num_inference_steps is None else {"num_inference_steps": num_inference_steps}

    def run_inputs() -> None:
        for kwargs in share:
            target(**{**extra, **kwargs})

    return run_inputs, share


@contextlib.contextmanager
def intercepted(
    target: Any,
    components: Sequence[Component],
    intercept: Callable[[Component, Callable[..., Any]], Callable[..., Any]],
    tracker: StepTracker,
    timestep_arg: str | None = None,
    installer: Installer | None = None,
    inspect: Callable[[tuple, dict], None] | None = None,
    gradients: bool = False,
) -> Iterator[None]:
    """Every component of ``target`` routed through ``intercept`` (steps read by ``tracker``), without
    gradients unless ``gradients``; removed exactly on exit. ``inspect`` sees each denoiser call's
    arguments; ``installer`` attaches the hooks (torch hooks by default)."""
    models = [m for _, m in denoisers_of(target)]
    session = Session(models, components, intercept, tracker, timestep_arg=timestep_arg, installer=installer)
    session.inspect = inspect
    with session, torch.enable_grad() if gradients else torch.no_grad():
        yield


def progress(
    enabled: bool,
    total: int | None,
    desc: str = "calibrating",
    unit: str = "step",
    iterable: Iterable[Any] | None = None,
) -> Any:
    """A tqdm bar (over ``iterable`` when given) that leaves no line behind; silent when not enabled."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, leave=False)


def flatten(output: Any) -> torch.Tensor | None:
    """(batch, features) float32 view of a component's output (all tensors of a tuple joined)."""
    if isinstance(output, torch.Tensor):
        tensors = [output]
    elif isinstance(output, (tuple, list)):
        tensors = [o for o in output if isinstance(o, torch.Tensor)]
    else:
        tensors = []
    if not tensors:
        return None
    b = tensors[0].shape[0] if tensors[0].dim() > 0 else 1
    parts = [t.detach().reshape(b, -1).float() for t in tensors if t.dim() > 0 and t.shape[0] == b]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
