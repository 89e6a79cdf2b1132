"""The data feed: whole packs into token-budget micro-batches, per-rank plans, and the prefetching worker."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from padless.shards.reader import open_shards
from padless.train.batch import concat_packs
from padless.train.data import Prefetcher, fill_micro_batches, pack_sizes, plan_epoch, step_sum


def _random_sizes(seed: int, n: int, max_len: int = 128) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, max_len + 1, size=n).astype(np.int64)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget", [128, 129, 300, 10_000])
def test_fill_uses_whole_packs_once_within_budget(seed: int, budget: int) -> None:
    sizes = _random_sizes(seed, 57)
    order = np.random.default_rng(seed + 100).permutation(len(sizes))
    groups = fill_micro_batches(order, sizes, budget)
    # Every pack exactly once, in the given order.
    assert np.array_equal(np.concatenate(groups), order)
    for g in groups:
        assert int(sizes[g].sum()) <= budget
    # Greedy: the next group's first pack would not have fit into the previous group.
    for a, b in itertools.pairwise(groups):
        assert int(sizes[a].sum()) + int(sizes[b[0]]) > budget


def test_fill_rejects_a_zero_budget() -> None:
    with pytest.raises(ValueError, match="token budget must be >= 1, got 0"):
        fill_micro_batches(np.arange(3), np.ones(3, np.int64), 0)


def test_fill_rejects_a_pack_larger_than_the_budget() -> None:
    """Packs are never split, and a micro-batch never exceeds its budget: the longest pack is named."""
    sizes = np.array([40, 90, 130, 20], np.int64)
    with pytest.raises(ValueError, match="pack 2 holds 130 tokens, more than the token budget 129"):
        fill_micro_batches(np.array([3, 2, 1, 0]), sizes, 129)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("grad_accum", [1, 3])
def test_plan_deals_disjoint_equal_shares(world: int, grad_accum: int) -> None:
    sizes = _random_sizes(7, 41)
    order = np.random.default_rng(3).permutation(len(sizes))
    plan = plan_epoch(order, sizes, epoch=0, budget=200, world_size=world, grad_accum=grad_accum)
    counts = {len(r) for r in plan.ranks}
    assert len(counts) == 1, "every rank must get the same number of micro-batches (same step count)"
    packs = [int(i) for r in plan.ranks for g in r for i in g]
    dropped = [int(i) for g in plan.dropped for i in g]
    assert len(packs) == len(set(packs)), "ranks must see disjoint packs"
    assert sorted(packs + dropped) == list(range(len(sizes))), "kept + dropped = every pack once"
    assert len(plan.dropped) < world
    assert plan.steps == -(-plan.micro_batches_per_rank // grad_accum)
    if plan.dropped:
        assert "dropped the last" in plan.describe_dropped()
    # The step denominator counts every rank's micro-batches of that step.
    for s in range(plan.steps):
        sl = plan.step_slice(s)
        assert step_sum(plan, s, sizes) == sum(int(sizes[g].sum()) for r in plan.ranks for g in r[sl])


def test_world_of_two_matches_one_rank_accumulating_two() -> None:
    """Global micro-batches of step s on 2 ranks (ga=1) are those of 1 rank with ga=2: same data per step."""
    sizes = _random_sizes(11, 30)
    order = np.random.default_rng(5).permutation(len(sizes))
    two = plan_epoch(order, sizes, epoch=0, budget=150, world_size=2, grad_accum=1)
    one = plan_epoch(order, sizes, epoch=0, budget=150, world_size=1, grad_accum=2)
    for s in range(two.steps):
        a = sorted(int(i) for r in two.ranks for g in r[two.step_slice(s)] for i in g)
        b = sorted(int(i) for g in one.ranks[0][one.step_slice(s)] for i in g)
        assert a == b


def test_pack_sizes_and_prefetcher_match_direct_reads(synthetic_shards) -> None:
    ss = open_shards(synthetic_shards)
    sizes = pack_sizes(ss)
    assert sizes.num_tokens.tolist() == [ss[i].num_tokens for i in range(len(ss))]
    assert sizes.num_trainable.tolist() == [ss[i].num_trainable for i in range(len(ss))]
    assert sizes.num_examples.tolist() == [len(ss[i].cu_seqlens) - 1 for i in range(len(ss))]
    assert sizes.max_seqlen == max(int(np.diff(ss[i].cu_seqlens).max()) for i in range(len(ss)))
    plan = plan_epoch(ss.order(0, 0), sizes.num_tokens, epoch=0, budget=300)
    groups = plan.ranks[0]
    assert sizes.max_examples([plan]) == max(concat_packs([ss[int(i)] for i in g]).num_examples for g in groups)
    assert sizes.max_trainable([plan]) == max(concat_packs([ss[int(i)] for i in g]).num_trainable for g in groups)
    with Prefetcher(ss, groups, start=2, pin=False, depth=2) as feed:
        got = list(feed)
    assert [k for k, _ in got] == list(range(2, len(groups)))
    for k, batch in got:
        expected = concat_packs([ss[int(i)] for i in groups[k]])
        for name in ("input_ids", "position_ids", "labels", "cu_seqlens"):
            assert torch.equal(getattr(batch, name), getattr(expected, name))
        assert (batch.num_tokens, batch.num_trainable, batch.max_seqlen) == (
            expected.num_tokens,
            expected.num_trainable,
            expected.max_seqlen,
        )


def test_prefetcher_reraises_worker_errors(synthetic_shards) -> None:
    ss = open_shards(synthetic_shards)
    with Prefetcher(ss, [np.array([0]), np.array([10**6])], pin=False) as feed, pytest.raises(IndexError):
        list(feed)


def test_epoch_orders_differ_and_repeat(synthetic_shards) -> None:
    ss = open_shards(synthetic_shards)
    assert not np.array_equal(ss.order(0, 0), ss.order(0, 1))
    assert np.array_equal(ss.order(0, 1), ss.order(0, 1))
