"""Everything stepcache does with ``torch.distributed``, in one module.

stepcache needs three things of a process group, and nothing more:

* **Calibration over many processes.** :func:`stepcache.calibrate` gives each rank of its
  ``process_group`` a share of the generations (:func:`shard`) and pools the per-cell sufficient
  statistics of all ranks (count, mean and sum of squared deviations, combined exactly), so every
  rank ends with the calibration of the union, equal to one process calibrating every input.
* **Context parallelism.** When each rank holds a slice of every sequence (Ulysses, ring attention),
  a relative L1 error ``sum|a - b| / sum|b|`` is a ratio of two sums over the whole sequence: the
  calibration's ``sequence_group`` sums numerators and denominators over the ranks (:func:`all_reduce`),
  never the ratios.
* **Agreement is checked, never assumed.** Enabling a cache under an initialised process group
  compares a digest of each rank's resolved schedule (:func:`check_schedule_agreement`): one
  ``all_gather`` of five integers per enable. Ranks that differ all raise
  :class:`~stepcache.errors.ScheduleMismatchError`; a rank that never arrives makes the others raise
  after a timeout instead of hanging. :func:`set_schedule_check` changes the group or turns it off.

And the conveniences: :func:`rank` and :func:`is_main` (rank 0 writes files, shows progress bars and
logs at info level; other ranks log warnings and errors only), and :func:`launched` for the command
line under ``torchrun``. Nothing here touches ``torch.distributed`` unless a process group is
initialised, so single-process code never pays for it.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch

from .errors import DistributedError, ScheduleMismatchError

__all__ = [
    "AUTO",
    "all_gather",
    "all_reduce",
    "check_schedule_agreement",
    "is_initialized",
    "is_main",
    "launched",
    "rank",
    "resolve_group",
    "set_schedule_check",
    "shard",
]

AUTO = "auto"
"""Group argument meaning: the whole world when a process group is initialised (and has more than
one rank), else no group at all."""

T = TypeVar("T")


def is_initialized() -> bool:
    """Whether a default process group exists (``init_process_group`` ran: torchrun, accelerate, ...)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank: from the process group, else from ``RANK`` (set by torchrun and
    accelerate before the group exists), else 0."""
    if is_initialized():
        import torch.distributed as dist

        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_main() -> bool:
    """Rank 0: the process that writes files, shows progress bars and logs at info level."""
    return rank() == 0


def resolve_group(group: Any) -> Any:
    """``AUTO`` -> the world group when initialised with more than one rank, else ``None``; ``None``
    -> ``None``; a process group -> itself (which needs an initialised default group).

    Raises:
        DistributedError: a group was given but no process group is initialised.
    """
    if group is None:
        return None
    if isinstance(group, str):
        if group != AUTO:
            raise DistributedError(
                f"a process group is a torch ProcessGroup, None or {AUTO!r}; got {group!r}."
            )
        if not is_initialized():
            return None
        import torch.distributed as dist

        return dist.group.WORLD if dist.get_world_size() > 1 else None
    if not is_initialized():
        raise DistributedError(
            "a process group was given but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group() first (torchrun and accelerate set up its environment)."
        )
    return group


def _require(group: Any) -> None:
    """A process group was given: torch.distributed must be initialised (else its raw errors)."""
    if not is_initialized():
        raise DistributedError(
            "a process group was given but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group() first, or pass group=None for this process alone."
        )


def group_rank(group: Any) -> int:
    """This process's rank within ``group`` (0 without a group)."""
    if group is None:
        return 0
    _require(group)
    import torch.distributed as dist

    return dist.get_rank(group)


def group_size(group: Any) -> int:
    """Ranks in ``group`` (1 without a group)."""
    if group is None:
        return 1
    _require(group)
    import torch.distributed as dist

    return dist.get_world_size(group)


def shard(items: Iterable[T], group: Any = AUTO) -> list[T]:
    """This rank's share of ``items``: item ``i`` goes to the rank ``i % world``, so the union over
    ranks is every item exactly once. Without a process group, all of them.

    Use it in a ``run=`` callable given to :func:`stepcache.calibrate`, or for generation over many
    prompts (``for prompt in shard(prompts): ...``)."""
    items = list(items)
    group = resolve_group(group)
    if group is None:
        return items
    return items[group_rank(group) :: group_size(group)]


def _device(group: Any) -> torch.device:
    """Where a collective's tensors must live: the current CUDA device for NCCL, else the CPU."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, group: Any, op: str = "sum") -> torch.Tensor:
    """The elementwise ``op`` (``"sum"`` or ``"max"``) of ``tensor`` over ``group``, as a new tensor on
    ``tensor``'s device and dtype. Blocks until every rank of the group contributes. Without a group
    (``None``) this process is the whole group: a copy of ``tensor``.

    Raises:
        DistributedError: an unknown ``op``, or a group while torch.distributed is not initialised.
    """
    if op not in ("sum", "max"):
        raise DistributedError(f"op must be 'sum' or 'max', got {op!r}.")
    if group is None:
        return tensor.detach().clone()
    _require(group)
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    work = tensor.detach().to(_device(group), copy=True).contiguous()
    dist.all_reduce(work, op=ops[op], group=group)
    return work.to(tensor.device)


def all_gather(tensor: torch.Tensor, group: Any, *, timeout: float | None = None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape and dtype on all ranks), in rank order, on the CPU.

    With ``timeout`` (seconds), wait at most that long and raise :class:`DistributedError` if some
    rank has not contributed by then (the group's own timeout applies otherwise). Without a group
    (``None``), this process's tensor alone."""
    if group is None:
        return [tensor.detach().cpu().clone()]
    _require(group)
    import torch.distributed as dist

    work_tensor = tensor.detach().to(_device(group)).contiguous()
    out = [torch.empty_like(work_tensor) for _ in range(group_size(group))]
    if timeout is None:
        dist.all_gather(out, work_tensor, group=group)
    else:
        work = dist.all_gather(out, work_tensor, group=group, async_op=True)
        try:
            work.wait(timeout=datetime.timedelta(seconds=timeout))
        except RuntimeError as e:  # gloo and NCCL report a timed-out wait as RuntimeError subclasses
            raise DistributedError(
                f"not every rank of the process group took part within {timeout:g} s ({_one_line(e)})"
            ) from None
    return [t.cpu() for t in out]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


# ---------------------------------------------------------------- schedule agreement
_check_group: Any = AUTO
_check_timeout = 300.0


def set_schedule_check(group: Any = AUTO, *, timeout: float = 300.0) -> None:
    """Choose which ranks compare schedules when a cache is enabled.

    Args:
        group: ``AUTO`` (default: every rank, when a process group is initialised), a process group
            (the ranks that cooperate on one generation, say the context-parallel group), or ``None``
            to skip the check (pure data parallelism where ranks may use different schedules, or
            enable caches different numbers of times).
        timeout: seconds a rank waits for the others at the check before raising.
    """
    global _check_group, _check_timeout
    if group is not None and isinstance(group, str) and group != AUTO:
        raise DistributedError(f"group must be a torch ProcessGroup, None or {AUTO!r}; got {group!r}.")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout < 1e9:
        raise DistributedError(f"timeout must be a positive number of seconds, got {timeout!r}.")
    _check_group, _check_timeout = group, float(timeout)


def schedule_digest(plans: Mapping[str, Sequence[int]], num_steps: int) -> bytes:
    """32 bytes identifying what a cache will do: every component's plan, and the step count."""
    text = json.dumps(
        {"num_steps": int(num_steps), "plans": {k: [int(v) for v in plans[k]] for k in sorted(plans)}},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).digest()


def check_schedule_agreement(plans: Mapping[str, Sequence[int]], num_steps: int) -> None:
    """Raise on every rank unless every rank of the check's group enables the same schedule.

    Called every time a cache is enabled: costs nothing without a process group, else one
    ``all_gather`` of five integers per rank. So every rank of the group must enable caches the
    same number of times: under context parallelism they do anyway (they generate together); under
    data parallelism enable the cache once around the loop over this rank's prompts, or skip the
    check (:func:`set_schedule_check`). It is symmetric on purpose: a rank remembering an earlier
    agreement and skipping the collective would leave a peer waiting.

    What is guaranteed: every rank that reaches the check gets the same answer (ranks compare the
    same gathered digests), so either all of them go on or all of them raise
    :class:`~stepcache.errors.ScheduleMismatchError`. A rank that never reaches it (it failed
    earlier, or the ranks enable caches a different number of times with different schedules) makes
    the others raise :class:`~stepcache.errors.DistributedError` after the timeout of
    :func:`set_schedule_check` instead of hanging; the group is then out of step and should be torn
    down (``destroy_process_group``), as after any failed collective.
    """
    group = resolve_group(_check_group)
    if group is None:
        return
    digest = schedule_digest(plans, num_steps)
    computed = sum(int(v) == 1 for p in plans.values() for v in p)
    total = sum(len(p) for p in plans.values())
    words = [int.from_bytes(digest[i : i + 8], "little", signed=True) for i in range(0, 32, 8)]
    mine = torch.tensor([*words, computed * 1_000_000 // max(total, 1)], dtype=torch.int64)
    try:
        gathered = all_gather(mine, group, timeout=_check_timeout)
    except DistributedError as e:
        raise DistributedError(
            f"schedule check: {e}. A rank failed before enabling its cache (see its log), or ranks "
            "enable caches a different number of times: enable the cache on every rank, or skip the "
            "check with stepcache.distributed.set_schedule_check(None)."
        ) from None
    digests = [tuple(t[:4].tolist()) for t in gathered]
    if len(set(digests)) > 1:
        me = group_rank(group)
        lines = ", ".join(
            f"rank {r}: {_hex(d)} (computes {int(t[4]) / 1e6:.3f})"
            for r, (d, t) in enumerate(zip(digests, gathered, strict=True))
        )
        raise ScheduleMismatchError(
            f"ranks enable different schedules ({lines}; this is rank {me}). Under context parallelism "
            "they would hang: load the same schedule file on every rank (or, for ranks that really "
            "generate independently, skip the check with stepcache.distributed.set_schedule_check(None))."
        )


def _hex(words: tuple[int, ...]) -> str:
    return b"".join(w.to_bytes(8, "little", signed=True) for w in words).hex()[:12]


# ---------------------------------------------------------------- command line
@contextlib.contextmanager
def launched(backend: str = "gloo") -> Iterator[bool]:
    """For the command line: when started by ``torchrun`` (or ``accelerate launch``), which set
    ``WORLD_SIZE`` and a rendezvous address, initialise the default process group for the block and
    tear it down after. Yields whether this process is one of several.

    ``gloo`` is enough: stepcache's own collectives move a few small CPU tensors per calibration."""
    if is_initialized():
        yield group_size(resolve_group(AUTO)) > 1
        return
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    if world <= 1 or "MASTER_ADDR" not in os.environ:
        yield False
        return
    import torch.distributed as dist

    dist.init_process_group(backend=backend)
    try:
        yield True
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
