"""prep stats' length histogram: integer bins from the shortest to the longest example."""

import itertools

import numpy as np
import pytest

from padless.prep.report import length_histogram


def test_equal_lengths_make_one_bin() -> None:
    h = length_histogram(np.full(4, 131072))
    assert h == {"counts": [4], "edges": [131072, 131073]}


@pytest.mark.parametrize(("lo", "hi", "n"), [(5, 8, 50), (1, 1000, 400), (10, 29, 100), (17, 17 + 21, 300)])
def test_bins_have_equal_integer_width_and_count_every_length(lo: int, hi: int, n: int) -> None:
    rng = np.random.default_rng(lo + hi)
    lens = np.concatenate([[lo, hi], rng.integers(lo, hi + 1, n)])
    h = length_histogram(lens)
    edges, counts = h["edges"], h["counts"]
    widths = {b - a for a, b in itertools.pairwise(edges)}
    assert len(widths) == 1 and min(widths) >= 1 and len(counts) <= 20
    assert edges[0] == lo and edges[-2] <= hi < edges[-1]
    assert counts == [int(((lens >= a) & (lens < b)).sum()) for a, b in itertools.pairwise(edges)]
    assert counts[0] > 0 and counts[-1] > 0  # no empty bin past either end


def test_no_examples_no_bins() -> None:
    assert length_histogram(np.array([], dtype=np.int64)) == {"counts": [], "edges": []}
