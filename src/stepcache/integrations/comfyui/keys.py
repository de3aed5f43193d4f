"""What a ComfyUI calibration is valid for: the key of a sampling run.

A calibration measures how much each component's output changes from one sampler evaluation to the
next, which depends on the model (architecture, weights, LoRA patches, dtype), the sampler and its
sigmas (so the step count), the guidance and the latent's shape. :func:`run_key` hashes those into
one digest; a calibration file is named by it, so the StepCache node finds the calibration of a run
like this one and calibrates afresh when anything in the key changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

from ...runtime.introspect import fingerprint

__all__ = ["RunKey", "patches_digest", "run_key", "sampler_name", "weights_digest"]

_SAMPLE = 256  # elements read per tensor for a digest: identity, not a checksum
_PARAMS = 16  # parameters sampled for the weights digest
_PATCH_DIGESTS: dict[Any, str] = {}  # patches_uuid -> digest (one entry per set of patches made)


@dataclass(frozen=True)
class RunKey:
    """The digest of a run's key and its fields (recorded, human-readable, in the calibration)."""

    digest: str
    info: dict[str, Any]

    @property
    def filename(self) -> str:
        """The calibration file of this key: ``flux-euler-20steps-<digest>.json``."""
        info = self.info
        return f"{info['family']}-{info['sampler']}-{info['steps']}steps-{self.digest[:16]}.json"


def run_key(
    patcher: Any,
    model: Any,
    *,
    family: str,
    guider: Any,
    sampler: Any,
    sigmas: torch.Tensor,
    latent_shape: Any,
    discovery: dict[str, Any],
) -> RunKey:
    """The key of one sampling run of ``model`` (the diffusion model ``patcher`` samples with)."""
    values = [round(float(s), 6) for s in sigmas.detach().float().cpu().reshape(-1)]
    info: dict[str, Any] = {
        "family": family,
        "model_class": type(model).__name__,
        "fingerprint": fingerprint(model),
        "weights": weights_digest(patcher),
        "patches": patches_digest(patcher),
        "dtype": str(_dtype(patcher, model)).replace("torch.", ""),
        "sampler": sampler_name(sampler),
        "steps": max(len(values) - 1, 0),
        "sigmas": values,
        "guider": type(guider).__name__,
        "cfg": _number(getattr(guider, "cfg", None)),
        "guidance": sorted({_number(g) for g in _cond_values(guider, "guidance") if g is not None}),
        "latent_shape": [int(d) for d in latent_shape],
        "blocks": discovery.get("blocks"),
        "types": list(discovery.get("types") or ()),
    }
    text = json.dumps(info, sort_keys=True, default=str)
    return RunKey(hashlib.sha256(text.encode()).hexdigest(), info)


def sampler_name(sampler: Any) -> str:
    """``euler``, ``dpmpp_2m``, ... for ComfyUI's KSAMPLER (its sampler function, without ``sample_``),
    with its extra options when they are not the defaults; else the sampler's class name."""
    fn = getattr(sampler, "sampler_function", None)
    name = getattr(fn, "__name__", None) or type(sampler).__name__
    name = name.removeprefix("sample_")
    extra = getattr(sampler, "extra_options", None) or {}
    if extra:
        name += "+" + hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return name.replace("/", "_")


def weights_digest(patcher: Any) -> str:
    """A digest of a sample of the diffusion model's weights as loaded from the checkpoint: two
    checkpoints of one architecture (Flux dev and schnell) differ here. A weight that a patch
    (LoRA) currently replaces is read from the patcher's backup of the original, so the digest is
    the same whether or not the patches are applied; the patches have their own digest."""
    base = getattr(patcher, "model", None)
    if base is None:
        return ""
    params = [(n, p) for n, p in base.named_parameters() if n.startswith("diffusion_model.")]
    if not params:
        return ""
    stride = max(1, len(params) // _PARAMS)
    backup = getattr(patcher, "backup", {}) or {}
    parts = []
    for name, param in params[::stride][:_PARAMS]:
        saved = backup.get(name)
        tensor = getattr(saved, "weight", saved) if saved is not None else param
        parts.append([name, *_tensor_summary(tensor)])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def patches_digest(patcher: Any) -> str:
    """A digest of the weight patches on the patcher (LoRAs and the like: keys, strengths, and a
    sample of each patch's tensors). Empty when there are none. Kept per ``patches_uuid``, which
    ComfyUI renews whenever patches are added, so a run reads the patches once."""
    patches = getattr(patcher, "patches", None) or {}
    if not patches:
        return ""
    uuid = getattr(patcher, "patches_uuid", None)
    if uuid is not None and uuid in _PATCH_DIGESTS:
        return _PATCH_DIGESTS[uuid]
    parts = [[key, [_summary(p) for p in patches[key]]] for key in sorted(patches)]
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]
    if uuid is not None:
        _PATCH_DIGESTS[uuid] = digest
    return digest


def _summary(obj: Any, depth: int = 0) -> Any:
    if isinstance(obj, torch.Tensor):
        return _tensor_summary(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if depth > 4:
        return type(obj).__name__
    if isinstance(obj, (tuple, list)):
        return [_summary(o, depth + 1) for o in obj]
    weights = getattr(obj, "weights", None)  # comfy.weight_adapter adapters keep their tensors here
    if weights is not None:
        return [type(obj).__name__, _summary(weights, depth + 1)]
    return type(obj).__name__


def _tensor_summary(tensor: Any) -> list[Any]:
    shape = [int(d) for d in getattr(tensor, "shape", ())]
    try:
        head = tensor.detach().reshape(-1)[:_SAMPLE].float()
        values = [f"{float(head.sum()):.6g}", f"{float(head.abs().sum()):.6g}"]
    except Exception:  # a quantized or otherwise unreadable tensor: its shape and type only
        values = [type(tensor).__name__]
    return [shape, str(getattr(tensor, "dtype", "")), *values]


def _dtype(patcher: Any, model: Any) -> Any:
    getter = getattr(patcher, "model_dtype", None)
    if callable(getter):
        try:
            return getter()
        except Exception:
            pass
    return getattr(model, "dtype", None)


def _cond_values(guider: Any, name: str) -> list[Any]:
    conds = getattr(guider, "original_conds", None) or {}
    return [c.get(name) for group in conds.values() for c in (group or []) if isinstance(c, dict)]


def _number(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return round(float(value), 6) if isinstance(value, (int, float)) else value
