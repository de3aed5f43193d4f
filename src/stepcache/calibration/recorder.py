"""Recording a calibration: the interceptor that measures each component's step-to-step change (and
its forecast errors), and :func:`calibrate`, which runs the generations and turns the records into a
:class:`~stepcache.calibration.Calibration`."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .. import distributed
from .._logging import follow_diffusers
from .._version import __version__
from ..discovery import Component, discover
from ..errors import CalibrationError
from ..runtime.introspect import count_macs, fingerprint, model_class, weights_state
from ..runtime.session import Installer
from ..runtime.steps import StepTracker
from ..schedule import METHODS, forecast_coefficients
from .harness import flatten, generations, intercepted
from .harness import progress as progress_bar
from .pooled import local_statistics, pooled_statistics, sum_over
from .value import DEFAULT_LOOKAHEAD, SECOND_ORDER, Calibration

__all__ = ["Recorder", "assemble", "calibrate", "recorded_calibration"]

logger = logging.getLogger("stepcache.calibration")


class Recorder:
    """Interceptor that runs each component normally and records its step-to-step change.

    With ``forecast``, it also records the error of a first-order forecast: the output at step ``s``
    predicted from the outputs at ``a = s - j`` and ``b = a - m`` as ``o_a + (j / m) (o_a - o_b)``, the
    extrapolation the runtime applies; that needs the ``2k + 1`` most recent outputs instead of ``k``.
    With ``second_order`` as well, the errors of the second-order methods (``SECOND_ORDER``) from
    ``a``, ``b`` and ``c = b - p``, with the runtime's weights (``forecast_coefficients``); that needs
    the ``3k + 2`` most recent outputs and ``2 k (k+1)^2`` more error sums per step.

    Errors of one generation collect in one table per component, ``(steps, k, width)``: along the
    last axis the copy error, then the first-order errors by ``m``, then each second-order method's
    errors by ``(m, p)``.
    """

    def __init__(
        self,
        components: Sequence[Component],
        lookahead: int,
        tracker: StepTracker,
        forecast: bool = False,
        sequence_group: Any = None,
        second_order: bool = False,
    ) -> None:
        self.k = lookahead
        self.forecast = forecast
        self.second_order = second_order and forecast
        k = lookahead
        self.width = (
            1 + (k + 1 if forecast else 0) + (len(SECOND_ORDER) * (k + 1) ** 2 if self.second_order else 0)
        )
        self.tracker = tracker
        self.sequence_group = sequence_group
        self.names = [c.name for c in components]
        self.macs: dict[str, float | None] = {}
        self.generations: list[dict[str, np.ndarray]] = []
        self.forecast_generations: list[dict[str, np.ndarray]] = []
        self._hist: dict[tuple[str, int], deque] = {}
        # (name, step, j, m, per-item |difference|_1, per-item |output|_1); m = 0 marks a copy error.
        # Numerator and denominator stay apart until the generation ends: under context parallelism
        # both are summed over the ranks' sequence slices before dividing.
        # Second-order forecasts come in blocks: j and m are then arrays (one per row of e).
        self._pending: list[tuple[str, int, Any, Any, torch.Tensor, torch.Tensor]] = []
        self._max_step = -1

    def intercept(self, comp: Component, original: Callable[..., Any]) -> Callable[..., Any]:
        name = comp.name

        def forward(*args: Any, **kwargs: Any) -> Any:
            if name in self.macs:
                out = original(*args, **kwargs)
            else:
                out, self.macs[name] = count_macs(original, *args, **kwargs)
            self._record(name, out)
            return out

        return forward

    def _record(self, name: str, out: Any) -> None:
        step, branch = self.tracker.step, self.tracker.branch
        cur = flatten(out)
        if cur is None:
            return
        k = self.k
        depth = (3 * k + 2 if self.second_order else 2 * k + 1) if self.forecast else k
        hist = self._hist.setdefault((name, branch), deque(maxlen=depth))
        past = {s: o for s, o in hist if o.shape == cur.shape}
        norm = cur.abs().sum(1)
        for j in range(1, k + 1):
            a = past.get(step - j)
            if a is None:
                continue
            self._pending.append((name, step, j, 0, (cur - a).abs().sum(1), norm))
            if not self.forecast:
                continue
            for m in range(1, k + 2):
                b = past.get(step - j - m)
                if b is None:
                    continue
                pred = a + (j / m) * (a - b)
                self._pending.append((name, step, j, m, (cur - pred).abs().sum(1), norm))
        if self.second_order:
            self._record_second_order(name, step, cur, past, norm)
        hist.append((step, cur))
        self._max_step = max(self._max_step, step)

    def _record_second_order(
        self, name: str, step: int, cur: torch.Tensor, past: dict[int, torch.Tensor], norm: torch.Tensor
    ) -> None:
        """Every second-order forecast of ``step`` from three earlier outputs at once: each is a
        weighted sum of the stacked history (``(1 + alpha) o_a + (beta - alpha) o_b - beta o_c``),
        so one matrix product per chunk of forecasts replaces hundreds of small elementwise ops."""
        k = self.k
        slots = sorted(past)
        where = {t: i for i, t in enumerate(slots)}
        rows, cells = [], []
        for j in range(1, k + 1):
            for m in range(1, k + 2):
                for p in range(1, k + 2):
                    a, b, c = step - j, step - j - m, step - j - m - p
                    if a not in where or b not in where or c not in where:
                        continue
                    for q, method in enumerate(SECOND_ORDER):
                        alpha, beta = forecast_coefficients(METHODS[method], step, a, b, c)
                        row = [0.0] * len(slots)
                        row[where[a]] += 1 + alpha
                        row[where[b]] += beta - alpha
                        row[where[c]] -= beta
                        rows.append(row)
                        cells.append((j, k + 2 + q * (k + 1) ** 2 + (m - 1) * (k + 1) + (p - 1)))
        if not rows:
            return
        history = torch.stack([past[t] for t in slots])  # (slots, batch, features)
        weights = torch.tensor(rows, dtype=history.dtype, device=history.device)
        chunk = max(1, (1 << 26) // max(1, cur.numel()))  # at most ~256 MB of float32 forecasts at once
        for lo in range(0, len(rows), chunk):
            preds = torch.einsum("ch,hbf->cbf", weights[lo : lo + chunk], history)
            errors = (cur - preds).abs().sum(2)  # (forecasts, batch)
            js = np.array([c[0] for c in cells[lo : lo + chunk]])
            ats = np.array([c[1] for c in cells[lo : lo + chunk]])
            self._pending.append((name, step, js, ats, errors, norm))

    def finish_generation(self) -> None:
        """Average the finished generation's errors over items and branches into one sample."""
        if self._max_step < 0:
            return
        n, k = self._max_step + 1, self.k
        sums = {name: np.zeros((n, k, self.width)) for name in self.names}
        counts = {name: np.zeros((n, k, self.width)) for name in self.names}
        if self._pending:
            flat = self._ratios().cpu().numpy()
            at = 0
            for name, step, j, m, e, _ in self._pending:
                vals = flat[at : at + e.numel()]
                at += e.numel()
                if isinstance(j, np.ndarray):  # a block of second-order forecasts: (cells, batch)
                    cells, items = e.shape
                    block = vals.reshape(cells, items)
                    np.add.at(sums[name][step], (j - 1, m), block.sum(1))
                    np.add.at(counts[name][step], (j - 1, m), items)
                    continue
                sums[name][step, j - 1, m] += vals.sum()
                counts[name][step, j - 1, m] += vals.size
        with np.errstate(invalid="ignore", divide="ignore"):
            means = {
                name: np.where(counts[name] > 0, sums[name] / counts[name], np.nan) for name in self.names
            }
        self.generations.append({name: m[:, :, 0] for name, m in means.items()})
        if self.forecast:
            self.forecast_generations.append({name: m[:, :, 1:] for name, m in means.items()})
        self.drop_generation()

    def _ratios(self) -> torch.Tensor:
        """Every pending relative L1 error, flat: numerators over denominators, each summed over the
        sequence group's slices first when there is one (one collective per generation)."""
        num = torch.cat([e.reshape(-1) for *_, e, _ in self._pending])
        den = torch.cat([d.expand_as(e).reshape(-1) for *_, e, d in self._pending])
        group = self.sequence_group
        if group is not None:
            sizes = distributed.all_reduce(torch.tensor([num.numel(), -num.numel()]), group, op="max")
            if int(sizes[0]) != -int(sizes[1]):
                raise CalibrationError(
                    f"the ranks of sequence_group measured different numbers of errors in one generation "
                    f"({-int(sizes[1])} to {int(sizes[0])}): they must run the same generations, each on "
                    "an equal slice of the sequence."
                )
            both = distributed.all_reduce(torch.stack([num, den]), group)
            num, den = both[0], both[1]
        return num / den.clamp_min(1e-12)

    def drop_generation(self) -> None:
        self._hist.clear()
        self._pending.clear()
        self._max_step = -1


def calibrate(
    target: Any,
    run: Callable[[], Any] | None = None,
    *,
    inputs: Iterable[Mapping[str, Any]] | None = None,
    num_inference_steps: int | None = None,
    lookahead: int = DEFAULT_LOOKAHEAD,
    forecast: bool = True,
    second_order: bool = False,
    blocks: Any = None,
    components: Any = None,
    types: Iterable[str] | None = None,
    timestep_arg: str | None = None,
    scheduler: str | None = None,
    meta: Mapping[str, Any] | None = None,
    progress: bool = True,
    process_group: Any = distributed.AUTO,
    sequence_group: Any = None,
    tracker: StepTracker | None = None,
    installer: Installer | None = None,
) -> Calibration:
    """Record per-step error curves of every cacheable component of ``target``.

    Args:
        target: a diffusers pipeline (its ``.transformer`` is calibrated) or the denoiser module.
        run: a callable with no arguments that performs one or more generations with ``target``.
            Each generation is one sample; they are averaged.
        inputs: instead of ``run`` for a pipeline: a list of call kwargs, one generation each
            (``[{"class_labels": [3]}, ...]``), run with ``num_inference_steps``.
        lookahead: ``k``, the largest step distance to measure (the longest possible reuse run).
        forecast: also record first-order forecast errors (what the ``optimal`` policy uses to choose
            between copying and forecasting); holds ``2k + 1`` outputs per component instead of ``k``.
        second_order: also record the errors of the second-order forecasts (``"taylor2"``, plan value
            3, and ``"bdf2"``, 4; ``forecast2_errors``), which the policies then choose from as well;
            holds ``3k + 2`` outputs per component and costs ``2 k (k+1)^2`` more error sums per
            component and step (off by default).
        blocks, components, types: override discovery (see :func:`stepcache.discover`).
        timestep_arg: name of the denoiser's timestep argument, if it is not found automatically.
        scheduler: scheduler name to record (taken from the pipeline when there is one).
        meta: extra metadata to record (for instance the guidance scale the runs used).
        progress: show a progress bar over denoising steps (on rank 0 only, under a process group).
        process_group: the ranks that calibrate different generations: with ``inputs``, rank ``r`` of
            ``w`` runs the inputs ``i`` with ``i % w == r``; with ``run``, every rank runs its own
            ``run`` (give each its share, e.g. with :func:`stepcache.distributed.shard`). Every rank
            returns the calibration of all ranks' generations, equal (to float precision) to one
            process calibrating them all. ``"auto"`` (default): the whole world when
            ``torch.distributed`` is initialised (torchrun, accelerate) and no ``sequence_group`` is
            given; ``None``: calibrate alone.
        sequence_group: under context parallelism (each rank holds a slice of every sequence), the
            ranks that share one generation. Relative errors are then ratios of sums over the whole
            sequence (numerator and denominator summed over the group), so every rank of it records
            the same curves as one process running the whole sequence. Its ranks must run the same
            generations: with both groups, shard over the data-parallel ``process_group`` only.
        tracker: a :class:`~stepcache.runtime.StepTracker` that ``run`` drives itself, calling its
            ``set_step(step, branch)`` before each denoiser call: for a host that knows its steps and
            guidance branches better than timesteps tell (ComfyUI's sampler, whose model evaluations
            are the steps). Default: each call's step and branch are read from its timestep.
        installer: how the interception is attached (a ``stepcache.runtime.session.Installer``);
            torch hooks by default.

    Raises:
        CalibrationError: bad arguments, no generation ran, or generations of different lengths
            (under a process group, on every rank together, whichever rank's generations failed).
    """
    follow_diffusers()
    if not isinstance(lookahead, int) or isinstance(lookahead, bool) or lookahead < 1:
        raise CalibrationError(f"lookahead must be a positive integer, got {lookahead!r}.")
    seq = distributed.resolve_group(sequence_group)
    default = isinstance(process_group, str) and process_group == distributed.AUTO and seq is not None
    group = None if default else distributed.resolve_group(process_group)
    run, inputs = generations(target, run, inputs, num_inference_steps, group)
    comps = discover(target, blocks=blocks, components=components, types=types)
    names = [c.name for c in comps]
    tracker = StepTracker() if tracker is None else tracker
    if second_order and not forecast:
        raise CalibrationError("second_order=True records forecast errors too: pass forecast=True with it.")
    recorder = Recorder(
        comps, lookahead, tracker, forecast=forecast, sequence_group=seq, second_order=second_order
    )
    tracker.on_generation.append(recorder.finish_generation)
    tracker.on_reset.append(recorder.drop_generation)

    total = len(inputs) * num_inference_steps if inputs is not None and num_inference_steps else None
    bar = progress_bar(progress and distributed.is_main(), total)
    tracker.on_step.append(lambda _s: bar.update(1) if tracker.branch == 0 else None)
    start = time.perf_counter()
    failure: Exception | None = None
    try:
        with intercepted(target, comps, recorder.intercept, tracker, timestep_arg, installer):
            run()
        recorder.finish_generation()
    except Exception as e:
        if group is None:
            raise
        failure = e  # told to the other ranks first, so that none of them waits for this one
    finally:
        bar.close()
    macs = [recorder.macs.get(name) for name in names]
    if seq is not None:
        macs = sum_over(macs, seq)
    seconds = time.perf_counter() - start
    if group is None:
        stats = local_statistics(recorder, names)
    else:
        *pooled, macs, seconds = pooled_statistics(recorder, names, group, failure, macs, seconds)
        stats = tuple(pooled)  # type: ignore[assignment]
    processes = distributed.group_size(group) if group is not None else None
    return assemble(recorder, target, comps, stats, macs, seconds, scheduler, meta, processes)


def recorded_calibration(
    recorder: Recorder,
    target: Any,
    components: Sequence[Component],
    seconds: float,
    *,
    scheduler: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Calibration:
    """The :class:`Calibration` of the generations ``recorder`` finished in this process, recorded on
    ``target`` (what :func:`calibrate` returns without a process group; :mod:`stepcache.auto` records
    a generation the user runs this way)."""
    names = [c.name for c in components]
    stats = local_statistics(recorder, names)
    macs = [recorder.macs.get(name) for name in names]
    return assemble(recorder, target, components, stats, macs, seconds, scheduler, meta, None)


def assemble(
    recorder: Recorder,
    target: Any,
    comps: Sequence[Component],
    stats: tuple[int, int, dict[str, Any], dict[str, Any]],
    macs: Sequence[float | None],
    seconds: float,
    scheduler: str | None,
    meta: Mapping[str, Any] | None,
    processes: int | None,
) -> Calibration:
    """A :class:`Calibration` from the statistics of a recorder's generations and the model's metadata."""
    lookahead = recorder.k
    names = [c.name for c in comps]
    num_samples, n, moments, fmoments = stats
    errors = {name: moments[name].mean for name in names}
    spread = {name: moments[name].std() for name in names}
    forecast_errors = {name: fmoments[name].mean[:, :, : lookahead + 1] for name in names} if fmoments else {}
    forecast2_errors: dict[str, dict[str, np.ndarray]] = {}
    if fmoments and recorder.second_order:
        k1 = lookahead + 1
        for q, method in enumerate(SECOND_ORDER):
            forecast2_errors[method] = {
                name: fmoments[name]
                .mean[:, :, k1 + q * k1 * k1 : k1 + (q + 1) * k1 * k1]
                .reshape(n, lookahead, k1, k1)
                for name in names
            }
    sched = scheduler or (type(target.scheduler).__name__ if hasattr(target, "scheduler") else None)
    info = {
        **dict(meta or {}),
        "model_class": model_class(target),
        "fingerprint": fingerprint(target),
        **weights_state(target),
        "scheduler": sched,
        "stepcache_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(seconds, 2),
    }
    if processes is not None:
        info["processes"] = processes
    logger.info("calibrated %d components over %d generation(s) of %d steps", len(names), num_samples, n)
    return Calibration(
        num_steps=n,
        lookahead=lookahead,
        num_samples=num_samples,
        components={c.name: c.type for c in comps},
        errors=errors,
        spread=spread,
        macs=dict(zip(names, macs, strict=True)),
        meta=info,
        forecast_errors=forecast_errors,
        forecast2_errors=forecast2_errors,
    )
