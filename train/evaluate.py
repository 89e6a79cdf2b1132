"""Held-out loss: ``eval_loss`` = Σ token losses / Σ trainable tokens over the WHOLE eval shard set.

A mean of per-batch means would weight short batches as much as long ones; summing first makes ``eval_loss``
exactly what running every eval example alone and pooling its token losses gives (tests check this against the
unpatched Hugging Face model). On several ranks each takes a disjoint share of the eval packs and the two sums
are all-reduced once at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .data import Prefetcher, ShardSetLike, fill_micro_batches, pack_sizes

__all__ = ["default_eval_shards", "evaluate"]


def default_eval_shards(train_shards: str | Path) -> Path | None:
    """``SHARDS/eval`` when `prep pack --eval-fraction` wrote it there, else None."""
    candidate = Path(train_shards) / "eval"
    return candidate if (candidate / "manifest.json").is_file() else None


@torch.no_grad()
def evaluate(
    loss_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    model: torch.nn.Module,
    ss: ShardSetLike,
    *,
    device: torch.device,
    budget: int,
    rank: int = 0,
    world_size: int = 1,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
) -> tuple[float, int]:
    """Return ``(eval_loss, trainable_tokens)`` of ``ss`` under ``loss_fn(model, batch) -> (loss_sum, n)``."""
    was_training = model.training
    model.eval()
    try:
        sizes = pack_sizes(ss)
        groups = fill_micro_batches(np.arange(len(ss), dtype=np.int64), sizes.num_tokens, budget)
        mine = groups[rank::world_size]
        total = torch.zeros(2, dtype=torch.float64, device=device)
        with Prefetcher(ss, mine, pin=device.type == "cuda") as feed:
            for _, host_batch in feed:
                batch = host_batch.to(device, non_blocking=True)
                loss_sum, n = loss_fn(model, batch)
                total[0] += loss_sum.detach().double()
                total[1] += n.detach().double() if torch.is_tensor(n) else float(n)
        if all_reduce is not None:
            all_reduce(total)
        loss_sum, count = total.tolist()  # host-device sync: one per evaluation
    finally:
        model.train(was_training)
    return (loss_sum / count if count > 0 else float("nan")), int(count)
