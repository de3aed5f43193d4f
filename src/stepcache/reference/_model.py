"""Loading the reference DiT, building its inference schedulers, and a plain sampling loop.

diffusers is imported inside the functions so that ``import stepcache.reference`` stays cheap.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stepcache.errors import StepCacheError
from stepcache.reference._data import NUM_CLASSES
from stepcache.reference._weights import (
    REGENERATE_HINT,
    ReferenceWeightsError,
    load_state_into,
    read_json,
    read_safetensors,
    resolve_weights_dir,
)

if TYPE_CHECKING:
    from diffusers import DiTTransformer2DModel
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "MODEL_CONFIG_FILE",
    "MODEL_FILES",
    "MODEL_NAMES",
    "MODEL_SCHEDULERS",
    "MODEL_WEIGHTS_FILE",
    "NULL_CLASS",
    "SCHEDULER_NAMES",
    "default_scheduler",
    "load_model",
    "load_model_metadata",
    "make_scheduler",
    "sample",
]

logger = logging.getLogger(__name__)

MODEL_WEIGHTS_FILE = "dit_digits.safetensors"
MODEL_CONFIG_FILE = "dit_digits.json"
FLOW_MODEL_WEIGHTS_FILE = "dit_digits_flow.safetensors"
FLOW_MODEL_CONFIG_FILE = "dit_digits_flow.json"
#: The shipped reference models: ``"ddpm"`` (``dit_digits``, DDPM epsilon prediction, the default) and
#: ``"flow"`` (``dit_digits_flow``, flow matching / rectified flow, velocity prediction).
MODEL_NAMES = ("ddpm", "flow")
#: (weights file, config file) of each model.
MODEL_FILES: dict[str, tuple[str, str]] = {
    "ddpm": (MODEL_WEIGHTS_FILE, MODEL_CONFIG_FILE),
    "flow": (FLOW_MODEL_WEIGHTS_FILE, FLOW_MODEL_CONFIG_FILE),
}
#: The samplers that fit each model, default first. A DDPM (epsilon) model cannot be sampled with a
#: flow-matching Euler scheduler, nor the velocity model with DDIM/DPM-Solver: they read the model's
#: output differently, so a mismatch is refused rather than mapped.
MODEL_SCHEDULERS: dict[str, tuple[str, ...]] = {
    "ddpm": ("ddim", "dpm", "unipc", "deis", "euler", "euler-a"),
    "flow": ("flow-euler",),
}
_MODEL_ALIASES = {"ddpm": "ddpm", "dit_digits": "ddpm", "flow": "flow", "dit_digits_flow": "flow"}
_SCHEDULER_ALIASES = {
    "ddim": "ddim",
    "dpm": "dpm",
    "dpm++": "dpm",
    "dpmsolver++": "dpm",
    "dpm-solver++": "dpm",
    "unipc": "unipc",
    "uni-pc": "unipc",
    "deis": "deis",
    "euler": "euler",
    "euler-a": "euler-a",
    "euler-ancestral": "euler-a",
    "euler_a": "euler-a",
    "flow-euler": "flow-euler",
}
# Used when the flow model's config lacks a "scheduler" section; matches what the training script writes.
_DEFAULT_FLOW_SCHEDULER: dict[str, Any] = {
    "class": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "prediction_type": "flow",
}


def model_key(model: str) -> str:
    """``"ddpm"`` or ``"flow"`` for a model name (also accepts the file stems ``dit_digits[_flow]``)."""
    key = _MODEL_ALIASES.get(str(model).lower())
    if key is None:
        raise StepCacheError(f"unknown reference model {model!r}; expected one of {', '.join(MODEL_NAMES)}")
    return key


def scheduler_key(name: str) -> str:
    """The canonical scheduler name (``ddim``, ``dpm`` or ``flow-euler``) for a name or alias."""
    key = _SCHEDULER_ALIASES.get(str(name).lower())
    if key is None:
        raise StepCacheError(f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULER_NAMES)}")
    return key


def model_of_scheduler(name: str) -> str:
    """The reference model a scheduler name belongs to: ``"flow"`` for flow-euler, else ``"ddpm"``."""
    key = scheduler_key(name)
    return next(m for m, names in MODEL_SCHEDULERS.items() if key in names)


def default_scheduler(model: str = "ddpm") -> str:
    """The default sampler of a reference model: ``ddim`` (ddpm) or ``flow-euler`` (flow)."""
    return MODEL_SCHEDULERS[model_key(model)][0]


def check_scheduler_fits(model: str, scheduler: str) -> str:
    """The canonical scheduler name, or a one-line error when it does not fit ``model``."""
    mkey, skey = model_key(model), scheduler_key(scheduler)
    valid = MODEL_SCHEDULERS[mkey]
    if skey not in valid:
        what = "flow matching (velocity)" if mkey == "flow" else "DDPM (epsilon)"
        raise StepCacheError(
            f"scheduler {scheduler!r} does not fit the {mkey} reference model (trained with {what}); "
            f"use {' or '.join(valid)}"
        )
    return skey


#: diffusers' DiT appends one extra label embedding after the real classes: the "no class" label that
#: classifier-free guidance conditions on.
NULL_CLASS = NUM_CLASSES
#: Recommended guidance scale, used for the headline figures and the grid in MODEL_CARD.md: 1.0, i.e. no
#: guidance. Unguided samples already reach ~97 % class accuracy with an FD under 2x the real-vs-real
#: floor; guidance 2 lifts accuracy to 100 % but quadruples the FD (it trades diversity for class
#: fidelity). Pass ``guidance_scale`` explicitly to exercise batched classifier-free guidance.
DEFAULT_GUIDANCE_SCALE = 1.0
#: Every inference scheduler :func:`make_scheduler` builds, over both models.
SCHEDULER_NAMES = ("ddim", "dpm", "unipc", "deis", "euler", "euler-a", "flow-euler")

# Used when a config predates the "scheduler" section; matches what scripts/train_reference.py writes.
_DEFAULT_TRAIN_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
}


def load_model_metadata(weights_dir: str | Path | None = None, *, model: str = "ddpm") -> dict[str, Any]:
    """The shipped ``dit_digits.json`` (or ``dit_digits_flow.json`` for ``model="flow"``): model config,
    training scheduler, training and evaluation record."""
    return read_json(resolve_weights_dir(weights_dir) / MODEL_FILES[model_key(model)][1])


def load_model(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    weights_dir: str | Path | None = None,
    model: str = "ddpm",
) -> DiTTransformer2DModel:
    """Build the reference ``DiTTransformer2DModel`` from the shipped config and load its EMA weights.

    Args:
        device: where to put the model.
        dtype: parameter dtype; weights are stored in float32.
        weights_dir: folder holding ``dit_digits.json`` and ``dit_digits.safetensors``; ``None`` means the
            folder shipped with the package.
        model: ``"ddpm"`` (default: ``dit_digits``, DDPM epsilon prediction, sampled with ddim/dpm) or
            ``"flow"`` (``dit_digits_flow``, flow matching, sampled with ``flow-euler``). The loaded module
            remembers which (``stepcache_reference_model``), so :func:`sample` picks the right sampler.

    Returns:
        The model in eval mode (so diffusers' built-in label dropout is off).

    Raises:
        ReferenceWeightsError: a file is missing, corrupted, or does not fit the architecture.
    """
    from diffusers import DiTTransformer2DModel

    key = model_key(model)
    folder = resolve_weights_dir(weights_dir)
    weights_path, cfg_path = (folder / name for name in MODEL_FILES[key])
    meta = read_json(cfg_path)
    model_cfg = meta.get("model")
    if not isinstance(model_cfg, dict):
        raise ReferenceWeightsError(f"{cfg_path} has no 'model' config section. {REGENERATE_HINT}")
    try:
        net = DiTTransformer2DModel(**model_cfg)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise ReferenceWeightsError(
            f"{cfg_path} has an invalid 'model' config ({exc}). {REGENERATE_HINT}"
        ) from exc
    state = read_safetensors(weights_path, expected_sha256=meta.get("sha256"))
    load_state_into(net, state, weights_path)
    # Remember the training betas (or flow shift) so `sample(model, ...)` matches this model even when it
    # was loaded from a non-default folder, and which model it is, for the default sampler.
    defaults = _DEFAULT_FLOW_SCHEDULER if key == "flow" else _DEFAULT_TRAIN_SCHEDULER
    net.stepcache_train_scheduler = {**defaults, **meta.get("scheduler", {})}
    net.stepcache_reference_model = key
    net = net.to(device=device)
    if dtype != torch.float32:  # .to(dtype) makes diffusers warn even when it is a no-op
        net = net.to(dtype=dtype)
    return net.eval()


def _train_scheduler_config(weights_dir: str | Path | None, model: str = "ddpm") -> dict[str, Any]:
    defaults = _DEFAULT_FLOW_SCHEDULER if model == "flow" else _DEFAULT_TRAIN_SCHEDULER
    try:
        meta = load_model_metadata(weights_dir, model=model)
    except ReferenceWeightsError as exc:
        logger.warning("%s Using the default training schedule for the scheduler.", exc)
        return dict(defaults)
    return {**defaults, **meta.get("scheduler", {})}


def _is_flow_config(cfg: dict[str, Any]) -> bool:
    return cfg.get("prediction_type") == "flow" or "FlowMatch" in str(cfg.get("class", ""))


def is_flow_scheduler(scheduler: Any) -> bool:
    """Whether a scheduler object is a flow-matching one (velocity model, float sigma*1000 timesteps)."""
    return "FlowMatch" in type(scheduler).__name__


def make_scheduler(
    name: str = "ddim",
    num_inference_steps: int = 50,
    *,
    weights_dir: str | Path | None = None,
    train_config: dict[str, Any] | None = None,
) -> SchedulerMixin:
    """A fresh inference scheduler on the training betas, with ``set_timesteps`` already called.

    Args:
        name: for the DDPM model ``"ddim"`` (deterministic DDIM, eta=0), ``"dpm"`` (DPM-Solver++ 2M),
            ``"unipc"`` (UniPC multistep, order 2), ``"deis"`` (DEIS multistep, order 2), ``"euler"``
            (Euler, "leading" timestep spacing) or ``"euler-a"`` (Euler ancestral: stochastic, seeded by
            :func:`sample`); ``"flow-euler"`` (diffusers' ``FlowMatchEulerDiscreteScheduler``) for the
            flow model.
        num_inference_steps: number of denoising steps.
        weights_dir: where to read the training schedule from (``None``: the shipped config of the model
            the scheduler belongs to).
        train_config: the training scheduler section itself (overrides ``weights_dir``); a flow config
            with ``ddim``/``dpm`` (or the reverse) is refused.

    Both use "trailing" timestep spacing, so the first step is at t=999 where x_T ~ N(0, I) is exactly
    what the model was trained to see. At t=999 the cosine schedule has sqrt(alpha_bar) ~ 5e-5, so the
    implied x0 prediction amplifies any epsilon error enormously; the samplers therefore clip the x0
    prediction to the data range [-1, 1] (DDIM ``clip_sample``; for DPM-Solver++, UniPC and DEIS
    ``thresholding`` with ``sample_max_value=1``, which is the same hard clip). The Euler samplers have
    no such clip and give visibly worse digits (about 75 % class accuracy instead of 95 % at 15-30
    steps): they are there to run caches under the samplers users have, not for the best images. A new object is returned on every call because
    multistep solvers keep state between steps and must not be shared between runs.

    ``flow-euler`` is the plain Euler ODE step of rectified flow, ``x <- x + (sigma_next - sigma) v``,
    with sigmas linear from 1 to 1/1000 (then 0) and timesteps ``sigma * 1000`` (floats). Its ``shift``
    comes from the training config: 1.0, i.e. no resolution shift. SD3/Flux shift sigmas towards the
    noise end (shift 3, or dynamic) because large latent images keep their global structure longer
    under noise; 16x16 pixels are not that case, and the model was trained with t ~ U(0, 1).
    """
    from diffusers import (
        DDIMScheduler,
        DEISMultistepScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    if num_inference_steps < 1:
        raise StepCacheError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    key = scheduler_key(name)
    mkey = model_of_scheduler(key)
    if train_config is not None:
        given_flow = _is_flow_config(train_config)
        if given_flow != (mkey == "flow"):
            check_scheduler_fits("flow" if given_flow else "ddpm", key)
        defaults = _DEFAULT_FLOW_SCHEDULER if mkey == "flow" else _DEFAULT_TRAIN_SCHEDULER
        cfg = {**defaults, **train_config}
    else:
        cfg = _train_scheduler_config(weights_dir, mkey)
    if key == "flow-euler":
        flow_sched = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=int(cfg["num_train_timesteps"]), shift=float(cfg.get("shift", 1.0))
        )
        flow_sched.set_timesteps(num_inference_steps)
        return flow_sched
    common = {
        "num_train_timesteps": int(cfg["num_train_timesteps"]),
        "beta_schedule": cfg["beta_schedule"],
        "beta_start": float(cfg["beta_start"]),
        "beta_end": float(cfg["beta_end"]),
        "prediction_type": cfg["prediction_type"],
        "timestep_spacing": "trailing",
    }
    if key == "ddim":
        sched = DDIMScheduler(**common, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True)
    elif key == "dpm":
        sched = DPMSolverMultistepScheduler(
            **common,
            algorithm_type="dpmsolver++",
            solver_order=2,
            thresholding=True,
            dynamic_thresholding_ratio=0.995,
            sample_max_value=1.0,
        )
    elif key in ("unipc", "deis"):
        solver = UniPCMultistepScheduler if key == "unipc" else DEISMultistepScheduler
        sched = solver(
            **common,
            solver_order=2,
            thresholding=True,
            dynamic_thresholding_ratio=0.995,
            sample_max_value=1.0,
        )
    elif key in ("euler", "euler-a"):
        # "leading" spacing (steps_offset 1, as Stable Diffusion's Euler): with "trailing" the first sigma
        # of this training schedule is ~20,000 (alpha_bar(999) ~ 0), Euler has no x0 clipping, and the
        # samples came out saturated (99 % of pixels at +-1, class accuracy 0.65 at 10 and 30 steps).
        # Leading: first sigma 6.5 (10 steps) / 15.6 (30), 6-16 % saturated pixels as DDIM, accuracy 0.9-1.0.
        solver = EulerDiscreteScheduler if key == "euler" else EulerAncestralDiscreteScheduler
        sched = solver(**{**common, "timestep_spacing": "leading", "steps_offset": 1})
    else:  # pragma: no cover - scheduler_key() admits nothing else
        raise StepCacheError(f"unknown scheduler {name!r}; expected one of {SCHEDULER_NAMES}")
    sched.set_timesteps(num_inference_steps)
    return sched


def sample(
    model: torch.nn.Module,
    class_labels: torch.Tensor,
    *,
    scheduler: str | SchedulerMixin | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    seed: int = 0,
    progress: bool = False,
    callback: Callable[[int], None] | None = None,
    differentiable: bool = False,
) -> torch.Tensor:
    """Generate one image per label with a plain denoising loop.

    The loop calls ``model(hidden_states=..., timestep=..., class_labels=...)`` exactly once per step
    (classifier-free guidance is batched into that one call), so forward hooks installed by a caching
    engine see one call per denoising step, with the timestep as a ``(batch,)`` tensor.

    Args:
        model: the reference DiT (or anything with the same call signature returning ``.sample``).
        class_labels: ``(N,)`` integer labels in ``0..9`` (``NULL_CLASS`` = unconditional).
        scheduler: a name of :data:`MODEL_SCHEDULERS` that fits the model (``"ddim"``, ``"dpm"``,
            ``"unipc"``, ``"deis"``, ``"euler"``, ``"euler-a"``; ``"flow-euler"`` for the flow model), built with
            :func:`make_scheduler` on the schedule the model was trained with, or an already configured
            diffusers scheduler whose timesteps are set. ``None``: the model's default (``ddim`` for the
            DDPM model, ``flow-euler`` for the flow model). A name that does not fit the model is refused.
        num_inference_steps: steps when ``scheduler`` is a name (ignored for a scheduler object).
        guidance_scale: classifier-free guidance weight; ``1.0`` disables guidance (model card figures use
            :data:`DEFAULT_GUIDANCE_SCALE`). For the flow model the velocity is guided the same way,
            ``v_null + w (v_cond - v_null)``.
        seed: seeds the CPU ``torch.Generator`` that draws x_T, so a fixed seed reproduces the images on
            any device.
        progress: show a tqdm bar.
        callback: called as ``callback(step_index)`` after each step.
        differentiable: build the autograd graph of the loop when gradients are enabled where it is
            called (what :func:`stepcache.fit_forecasts` differentiates); by default the loop runs
            without gradients whatever the caller's mode.

    Returns:
        ``(N, 1, 16, 16)`` images in ``[-1, 1]`` (float32, on the model's device).
    """
    which = getattr(model, "stepcache_reference_model", None)
    if scheduler is None:
        scheduler = default_scheduler(which or "ddpm")
    if isinstance(scheduler, str):
        if which is not None:
            check_scheduler_fits(which, scheduler)
        train_cfg = getattr(model, "stepcache_train_scheduler", None)
        sched = make_scheduler(scheduler, num_inference_steps, train_config=train_cfg)
    else:
        sched = scheduler
    # Flow matching: float timesteps sigma * 1000 (read as they are); DDPM: integer timesteps.
    flow = is_flow_scheduler(sched)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).to(device)
    n = labels.shape[0]
    cfg_model = getattr(model, "config", None)
    channels = int(getattr(cfg_model, "in_channels", 1))
    size = int(getattr(cfg_model, "sample_size", 16))
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    x = torch.randn((n, channels, size, size), generator=generator, dtype=torch.float32)
    x = (x * float(getattr(sched, "init_noise_sigma", 1.0))).to(device=device, dtype=dtype)

    use_cfg = guidance_scale != 1.0
    # Guided runs stack [conditional; unconditional] so each step is still one model call.
    model_labels = torch.cat([labels, torch.full_like(labels, NULL_CLASS)]) if use_cfg else labels

    # DDIM clips its x0 prediction to [-1, 1] but by default keeps the unclipped epsilon for the
    # "direction" term; under guidance the two then disagree badly (measured: 78 % class accuracy at
    # guidance 2). Re-deriving epsilon from the clipped x0, as GLIDE does, keeps the update consistent.
    step_kwargs: dict[str, Any] = {}
    step_params = inspect.signature(sched.step).parameters
    if "use_clipped_model_output" in step_params:
        step_kwargs["use_clipped_model_output"] = True
    if "generator" in step_params:  # stochastic samplers (Euler ancestral) draw their noise from the seed too
        step_kwargs["generator"] = generator

    timesteps = sched.timesteps
    iterator: Any = timesteps
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(timesteps, desc="sampling", leave=False)
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        for i, t in enumerate(iterator):
            x_in = torch.cat([x, x]) if use_cfg else x
            if hasattr(sched, "scale_model_input"):
                x_in = sched.scale_model_input(x_in, t)
            if flow:
                t_batch = torch.full((x_in.shape[0],), float(t), device=device, dtype=torch.float32)
            else:
                t_batch = torch.full((x_in.shape[0],), int(t), device=device, dtype=torch.long)
            out = model(hidden_states=x_in, timestep=t_batch, class_labels=model_labels).sample
            if use_cfg:
                eps_cond, eps_uncond = out.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            else:
                eps = out
            x = sched.step(eps, t, x, **step_kwargs).prev_sample
            if callback is not None:
                callback(i)
    return x.float().clamp(-1.0, 1.0)
