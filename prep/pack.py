"""First-fit-decreasing bin packing of example lengths into packs of at most ``max_len`` tokens.

All examples are packed at once (not per chunk): chunked packing leaves a half-empty bin per chunk. The
algorithm is classic FFD made O(n log n): a counting sort by length (lengths are bounded by ``max_len``),
then for each example a descent of a max segment tree over bin free space finds the leftmost bin with room
in O(log n). An optional cap on examples per pack closes a bin once it holds that many. After packing, the
pack order is shuffled with a seed: packs come out of FFD roughly sorted by fill, and feeding them in that
order biases the training loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

__all__ = ["PackPlan", "ffd_assign", "ffd_reference", "plan_packs"]


@numba.njit(cache=True, nogil=True)
def _sort_desc(lengths: np.ndarray, max_len: int) -> np.ndarray:
    """Indices of ``lengths`` sorted by decreasing length, ties by increasing index (a stable counting sort)."""
    n = lengths.shape[0]
    counts = np.zeros(max_len + 2, np.int64)
    for i in range(n):
        counts[max_len - lengths[i]] += 1
    start = 0
    for v in range(max_len + 2):
        c = counts[v]
        counts[v] = start
        start += c
    order = np.empty(n, np.int64)
    for i in range(n):
        k = max_len - lengths[i]
        order[counts[k]] = i
        counts[k] += 1
    return order


@numba.njit(cache=True, nogil=True)
def _ffd(lengths: np.ndarray, order: np.ndarray, capacity: int, max_per_bin: int, n_leaves: int) -> np.ndarray:
    """Bin of each example (indexed like ``lengths``), bins numbered in the order first-fit opens them."""
    size = 1
    while size < n_leaves:
        size *= 2
    # tree[1] is the root; leaves tree[size + b] hold bin b's free space (unopened bins are empty, so full).
    tree = np.full(2 * size, capacity, np.int32)
    count = np.zeros(size, np.int32)
    bins = np.empty(lengths.shape[0], np.int64)
    prev_need = -1
    prev_leaf = 1
    for j in range(order.shape[0]):
        i = order[j]
        need = lengths[i]
        if need == prev_need:
            # Same need as the last item: every bin left of its bin had less room then and has no more now, so
            # search rightwards from there: climb until a right sibling has room. Runs of equal lengths are long
            # (lengths <= max_len), so this is O(1) amortised instead of a full descent per item.
            node = prev_leaf
            if tree[node] < need:
                while True:
                    if node % 2 == 0 and tree[node + 1] >= need:
                        node += 1
                        break
                    node //= 2
        else:
            node = 1
        while node < size:  # leftmost leaf with free >= need below `node`: go left whenever it has room
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        prev_need = need
        prev_leaf = node
        b = node - size
        bins[i] = b
        count[b] += 1
        free = tree[node] - need
        if max_per_bin > 0 and count[b] >= max_per_bin:
            free = 0  # closed: every example needs at least one token
        tree[node] = free
        node //= 2
        while node >= 1:  # fix maxima upwards; stop as soon as one is unchanged (those above are then too)
            left, right = tree[2 * node], tree[2 * node + 1]
            m = left if left > right else right
            if tree[node] == m:
                break
            tree[node] = m
            node //= 2
    return bins


def _leaf_bound(lengths: np.ndarray, capacity: int, max_per_bin: int) -> int:
    """An upper bound on the bins first-fit opens: no two bins are both at most half full (else the later
    items would have fit the earlier bin), plus the bins a per-bin example cap can close early."""
    n = len(lengths)
    bound = 2 * (int(lengths.sum()) // capacity + 1) + 1
    if max_per_bin > 0:
        bound += n // max_per_bin + 1
    return max(1, min(n, bound))


def ffd_assign(lengths: np.ndarray, capacity: int, max_per_bin: int = 0) -> np.ndarray:
    """First-fit-decreasing: the bin of each example, bins numbered by opening order (int64, like lengths)."""
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return np.zeros(0, np.int64)
    if lengths.min() < 1 or lengths.max() > capacity:
        raise ValueError(f"lengths must be in [1, {capacity}], got [{lengths.min()}, {lengths.max()}]")
    return _assign_sorted(lengths, _sort_desc(lengths, int(capacity)), capacity, max_per_bin)


def _assign_sorted(lengths: np.ndarray, order: np.ndarray, capacity: int, max_per_bin: int) -> np.ndarray:
    return _ffd(lengths, order, int(capacity), int(max_per_bin), _leaf_bound(lengths, capacity, max_per_bin))


def ffd_reference(lengths, capacity: int, max_per_bin: int = 0) -> list[int]:
    """Brute-force FFD (quadratic), the property tests' reference: same ordering and tie rules as ``ffd_assign``."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[int] = []
    count: list[int] = []
    bins = [0] * len(lengths)
    for i in order:
        for b in range(len(free)):
            if free[b] >= lengths[i] and (max_per_bin <= 0 or count[b] < max_per_bin):
                break
        else:
            free.append(capacity)
            count.append(0)
            b = len(free) - 1
        free[b] -= lengths[i]
        count[b] += 1
        bins[i] = b
    return bins


@numba.njit(cache=True, nogil=True)
def _group(bins: np.ndarray, lengths: np.ndarray, order: np.ndarray, n_bins: int):
    """Examples grouped by bin (placement order inside a bin) and the number of examples per bin."""
    per = np.zeros(n_bins, np.int64)
    for i in range(bins.shape[0]):
        per[bins[i]] += 1
    start = np.zeros(n_bins, np.int64)
    acc = 0
    for b in range(n_bins):
        start[b] = acc
        acc += per[b]
    flat = np.empty(bins.shape[0], np.int64)
    for j in range(order.shape[0]):
        i = order[j]
        b = bins[i]
        flat[start[b]] = i
        start[b] += 1
    return flat, per


@dataclass(frozen=True)
class PackPlan:
    """Packs in their final (shuffled) order: ``example_order`` lists example ids pack after pack,
    ``examples_per_pack`` how many consecutive entries form each pack."""

    example_order: np.ndarray
    examples_per_pack: np.ndarray

    @property
    def num_packs(self) -> int:
        return len(self.examples_per_pack)


def plan_packs(lengths: np.ndarray, max_len: int, *, max_examples_per_pack: int = 0, seed: int = 0) -> PackPlan:
    """Pack all examples with FFD, then shuffle the pack order with ``seed``."""
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return PackPlan(np.zeros(0, np.int64), np.zeros(0, np.int64))
    if lengths.min() < 1 or lengths.max() > max_len:
        raise ValueError(f"lengths must be in [1, {max_len}], got [{lengths.min()}, {lengths.max()}]")
    order = _sort_desc(lengths, int(max_len))
    bins = _assign_sorted(lengths, order, max_len, max_examples_per_pack)
    n_bins = int(bins.max()) + 1
    flat, per = _group(bins, lengths, order, n_bins)
    perm = np.random.default_rng(seed).permutation(n_bins)
    starts = np.concatenate([[0], np.cumsum(per)[:-1]])
    # Reassemble packs in permuted order: for each pack in the new order, its slice of `flat`.
    new_per = per[perm]
    idx = np.repeat(starts[perm] - np.concatenate([[0], np.cumsum(new_per)[:-1]]), new_per) + np.arange(len(flat))
    return PackPlan(flat[idx], new_per)
