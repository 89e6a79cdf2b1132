"""Several processes (torchrun): environment detection, process group, DDP or FSDP2 wrapping.

The trainer's loss is ``Σ token losses / trainable tokens of the whole step on all ranks``. DDP and FSDP2
average gradients over ranks, so each rank scales its local loss sum by ``world_size / N_step`` (N_step is known
on the host from the epoch plan), which makes the averaged gradient the gradient of the global token mean.

DDP only sees calls through its own ``forward``; :class:`PackedLossModule` makes the packed loss that forward,
so the gradient all-reduce hooks are armed for the micro-batch that should sync.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .batch import MicroBatch
from .config import TrainError

__all__ = [
    "DistEnv",
    "PackedLossModule",
    "all_reduce_sum",
    "barrier",
    "batch_fields",
    "destroy_process_group",
    "detect",
    "init_process_group",
    "min_over_ranks",
    "no_sync",
    "wrap_model",
]


@dataclass(frozen=True)
class DistEnv:
    """This process's place: ``rank`` of ``world_size``, ``local_rank`` on its host."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect() -> DistEnv:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK (a single process when they are absent)."""
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_process_group(env: DistEnv, device: torch.device) -> bool:
    """Join the process group (NCCL on CUDA, gloo on CPU) unless single-process or already joined.

    Returns True when this call created the group: its caller then owns it and tears it down
    (:func:`destroy_process_group`); a group the caller's program set up stays up.
    """
    if not env.distributed or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, **kwargs)
    return True


def destroy_process_group() -> None:
    """Leave the process group (frees NCCL's communicators; without it NCCL warns at exit); a no-op without one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> None:
    """In-place sum over ranks (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def min_over_ranks(value: int, device: torch.device) -> int:
    """The least ``value`` of all ranks (``value`` itself in a single process): one number every rank agrees on."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


class PackedLossModule(torch.nn.Module):
    """``forward(batch fields) -> (loss_sum, n_counted)`` through ``loss_fn(model, MicroBatch)``.

    The fields travel as plain tensors and ints so that DDP's input handling never has to understand a
    dataclass.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, MicroBatch], tuple]):
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, *fields: object) -> tuple[torch.Tensor, torch.Tensor]:
        """``fields``: the MicroBatch fields in declaration order (:func:`batch_fields`)."""
        return self._loss_fn(self.model, MicroBatch(*fields))

    def run(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self(*batch_fields(batch))


def batch_fields(batch: MicroBatch) -> tuple:
    """Every MicroBatch field in declaration order (one list for the plain call and DDP's, none forgotten)."""
    return tuple(getattr(batch, f.name) for f in dataclasses.fields(MicroBatch))


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks (the ``layers`` ModuleList of a Hugging Face decoder, inside any peft wrapper)."""
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList):
            return list(module)
    return []


def wrap_model(module: PackedLossModule, env: DistEnv, device: torch.device, *, fsdp: bool) -> torch.nn.Module:
    """DDP (default) or FSDP2 ``fully_shard`` per decoder layer and at the root; unchanged in one process.

    Returns the module to call; ``.run(batch)`` works on what is returned either way.
    """
    if not env.distributed:
        return module
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as error:
            raise TrainError(f"--fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6): {error}") from error
        for layer in _decoder_layers(module.model):
            fully_shard(layer)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # No buffer broadcast: the only buffers (RoPE tables) are identical on every rank, and a broadcast per forward
    # would make evaluation (where ranks may run different numbers of micro-batches) a collective.
    ddp = DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
    ddp.run = lambda batch: ddp(*batch_fields(batch))  # type: ignore[attr-defined]
    return ddp


@contextlib.contextmanager
def no_sync(wrapped: torch.nn.Module, skip: bool) -> Iterator[None]:
    """Skip the gradient all-reduce of this backward (all micro-batches of a step but the last) under DDP/FSDP2."""
    if not skip:
        yield
        return
    if hasattr(wrapped, "no_sync"):  # DDP
        with wrapped.no_sync():
            yield
    elif hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield
