"""What each rank of the distributed tests runs (a module, so spawned processes can import it).

``PlainPipe`` is a pipeline-shaped call around the plain test DiT. ``sequence_parallel`` turns the
DiT into a context-parallel one the way Ulysses/ring attention shard it: every rank holds a slice of
the tokens, and attention all-gathers keys and values over the group, so each rank computes exactly
its rows of the full attention.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import stepcache
from stepcache import Calibration, Schedule, distributed
from stepcache.errors import CalibrationError, DistributedError, ScheduleMismatchError
from stepcache.integrations.models import transformer
from tests._helpers.plain_models import Attention, PlainDiT, sample, timesteps

TOKENS, CHANNELS = 16, 4
STEPS = 8
LABELS = [[1], [3, 0], [4], [2]]  # uneven batches and, over 2 ranks, an even split of 4


def make_model() -> PlainDiT:
    torch.manual_seed(0)
    return PlainDiT().eval()


class PlainPipe:
    """``pipe(labels, seed=..., num_inference_steps=...)`` over the plain DiT's sampler."""

    def __init__(self, model: PlainDiT) -> None:
        self.transformer = model

    def __call__(self, labels, seed: int = 0, num_inference_steps: int = STEPS, fail: bool = False):
        if fail:
            raise RuntimeError("this rank's generation failed")
        return sample(self.transformer, torch.tensor(labels), num_inference_steps, seed=seed, guidance=2.0)


def inputs(n: int = 3) -> list[dict]:
    return [{"labels": LABELS[i % len(LABELS)], "seed": i} for i in range(n)]


class SequenceParallelAttention(Attention):
    """Queries of this rank's tokens, keys and values of every rank's (all-gathered)."""

    group = None

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        k, v = (torch.cat(distributed.all_gather(t.contiguous(), self.group), dim=2) for t in (k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def sequence_parallel(model: PlainDiT, group) -> PlainDiT:
    for block in model.blocks:
        block.attn.__class__ = SequenceParallelAttention
        block.attn.group = group
    return model


def sp_sample(model, labels, n=STEPS, seed=0, guidance=2.0):
    """The plain sampler on this rank's token slice; the full final sample, gathered."""
    world, me = dist.get_world_size(), dist.get_rank()
    y = torch.tensor(labels)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(y), TOKENS, CHANNELS, generator=g)
    part = TOKENS // world
    x = x[:, me * part : (me + 1) * part].contiguous()
    null = torch.full_like(y, model.num_classes)
    for tv in timesteps(n):
        both = model(torch.cat([x, x]), tv.expand(2 * len(y)), torch.cat([y, null]))
        cond, unc = both.chunk(2)
        x = x - 0.05 * (unc + guidance * (cond - unc))
    return torch.cat(distributed.all_gather(x, dist.group.WORLD), dim=1)


def schedule(n=STEPS, shift=0):
    plan = tuple(1 if (s + shift) % 3 == 0 or s < 2 or s == n - 1 else 0 for s in range(n))
    return Schedule(n, {"attn": plan, "ff": plan})


def tiny_flux():
    torch.manual_seed(0)
    return transformer("flux")


def flux_sample(model, seed: int = 0, n: int = STEPS) -> torch.Tensor:
    """A denoising loop over the tiny Flux transformer (16 image tokens, 6 text tokens)."""
    g = torch.Generator().manual_seed(seed)
    x, text, pooled = (
        torch.randn(1, 16, 16, generator=g),
        torch.randn(1, 6, 16, generator=g),
        torch.randn(1, 16, generator=g),
    )
    img_ids, txt_ids = torch.arange(48.0).reshape(16, 3), torch.zeros(6, 3)
    with torch.no_grad():
        for t in torch.linspace(1, 0.1, n):
            out = model(
                x,
                encoder_hidden_states=text,
                pooled_projections=pooled,
                timestep=t.expand(1),
                img_ids=img_ids,
                txt_ids=txt_ids,
                return_dict=False,
            )[0]
            x = x - 0.1 * out
    return x


def flux_runs(model):
    return lambda: [flux_sample(model, seed) for seed in (0, 1)]


def diffusers_ulysses(rank: int, folder: Path) -> None:
    """diffusers' ContextParallelConfig(ulysses_degree=2) on the CPU. diffusers puts rank r on
    device ``r % torch.accelerator.device_count()``, which is 0 on a CPU-only torch: one device it is."""
    from diffusers import ContextParallelConfig

    torch.accelerator.device_count = lambda: 1
    model = tiny_flux()
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    with stepcache.cache(model, schedule()):
        torch.save(flux_sample(model), folder / f"flux_cached_rank{rank}.pt")
    whole = stepcache.calibrate(
        model, run=flux_runs(model), lookahead=2, sequence_group=dist.group.WORLD, progress=False
    )
    whole.save(folder / f"flux_calibration_rank{rank}.json")
    alone = stepcache.calibrate(model, run=flux_runs(model), lookahead=2, process_group=None, progress=False)
    alone.save(folder / f"flux_slice_calibration_rank{rank}.json")


def run(rank: int, world: int, port: int, out: str) -> None:
    """Every scenario in one pair of processes (process start-up dominates the cost)."""
    torch.set_num_threads(1)
    os.environ.setdefault("RANK", str(rank))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    folder = Path(out)
    report: dict = {}

    # 1. Sharded calibration: this rank runs inputs i % world == rank; every rank gets the union.
    pipe = PlainPipe(make_model())
    cal = stepcache.calibrate(pipe, inputs=inputs(), num_inference_steps=STEPS, lookahead=2, progress=False)
    cal.save(folder / f"sharded_rank{rank}.json")
    # ...and a separate job per rank (no pooling), to merge afterwards.
    mine = distributed.shard(inputs())
    alone = stepcache.calibrate(
        pipe, inputs=mine, num_inference_steps=STEPS, lookahead=2, progress=False, process_group=None
    )
    alone.save(folder / f"alone_rank{rank}.json")

    # 2. A generation failing on one rank fails calibration on every rank, without a hang.
    bad = [{**kw, "fail": rank == 1} for kw in inputs(2)]
    try:
        stepcache.calibrate(pipe, inputs=bad, num_inference_steps=STEPS, progress=False)
        report["failure"] = "no error"
    except (CalibrationError, RuntimeError) as e:
        report["failure"] = f"{type(e).__name__}: {e}"

    # 3. Context parallelism: each rank holds half the tokens of every generation.
    sp = sequence_parallel(make_model(), dist.group.WORLD)
    torch.save(sp_sample(sp, [1, 3], seed=5), folder / f"sp_uncached_rank{rank}.pt")
    with stepcache.cache(sp, schedule()) as handle:
        torch.save(sp_sample(sp, [1, 3], seed=5), folder / f"sp_cached_rank{rank}.pt")
        torch.save(sp_sample(sp, [2], seed=6), folder / f"sp_cached2_rank{rank}.pt")
    report["sp_reused"] = handle.stats.reused

    def sp_run():
        for i in range(2):
            sp_sample(sp, LABELS[i], seed=i)

    spcal = stepcache.calibrate(sp, run=sp_run, lookahead=2, sequence_group=dist.group.WORLD, progress=False)
    spcal.save(folder / f"sp_calibration_rank{rank}.json")

    # 3b. The same with diffusers' own context parallelism (Ulysses) on a tiny Flux transformer.
    try:
        diffusers_ulysses(rank, folder)
    except Exception as e:  # reported, so the other scenarios still run
        report["diffusers_error"] = f"{type(e).__name__}: {e}"

    # 4. Different schedules on the ranks: every rank raises, nobody hangs.
    model = make_model()
    started = time.perf_counter()
    try:
        with stepcache.cache(model, schedule(shift=rank)):
            pass
        report["mismatch"] = "no error"
    except ScheduleMismatchError as e:
        report["mismatch"] = str(e)
    report["mismatch_seconds"] = time.perf_counter() - started

    # 5. The same schedule after a mismatch: the ranks agree again.
    with stepcache.cache(model, schedule()):
        pass
    with stepcache.cache(model, schedule()):
        pass

    # 6. A rank that never reaches the check (it failed before enabling its cache): the others
    # raise after the timeout. Last: the group is out of step afterwards.
    distributed.set_schedule_check(timeout=3)
    done = folder / "timeout_done"
    if rank == 0:
        started = time.perf_counter()
        try:
            with stepcache.cache(model, schedule(shift=1)):
                pass
            report["timeout"] = "no error"
        except DistributedError as e:
            report["timeout"] = str(e)
        report["timeout_seconds"] = time.perf_counter() - started
        done.touch()
    else:
        deadline = time.monotonic() + 30
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    (folder / f"report_rank{rank}.json").write_text(json.dumps(report))


def load(path) -> Calibration:
    return Calibration.load(path)
