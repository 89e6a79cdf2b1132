"""The data feed: whole packs -> micro-batches by a token budget -> per-rank plans -> pinned, prefetched batches.

Packing happened offline, so here there is nothing to pad, sort or mask: each epoch takes the shard set's seeded
pack order, fills micro-batches greedily with whole packs up to ``tokens_per_micro_batch`` tokens (never less
than the longest pack: packs are not split), and deals the micro-batches round-robin to the ranks. Every rank gets
the same number of micro-batches, so every rank runs the same number of optimizer steps; the few micro-batches
that do not divide evenly (fewer than ``world_size``) are dropped for that epoch and reported. The plan is a pure
function of (pack sizes, seed, epoch, budget, world size), so every rank knows every rank's token counts without
a collective, and a resumed run rebuilds the same plan and skips to the saved position.

A background thread turns planned micro-batches into host :class:`~train.batch.MicroBatch` es (numpy
concatenation, page-locked on CUDA); the loop copies them to the device with ``non_blocking=True``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .batch import MicroBatch, concat_packs

__all__ = [
    "EpochPlan",
    "Prefetcher",
    "ShardSetLike",
    "fill_micro_batches",
    "pack_sizes",
    "plan_epoch",
    "step_sum",
]


class ShardSetLike(Protocol):
    """What the feed needs from ``shards.ShardSet``."""

    manifest: dict[str, Any]
    max_len: int

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> Any: ...
    def order(self, seed: int, epoch: int) -> np.ndarray: ...


@dataclass(frozen=True)
class PackSizes:
    """Per-pack token counts, read once (the shards store them per pack, so no token array is touched)."""

    num_tokens: np.ndarray  # (P,) int64
    num_trainable: np.ndarray  # (P,) int64
    num_examples: np.ndarray  # (P,) int64
    max_token_id: int = -1  # the largest token id in any pack (-1: no tokens)
    max_seqlen: int = 0  # the longest example of any pack (its positions run 0 .. max_seqlen - 1)

    def max_examples(self, plans: Sequence[EpochPlan]) -> int:
        """The most examples any micro-batch of ``plans`` holds (sizes a static CUDA-graph batch)."""
        return max((int(self.num_examples[g].sum()) for p in plans for rank in p.ranks for g in rank), default=1)

    def max_trainable(self, plans: Sequence[EpochPlan]) -> int:
        """The most trainable tokens any micro-batch of ``plans`` holds (bounds a CUDA graph's loss rows)."""
        return max((int(self.num_trainable[g].sum()) for p in plans for rank in p.ranks for g in rank), default=0)


def pack_sizes(ss: ShardSetLike) -> PackSizes:
    """Token, trainable-token and example counts of every pack, the largest token id and the longest example (one
    pass over the per-pack scalars)."""
    if hasattr(ss, "iter_batches"):  # shards.ShardSet: whole record batches, decoded once
        columns, top, longest = [], -1, 0
        for _, d in ss.iter_batches():
            columns.append((d["num_tokens"], d["num_trainable"], np.diff(d["cu_seqlens.off"]) - 1))
            if len(d["input_ids"]):
                top = max(top, int(d["input_ids"].max()))
            if len(d["max_seqlen"]):
                longest = max(longest, int(d["max_seqlen"].max()))
        if columns:
            arrays = (np.concatenate([c[j] for c in columns]).astype(np.int64) for j in range(3))
            return PackSizes(*arrays, max_token_id=top, max_seqlen=longest)
    tokens = np.empty(len(ss), dtype=np.int64)
    trainable = np.empty(len(ss), dtype=np.int64)
    examples = np.empty(len(ss), dtype=np.int64)
    top, longest = -1, 0
    for i in range(len(ss)):
        pack = ss[i]
        tokens[i] = int(pack.num_tokens)
        trainable[i] = int(pack.num_trainable)
        examples[i] = len(pack.cu_seqlens) - 1
        if len(pack.input_ids):
            top = max(top, int(np.max(pack.input_ids)))
        longest = max(longest, int(pack.max_seqlen))
    return PackSizes(tokens, trainable, examples, max_token_id=top, max_seqlen=longest)


def fill_micro_batches(order: np.ndarray, num_tokens: np.ndarray, budget: int) -> list[np.ndarray]:
    """Greedy fill in ``order``: append whole packs while the micro-batch stays within ``budget`` tokens.

    Packs are never split (that would cut examples), so a pack bigger than ``budget`` is a ValueError.
    """
    if budget < 1:
        raise ValueError(f"token budget must be >= 1, got {budget}")
    if len(order) and int(num_tokens[order].max()) > budget:
        i = int(order[int(np.argmax(num_tokens[order]))])
        raise ValueError(f"pack {i} holds {int(num_tokens[i])} tokens, more than the token budget {budget}")
    groups: list[np.ndarray] = []
    start, used = 0, 0
    sizes = num_tokens[order]
    for j, n in enumerate(sizes.tolist()):  # one iteration per pack, never per token
        if j > start and used + n > budget:
            groups.append(order[start:j])
            start, used = j, 0
        used += n
    if len(order) > start:
        groups.append(order[start:])
    return groups


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's micro-batches for every rank: ``ranks[r][k]`` = pack indices of rank r's k-th micro-batch."""

    epoch: int
    ranks: list[list[np.ndarray]]
    dropped: list[np.ndarray] = field(default_factory=list)  # micro-batches nobody trains on this epoch
    grad_accum: int = 1

    @property
    def micro_batches_per_rank(self) -> int:
        return len(self.ranks[0]) if self.ranks else 0

    @property
    def steps(self) -> int:
        """Optimizer steps this epoch (the last one may hold fewer than ``grad_accum`` micro-batches)."""
        return -(-self.micro_batches_per_rank // self.grad_accum)

    def step_slice(self, step_in_epoch: int) -> slice:
        """Which of each rank's micro-batches make up optimizer step ``step_in_epoch`` (0-based)."""
        begin = step_in_epoch * self.grad_accum
        return slice(begin, min(begin + self.grad_accum, self.micro_batches_per_rank))

    def describe_dropped(self) -> str:
        if not self.dropped:
            return ""
        packs = int(sum(len(g) for g in self.dropped))
        return (
            f"epoch {self.epoch}: dropped the last {len(self.dropped)} micro-batch(es) ({packs} packs) of the seeded "
            f"order so that all {len(self.ranks)} ranks run the same number of steps; other epochs drop others"
        )


def plan_epoch(
    order: np.ndarray, num_tokens: np.ndarray, *, epoch: int, budget: int, world_size: int = 1, grad_accum: int = 1
) -> EpochPlan:
    """Fill micro-batches in ``order`` and deal them round-robin to ``world_size`` ranks (equal counts)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    groups = fill_micro_batches(np.asarray(order, dtype=np.int64), num_tokens, budget)
    keep = len(groups) - len(groups) % world_size
    ranks = [groups[r:keep:world_size] for r in range(world_size)]
    return EpochPlan(epoch=epoch, ranks=ranks, dropped=groups[keep:], grad_accum=grad_accum)


def step_sum(plan: EpochPlan, step_in_epoch: int, per_pack: np.ndarray) -> int:
    """``per_pack`` (e.g. trainable tokens: the loss denominator) summed over one optimizer step of ALL ranks.

    Every rank computes it from the same plan on the host, so no all-reduce (and no device sync) is needed.
    """
    sl = plan.step_slice(step_in_epoch)
    return int(sum(int(per_pack[g].sum()) for rank in plan.ranks for g in rank[sl]))


class Prefetcher:
    """A background thread building pinned host micro-batches ahead of the loop.

    Iterate it to get ``(k, MicroBatch)`` for the planned micro-batches ``groups[start:]``; an error in the
    worker is re-raised in the consumer. ``close()`` stops the worker (also on garbage collection of the loop).
    """

    _DONE = object()

    def __init__(self, ss: ShardSetLike, groups: Sequence[np.ndarray], *, start: int = 0, pin: bool, depth: int = 4):
        self._ss, self._groups, self._start, self._pin = ss, groups, start, pin
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="padless-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for k in range(self._start, len(self._groups)):
                batch = concat_packs([self._ss[int(i)] for i in self._groups[k]])
                if self._pin:
                    batch = batch.pin_memory()  # page-locked: the device copy can overlap compute
                if not self._put((k, batch)):
                    return
            self._put(self._DONE)
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._put(error)

    def __iter__(self) -> Iterator[tuple[int, MicroBatch]]:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
