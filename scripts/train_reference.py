#!/usr/bin/env python
"""Train (and evaluate) the reference DiT and the evaluation classifier shipped in ``stepcache.reference``.

Why this exists: step-caching demos, tests and benchmarks need a real trained diffusion transformer that
runs offline on a laptop CPU. This script recreates every file in ``src/stepcache/reference/weights/`` from
scikit-learn's bundled digits, seeded, on CPU:

    python scripts/train_reference.py --minutes 30          # classifier + DiT + evaluation (~40 min)
    python scripts/train_reference.py --steps 9000          # bit-reproducible step count instead of a time budget
    python scripts/train_reference.py --only eval           # re-evaluate the shipped weights, redraw the grid
    python scripts/train_reference.py --resume              # continue from the periodic checkpoint after a crash
    python scripts/train_reference.py --objective flow --only dit --steps 3000   # the flow-matching model

``--objective flow`` trains the second reference model, ``dit_digits_flow``: the same DiT config trained with
flow matching (rectified flow, velocity target) instead of DDPM epsilon prediction. It writes only
``dit_digits_flow.safetensors`` / ``dit_digits_flow.json`` (and ``sample_grid_flow.png``); the classifier is
never retrained by a flow run, so the DDPM model's files and the shared classifier stay untouched.

With ``--minutes`` the run stops at the wall-clock budget; the learning-rate schedule is sized from the
throughput measured in the first steps, so the exact step count depends on the machine (it is recorded in
``dit_digits.json``). Pass ``--steps`` for an exactly reproducible run.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stepcache.reference import (
    DEFAULT_GUIDANCE_SCALE,
    IMAGE_SIZE,
    NULL_CLASS,
    NUM_CLASSES,
    DigitClassifier,
    load_classifier,
    load_digits,
    load_model,
    sample,
)
from stepcache.reference._classifier import CLASSIFIER_CONFIG_FILE, CLASSIFIER_WEIGHTS_FILE
from stepcache.reference._data import SPLIT_SEED, TEST_FRACTION
from stepcache.reference._model import MODEL_FILES
from stepcache.reference._weights import DEFAULT_WEIGHTS_DIR, file_sha256

logger = logging.getLogger("train_reference")

MODEL_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "patch_size": 2,
    "num_layers": 6,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "num_embeds_ada_norm": NUM_CLASSES,
    "norm_type": "ada_norm_zero",
}
DATA_DESCRIPTION = (
    f"sklearn.datasets.load_digits (1,797 8x8 images, 0..16), bilinear-upsampled to {IMAGE_SIZE}x{IMAGE_SIZE} "
    f"(align_corners=False), scaled to [-1, 1]; stratified split test_size={TEST_FRACTION}, seed={SPLIT_SEED}; "
    "trained on the train split (1,437 images)"
)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed every RNG the run touches; the CPU kernels used here are deterministic for fixed threads."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write via a temporary file + rename so a crash never leaves a half-written weights file behind."""
    from safetensors.torch import save_file

    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(
        {k: v.detach().float().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata
    )
    os.replace(tmp, path)
    path.chmod(0o644)  # safetensors writes 0600; shipped package data must be world-readable


def atomic_write_json(data: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def random_affine(
    x: torch.Tensor, gen: torch.Generator, max_shift: float, max_rot_deg: float
) -> torch.Tensor:
    """Small random shifts/rotations/scalings: generated digits are not perfectly centred, so the
    classifier must not rely on exact pixel positions."""
    n = x.shape[0]
    ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(max_rot_deg)
    scale = 1.0 + (torch.rand(n, generator=gen) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2.0 * max_shift / x.shape[-1])
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Background is -1, so pad with the border value rather than zeros (which would be mid-grey).
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --------------------------------------------------------------------------------------------------
# classifier
# --------------------------------------------------------------------------------------------------
def train_classifier(out_dir: Path, seed: int, epochs: int, threads: int) -> dict[str, Any]:
    """Train the evaluation CNN on the train split and save it with its held-out accuracy."""
    seed_everything(seed)
    torch.set_num_threads(threads)
    x_train, y_train = load_digits("train")
    x_test, y_test = load_digits("test")
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    batch = 64
    steps_per_epoch = math.ceil(len(x_train) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            xb = random_affine(x_train[idx], gen, max_shift=1.5, max_rot_deg=12.0)
            loss = F.cross_entropy(model(xb), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if (epoch + 1) % 10 == 0 or epoch == epochs - 1:
            acc = _accuracy(model, x_test, y_test)
            logger.info(
                "classifier epoch %d/%d loss %.4f test acc %.4f", epoch + 1, epochs, total / len(x_train), acc
            )
    model.eval()
    test_acc = _accuracy(model, x_test, y_test)
    train_acc = _accuracy(model, x_train, y_train)
    first200 = _accuracy(model, x_test[:200], y_test[:200])
    weights_path = out_dir / CLASSIFIER_WEIGHTS_FILE
    atomic_save_safetensors(model.state_dict(), weights_path, {"format": "pt", "arch": "DigitClassifier"})
    meta = {
        "config": model.config(),
        "sha256": file_sha256(weights_path),
        "training": {
            "data": DATA_DESCRIPTION,
            "epochs": epochs,
            "batch_size": batch,
            "optimizer": "AdamW(lr=2e-3 one-cycle, wd=1e-4), label smoothing 0.05",
            "augmentation": "random affine: shift <=1.5 px, rotation <=12 deg, scale 0.9-1.1",
            "seed": seed,
            "seconds": round(time.time() - t0, 1),
        },
        "metrics": {
            "test_accuracy": test_acc,
            "test_accuracy_first200": first200,
            "train_accuracy": train_acc,
            "num_test": len(x_test),
        },
    }
    atomic_write_json(meta, out_dir / CLASSIFIER_CONFIG_FILE)
    logger.info("classifier: test acc %.4f (first 200: %.4f), saved to %s", test_acc, first200, weights_path)
    return meta


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    model.train(was)
    return acc


# --------------------------------------------------------------------------------------------------
# DiT
# --------------------------------------------------------------------------------------------------
def _disable_builtin_label_dropout(model: nn.Module) -> None:
    """diffusers' DiT gives every block its own LabelEmbedding, each dropping labels independently with
    the global RNG. We turn that off and drop labels ourselves, once per image and seeded, so the whole
    network sees the same (possibly null) label."""
    for module in model.modules():
        if hasattr(module, "dropout_prob") and hasattr(module, "embedding_table"):
            module.dropout_prob = 0.0


def _lr_at(step: int, total: int, base_lr: float, warmup: int, final_frac: float = 0.1) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


OBJECTIVES = ("ddpm", "flow")
#: Flow-matching timestep sampling. "uniform": t ~ U(0, 1). "logit-normal": t = sigmoid(n), n ~ N(0, 1),
#: SD3's default (it concentrates training on mid-range t, which matters for large latent images whose
#: content is decided there; for 16x16 pixels the model must also be good at t ~ 1, the first Euler step).
FLOW_TIMESTEP_SAMPLING = ("uniform", "logit-normal")


def flow_timesteps(n: int, gen: torch.Generator, sampling: str = "uniform") -> torch.Tensor:
    """Continuous flow-matching times ``t`` in (0, 1) (``t = 1`` is pure noise), ``(n,)`` float32."""
    if sampling == "uniform":
        return torch.rand(n, generator=gen)
    if sampling == "logit-normal":
        return torch.sigmoid(torch.randn(n, generator=gen))
    raise ValueError(f"unknown flow timestep sampling {sampling!r}; expected one of {FLOW_TIMESTEP_SAMPLING}")


def flow_matching_batch(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rectified flow as diffusers' ``FlowMatchEulerDiscreteScheduler`` expects it.

    ``x_t = (1 - t) x0 + t noise`` with sigma = t, velocity target ``v = noise - x0`` (so the Euler step
    ``x + (sigma_next - sigma) v`` moves from noise towards data), and the model's timestep input is
    ``t * 1000``, the scheduler's ``timesteps``. Returns ``(x_t, model_timestep, target)``.
    """
    tb = t.reshape(-1, *([1] * (x0.dim() - 1)))
    xt = (1.0 - tb) * x0 + tb * noise
    return xt, t * 1000.0, noise - x0


def flow_matching_loss(
    model: nn.Module, x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator, sampling: str = "uniform"
) -> torch.Tensor:
    """One flow-matching MSE on a batch (the noise and times are drawn from ``gen``)."""
    t = flow_timesteps(len(x0), gen, sampling)
    noise = torch.randn(x0.shape, generator=gen)
    xt, timestep, target = flow_matching_batch(x0, t, noise)
    pred = model(hidden_states=xt, timestep=timestep, class_labels=y).sample
    return F.mse_loss(pred, target)


@torch.no_grad()
def heldout_flow_loss(model: nn.Module, seed: int, repeats: int = 4) -> float:
    """Velocity-MSE on the held-out split with fixed noise and uniform times: comparable across runs."""
    x0, y = load_digits("test")
    gen = torch.Generator().manual_seed(seed + 12345)
    model.eval()
    losses = []
    for _ in range(repeats):
        t = torch.rand(len(x0), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt, timestep, target = flow_matching_batch(x0, t, noise)
        for s in range(0, len(x0), 128):
            pred = model(
                hidden_states=xt[s : s + 128], timestep=timestep[s : s + 128], class_labels=y[s : s + 128]
            ).sample
            losses.append(float(F.mse_loss(pred, target[s : s + 128], reduction="sum")))
    return sum(losses) / (repeats * x0.numel())


@torch.no_grad()
def heldout_loss(model: nn.Module, noise_sched: Any, seed: int, repeats: int = 4) -> float:
    """Epsilon-MSE on the held-out split with fixed noise/timesteps: comparable across runs."""
    x0, y = load_digits("test")
    gen = torch.Generator().manual_seed(seed + 12345)
    model.eval()
    losses = []
    for _ in range(repeats):
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(x0),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        for s in range(0, len(x0), 128):
            pred = model(
                hidden_states=xt[s : s + 128], timestep=t[s : s + 128], class_labels=y[s : s + 128]
            ).sample
            losses.append(float(F.mse_loss(pred, noise[s : s + 128], reduction="sum")))
    return sum(losses) / (repeats * x0.numel())


def train_dit(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Train the reference DiT (DDPM epsilon prediction, or flow matching with ``--objective flow``);
    saves the EMA weights."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel
    from tqdm.auto import tqdm

    seed_everything(args.seed)
    torch.set_num_threads(args.threads)
    x_train, y_train = load_digits("train")
    flow = args.objective == "flow"
    weights_file, config_file = MODEL_FILES[args.objective]
    noise_sched = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule=args.beta_schedule,
        prediction_type="epsilon",
        clip_sample=False,
    )
    model = DiTTransformer2DModel(**MODEL_CONFIG)
    _disable_builtin_label_dropout(model)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("DiT parameters: %d", n_params)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(args.seed)

    step, elapsed, total_steps = 0, 0.0, args.steps
    loss_hist: list[float] = []
    ckpt_path = Path(args.checkpoint)
    ck: dict[str, Any] | None = None
    if args.resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        torch.set_rng_state(ck["torch_rng"])
        step, elapsed, total_steps, loss_hist = ck["step"], ck["elapsed"], ck["total_steps"], ck["loss_hist"]
        logger.info("resumed from %s at step %d (%.1f min)", ckpt_path, step, elapsed / 60)

    budget = args.minutes * 60.0 if args.minutes else float("inf")
    max_steps = args.steps if args.steps else None
    calib_at = 30
    perm = torch.randperm(len(x_train), generator=gen)
    pos = 0
    if ck is not None and "perm" in ck:  # older checkpoints lack the epoch permutation
        perm, pos = ck["perm"], ck["pos"]
    t_start = time.time() - elapsed
    t_calib = None
    last_ckpt = time.time()
    bar = tqdm(total=max_steps, initial=step, desc="DiT", mininterval=10, dynamic_ncols=True)
    model.train()
    while True:
        elapsed = time.time() - t_start
        if max_steps is not None and step >= max_steps:
            break
        if elapsed >= budget:
            logger.info("time budget reached at step %d", step)
            break
        if total_steps is None:
            # Size the cosine LR schedule from the measured throughput (steps 5..30 after warm caches).
            if step == 5:
                t_calib = time.time()
            elif step == calib_at and t_calib is not None:
                per_step = (time.time() - t_calib) / (calib_at - 5)
                total_steps = int(step + (budget - elapsed) / per_step * 0.97)
                logger.info(
                    "%.3f s/step -> planning %d steps in %.0f min", per_step, total_steps, args.minutes
                )
        if pos + args.batch_size > len(x_train):
            perm = torch.randperm(len(x_train), generator=gen)
            pos = 0
        idx = perm[pos : pos + args.batch_size]
        pos += args.batch_size
        x0, y = x_train[idx], y_train[idx]
        drop = torch.rand(len(y), generator=gen) < args.label_dropout
        y = torch.where(drop, torch.full_like(y, NULL_CLASS), y)
        lr = _lr_at(step, total_steps or 10**9, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        if flow:
            loss = flow_matching_loss(model, x0, y, gen, args.flow_timesteps)
        else:
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(y),), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            xt = noise_sched.add_noise(x0, noise, t)
            pred = model(hidden_states=xt, timestep=t, class_labels=y).sample
            loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1.0 - decay)
        loss_hist.append(float(loss.detach()))
        step += 1
        bar.update(1)
        if step % 100 == 0:
            recent = sum(loss_hist[-100:]) / len(loss_hist[-100:])
            bar.set_postfix(loss=f"{recent:.4f}", lr=f"{lr:.2e}", min=f"{elapsed / 60:.1f}")
        if step % 500 == 0 or step in (20, 50, 100):
            recent = sum(loss_hist[-100:]) / len(loss_hist[-100:])
            logger.info("step %d  loss(100) %.4f  lr %.2e  %.1f min", step, recent, lr, elapsed / 60)
        if time.time() - last_ckpt > args.checkpoint_minutes * 60:
            _save_checkpoint(
                ckpt_path,
                model,
                ema,
                opt,
                gen,
                step,
                time.time() - t_start,
                total_steps,
                loss_hist,
                perm,
                pos,
            )
            last_ckpt = time.time()
    bar.close()
    elapsed = time.time() - t_start
    _save_checkpoint(ckpt_path, model, ema, opt, gen, step, elapsed, total_steps, loss_hist, perm, pos)

    final_loss = sum(loss_hist[-200:]) / max(1, len(loss_hist[-200:]))
    test_loss = heldout_flow_loss(ema, args.seed) if flow else heldout_loss(ema, noise_sched, args.seed)
    weights_path = out_dir / weights_file
    atomic_save_safetensors(ema.state_dict(), weights_path, {"format": "pt", "weights": "EMA"})
    scheduler_meta: dict[str, Any] = (
        {
            "class": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": 1000,
            "shift": 1.0,
            "prediction_type": "flow",
        }
        if flow
        else {
            "class": "DDPMScheduler",
            "num_train_timesteps": 1000,
            "beta_schedule": args.beta_schedule,
            "beta_start": float(noise_sched.config.beta_start),
            "beta_end": float(noise_sched.config.beta_end),
            "prediction_type": "epsilon",
        }
    )
    objective = (
        f"flow matching (rectified flow): x_t = (1 - t) x0 + t noise, velocity target noise - x0, "
        f"MSE; t ~ {'U(0, 1)' if args.flow_timesteps == 'uniform' else 'sigmoid(N(0, 1)) (logit-normal)'}, "
        "model timestep input t * 1000"
        if flow
        else "DDPM epsilon-prediction MSE, t ~ U{0..999}"
    )
    meta = {
        "model": MODEL_CONFIG,
        "scheduler": scheduler_meta,
        "sha256": file_sha256(weights_path),
        "num_parameters": n_params,
        "null_class": NULL_CLASS,
        "training": {
            "data": DATA_DESCRIPTION,
            "objective": objective,
            **({"timestep_sampling": args.flow_timesteps} if flow else {}),
            "steps": step,
            "planned_steps": total_steps,
            "minutes": round(elapsed / 60, 2),
            "batch_size": args.batch_size,
            "optimizer": f"AdamW(lr={args.lr}, betas=(0.9, 0.999), wd=0), grad-clip 1.0",
            "lr_schedule": f"linear warm-up {args.warmup} steps, cosine to 0.1x over planned_steps",
            "label_dropout": args.label_dropout,
            "ema_decay": args.ema_decay,
            "weights": "EMA",
            "seed": args.seed,
            "threads": args.threads,
            "final_loss": round(final_loss, 5),
            "final_loss_note": "mean training loss of the last 200 steps (online model)",
            "heldout_loss_ema": round(test_loss, 5),
            "torch": torch.__version__,
        },
    }
    atomic_write_json(meta, out_dir / config_file)
    logger.info(
        "DiT: %d steps in %.1f min, final loss %.4f, held-out EMA loss %.4f",
        step,
        elapsed / 60,
        final_loss,
        test_loss,
    )
    return meta


def _save_checkpoint(
    path: Path,
    model: nn.Module,
    ema: nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    step: int,
    elapsed: float,
    total_steps: int | None,
    loss_hist: list[float],
    perm: torch.Tensor,
    pos: int,
) -> None:
    """Everything needed to continue the run exactly where it stopped (``--resume``)."""
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "opt": opt.state_dict(),
            "gen": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "step": step,
            "elapsed": elapsed,
            "total_steps": total_steps,
            "loss_hist": loss_hist,
            "perm": perm,
            "pos": pos,
        },
        tmp,
    )
    os.replace(tmp, path)
    logger.info("checkpoint saved at step %d -> %s", step, path)


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------
def evaluate(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Score the saved weights: class accuracy and classifier-feature FD (with noise floors)."""
    from stepcache.metrics import (
        class_accuracy,
        extract_features,
        frechet_distance_bootstrap,
        frechet_distance_from_features,
    )

    torch.set_num_threads(args.threads)
    flow = args.objective == "flow"
    model = load_model(weights_dir=out_dir, model=args.objective)
    clf = load_classifier(weights_dir=out_dir)
    x_train, _ = load_digits("train")
    x_test, y_test = load_digits("test")
    f_train = extract_features(x_train, clf)
    f_test = extract_features(x_test, clf)
    n = args.eval_samples
    gen = torch.Generator().manual_seed(1)
    sub = torch.randperm(len(x_train), generator=gen)[:n]
    # Real-vs-real floors: the FD two *real* sets of these sizes already have. The full floor compares the
    # held-out split with all 1,437 training images; the size-matched one uses n training images, the same
    # number of images as the generated set, because FD is biased upwards for small sets.
    floors = {
        "fd_floor_test_vs_train": frechet_distance_from_features(f_test, f_train),
        f"fd_floor_test_vs_train_n{len(sub)}": frechet_distance_from_features(f_test, f_train[sub]),
    }
    logger.info("floors: %s", floors)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(math.ceil(n / NUM_CLASSES))[:n]
    runs = []
    if flow:  # one sampler, two step counts
        configs = [("flow-euler", steps, g) for steps in args.eval_flow_steps for g in args.eval_guidance]
    else:
        sampler_steps = {"ddim": 50, "dpm": 20}
        configs = [(name, sampler_steps[name], g) for name in args.eval_samplers for g in args.eval_guidance]
    for sched_name, steps, g in configs:
        t0 = time.time()
        imgs = sample(
            model, labels, scheduler=sched_name, num_inference_steps=steps, guidance_scale=g, seed=args.seed
        )
        secs = time.time() - t0
        fd, (lo, hi) = frechet_distance_bootstrap(x_test, imgs, clf, n_boot=200, seed=0)
        row = {
            "sampler": sched_name,
            "steps": steps,
            "guidance_scale": g,
            "num_samples": n,
            "seed": args.seed,
            "class_accuracy": class_accuracy(imgs, labels, clf),
            "fd_vs_test": fd,
            "fd_ci95": [lo, hi],
            "seconds": round(secs, 1),
        }
        runs.append(row)
        logger.info("eval %s", row)
    meta_path = out_dir / MODEL_FILES[args.objective][1]
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    old = meta.get("evaluation", {})

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["sampler"], r["steps"], r["guidance_scale"], r["num_samples"], r.get("seed", 0))

    merged = {key(r): r for r in old.get("runs", []) if old.get("weights_sha256") == meta.get("sha256")}
    merged.update({key(r): r for r in runs})
    meta["evaluation"] = {
        "weights_sha256": meta.get("sha256"),
        "feature_extractor": "reference classifier penultimate layer (64-d), torchmetrics FrechetInceptionDistance",
        "real_set": "held-out test split (360 images)",
        "classifier_test_accuracy": class_accuracy(x_test, y_test, clf),
        "floors": {**(old.get("floors", {}) if merged else {}), **floors},
        "default_guidance_scale": DEFAULT_GUIDANCE_SCALE,
        "runs": sorted(
            merged.values(), key=lambda r: (r["num_samples"], r["sampler"], r["steps"], r["guidance_scale"])
        ),
    }
    atomic_write_json(meta, meta_path)
    print(json.dumps(meta["evaluation"], indent=2))
    print("| sampler | steps | guidance | samples | class acc | FD vs test [95% CI] | sampling s |")
    print("|---|---|---|---|---|---|---|")
    for r in meta["evaluation"]["runs"]:
        print(
            f"| {r['sampler']} | {r['steps']} | {r['guidance_scale']} | {r['num_samples']} | "
            f"{r['class_accuracy']:.3f} | {r['fd_vs_test']:.2f} [{r['fd_ci95'][0]:.2f}, {r['fd_ci95'][1]:.2f}] | "
            f"{r['seconds']} |"
        )
    return meta["evaluation"]


def save_grid(
    model: nn.Module, path: Path, seed: int, per_class: int = 10, scheduler: str = "ddim", steps: int = 50
) -> None:
    """One row per class, DDIM 50 steps (flow model: flow-Euler 20) at the default guidance scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    imgs = sample(
        model,
        labels,
        scheduler=scheduler,
        num_inference_steps=steps,
        guidance_scale=DEFAULT_GUIDANCE_SCALE,
        seed=seed,
    )
    imgs = ((imgs + 1) / 2).clamp(0, 1).reshape(NUM_CLASSES, per_class, IMAGE_SIZE, IMAGE_SIZE)
    fig, axes = plt.subplots(NUM_CLASSES, per_class, figsize=(per_class * 0.6 + 0.4, NUM_CLASSES * 0.6))
    for r in range(NUM_CLASSES):
        for c in range(per_class):
            ax = axes[r, c]
            ax.imshow(imgs[r, c].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(str(r), rotation=0, labelpad=10, va="center")
    title = {"ddim": "DDIM", "flow-euler": "flow-matching Euler"}.get(scheduler, scheduler)
    fig.suptitle(f"{title} {steps} steps, guidance {DEFAULT_GUIDANCE_SCALE}, seed {seed}", fontsize=8)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    logger.info("sample grid -> %s", path)


# --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-clock budget for the DiT (0 = none; default 30, or none when --steps is given)",
    )
    p.add_argument("--steps", type=int, default=None, help="exact number of DiT steps (reproducible)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--beta-schedule", default="squaredcos_cap_v2", choices=["linear", "squaredcos_cap_v2"])
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="ddpm",
        help="ddpm: dit_digits (epsilon prediction); flow: dit_digits_flow (flow matching, velocity)",
    )
    p.add_argument(
        "--flow-timesteps",
        choices=FLOW_TIMESTEP_SAMPLING,
        default="uniform",
        help="how --objective flow samples t (default uniform; logit-normal is SD3's choice)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--classifier-epochs", type=int, default=60)
    p.add_argument(
        "--only", choices=["classifier", "dit", "eval", "grid"], default=None, help="run one stage only"
    )
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation stage")
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--eval-samplers", nargs="+", choices=["ddim", "dpm"], default=["ddim", "dpm"])
    p.add_argument(
        "--eval-flow-steps", type=int, nargs="+", default=[20, 50], help="flow-Euler step counts to score"
    )
    p.add_argument("--eval-guidance", type=float, nargs="+", default=[1.0, DEFAULT_GUIDANCE_SCALE])
    p.add_argument("--out-dir", type=Path, default=DEFAULT_WEIGHTS_DIR)
    p.add_argument(
        "--grid", type=Path, default=None, help="sample grid path (default: reference/sample_grid.png)"
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="periodic checkpoint (default $TMPDIR/stepcache_train_reference[_flow].ckpt, one per objective)",
    )
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    if args.minutes is None:
        # --steps alone means exactly that many steps: a default time budget would cut the run short and
        # leave the LR schedule unfinished (it did, once per model: see MODEL_CARD.md).
        args.minutes = 0.0 if args.steps else 30.0
    if args.checkpoint is None:  # one file per objective: the architectures match, so a mix-up would load
        suffix = "_flow" if args.objective == "flow" else ""
        args.checkpoint = Path(tempfile.gettempdir()) / f"stepcache_train_reference{suffix}.ckpt"
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    # A flow run never retrains the shared classifier (the DDPM model's evaluation depends on it).
    if args.only == "classifier" or (args.only is None and args.objective == "ddpm"):
        train_classifier(out_dir, args.seed, args.classifier_epochs, args.threads)
    if args.only in (None, "dit"):
        train_dit(args, out_dir)
    if args.only == "eval" or (args.only is None and not args.no_eval):
        evaluate(args, out_dir)
    if args.only == "grid" or (args.only is None and not args.no_eval):
        flow = args.objective == "flow"
        default_grid = "sample_grid_flow.png" if flow else "sample_grid.png"
        grid_path = Path(args.grid) if args.grid else out_dir.parent / default_grid
        save_grid(
            load_model(weights_dir=out_dir, model=args.objective),
            grid_path,
            seed=args.seed,
            scheduler="flow-euler" if flow else "ddim",
            steps=20 if flow else 50,
        )


if __name__ == "__main__":
    main()
