"""Numbers about a shard set computed from the shards themselves (not trusted from the manifest):
example lengths, fill, and what padded batching would cost by comparison."""

from __future__ import annotations

from typing import Any

import numpy as np

from .reader import ShardSet

__all__ = ["example_lengths", "padded_batching_tokens", "set_stats"]


def example_lengths(ss: ShardSet) -> np.ndarray:
    """Every example's token count, in shard order (int64)."""
    parts = []
    for _, d in ss.iter_batches():
        cu, off = d["cu_seqlens"].astype(np.int64), d["cu_seqlens.off"]
        lens = np.diff(cu)
        # Drop the differences that straddle two packs (between one pack's last entry and the next's 0).
        keep = np.ones(len(lens), bool)
        keep[off[1:-1] - 1] = False
        parts.append(lens[keep])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def padded_batching_tokens(lengths: np.ndarray, batch_sizes=range(1, 33), seed: int = 0) -> dict[int, int]:
    """Tokens a padded trainer would process per epoch: examples in a random order, each batch padded to its
    longest example (dynamic padding, the usual collator)."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    lens = lengths[order]
    out = {}
    for b in batch_sizes:
        n_full = len(lens) // b * b
        cost = int(lens[:n_full].reshape(-1, b).max(axis=1).sum()) * b
        if n_full < len(lens):
            cost += int(lens[n_full:].max()) * (len(lens) - n_full)
        out[int(b)] = cost
    return out


def set_stats(ss: ShardSet) -> dict[str, Any]:
    """Counts recomputed from the packs, example-length percentiles, and padded-batching cost."""
    packs = tokens = trainable = 0
    for _, d in ss.iter_batches():
        packs += len(d["num_tokens"])
        tokens += int(d["num_tokens"].sum())
        trainable += int(d["loss_mask"].sum())
    lens = example_lengths(ss)
    pct = {str(p): float(np.percentile(lens, p)) for p in (0, 10, 25, 50, 75, 90, 95, 99, 100)}
    padded = padded_batching_tokens(lens)
    return {
        "packs": packs,
        "examples": len(lens),
        "tokens": tokens,
        "trainable": trainable,
        "max_len": ss.max_len,
        "fill": tokens / (packs * ss.max_len) if packs else 0.0,
        "lower_bound_packs": -(-tokens // ss.max_len),
        "length_percentiles": pct,
        "length_mean": float(lens.mean()) if len(lens) else 0.0,
        "padded_tokens": padded,
        "packed_slots": packs * ss.max_len,
    }
