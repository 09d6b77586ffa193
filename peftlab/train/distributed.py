"""Several processes on torch.distributed: DDP (gloo on CPU, nccl on CUDA) or FSDP (`fully_shard`).

Every rank walks the same global micro-batches (same seed, same order) and takes its slice of each. Each
rank's loss is weighted by its share of the global batch's loss units (labelled tokens or examples), so the
averaged gradient equals the single-process gradient of the whole micro-batch. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from peftlab.data.tasks import IGNORE_INDEX
from peftlab.errors import PeftlabError

RENDEZVOUS_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    strategy: str = "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def world_from_env(strategy: str = "ddp") -> World:
    """The world torchrun describes in the environment; a single process when WORLD_SIZE is unset or 1."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    missing = [v for v in RENDEZVOUS_VARS if v not in os.environ]
    if missing:
        raise PeftlabError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: launch with "
                           "`torchrun --nproc_per_node N -m peftlab train ...` or `peftlab train --nproc N`")
    return World(int(os.environ["RANK"]), size, int(os.environ["LOCAL_RANK"]), strategy)


def start(world: World, device: torch.device) -> torch.device:
    """Join the process group; returns this rank's device (cuda:<local_rank> on GPUs)."""
    if not world.distributed:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def stop(world: World, finished: bool = True) -> None:
    """Leave the process group. After a finished run, first drop the run's garbage (FSDP's modules sit in
    reference cycles holding gloo work: freed during interpreter exit, after the group is gone, they abort
    the process) and wait for every process, so none tears the group down while another still uses it. After
    a failure, leave at once: the others may be stuck in a collective."""
    if world.distributed and dist.is_initialized():
        if finished:
            gc.collect()
            dist.barrier()
        dist.destroy_process_group()


def check_batch(world: World, batch_size: int) -> None:
    if world.size > batch_size:
        raise PeftlabError(f"{world.size} processes but batch_size {batch_size}: each process needs at least one "
                           f"example per micro-batch; use --nproc <= {batch_size} or a larger --batch-size")


def shard(indices: list[int], world: World) -> tuple[list[int], bool]:
    """This rank's slice of a global micro-batch; (a stand-in example, False) when the slice is empty."""
    mine = indices[world.rank::world.size]
    return (mine, True) if mine else (indices[:1], False)


def loss_units(batch: dict[str, torch.Tensor], causal: bool) -> int:
    """What the loss averages over: labelled tokens (shifted for causal LMs), or examples."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return labels.shape[0]
    if causal:
        labels = labels[:, 1:]
    return int((labels != IGNORE_INDEX).sum())


def all_reduce(values: Sequence[float], world: World, op: str = "sum") -> list[float]:
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def all_gather_object(value, world: World) -> list:
    if not world.distributed:
        return [value]
    gathered = [None] * world.size
    dist.all_gather_object(gathered, value)
    return gathered


class LossModule(nn.Module):
    """model + loss in one forward, so DDP sees the whole computation (the chunked loss reads lm_head)."""

    def __init__(self, model: nn.Module, compute_loss) -> None:
        super().__init__()
        self.model, self.compute_loss = model, compute_loss

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.compute_loss(self.model, batch)


def wrap(model: nn.Module, compute_loss, world: World, device: torch.device) -> nn.Module:
    """A module whose forward(batch) is the loss: DDP-wrapped, FSDP-sharded, or plain."""
    if world.distributed and world.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        blocks = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module)
        fully_shard(model)
    loss_module = LossModule(model, compute_loss)
    if world.distributed and world.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(loss_module, device_ids=ids)
    return loss_module


def gradient_sync(wrapped: nn.Module, model: nn.Module, world: World, enabled: bool):
    """Skip the all-reduce on all but the last micro-batch of an accumulated step."""
    if enabled or not world.distributed:
        return contextlib.nullcontext()
    if world.strategy == "ddp":
        return wrapped.no_sync()
    return _fsdp_no_sync(model)


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> dict:
    """The whole optimizer state (gathered from the shards under FSDP; every process calls this)."""
    if world.strategy != "fsdp" or not world.distributed:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, world: World) -> None:
    if world.strategy != "fsdp" or not world.distributed:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: FSDP's DTensors gathered whole."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@contextlib.contextmanager
def full_weights(model: nn.Module, world: World) -> Iterator[None]:
    """Inside the block every rank's modules hold whole (unsharded) parameters, ready to save."""
    if not (world.distributed and world.strategy == "fsdp"):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()


def launch(nproc: int, argv: Sequence[str]) -> int:
    """`peftlab train --nproc N ...`: the same command under torchrun on this machine."""
    if nproc < 1:
        raise PeftlabError(f"--nproc must be at least 1, got {nproc}")
    if "WORLD_SIZE" in os.environ:
        raise PeftlabError("--nproc inside a torchrun launch: drop --nproc, torchrun already started the processes")
    from peftlab.cli import ARGV_ENV

    # peftlab's flags travel in the environment: on torchrun's command line its own parser would read them
    # (--r is an abbreviation of several of its options)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "peftlab"]
    return subprocess.call(command, env={**os.environ, ARGV_ENV: json.dumps(list(argv))})

