"""Verify a shard set end to end: checksums, schema, every per-pack invariant of FORMAT.md, and the counts.

A violation raises ``ShardFormatError`` naming the shard file and the pack (global index and index in the shard).
``verify_with_eval`` also verifies the held-out set ``eval/`` that ``prep pack --eval-fraction`` writes inside.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ShardFormatError
from .invariants import batch_problem
from .manifest import file_sha256, read_manifest
from .reader import ShardSet
from .schema import EVAL_DIR
from .tokenizer_identity import manifest_difference

__all__ = ["verify_shard_set", "verify_with_eval"]


def verify_shard_set(path: str | os.PathLike) -> dict[str, Any]:
    """Verify everything; returns counts. Raises ``ShardFormatError`` on the first violation."""
    ss = ShardSet(path, check_checksums=False)
    shards = ss.info.shards
    for s, real in zip(shards, ss._files):
        digest = file_sha256(real)
        if digest != s.sha256:
            raise ShardFormatError(
                f"shard {s.file}: sha256 {digest[:16]}... expected {s.sha256[:16]}... (corrupted); re-run `prep pack`"
            )
    sums = [{"packs": 0, "examples": 0, "tokens": 0, "trainable": 0} for _ in shards]
    for b, d in ss.iter_batches():  # the reader checks each batch's cheap invariants as it decodes it
        problem = batch_problem(d, max_len=ss.max_len, vocab_size=ss.vocab_size, full=True)
        if problem is not None:
            raise ShardFormatError(ss._pack_message(b, *problem))
        acc = sums[ss._batch_shard[b]]
        acc["packs"] += len(d["num_tokens"])
        acc["examples"] += len(d["example_index"])
        acc["tokens"] += int(d["num_tokens"].sum(dtype=np.int64))
        acc["trainable"] += int(d["num_trainable"].sum(dtype=np.int64))
    for s, acc in zip(shards, sums):
        for k, v in acc.items():
            if getattr(s, k) != v:
                raise ShardFormatError(f"shard {s.file}: manifest says {k}={getattr(s, k)} but the file holds {v}")
    t = ss.info.totals
    return {"shards": len(shards), "packs": t.packs, "examples": t.examples, "tokens": t.tokens,
            "trainable": t.trainable}  # fmt: skip


def verify_with_eval(path: str | os.PathLike) -> dict[str, dict[str, Any] | None]:
    """Verify the set at ``path`` and its held-out set ``path/eval`` when there is one.

    Returns ``{"main": counts, "eval": counts or None}``. An ``eval`` entry that is not a complete shard set fails:
    the trainer would skip it silently. So does one that ``train run`` refuses beside this set: made with another
    tokenizer (its eval loss would score other token ids).
    """
    report: dict[str, dict[str, Any] | None] = {"main": verify_shard_set(path), "eval": None}
    held_out = Path(path) / EVAL_DIR
    if held_out.exists() or held_out.is_symlink():
        try:
            report["eval"] = verify_shard_set(held_out)
        except ShardFormatError as e:
            raise ShardFormatError(f"held-out set {EVAL_DIR}/: {e}") from e
        main, ev = read_manifest(path), read_manifest(held_out)
        difference = manifest_difference(main.raw, ev.raw, ("the set", f"{EVAL_DIR}/"))
        if difference is not None:
            raise ShardFormatError(
                f"held-out set {EVAL_DIR}/ was not tokenized like the set it belongs to ({difference}); `train run` "
                "refuses it: re-run `prep pack` with --eval-fraction or --eval-examples"
            )
    return report
