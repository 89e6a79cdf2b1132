"""First-fit-decreasing bin packing of example lengths into packs of at most ``max_len`` tokens.

All examples are packed at once (not per chunk): chunked packing leaves a half-empty bin per chunk. The
algorithm is classic FFD made O(n log n): a counting sort by length (bounded by the longest example),
then a max segment tree over bin free space finds the leftmost bin with room in O(log n); equal lengths come
in runs and a bin takes as many of a run as fit at once (see ``_ffd_sorted``). An optional cap on examples per
pack closes a bin once it holds that many. After packing, the pack order is shuffled with a seed: packs come
out of FFD roughly sorted by their longest example, and feeding them in that order biases the training loss.
Measured: 5-9M examples/s on 10M lengths on a shared 2-core CPU (tools/bench_prep.py, docs/bench/prep.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

__all__ = ["PackPlan", "ffd_assign", "ffd_reference", "plan_packs"]


@numba.njit(cache=True, nogil=True)
def _sort_desc(lengths: np.ndarray, max_len: int):
    """A stable counting sort by decreasing length (ties by increasing index): (order, sorted lengths).

    ``max_len`` bounds the lengths; its time and memory grow with it, so callers pass the longest length, not the
    pack capacity (which may be up to 2^31 - 1)."""
    n = lengths.shape[0]
    counts = np.zeros(max_len + 2, np.int64)
    for i in range(n):
        counts[max_len - lengths[i]] += 1
    sorted_len = np.empty(n, np.int64)
    start = 0
    for v in range(max_len + 2):
        c = counts[v]
        for t in range(start, start + c):
            sorted_len[t] = max_len - v
        counts[v] = start
        start += c
    order = np.empty(n, np.int64)
    for i in range(n):
        k = max_len - lengths[i]
        order[counts[k]] = i
        counts[k] += 1
    return order, sorted_len


@numba.njit(cache=True, nogil=True)
def _ffd_sorted(sorted_len: np.ndarray, capacity: int, max_per_bin: int, n_leaves: int):
    """(bin of each item of ``sorted_len``, examples per bin): items in FFD order, bins numbered as opened.

    Equal lengths come in runs. Within a run every bin left of the one the last item went to had less room
    than that length and has no more now, so the next item goes to that bin or one to its right; and a bin
    with free space F takes floor(F / L) items of the run in a row. So a whole group is placed at once (one
    tree update per bin and length, not per item), and the search for the next bin climbs from the last one
    instead of descending from the root: O(n log n) worst case, about O(n) on real length distributions.
    """
    n = sorted_len.shape[0]
    size = 1
    while size < n_leaves:
        size *= 2
    # tree[1] is the root; leaves tree[size + b] hold bin b's free space (unopened bins are empty, so full).
    tree = np.full(2 * size, capacity, np.int32)
    count = np.zeros(size, np.int32)
    bins = np.empty(n, np.int64)
    j = 0
    node = 1
    run_end = 0
    while j < n:
        need = sorted_len[j]
        if j >= run_end:  # a new length: find its run and search from the root
            run_end = j
            while run_end < n and sorted_len[run_end] == need:
                run_end += 1
            node = 1
        elif tree[node] < need:  # same length, last bin full for it: climb until a right sibling has room
            while True:
                if node % 2 == 0 and tree[node + 1] >= need:
                    node += 1
                    break
                node //= 2
        while node < size:  # leftmost leaf with free >= need below `node`: go left whenever it has room
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - size
        k = tree[node] // need
        if run_end - j < k:
            k = run_end - j
        if max_per_bin > 0 and max_per_bin - count[b] < k:
            k = max_per_bin - count[b]
        for t in range(j, j + k):
            bins[t] = b
        j += k
        count[b] += k
        free = tree[node] - k * need
        if max_per_bin > 0 and count[b] >= max_per_bin:
            free = 0  # closed: every example needs at least one token
        tree[node] = free
        up = node // 2
        while up >= 1:  # fix maxima upwards; stop as soon as one is unchanged (those above are then too)
            left, right = tree[2 * up], tree[2 * up + 1]
            m = left if left > right else right
            if tree[up] == m:
                break
            tree[up] = m
            up //= 2
    return bins, count


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
    order, sorted_len = _sort_desc(lengths, int(lengths.max()))
    bins = np.empty(len(lengths), np.int64)
    bound = _leaf_bound(lengths, capacity, max_per_bin)
    bins[order] = _ffd_sorted(sorted_len, int(capacity), int(max_per_bin), bound)[0]
    return bins


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
def _layout(sorted_bins: np.ndarray, order: np.ndarray, count: np.ndarray, perm: np.ndarray):
    """Example ids pack after pack with packs in the order ``perm`` (placement order inside a pack), in one pass."""
    n_bins = perm.shape[0]
    new_per = np.empty(n_bins, np.int64)
    start = np.empty(n_bins, np.int64)  # by bin: where its examples go in the output
    acc = 0
    for q in range(n_bins):
        b = perm[q]
        new_per[q] = count[b]
        start[b] = acc
        acc += count[b]
    out = np.empty(order.shape[0], np.int64)
    for j in range(order.shape[0]):
        b = sorted_bins[j]
        out[start[b]] = order[j]
        start[b] += 1
    return out, new_per


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
    order, sorted_len = _sort_desc(lengths, int(lengths.max()))
    bound = _leaf_bound(lengths, max_len, max_examples_per_pack)
    sorted_bins, count = _ffd_sorted(sorted_len, int(max_len), int(max_examples_per_pack), bound)
    n_bins = int(sorted_bins.max()) + 1
    perm = np.random.default_rng(seed).permutation(n_bins)
    return PackPlan(*_layout(sorted_bins, order, count, perm))
