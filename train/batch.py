"""One micro-batch as a single varlen token stream: whole packs concatenated, no padding, no attention mask.

A micro-batch is built from whole packs of a shard set. Their token arrays are concatenated and their
``cu_seqlens`` shifted, so the model sees one stream of T tokens holding S examples back to back.
``max_seqlen`` and the token counts come from the shard (no device sync is needed to learn them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

__all__ = ["IGNORE_INDEX", "MicroBatch", "PackLike", "concat_packs"]

IGNORE_INDEX = -100


class PackLike(Protocol):
    """What a micro-batch needs from a pack (``shards.Pack`` has these fields)."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    cu_seqlens: np.ndarray
    labels: np.ndarray
    num_tokens: int
    num_trainable: int
    max_seqlen: int


@dataclass(frozen=True)
class MicroBatch:
    """A packed micro-batch: T tokens of S examples in one stream (see docs/DESIGN.md for shapes).

    ``labels`` follow the Hugging Face convention, unshifted: ``labels[t] == input_ids[t]`` where token t is a
    trained target, else -100; every example's first token is -100, so a next-token shift never crosses an
    example boundary.
    """

    input_ids: torch.Tensor  # (T,) int64
    position_ids: torch.Tensor  # (T,) int64, restarting at 0 for each example
    labels: torch.Tensor  # (T,) int64
    cu_seqlens: torch.Tensor  # (S+1,) int32
    max_seqlen: int
    num_tokens: int
    num_trainable: int
    mean_seqlen: float | None = None  # real tokens / real examples of a padded stream (tiling hint); None: T / S
    # Host-known upper bound of the counted tokens that stays the same for every batch of a CUDA graph (the static
    # shape's max_trainable): the lm_head runs on that many rows, counted tokens first. None: num_trainable eagerly.
    counted_bound: int | None = None

    def to(self, device: torch.device | str, non_blocking: bool = True) -> MicroBatch:
        """Copy every tensor to ``device`` (asynchronously when the source is pinned)."""
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.to(device, non_blocking=non_blocking),
            position_ids=self.position_ids.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            cu_seqlens=self.cu_seqlens.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> MicroBatch:
        """Page-lock the host tensors so that :meth:`to` does not block the host."""
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.pin_memory(),
            position_ids=self.position_ids.pin_memory(),
            labels=self.labels.pin_memory(),
            cu_seqlens=self.cu_seqlens.pin_memory(),
        )

    @property
    def num_examples(self) -> int:
        return int(self.cu_seqlens.numel()) - 1


def concat_packs(packs: Sequence[PackLike]) -> MicroBatch:
    """Concatenate whole packs into one host-side :class:`MicroBatch` (numpy work only, no per-token loop)."""
    if not packs:
        raise ValueError("concat_packs needs at least one pack")
    input_ids = np.concatenate([p.input_ids for p in packs]).astype(np.int64, copy=False)
    position_ids = np.concatenate([p.position_ids for p in packs]).astype(np.int64, copy=False)
    labels = np.concatenate([p.labels for p in packs]).astype(np.int64, copy=False)
    offsets = np.cumsum([0] + [int(p.cu_seqlens[-1]) for p in packs[:-1]])
    cu_seqlens = np.concatenate(
        [packs[0].cu_seqlens[:1]] + [p.cu_seqlens[1:] + off for p, off in zip(packs, offsets)]
    ).astype(np.int32, copy=False)
    return MicroBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        labels=torch.from_numpy(labels),
        cu_seqlens=torch.from_numpy(cu_seqlens),
        max_seqlen=max(int(p.max_seqlen) for p in packs),
        num_tokens=sum(int(p.num_tokens) for p in packs),
        num_trainable=sum(int(p.num_trainable) for p in packs),
    )
