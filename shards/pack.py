"""``Pack``: one packed row handed to a trainer, as numpy arrays (the reader contract in docs/DESIGN.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["IGNORE_INDEX", "Pack", "labels_from_mask"]

IGNORE_INDEX = -100


def labels_from_mask(input_ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """Hugging Face labels, **unshifted**: ``input_ids[t]`` where ``loss_mask[t]`` else -100 (int64)."""
    return np.where(loss_mask, input_ids, np.int64(IGNORE_INDEX))  # int64: uint32 and int64 promote to it


@dataclass(frozen=True)
class Pack:
    """One pack of whole examples laid end to end.

    ``input_ids`` uint32 (n,), ``position_ids`` int32 (n,) restarting at 0 at every example, ``cu_seqlens``
    int32 (S+1,), ``loss_mask`` bool (n,) (False on every example's first token), ``labels`` int64 (n,),
    ``example_index`` int64 (S,) source rows, and the Python ints ``num_tokens``, ``num_trainable``,
    ``max_seqlen``.
    """

    input_ids: np.ndarray
    position_ids: np.ndarray
    cu_seqlens: np.ndarray
    loss_mask: np.ndarray
    labels: np.ndarray
    example_index: np.ndarray
    num_tokens: int
    num_trainable: int
    max_seqlen: int

    @property
    def num_examples(self) -> int:
        """Number of examples S in the pack."""
        return len(self.cu_seqlens) - 1
