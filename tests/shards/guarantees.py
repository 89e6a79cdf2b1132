"""What a shard reader guarantees of every pack it hands out (shards/FORMAT.md, Checks), checked one pack at a time:
an implementation independent of the reader's vectorised ``invariants.batch_problem``, for the tests to compare."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["pack_guarantee_problem"]


def pack_guarantee_problem(p: Any, max_len: int, vocab_size: int | None) -> str | None:
    """The first guarantee that pack ``p`` breaks (a short name), or None when all hold."""
    n = len(p.input_ids)
    if p.input_ids.dtype != np.uint32 or p.position_ids.dtype != np.int32 or p.cu_seqlens.dtype != np.int32:
        return "dtypes"
    if p.loss_mask.dtype != np.bool_ or p.labels.dtype != np.int64 or p.example_index.dtype != np.int64:
        return "dtypes"
    if not (len(p.position_ids) == len(p.loss_mask) == len(p.labels) == n == p.num_tokens) or not 1 <= n <= max_len:
        return "lengths"
    cu = p.cu_seqlens.astype(np.int64)
    if len(cu) < 2 or len(cu) != len(p.example_index) + 1 or cu[0] != 0 or cu[-1] != n or (np.diff(cu) <= 0).any():
        return "cu_seqlens"
    lens = np.diff(cu)
    if p.max_seqlen != int(lens.max()):
        return "max_seqlen"
    pos = p.position_ids.astype(np.int64)
    if (pos[cu[:-1]] != 0).any() or (pos < 0).any() or (pos >= p.max_seqlen).any():
        return "positions"
    if p.loss_mask[cu[:-1]].any() or p.num_trainable != int(p.loss_mask.sum()):
        return "loss_mask"
    if not np.array_equal(p.labels, np.where(p.loss_mask, p.input_ids.astype(np.int64), -100)):
        return "labels"
    if vocab_size is not None and n and int(p.input_ids.max()) >= vocab_size:
        return "vocabulary"
    return None
