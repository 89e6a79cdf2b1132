"""Weighted mixing of several datasets (``prep pack --mix a.jsonl=0.7,b.jsonl=0.3``).

What a weight means: the fraction of the mix's **examples** (source rows, before ``--overlong`` splits any) drawn
from that source. Weights are relative (``a=7,b=3`` is ``a=0.7,b=0.3``). The mix holds ``--mix-examples`` rows, by
default as many as its sources hold together (their usable rows: bad rows left out by ``--skip-bad-rows`` do not
count), so source i contributes ``count_i = weight_i / sum(weights) * total`` rows, rounded by largest remainder so
the counts sum to the total exactly.

How rows are drawn from a source with ``available`` rows, seeded by ``--seed`` (the same seed, data and options give
the same mix):

- ``count <= available``: a sample **without replacement** (each row at most once);
- ``count > available``: the source is **repeated**: every row ``count // available`` times, and a sample without
  replacement of ``count % available`` rows once more (sampling with replacement, balanced: no row appears more
  than once more often than another).

The held-out split (``--eval-fraction`` / ``--eval-examples``) is drawn afterwards over the mix's distinct rows, so
every copy of a repeated row lands on the same side and no eval row is trained on.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np

from .errors import PrepError

__all__ = ["MixEntry", "draw", "mix_counts", "parse_mix"]


@dataclass(frozen=True)
class MixEntry:
    """One ``DATASET=WEIGHT`` of ``--mix``."""

    dataset: str
    weight: float


_ITEM = re.compile(r"(?P<dataset>.+)=(?P<weight>[^=]+)")


def parse_mix(items: tuple[str, ...] | list[str]) -> list[MixEntry]:
    """``("a.jsonl=0.7,b.jsonl=0.3",)`` (or one item per dataset) -> entries in order (a dataset name cannot hold a
    comma)."""
    out: list[MixEntry] = []
    for item in items:
        for part in item.split(","):
            m = _ITEM.fullmatch(part.strip())
            if m is None:
                raise PrepError(f"--mix {part!r}: expected DATASET=WEIGHT, e.g. --mix a.jsonl=0.7,b.jsonl=0.3")
            try:
                weight = float(m["weight"])
            except ValueError:
                weight = math.nan
            if not (math.isfinite(weight) and weight > 0):
                raise PrepError(f"--mix {part!r}: the weight {m['weight']!r} must be a number > 0")
            out.append(MixEntry(m["dataset"].strip(), weight))
    names = [e.dataset for e in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PrepError(f"--mix names {twice} more than once; give each dataset once with its whole weight")
    return out


# Memory a packed example costs until the shards are written (its row id, length and trained-token count, the
# split's and the packer's arrays): measured about 45 bytes per example from 2M to 8M short examples.
BYTES_PER_EXAMPLE = 48


def check_mix_size(total: int, memory_bytes: int | None = None) -> None:
    """Refuse a mix whose examples' arrays alone would not fit this machine's memory (``memory_bytes``, default the
    physical memory), before anything is drawn: a mistyped ``--mix-examples`` is one error, not a killed process."""
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = total * BYTES_PER_EXAMPLE
    if need > memory_bytes:
        raise PrepError(
            f"--mix-examples {total:,} needs about {need / 2**30:,.1f} GiB of memory for its examples' arrays alone "
            f"({BYTES_PER_EXAMPLE} bytes each), more than this machine's {memory_bytes / 2**30:,.1f} GiB; ask for "
            "fewer examples"
        )


def mix_counts(weights: list[float], total: int) -> list[int]:
    """Rows per source: ``total`` split in proportion to ``weights`` by largest remainder (ties: the earlier
    source), so the counts sum to ``total``. Weights whose sum overflows (1e308 each) are scaled by the largest
    first, so they keep their proportions."""
    if not math.isfinite(sum(weights)):
        weights = [w / max(weights) for w in weights]
    s = sum(weights)
    exact = [w / s * total for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(rows: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` of ``rows`` (int64 row ids), sorted: without replacement when ``count <= len(rows)``, else every row
    ``count // len(rows)`` times plus ``count % len(rows)`` of them once more."""
    n = len(rows)
    if count == 0:
        return np.zeros(0, np.int64)
    if n == 0:
        raise AssertionError("draw() from an empty source")  # the caller names the source first
    whole, extra = divmod(count, n)
    picked = np.sort(rng.choice(n, size=extra, replace=False)) if extra else np.zeros(0, np.int64)
    times = np.full(n, whole, np.int64)
    times[picked] += 1
    return np.repeat(rows, times)
