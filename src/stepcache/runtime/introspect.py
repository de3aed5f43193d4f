"""What the runtime needs to know about a model and its outputs: identity, cost, final samples.

* :func:`fingerprint` hashes a denoiser's architecture, so a schedule or calibration made on one
  model is never silently applied to another;
* :func:`mac_shares` and :func:`count_macs` measure multiply-accumulates with torch's FLOP counter
  (matmuls, convolutions, attention): the one place stepcache turns calls into compute;
* :func:`final_samples` reads the samples a replay returned (tensor or pipeline output).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..discovery import Component, denoisers_of, unwrap
from ..errors import StepCacheError

__all__ = [
    "DIGEST_PREFIX",
    "MacShares",
    "count_macs",
    "final_samples",
    "fingerprint",
    "first_tensor_shape",
    "mac_shares",
    "model_class",
    "weights_state",
]


def fingerprint(target: object) -> str:
    """A short hash of the architecture of every denoiser of ``target`` (module or pipeline)."""
    models = [(prefix, unwrap(m)) for prefix, m in denoisers_of(target)]
    if len(models) == 1:
        return _fingerprint_one(models[0][1])
    joined = "|".join(prefix + _fingerprint_one(m) for prefix, m in models)
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def model_class(target: object) -> str:
    """Class name(s) of the denoiser(s), for metadata and messages."""
    return "+".join(type(unwrap(m)).__name__ for _, m in denoisers_of(target))


DIGEST_PREFIX = "v2:"  # weights digests that depend on order; older files hold the order-blind v1


def weights_state(target: object, *, digest_version: int = 2) -> dict[str, Any]:
    """What a config fingerprint cannot see but a schedule depends on: the weights' dtype, adapters
    loaded (peft LoRA) and a digest of the weights themselves (a fused LoRA or another checkpoint
    changes the features, hence the right schedule). One pass over the parameters, one host sync.

    The digest (``"v2:..."``) depends on order: per parameter, by name, its sum and absolute sum and
    sums weighted by row and by column position, so swapped blocks or permuted rows change it.
    ``digest_version=1`` gives the order-blind digest files written before recorded (two sums over
    all parameters), to compare those files by their own rule."""
    models = [unwrap(m) for _, m in denoisers_of(target)]
    named = [(n, p) for m in models for n, p in m.named_parameters()]
    adapters = sorted({str(k) for m in models for k in (getattr(m, "peft_config", None) or {})})
    if not named:
        return {"dtype": None, "adapters": adapters, "weights_digest": None}
    params = [p for _, p in named]
    with torch.no_grad():
        if digest_version == 1:
            sums = torch.stack([torch.stack([p.float().sum(), p.float().abs().sum()]) for p in params])
            values: list[Any] = [len(params), *(f"{v:.6g}" for v in sums.sum(0).double().tolist())]
            names = "|".join(n for n, _ in named)
            digest = hashlib.sha256((json.dumps(values) + names).encode()).hexdigest()[:16]
        else:
            stats = torch.stack([_ordered_sums(p) for p in params]).tolist()  # the one host sync
            values = [
                [n, list(p.shape), [f"{v:.5f}" for v in row]]
                for (n, p), row in zip(named, stats, strict=True)
            ]
            digest = DIGEST_PREFIX + hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16]
    return {
        "dtype": str(params[0].dtype).replace("torch.", ""),
        "adapters": adapters,
        "weights_digest": digest,
    }


def _ordered_sums(p: torch.Tensor) -> torch.Tensor:
    """Four numbers of one parameter in [-1, 1], normalised by its absolute sum so that a device's
    rounding stays far below the digits kept: the sum, and sums weighted by row and by column
    position (any permutation of rows or columns moves them)."""
    x = p.detach().float().reshape(p.shape[0] if p.dim() else 1, -1)
    scale = x.abs().sum().double().clamp_min(1e-30)
    rows, cols = x.sum(1).double(), x.sum(0).double()
    wr = torch.arange(1, rows.numel() + 1, dtype=torch.float64, device=x.device) / rows.numel()
    wc = torch.arange(1, cols.numel() + 1, dtype=torch.float64, device=x.device) / cols.numel()
    return torch.stack(
        [rows.sum() / scale, (rows * wr).sum() / scale, (cols * wc).sum() / scale, scale.log10()]
    )


def _fingerprint_one(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "items"):
        public = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
        text = type(model).__name__ + json.dumps(public, sort_keys=True, default=str)
    else:
        text = type(model).__name__ + repr([(n, tuple(p.shape)) for n, p in model.named_parameters()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def count_macs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float | None]:
    """Run ``fn`` once under torch's FLOP counter; return (output, multiply-accumulates)."""
    if torch.compiler.is_compiling():
        return fn(*args, **kwargs), None
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn(*args, **kwargs)
    return out, counter.get_total_flops() / 2.0


def first_tensor_shape(args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    """Shape of the first tensor argument: a cheap check that a stored output still fits."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return tuple(a.shape)
    for a in kwargs.values():
        if isinstance(a, torch.Tensor):
            return tuple(a.shape)
    return None


def final_samples(
    out: Any, error: type[StepCacheError] = StepCacheError, *, detach: bool = True
) -> torch.Tensor:
    """The final samples a replay callable returned (a tensor, or a pipeline output holding one);
    ``detach=False`` keeps their autograd graph."""
    for attr in ("images", "sample", "frames", "audios"):
        out = getattr(out, attr, out)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise error(
            "`run` must return the final samples as a tensor (e.g. a pipeline called with "
            f"output_type='pt'), got {type(out).__name__}."
        )
    return (out.detach() if detach else out).float()


@dataclass(frozen=True)
class MacShares:
    """Multiply-accumulates measured over one run: the denoiser's, and each component's."""

    total: float
    by_component: dict[str, float]

    def by_type(self, components: Iterable[Component]) -> dict[str, float]:
        """Summed MACs per component type."""
        out: dict[str, float] = {}
        for c in components:
            out[c.type] = out.get(c.type, 0.0) + self.by_component.get(c.name, 0.0)
        return out

    @property
    def cached_share(self) -> float:
        """Share of the denoiser's MACs spent in the measured components."""
        return sum(self.by_component.values()) / self.total if self.total else 0.0


def mac_shares(denoiser: nn.Module, components: Iterable[Component], run: Callable[[], Any]) -> MacShares:
    """Run ``run()`` (which calls ``denoiser`` one or more times) under torch's FLOP counter and
    return the denoiser's MACs and each component's, keyed by component name."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    counts = counter.get_flop_counts()
    root = type(denoiser).__name__
    total = sum(counts.get(root, {}).values()) / 2
    return MacShares(
        total, {c.name: sum(counts.get(f"{root}.{c.name}", {}).values()) / 2 for c in components}
    )
