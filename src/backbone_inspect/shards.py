"""Which slice of the inputs this process takes: ``--shard K/N``, torchrun or Slurm."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .errors import UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def take(self, items: Sequence[T]) -> list[T]:
        """Every ``count``-th item from ``index``: the shards are disjoint and cover every item."""
        return list(items[self.index :: self.count])

    @property
    def manifest_name(self) -> str:
        return f"manifest.shard-{self.index}-of-{self.count}.jsonl"


def parse_shard(text: str) -> Shard:
    parts = text.split("/")
    if len(parts) == 2 and all(part.strip().isascii() and part.strip().isdigit() for part in parts):
        index, count = (int(part) for part in parts)
        if 0 <= index < count:
            return Shard(index, count)
    raise UsageError(f"invalid --shard {text!r}: expected K/N with 0 <= K < N, e.g. 0/4")


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    return int(value) if value.isascii() and value.isdigit() else None


def shard_from_env(env: Mapping[str, str] | None = None, *, strict: bool = True, advise_srun: bool = True) -> Shard | None:
    """The shard of a torchrun rank (RANK/WORLD_SIZE) or of a task srun started
    (SLURM_PROCID/SLURM_STEP_NUM_TASKS).

    Not SLURM_NTASKS: a batch script of ``--ntasks 4`` has it, and SLURM_PROCID=0, in its one
    process, which would then take a quarter of the images. Variables that are set but disagree
    (``RANK=5 WORLD_SIZE=2``, a rank that is not a number) are a ``UsageError`` with ``strict``:
    every rank would otherwise take the whole input. ``advise_srun``: with ``strict``, a
    ``SlurmWithoutSrunWarning`` there (not for a Ray driver, meant to be one process of the job).
    """
    env = os.environ if env is None else env
    if strict and advise_srun:
        _warn_if_a_slurm_job_without_srun(env)
    for rank_name, size_name in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")):
        if not env.get(rank_name, "").strip() or not env.get(size_name, "").strip():
            continue
        rank, size = _env_int(env, rank_name), _env_int(env, size_name)
        if rank is not None and size is not None and 0 <= rank < size:
            return Shard(rank, size) if size > 1 else None
        if strict:
            raise UsageError(
                f"{rank_name}={env[rank_name]!r} and {size_name}={env[size_name]!r} do not name a rank below the "
                f"number of ranks: fix the launcher's variables, unset them, or give --shard K/N"
            )
    return None


class SlurmWithoutSrunWarning(UserWarning):
    """A Slurm job of several tasks runs the command in one process: it takes every image."""


def _warn_if_a_slurm_job_without_srun(env: Mapping[str, str]) -> None:
    tasks = _env_int(env, "SLURM_NTASKS")
    if tasks is not None and tasks > 1 and not env.get("SLURM_STEP_NUM_TASKS", "").strip() and not env.get("RANK", "").strip():
        warnings.warn(SlurmWithoutSrunWarning(
            f"this Slurm job has {tasks} tasks (SLURM_NTASKS) but this process was not started by srun, so it takes "
            f"every image itself; to split them between {tasks} processes, start the command with srun"
        ), stacklevel=3)


def local_rank_from_env(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = _env_int(env, name)
        if value is not None:
            return value
    return 0


def local_processes_from_env(env: Mapping[str, str] | None = None) -> int:
    """Processes of this run on this machine: torchrun's LOCAL_WORLD_SIZE, else the tasks srun
    started on this node (the job's SLURM_NTASKS_PER_NODE, where the step's are not given); else 1."""
    env = os.environ if env is None else env
    for value in (_env_int(env, "LOCAL_WORLD_SIZE"), _step_tasks_on_this_node(env), _env_int(env, "SLURM_NTASKS_PER_NODE")):
        if value:
            return value
    return 1


def _step_tasks_on_this_node(env: Mapping[str, str]) -> int | None:
    """srun's SLURM_STEP_TASKS_PER_NODE ("2(x3),1": two tasks on each of the step's first three
    nodes, one on the fourth) at this node's place in the step, SLURM_NODEID."""
    node = _env_int(env, "SLURM_NODEID")
    counts: list[int] = []
    for part in env.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            return None
        counts += [int(match[1])] * int(match[2] or 1)
    return counts[node] if node is not None and node < len(counts) else None


def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    size = _env_int(env, "WORLD_SIZE")
    return bool(env.get("TORCHELASTIC_RUN_ID") and env.get("MASTER_ADDR") and size and size > 1)


class RankGroup:
    """Under torchrun, ranks agree on the exit code at the end.

    torchrun stops every rank as soon as one exits non-zero, so a rank whose slice had bad
    images must not exit before the others finish: every rank waits for all, then all exit
    with the worst code.
    """

    def __init__(self) -> None:
        import datetime

        import torch.distributed as dist

        self._dist = dist
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))

    def agree_on_exit_code(self, code: int) -> int:
        import torch

        value = torch.tensor([code], dtype=torch.int64)
        self._dist.all_reduce(value, op=self._dist.ReduceOp.MAX)
        self._dist.destroy_process_group()
        return int(value.item())
