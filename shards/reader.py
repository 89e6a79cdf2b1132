"""``shards.open(path) -> ShardSet``: memory-mapped, checked, random-access reading of a shard set.

On open every manifest field is checked (``manifest.read_manifest``), every shard file must be a plain name
inside the set (a symlink may not lead outside it), and each file's size, Arrow footer, schema and batch count
must match, so a wrong, truncated or foreign set fails at once with a message that says what was expected.
Each file's sha256 is checked the first time a pack of it is read (hashing costs ~1 s/GB, paid once). Each
record batch is validated the first time it is decoded (Arrow structure, row count, no nulls, and the pack
invariants of ``invariants.batch_problem``), so no pack that could index out of bounds in a trainer (a token id
outside the vocabulary, a position past its example, ``cu_seqlens`` out of order) is ever handed out. Record
batches are zstd-compressed, so a pack access decompresses its batch; a small cache keeps the last few decoded
batches as numpy arrays.
"""

from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .errors import ShardFormatError
from .invariants import LIST_COLUMNS, SCALAR_COLUMNS, batch_problem
from .manifest import Manifest, file_sha256, read_manifest
from .pack import Pack, labels_from_mask
from .schema import SCHEMA

__all__ = ["ShardSet", "open_shards"]

_CACHE_BATCHES = 4


class ShardSet:
    """A read-only shard set: ``len(ss)`` packs, ``ss[i] -> Pack``, ``ss.order(seed, epoch)``.

    ``ss.info`` is the checked manifest (:class:`~shards.manifest.Manifest`); ``ss.manifest`` the same JSON object
    as a dict, the writer's caller metadata included.
    """

    def __init__(self, path: str | os.PathLike, *, check_checksums: bool = True) -> None:
        self.path = Path(path)
        self.info: Manifest = read_manifest(self.path)
        self.manifest: dict[str, Any] = self.info.raw
        self.max_len: int = self.info.max_len
        self.vocab_size: int | None = self.info.tokenizer.vocab_size if self.info.tokenizer else None
        self.check_checksums = check_checksums
        # Global pack index -> (shard, batch, row) through cumulative counts over all batches of all shards.
        batch_packs: list[int] = []
        self._batch_shard: list[int] = []
        self._batch_local: list[int] = []
        for s_i, s in enumerate(self.info.shards):
            batch_packs += s.batches
            self._batch_shard += [s_i] * len(s.batches)
            self._batch_local += list(range(len(s.batches)))
        self._batch_start = np.zeros(len(batch_packs) + 1, np.int64)
        np.cumsum(batch_packs, out=self._batch_start[1:])
        self._len = int(self._batch_start[-1])
        self._starts: list[int] = self._batch_start.tolist()  # bisect on a list: ~5x faster than np.searchsorted
        self._files = [self._shard_path(s.file) for s in self.info.shards]
        self._checked: set[int] = set()  # batches whose invariants held (the file is mapped read-only)
        self._pid = -1
        self._open_files()

    # -- files -----------------------------------------------------------------------------------------
    def _shard_path(self, name: str) -> Path:
        """The real path of shard ``name``: inside the set's folder, also through symlinks (the folder itself
        may be a symlink)."""
        f = self.path / name
        try:
            real, root = f.resolve(), self.path.resolve()
        except (OSError, RuntimeError) as e:  # a symlink loop
            raise ShardFormatError(f"shard {str(f)!r} cannot be resolved ({e}); re-run `prep pack`") from e
        if not real.is_relative_to(root):
            raise ShardFormatError(
                f"shard {str(f)!r} is a link to {str(real)!r}, outside the shard set {str(root)!r}; a shard set "
                "reads only its own files. Copy the file into the set or re-run `prep pack`"
            )
        return real

    def _open_files(self) -> None:
        """(Re)open every shard memory-mapped; also after a fork, since a mapping is per process."""
        self._readers: list[pa.ipc.RecordBatchFileReader] = []
        self._hashed: set[int] = set()
        # batch -> (decoded columns, the per-pack offsets and scalars as Python lists for __getitem__)
        self._cache: OrderedDict[int, tuple[dict[str, np.ndarray], tuple[list[int], ...]]] = OrderedDict()
        for s, real in zip(self.info.shards, self._files):
            f = self.path / s.file
            if not real.is_file():
                raise ShardFormatError(f"shard {str(f)!r} listed in the manifest is missing; re-run `prep pack`")
            size = real.stat().st_size
            if size != s.bytes:
                raise ShardFormatError(
                    f"shard {str(f)!r} is {size} bytes, expected {s.bytes} (truncated or replaced); re-run `prep pack`"
                )
            try:
                r = pa.ipc.open_file(pa.memory_map(str(real), "r"))
                num_batches = r.num_record_batches
            except (pa.ArrowException, OSError) as e:
                msg = f"shard {str(f)!r} is not a readable Arrow IPC file ({e}); re-run `prep pack`"
                raise ShardFormatError(msg) from e
            if not r.schema.equals(SCHEMA):
                got, want = [_field_text(x) for x in r.schema], [_field_text(x) for x in SCHEMA]
                diff = [(g, w) for g, w in zip(got, want) if g != w] or [(got, want)]
                raise ShardFormatError(f"shard {str(f)!r} has a different schema: got/expected {diff}")
            if num_batches != len(s.batches):
                raise ShardFormatError(f"shard {str(f)!r} has {num_batches} record batches, expected {len(s.batches)}")
            self._readers.append(r)
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "check_checksums": self.check_checksums}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], check_checksums=state["check_checksums"])

    def _batch(self, b: int) -> dict[str, np.ndarray]:
        """Record batch ``b`` decoded, checked once per process (``invariants.batch_problem``)."""
        return self._entry(b)[0]

    def _entry(self, b: int) -> tuple[dict[str, np.ndarray], tuple[list[int], ...]]:
        if os.getpid() != self._pid:
            self._open_files()
        hit = self._cache.get(b)
        if hit is not None:
            self._cache.move_to_end(b)
            return hit
        s_i, local = self._batch_shard[b], self._batch_local[b]
        shard = self.info.shards[s_i]
        f = self.path / shard.file
        if self.check_checksums and s_i not in self._hashed:
            digest = file_sha256(self._files[s_i])
            if digest != shard.sha256:
                raise ShardFormatError(
                    f"shard {str(f)!r} is corrupted: sha256 {digest[:16]}... expected {shard.sha256[:16]}...; "
                    "re-run `prep pack`"
                )
            self._hashed.add(s_i)
        try:
            rb = self._readers[s_i].get_batch(local)
            rb.validate(full=True)  # offsets and buffer sizes, before numpy reads any of them
            out: dict[str, np.ndarray] = {}
            nulls = []
            for name in LIST_COLUMNS:
                col = rb.column(name)
                values = col.values
                if col.null_count or values.null_count:
                    nulls.append(name)
                    continue
                out[name + ".off"] = col.offsets.to_numpy()
                out[name] = values.to_numpy(zero_copy_only=False)
            for name in SCALAR_COLUMNS:
                col = rb.column(name)
                if col.null_count:
                    nulls.append(name)
                    continue
                out[name] = col.to_numpy()
        except (pa.ArrowException, OSError) as e:
            msg = f"shard {str(f)!r} batch {local} cannot be decoded ({e}); re-run `prep pack`"
            raise ShardFormatError(msg) from e
        if nulls:
            raise ShardFormatError(f"shard {str(f)!r} batch {local} has nulls in {nulls}; the format has none")
        if rb.num_rows != shard.batches[local]:
            raise ShardFormatError(
                f"shard {str(f)!r} batch {local} holds {rb.num_rows} packs, the manifest says {shard.batches[local]}"
            )
        if b not in self._checked:
            problem = batch_problem(out, max_len=self.max_len, vocab_size=self.vocab_size)
            if problem is not None:
                raise ShardFormatError(self._pack_message(b, *problem))
            self._checked.add(b)
        # input_ids, position_ids and loss_mask share offsets (checked above), so one list serves all three.
        lists = tuple(
            out[k].tolist() for k in ("input_ids.off", "cu_seqlens.off", "example_index.off", *SCALAR_COLUMNS)
        )
        self._cache[b] = entry = (out, lists)
        if len(self._cache) > _CACHE_BATCHES:
            self._cache.popitem(last=False)
        return entry

    def _pack_message(self, b: int, row: int, problem: str) -> str:
        """``problem`` of row ``row`` of batch ``b``, naming the shard file, the pack in it and the global pack."""
        s_i = self._batch_shard[b]
        first_of_shard = int(self._batch_start[b - self._batch_local[b]])
        g = int(self._batch_start[b]) + row
        f = self.path / self.info.shards[s_i].file
        return f"shard {str(f)!r} pack {g - first_of_shard} (global pack {g}): {problem}"

    # -- public ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> Pack:
        i = int(i)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"pack index {i} out of range for a shard set of {self._len} packs")
        b = bisect.bisect_right(self._starts, i) - 1
        d, (tok, cu, ex, num_tokens, num_trainable, max_seqlen) = self._entry(b)
        r = i - self._starts[b]
        t0, t1 = tok[r], tok[r + 1]
        ids, mask = d["input_ids"][t0:t1], d["loss_mask"][t0:t1]
        return Pack(
            input_ids=ids,
            position_ids=d["position_ids"][t0:t1],
            cu_seqlens=d["cu_seqlens"][cu[r] : cu[r + 1]],
            loss_mask=mask,
            labels=labels_from_mask(ids, mask),
            example_index=d["example_index"][ex[r] : ex[r + 1]],
            num_tokens=num_tokens[r],
            num_trainable=num_trainable[r],
            max_seqlen=max_seqlen[r],
        )

    def __iter__(self):
        for i in range(self._len):
            yield self[i]

    def order(self, seed: int, epoch: int = 0) -> np.ndarray:
        """A seeded permutation of pack indices (int64); same (seed, epoch) -> same order on every rank."""
        return np.random.default_rng([int(seed), int(epoch)]).permutation(self._len).astype(np.int64)

    def iter_batches(self):
        """Yield every record batch as decoded numpy columns (fast sequential scans for stats / verify)."""
        for b in range(len(self._batch_shard)):
            yield b, self._batch(b)

    def __repr__(self) -> str:
        tokens = self.info.totals.tokens
        return f"ShardSet({str(self.path)!r}, packs={self._len}, tokens={tokens}, max_len={self.max_len})"


def _field_text(field: pa.Field) -> str:
    """``name: type [not null]`` of a schema field; a damaged file's name may not even be UTF-8."""
    try:
        name = field.name
    except UnicodeDecodeError:
        name = "<a name that is not UTF-8>"
    return f"{name}: {field.type}{'' if field.nullable else ' not null'}"


def open_shards(path: str | os.PathLike, *, check_checksums: bool = True) -> ShardSet:
    """Open a shard set folder written by ``prep pack`` (exported as ``shards.open``)."""
    return ShardSet(path, check_checksums=check_checksums)
