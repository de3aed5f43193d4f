"""Cheaper storage of kept outputs: bf16, fp16, or fp8 (e4m3) with one scale per tensor.

A kept output is packed when it is stored and unpacked (to the dtype it was computed in) when a
reuse step reads it. fp8 scales each tensor by its largest magnitude: ``q = x / s`` with
``s = amax(|x|) / 448`` (448 is e4m3's largest finite value), so no element overflows and the
relative rounding error is e4m3's (3 mantissa bits, about 6 %). fp16 holds at most 65504: a tensor
beyond that is divided by the smallest power of two that brings it into range (exact: only the
exponent moves), and one within range is stored unscaled, bit for bit what ``.half()`` gives. Both
keep their scale as one 4-byte tensor, computed on the device (no host sync). The compute step
itself returns the exact output: only reuse steps read the rounded copy.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import StepCacheError

__all__ = ["FP8_MAX", "FP16_MAX", "Packed", "pack", "resolve_storage_dtype", "stored_nbytes", "unpack"]

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
FP16_MAX = 65504.0  # torch.finfo(torch.float16).max
_SCALED = (FP8, torch.float16)  # stored with a 4-byte scale per tensor
_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp8": FP8,
    "fp8_e4m3": FP8,
    "float8_e4m3fn": FP8,
}
_DTYPES = {torch.float32, torch.bfloat16, torch.float16, FP8}


def resolve_storage_dtype(value: Any) -> torch.dtype | None:
    """``None`` (store as computed), a name (``"bf16"``, ``"fp16"``, ``"fp8"``, ``"fp32"``) or one of
    ``torch.float32``, ``torch.bfloat16``, ``torch.float16``, ``torch.float8_e4m3fn``."""
    if value is None:
        return None
    if isinstance(value, str) and value.lower() in _NAMES:
        return _NAMES[value.lower()]
    if isinstance(value, torch.dtype) and value in _DTYPES:
        return value
    raise StepCacheError(
        f"storage_dtype must be None, 'fp32', 'bf16', 'fp16' or 'fp8' (torch.float8_e4m3fn), got {value!r}."
    )


class Packed:
    """A stored tensor in another dtype: ``data`` (and ``scale`` for fp8), read back as ``dtype``."""

    __slots__ = ("data", "dtype", "scale")

    def __init__(self, data: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.data, self.scale, self.dtype = data, scale, dtype

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (0 if self.scale is None else self.scale.nbytes)


def _converts(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return t.is_floating_point() and t.dtype != dtype


def pack(value: Any, dtype: torch.dtype | None) -> Any:
    """``value`` (a tensor, or tuples of them) as stored in ``dtype``; unchanged when ``dtype`` is None
    or already the value's."""
    if dtype is None:
        return value
    if isinstance(value, tuple):
        return tuple(pack(v, dtype) for v in value)
    if not isinstance(value, torch.Tensor) or not _converts(value, dtype):
        return value
    if dtype == FP8:
        amax = value.detach().abs().amax().float()
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        return Packed((value.float() / scale).to(FP8), scale, value.dtype)
    if dtype == torch.float16:
        # Only what fp16 cannot hold is scaled, by a power of two (exact); an inf or NaN the model
        # produced is kept as it is. Everything stays on the device: no host sync.
        amax = value.detach().abs().amax().float()
        need = torch.isfinite(amax) & (amax > FP16_MAX)
        scale = torch.where(need, torch.exp2(torch.ceil(torch.log2(amax / FP16_MAX))), torch.ones_like(amax))
        return Packed((value.float() / scale).to(dtype), scale, value.dtype)
    return Packed(value.to(dtype), None, value.dtype)


def unpack(value: Any) -> Any:
    """A stored value back in the dtype it was computed in (through tuples)."""
    if isinstance(value, Packed):
        if value.scale is None:
            return value.data.to(value.dtype)
        return (value.data.float() * value.scale).to(value.dtype)
    if isinstance(value, tuple):
        return tuple(unpack(v) for v in value)
    return value


def stored_nbytes(value: Any, dtype: torch.dtype | None) -> int:
    """The bytes :func:`pack` would hold for ``value`` (tensors or tuples; meta tensors too), without
    packing: the elements in ``dtype``, plus a 4-byte scale per tensor in fp8 and fp16."""
    if isinstance(value, tuple):
        return sum(stored_nbytes(v, dtype) for v in value)
    if not isinstance(value, torch.Tensor):
        return 0
    if dtype is None or not _converts(value, dtype):
        return value.nbytes
    return value.numel() * dtype.itemsize + (4 if dtype in _SCALED else 0)
