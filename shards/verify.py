"""Verify a shard set end to end: checksums, schema, and every per-pack invariant of FORMAT.md.

A violation raises ``ShardFormatError`` naming the shard file and the pack (global index and row in the shard).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .errors import ShardFormatError
from .manifest import file_sha256
from .reader import ShardSet

__all__ = ["check_pack_arrays", "verify_shard_set"]


def check_pack_arrays(d: dict[str, np.ndarray], r: int, max_len: int) -> str | None:
    """The first invariant that pack row ``r`` of decoded batch ``d`` breaks, or None."""

    def row(name: str) -> np.ndarray:
        off = d[name + ".off"]
        return d[name][off[r] : off[r + 1]]

    ids, pos, cu, mask, ex = (row(n) for n in ("input_ids", "position_ids", "cu_seqlens", "loss_mask", "example_index"))
    n = len(ids)
    if not (len(pos) == len(mask) == n):
        return f"column lengths differ: input_ids {n}, position_ids {len(pos)}, loss_mask {len(mask)}"
    if n == 0:
        return "empty pack"
    if n > max_len:
        return f"{n} tokens, over max_len={max_len}"
    if int(d["num_tokens"][r]) != n:
        return f"num_tokens={int(d['num_tokens'][r])} but the pack holds {n} tokens"
    if len(cu) != len(ex) + 1 or len(cu) < 2:
        return f"cu_seqlens has {len(cu)} entries for {len(ex)} examples; expected examples + 1 (>= 2)"
    lens = np.diff(cu.astype(np.int64))
    if cu[0] != 0 or cu[-1] != n or (lens <= 0).any():
        return f"cu_seqlens {cu.tolist()[:8]}... must start at 0, rise strictly and end at num_tokens={n}"
    starts = cu[:-1].astype(np.int64)
    expect = np.arange(n, dtype=np.int64) - np.repeat(starts, lens)
    if not np.array_equal(pos, expect):
        t = int(np.flatnonzero(pos != expect)[0])
        return f"position_ids[{t}]={int(pos[t])}, expected {int(expect[t])} (positions restart at 0 per example)"
    if mask[starts].any():
        k = int(np.flatnonzero(mask[starts])[0])
        return f"loss_mask is True on the first token of example {k} (token {int(starts[k])}); expected False"
    if int(d["num_trainable"][r]) != int(mask.sum()):
        return f"num_trainable={int(d['num_trainable'][r])} but loss_mask has {int(mask.sum())} True"
    if int(d["max_seqlen"][r]) != int(lens.max()):
        return f"max_seqlen={int(d['max_seqlen'][r])} but the longest example has {int(lens.max())} tokens"
    return None


def verify_shard_set(path: str | os.PathLike) -> dict[str, Any]:
    """Verify everything; returns counts. Raises ``ShardFormatError`` on the first violation."""
    ss = ShardSet(path, check_checksums=False)
    shards = ss.info.shards
    for s, real in zip(shards, ss._files):
        digest = file_sha256(real)
        if digest != s.sha256:
            raise ShardFormatError(f"shard {s.file}: sha256 {digest[:16]}... expected {s.sha256[:16]}... (corrupted)")
    sums = [{"packs": 0, "examples": 0, "tokens": 0, "trainable": 0} for _ in shards]
    for b, d in ss.iter_batches():
        s_i = ss._batch_shard[b]
        first = int(ss._batch_start[b])
        n_rows = len(d["num_tokens"])
        for r in range(n_rows):
            err = check_pack_arrays(d, r, ss.max_len)
            if err:
                local = first - sum(x.packs for x in shards[:s_i]) + r
                raise ShardFormatError(f"shard {shards[s_i].file} pack {local} (global pack {first + r}): {err}")
        acc = sums[s_i]
        acc["packs"] += n_rows
        acc["examples"] += len(d["example_index"])
        acc["tokens"] += int(d["num_tokens"].sum())
        acc["trainable"] += int(d["num_trainable"].sum())
    for s, acc in zip(shards, sums):
        for k, v in acc.items():
            if getattr(s, k) != v:
                raise ShardFormatError(f"shard {s.file}: manifest says {k}={getattr(s, k)} but the file holds {v}")
    t = ss.info.totals
    return {"shards": len(shards), "packs": t.packs, "examples": t.examples, "tokens": t.tokens,
            "trainable": t.trainable}  # fmt: skip
