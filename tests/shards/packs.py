"""Shard-test builders: random packed examples (the packer itself is tested in tests/prep), and a rewrite of one
column of a written shard that keeps its checksums valid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from padless.shards.manifest import file_sha256


def random_packs(
    rng: np.random.Generator, n_examples: int, max_len: int, *, longest: int | None = None, vocab: int | None = None
):
    """(tokens, loss_mask, lengths, examples per pack, example index) for ``ShardWriter.add_packs``: example lengths
    in [1, ``longest``) (default max_len // 3) grouped greedily into packs, token ids below ``vocab`` (default the
    whole uint32 range), no target on any example's first token."""
    lengths = rng.integers(1, longest or max_len // 3, size=n_examples)
    per, cur, k = [], 0, 0
    for ln in lengths:
        if k and cur + ln > max_len:
            per.append(k)
            cur, k = 0, 0
        cur += ln
        k += 1
    per.append(k)
    tokens = rng.integers(0, vocab or 2**32 - 1, size=int(lengths.sum()), dtype=np.uint64).astype(np.uint32)
    mask = rng.random(len(tokens)) < 0.6
    mask[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = False
    index = rng.permutation(n_examples * 3)[:n_examples]
    return tokens, mask, lengths, np.array(per), index


def rewrite_column(path: Path, name: str, fn) -> None:
    """Rewrite one column of shard 0 (a valid file with a broken invariant) and fix the manifest checksums."""
    f = path / "shard-00000.arrow"
    with pa.memory_map(str(f)) as src:
        table = pa.ipc.open_file(src).read_all()
    col = table.column(name).combine_chunks()
    i = table.schema.get_field_index(name)
    if pa.types.is_list(col.type):
        values = fn(col.values.to_numpy(zero_copy_only=False).copy())
        new = pa.ListArray.from_arrays(col.offsets, pa.array(values, col.type.value_type))
    else:
        new = pa.array(fn(col.to_numpy().copy()), col.type)
    table = table.set_column(i, table.schema.field(i), new)
    with pa.ipc.new_file(str(f), table.schema) as w:
        w.write_table(table, max_chunksize=10**9)
    man = json.loads((path / "manifest.json").read_text())
    man["shards"][0].update(bytes=f.stat().st_size, sha256=file_sha256(f), batches=[table.num_rows])
    man["totals"]["bytes"] = sum(s["bytes"] for s in man["shards"])
    (path / "manifest.json").write_text(json.dumps(man))
