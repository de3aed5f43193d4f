"""The ComfyUI nodes, in ComfyUI's node API (``comfy_api.latest``): each takes a MODEL and returns a
patched clone of it (:func:`.patch.apply`).

* **StepCache**: MODEL + compute fraction -> MODEL. The first run of each key (model, LoRAs, sampler,
  sigmas, guidance, latent shape) runs uncached and records a calibration into ComfyUI's
  ``models/stepcache`` folder; every later run like it is cached with the optimal schedule for the
  compute fraction. Optional: what to cache, a memory budget and a storage dtype for kept outputs.
* **StepCache (schedule file)**: MODEL + a schedule file of ``models/stepcache`` -> MODEL.
* **StepCache Calibrate**: MODEL -> MODEL that records (and saves) a calibration of every run.

This module imports ComfyUI's node API: ComfyUI loads it through the custom node folder
(``comfyui-stepcache/__init__.py``, ``comfy_entrypoint``); ``import stepcache`` never does.
"""

from __future__ import annotations

from typing import Any

from comfy_api.latest import ComfyExtension, io

from ...calibration import DEFAULT_LOOKAHEAD
from ...errors import StepCacheError
from ...schedule import Schedule
from . import store
from .families import CACHE_MODES
from .patch import Settings, apply

__all__ = [
    "StepCacheCalibrateNode",
    "StepCacheExtension",
    "StepCacheNode",
    "StepCacheScheduleFileNode",
    "comfy_entrypoint",
]

CATEGORY = "model_patches/stepcache"
STORAGE = ["none", "bf16", "fp16", "fp8"]


def _cache_input() -> Any:
    return io.Combo.Input(
        "cache",
        options=list(CACHE_MODES),
        default="auto",
        optional=True,
        tooltip="What to cache: whole blocks, or their attention / cross-attention / feed-forward "
        "branches. auto: the model family's choice (blocks for Flux, HunyuanVideo and SD3, whose "
        "attention is computed inline; branches for Wan and Qwen-Image).",
    )


def _storage_input() -> Any:
    return io.Combo.Input(
        "storage_dtype",
        options=STORAGE,
        default="none",
        optional=True,
        tooltip="Keep cached outputs in this dtype (converted back on read): less memory, a little error.",
    )


def _storage(value: str | None) -> str | None:
    return None if value in (None, "", "none") else value


class StepCacheNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> Any:
        return io.Schema(
            node_id="StepCache",
            display_name="StepCache",
            category=CATEGORY,
            description="Calibrated step caching: the first run of each model / sampler / steps / guidance / "
            "size runs uncached and records a calibration (saved in models/stepcache); later runs reuse "
            "what barely changes between steps, on the optimal schedule for the compute fraction.",
            inputs=[
                io.Model.Input("model", tooltip="The model to cache."),
                io.Float.Input(
                    "compute_fraction",
                    default=0.5,
                    min=0.05,
                    max=1.0,
                    step=0.01,
                    tooltip="Share of the cached computations to run (1.0: all, exactly as without the node).",
                ),
                _cache_input(),
                io.Float.Input(
                    "memory_budget_gb",
                    default=0.0,
                    min=0.0,
                    max=4096.0,
                    step=0.25,
                    optional=True,
                    tooltip="Most memory (GB) the cached outputs may hold at once; 0: no limit. A tight "
                    "budget computes more than the fraction asks.",
                ),
                _storage_input(),
            ],
            outputs=[io.Model.Output(tooltip="The model with StepCache.")],
        )

    @classmethod
    def execute(
        cls,
        model: Any,
        compute_fraction: float,
        cache: str = "auto",
        memory_budget_gb: float = 0.0,
        storage_dtype: str = "none",
    ) -> Any:
        budget = int(memory_budget_gb * 1e9) if memory_budget_gb and memory_budget_gb > 0 else None
        settings = Settings(
            mode="auto",
            compute_fraction=float(compute_fraction),
            cache=cache,
            memory_budget=budget,
            storage_dtype=_storage(storage_dtype),
        )
        return io.NodeOutput(apply(model, settings))


class StepCacheScheduleFileNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> Any:
        return io.Schema(
            node_id="StepCacheScheduleFile",
            display_name="StepCache (schedule file)",
            category=CATEGORY,
            description="Cache with a stepcache schedule file from models/stepcache (made with stepcache's "
            "Python API or CLI); resampled to the run's step count when it has another.",
            inputs=[
                io.Model.Input("model", tooltip="The model to cache."),
                io.Combo.Input(
                    "schedule", options=store.listing(), tooltip="A schedule file in models/stepcache."
                ),
                _cache_input(),
                _storage_input(),
            ],
            outputs=[io.Model.Output(tooltip="The model with StepCache.")],
        )

    @classmethod
    def execute(cls, model: Any, schedule: str, cache: str = "auto", storage_dtype: str = "none") -> Any:
        path = store.resolve(schedule)
        try:
            value = Schedule.load(path)
        except StepCacheError as e:
            raise StepCacheError(
                f"{path.name} is not a stepcache schedule ({e}). A calibration file is read by the StepCache "
                "node itself; make a schedule with stepcache.optimal_schedule or `stepcache schedule`."
            ) from None
        settings = Settings(
            mode="schedule", schedule=value, cache=cache, storage_dtype=_storage(storage_dtype)
        )
        return io.NodeOutput(apply(model, settings))


class StepCacheCalibrateNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> Any:
        return io.Schema(
            node_id="StepCacheCalibrate",
            display_name="StepCache Calibrate",
            category=CATEGORY,
            description="Record a calibration of every run of this model (uncached) and save it in "
            "models/stepcache, where the StepCache node finds it for runs like it.",
            inputs=[
                io.Model.Input("model", tooltip="The model to calibrate."),
                _cache_input(),
                io.Int.Input(
                    "lookahead",
                    default=0,
                    min=0,
                    max=16,
                    optional=True,
                    tooltip="The longest run of reused steps to measure; 0: stepcache's default "
                    f"({DEFAULT_LOOKAHEAD}, or the steps - 1 when fewer).",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The model, recording a calibration of each run.")],
        )

    @classmethod
    def execute(cls, model: Any, cache: str = "auto", lookahead: int = 0) -> Any:
        settings = Settings(mode="calibrate", cache=cache, lookahead=int(lookahead) or None)
        return io.NodeOutput(apply(model, settings))


class StepCacheExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [StepCacheNode, StepCacheScheduleFileNode, StepCacheCalibrateNode]


async def comfy_entrypoint() -> StepCacheExtension:
    return StepCacheExtension()
