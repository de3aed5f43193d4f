"""Calibration: how much each component's output changes between denoising steps.

An uncached run records, for every component and step ``s``, the relative L1 change of its output
against ``j = 1..k`` steps earlier, ``e(s, j) = |o_s - o_{s-j}|_1 / |o_s|_1``, per batch item. Items and
guidance branches are averaged within a generation; generations are the samples, averaged with
their spread kept. Only the ``k`` most recent outputs of each component are held, in float32.

* :mod:`.value`: :class:`Calibration`, a plain value that saves to JSON with the metadata needed to
  refuse being applied to a different model;
* :mod:`.harness`: what every calibration run shares (the generations to run, the interception, the
  progress bar);
* :mod:`.recorder`: :func:`calibrate` and the interceptor that measures the changes;
* :mod:`.pooled`: the statistics of one process, or pooled exactly over a process group;
* :mod:`.weights`: :func:`sensitivity`, per-step, per-layer weights from perturbation replays;
* :mod:`.response`: :func:`response`, the first-order effect of every step's outputs on the final
  samples, from one differentiable generation (what the open loop ranks placements by);
* :mod:`.guidance`: the two guidance branches calibrated apart (:class:`GuidanceCalibration`).

The policies (:mod:`stepcache.policies`) turn a calibration into a :class:`~stepcache.Schedule`.
"""

from .guidance import GuidanceCalibration, calibrate_guidance
from .recorder import calibrate
from .response import DEFAULT_PROJECTIONS, response
from .value import DEFAULT_LOOKAHEAD, SECOND_ORDER, Calibration
from .weights import sensitivity

__all__ = [
    "DEFAULT_LOOKAHEAD",
    "DEFAULT_PROJECTIONS",
    "SECOND_ORDER",
    "Calibration",
    "GuidanceCalibration",
    "calibrate",
    "calibrate_guidance",
    "response",
    "sensitivity",
]
