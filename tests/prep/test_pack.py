"""The FFD packer against a brute-force reference, plus the invariants every packing must keep."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from padless.prep.pack import ffd_assign, ffd_reference, plan_packs


@st.composite
def cases(draw):
    capacity = draw(st.integers(16, 200))
    lengths = draw(st.lists(st.integers(1, capacity), min_size=0, max_size=120))
    cap = draw(st.integers(0, 6))
    return np.array(lengths, np.int64), capacity, cap


@settings(max_examples=300, deadline=None)
@given(cases())
def test_ffd_matches_brute_force_reference(case):
    lengths, capacity, cap = case
    bins = ffd_assign(lengths, capacity, cap)
    assert bins.tolist() == ffd_reference(lengths.tolist(), capacity, cap)


@settings(max_examples=200, deadline=None)
@given(cases(), st.integers(0, 2**31))
def test_plan_places_every_example_once_within_capacity(case, seed):
    lengths, capacity, cap = case
    plan = plan_packs(lengths, capacity, max_examples_per_pack=cap, seed=seed)
    assert sorted(plan.example_order.tolist()) == list(range(len(lengths)))  # every example exactly once
    assert int(plan.examples_per_pack.sum()) == len(lengths)
    starts = np.concatenate([[0], np.cumsum(plan.examples_per_pack)])
    sizes = [int(lengths[plan.example_order[a:b]].sum()) for a, b in itertools.pairwise(starts)]
    assert all(0 < s <= capacity for s in sizes)
    if cap:
        assert plan.examples_per_pack.max(initial=0) <= cap
    # Same bins as the reference FFD, only in a shuffled order.
    ref = ffd_reference(lengths.tolist(), capacity, cap)
    ref_bins = sorted(sorted(i for i in range(len(lengths)) if ref[i] == b) for b in set(ref))
    got_bins = sorted(sorted(plan.example_order[a:b].tolist()) for a, b in itertools.pairwise(starts))
    assert got_bins == ref_bins


def test_pack_order_is_seeded_and_shuffled():
    lengths = np.random.default_rng(0).integers(1, 500, size=5000)
    a = plan_packs(lengths, 1024, seed=1)
    b = plan_packs(lengths, 1024, seed=1)
    c = plan_packs(lengths, 1024, seed=2)
    np.testing.assert_array_equal(a.example_order, b.example_order)
    assert not np.array_equal(a.example_order, c.example_order)
    # Shuffled: FFD opens packs by decreasing longest example; the written order must not keep that.
    starts = np.concatenate([[0], np.cumsum(a.examples_per_pack)])
    longest = [int(lengths[a.example_order[x:y]].max()) for x, y in itertools.pairwise(starts)]
    assert longest != sorted(longest, reverse=True)


def test_ffd_is_near_lower_bound_on_many_small_examples():
    lengths = np.minimum(np.random.default_rng(3).geometric(1 / 80, size=200_000), 1024)
    bins = ffd_assign(lengths, 1024)
    assert bins.max() + 1 <= 1.005 * np.ceil(lengths.sum() / 1024)


def test_the_largest_max_len_costs_no_memory_or_time():
    """--max-len 2^31 - 1 (the format's bound, "no limit" in practice) packs a few short examples at once: the
    counting sort spans the longest example, never the pack capacity (16 GiB and a minute and a half)."""
    code = (
        "import resource, numpy as np\n"
        "from padless.prep.pack import ffd_assign, plan_packs\n"
        "plan = plan_packs(np.array([3, 700, 5, 9]), 2**31 - 1)\n"
        "assert plan.examples_per_pack.tolist() == [4]\n"
        "assert ffd_assign(np.array([3, 700]), 2**31 - 1).tolist() == [0, 0]\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) < 1 << 20, f"peak memory {int(proc.stdout) >> 10} MiB"  # ru_maxrss is in KiB
