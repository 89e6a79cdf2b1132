"""Stream every input through check -> render/tokenize -> ``--overlong`` in chunks, keeping only token arrays.

Rows exist as Python objects one chunk at a time (``prep.load.CHUNK_ROWS`` rows, plus the chunks in flight to
tokenizer processes). What is kept:

- the tokens (uint32) and loss mask of every example, appended to two files of a spill folder (:class:`Spill`,
  5 bytes per token on disk, in the staging folder next to ``--out``); they are read back per group of packs when
  the shards are written (:func:`write_packs`), from memory when the spill is small (at most 64 MiB);
- per input row: its tokens before ``--overlong`` (0 for a bad row), its trained tokens, whether it is usable;
- per example (after ``--overlong``: a row, its truncation, or each piece of a split row): its length, its row and
  its trained tokens.

So memory grows with the number of rows (25 bytes each while streaming), not with their text or tokens. Rows are
numbered end to end over the inputs in order (the shards' ``example_index``).
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import PackConfig
from .errors import PrepError
from .load import Source

__all__ = ["GROUP_TOKENS", "Opened", "Spill", "Streamed", "open_inputs", "ranges", "stream_inputs", "write_packs"]

# Tokens gathered from the spill per add_packs call when writing (~13 MB of tokens, mask and offsets at a time).
GROUP_TOKENS = 1 << 20
# A spill (5 bytes per token) up to this size is read back whole; a larger one example by example (see Spill).
IN_MEMORY_BYTES = 1 << 26
# How many bad-row reasons the summary and the manifest keep (the count covers all of them).
BAD_ROW_EXAMPLES = 5


def ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``[starts[0], ..., starts[0] + counts[0] - 1, starts[1], ...]`` (int64): consecutive ranges end to end."""
    counts = np.asarray(counts, np.int64)
    if len(counts) and counts.min() == 1 == counts.max():  # one each (the common case): no temporaries
        return np.asarray(starts, np.int64).copy()
    total = int(counts.sum())
    before = np.zeros(len(counts), np.int64)
    np.cumsum(counts[:-1], out=before[1:])
    return np.repeat(np.asarray(starts, np.int64) - before, counts) + np.arange(total, dtype=np.int64)


def _sums(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sums of ``values`` over consecutive segments of ``lengths`` (zero-length segments sum to 0)."""
    cs = np.zeros(len(values) + 1, np.int64)
    np.cumsum(values, out=cs[1:])
    ends = np.cumsum(lengths)
    return cs[ends] - cs[ends - lengths]


class Spill:
    """Examples' tokens and masks end to end in two files of ``folder``, read back by ranges.

    A spill of at most ``IN_MEMORY_BYTES`` is read back whole once (as fast as the arrays it replaces); a larger one
    example by example with ``pread`` (about 3 us per example and file), never memory-mapped: a mapping brings the
    pages around every example it touches into the process (on Linux, fault-around maps up to 64 KiB per touch), so a
    group of scattered examples would map most of the file."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.tokens_path, self.mask_path = folder / "tokens.u32", folder / "mask.u8"
        self._files = [open(self.tokens_path, "wb"), open(self.mask_path, "wb")]  # noqa: SIM115 (closed in close())
        self.tokens = 0
        self._whole: tuple[np.ndarray, np.ndarray] | None = None

    def append(self, tokens: np.ndarray, mask: np.ndarray) -> None:
        np.ascontiguousarray(tokens, np.uint32).tofile(self._files[0])
        np.ascontiguousarray(mask, np.bool_).tofile(self._files[1])
        self.tokens += len(tokens)

    def close(self) -> None:
        for f in self._files:
            f.close()

    def gather(self, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tokens and mask of the examples at ``starts`` (token offsets) with ``lengths``, end to end."""
        if self._whole is None and self.tokens * 5 <= IN_MEMORY_BYTES:
            self._whole = (np.fromfile(self.tokens_path, np.uint32), np.fromfile(self.mask_path, np.bool_))
        if self._whole is not None:
            idx = ranges(starts, lengths)
            return self._whole[0][idx], self._whole[1][idx]
        tokens = np.empty(int(np.sum(lengths)), np.uint32)
        mask = np.empty(len(tokens), np.bool_)
        out_t, out_m = memoryview(tokens).cast("B"), memoryview(mask).cast("B")
        fd_t, fd_m = os.open(self.tokens_path, os.O_RDONLY), os.open(self.mask_path, os.O_RDONLY)
        try:
            at = 0
            for start, n in zip(np.asarray(starts).tolist(), np.asarray(lengths).tolist()):
                if (
                    os.preadv(fd_t, [out_t[4 * at : 4 * (at + n)]], 4 * start) != 4 * n
                    or os.preadv(fd_m, [out_m[at : at + n]], start) != n
                ):
                    raise PrepError(f"the spill in {str(self.tokens_path.parent)!r} is shorter than written")
                at += n
        finally:
            os.close(fd_t)
            os.close(fd_m)
        return tokens, mask

    def remove(self) -> None:
        self.close()
        self._whole = None
        for p in (self.tokens_path, self.mask_path):
            p.unlink(missing_ok=True)


@dataclass
class Opened:
    """An input ready to stream: its source, detected format and first chunk (read to detect it)."""

    source: Source
    fmt: str
    chunks: Iterator[list[dict[str, Any]]]


def _check_distinct(sources: list[Source]) -> None:
    """Refuse a dataset given twice, however spelled (``a.jsonl`` and ``./a.jsonl``, a saved DatasetDict and its
    ``@train``, a folder and a file in it): its rows would be packed twice, and the held-out split, which draws
    distinct rows, could put one copy in eval/ and the other in the training set. Sources are compared by what they
    read (:attr:`Source.reads`)."""
    seen: dict[str, Source] = {}
    for source in sources:
        for item in source.reads:
            first = seen.setdefault(item, source)
            if first is source:
                continue
            if first.name == source.name:
                same = f"{source.name!r} is given twice"
            elif first.reads == source.reads:
                same = f"{first.name!r} and {source.name!r} are one dataset"
            else:
                same = f"{first.name!r} and {source.name!r} both read {item!r}"
            raise PrepError(f"{same}; give each dataset once (to repeat one, use --mix DATASET=WEIGHT,...)")


def open_inputs(cfg: PackConfig, maps: dict[str, str]) -> list[Opened]:
    """Open every input and read its first chunk: the format (``--format`` or detected from the first rows'
    columns), the ``--map`` columns and emptiness are checked for all inputs before anything is tokenized."""
    from .load import open_source
    from .render import apply_maps, detect_format

    sources = [open_source(spec) for spec in cfg.inputs()]
    _check_distinct(sources)
    out = []
    for spec, source in zip(cfg.inputs(), sources):
        chunks = source.chunks()
        first = next(chunks, None)
        if not first:
            raise PrepError(f"dataset {spec!r} is empty: no rows found; expected at least one example")
        fmt = detect_format(apply_maps(first, maps, spec), spec, cfg.format)
        out.append(Opened(source, fmt, itertools.chain([first], chunks)))
    return out


@dataclass
class Streamed:
    """What streaming keeps (see the module doc); arrays are filled by :func:`stream_inputs`."""

    spill: Spill
    formats: list[str]
    source_rows: list[int] = field(default_factory=list)  # rows per input, in order
    row_tokens: Any = None  # int32 (R,): tokens of each row before --overlong (0: bad or empty)
    row_trained: Any = None  # int32 (R,): its trained tokens
    good: Any = None  # bool (R,): usable (not a bad row)
    ex_len: Any = None  # int32 (E,): examples after --overlong, in row order
    ex_row: Any = None  # int64 (E,): the row of each example
    ex_trained: Any = None  # int32 (E,)
    bad_count: int = 0
    bad_first: list[str] = field(default_factory=list)  # the first BAD_ROW_EXAMPLES reasons, in row order

    @property
    def rows(self) -> int:
        return sum(self.source_rows)

    def ex_start(self) -> np.ndarray:
        """Each example's first token in the spill (int64)."""
        start = np.zeros(len(self.ex_len), np.int64)
        np.cumsum(self.ex_len[:-1], out=start[1:], dtype=np.int64)
        return start


def _overlong(tok, mask, lengths, index, max_len: int, mode: str):
    """Apply --overlong to the examples of flat arrays (empty ones leave): new (tokens, mask, lengths, index)."""
    keep_ex = lengths > 0
    if mode == "drop":
        keep_ex &= lengths <= max_len
    if not keep_ex.all():
        keep_tok = np.repeat(keep_ex, lengths)
        tok, mask, lengths, index = tok[keep_tok], mask[keep_tok], lengths[keep_ex], index[keep_ex]
    if mode == "drop" or not (lengths > max_len).any():
        return tok, mask, lengths, index
    starts = np.zeros(len(lengths), np.int64)  # position of every token inside its example
    np.cumsum(lengths[:-1], out=starts[1:])
    pos = np.arange(len(tok), dtype=np.int64) - np.repeat(starts, lengths)
    if mode == "truncate":
        keep_tok = pos < max_len
        return tok[keep_tok], mask[keep_tok], np.minimum(lengths, max_len), index
    mask = mask.copy()
    mask[pos % max_len == 0] = False  # every piece is its own example: no target on its first token
    pieces = (lengths + max_len - 1) // max_len
    new_len = np.full(int(pieces.sum()), max_len, np.int64)
    new_len[np.cumsum(pieces) - 1] = lengths - (pieces - 1) * max_len
    return tok, mask, new_len, np.repeat(index, pieces)


def stream_inputs(
    cfg: PackConfig,
    inputs: list[Opened],
    tk: Any,
    maps: dict[str, str],
    spill: Spill,
    stage: Callable[[str], Any],
    progress: Callable[[int], object] | None = None,
) -> Streamed:
    """Check, tokenize and apply ``--overlong`` to every row of ``inputs`` chunk by chunk (see the module doc).

    ``stage(name)``: a context manager that times a stage (``load data``, ``check rows``, ``tokenize``,
    ``overlong``). A bad row is an error naming it, or with ``--skip-bad-rows`` counted and left out."""
    from .render import apply_maps
    from .tokenize import Encoder, Task
    from .validate import row_name, row_problem

    st = Streamed(spill, [i.fmt for i in inputs])
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("row_tokens", "row_trained", "good", "len", "row", "tr")}
    sep = " " if cfg.prompt_separator is None else cfg.prompt_separator
    labels = [i.source.name if len(inputs) > 1 else None for i in inputs]
    # Per chunk in flight, in order: (its first row in its input, its first row over all inputs, its checked-bad
    # rows as (index in the chunk, reason)).
    pending: deque[tuple[int, int, list[tuple[int, str]]]] = deque()

    def take(result, label: str | None) -> None:
        in_input, first, reasons = pending.popleft()
        reasons += [(i - in_input, f"{row_name(i, label)}: {why}") for i, why in result.bad]  # template rejects
        good = np.ones(len(result.lengths), bool)
        good[[i for i, _ in reasons]] = False
        index = np.arange(first, first + len(result.lengths), dtype=np.int64)
        t, m, ln, ix = _overlong(result.tokens, result.mask, result.lengths, index, cfg.max_len, cfg.overlong)
        spill.append(t, m)
        for key, value in (("row_tokens", result.lengths), ("row_trained", _sums(result.mask, result.lengths)),
                           ("len", ln), ("tr", _sums(m, ln))):  # fmt: skip
            parts[key].append(value.astype(np.int32))
        parts["good"].append(good)
        parts["row"].append(ix)
        st.bad_count += len(reasons)
        if len(st.bad_first) < BAD_ROW_EXAMPLES:  # chunks come in row order: the first reasons are the first rows'
            st.bad_first += [why for _, why in sorted(reasons)][: BAD_ROW_EXAMPLES - len(st.bad_first)]
        if progress:
            progress(len(result.lengths))

    offset = 0  # the first row of the current input, counted over all inputs
    with Encoder(tk, cfg.num_proc) as enc:
        for opened, label in zip(inputs, labels):
            task = Task(opened.fmt, cfg.train_on, sep, cfg.skip_bad_rows, label)
            in_input = 0
            chunks = iter(opened.chunks)
            while True:
                with stage("load data"):
                    chunk = next(chunks, None)
                    rows = None if chunk is None else apply_maps(chunk, maps, None)
                if rows is None:
                    break
                with stage("check rows"):
                    checked = []
                    for i, row in enumerate(rows):
                        why = row_problem(row, opened.fmt, maps)
                        if why is None:
                            continue
                        if not cfg.skip_bad_rows:
                            raise PrepError(
                                f"{row_name(in_input + i, label)}: {why}; fix the row, or pass --skip-bad-rows to "
                                "leave out such rows"
                            )
                        checked.append((i, f"{row_name(in_input + i, label)}: {why}"))
                        rows[i] = None
                pending.append((in_input, offset + in_input, checked))
                with stage("tokenize"):
                    done = enc.put(task, in_input, rows)
                in_input += len(rows)
                with stage("overlong"):
                    for result in done:
                        take(result, label)
            with stage("tokenize"):
                done = enc.finish()
            with stage("overlong"):
                for result in done:
                    take(result, label)
            st.source_rows.append(in_input)
            offset += in_input
    spill.close()

    def cat(key: str, dtype) -> np.ndarray:  # one list at a time: the chunks of a list go as it is joined
        arrays = parts.pop(key)
        return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)

    st.row_tokens, st.row_trained = cat("row_tokens", np.int32), cat("row_trained", np.int32)
    st.good = cat("good", bool)
    st.ex_len, st.ex_row, st.ex_trained = cat("len", np.int32), cat("row", np.int64), cat("tr", np.int32)
    return st


def write_packs(writer: Any, st: Streamed, ex: np.ndarray, plan: Any, progress=None) -> None:
    """Write the packs of ``plan`` (a ``prep.pack.PackPlan`` over the examples ``ex``, ids into ``st.ex_*``) with
    ``writer``, gathering their tokens from the spill about ``GROUP_TOKENS`` at a time, cut at the writer's
    record-batch bounds (so the files are those one ``add_packs`` call over every pack would write)."""
    order, per_pack = plan.example_order, plan.examples_per_pack
    pack_ex = np.zeros(len(per_pack) + 1, np.int64)
    np.cumsum(per_pack, out=pack_ex[1:])
    pack_tok = np.zeros(len(per_pack) + 1, np.int64)  # tokens before each pack
    if len(per_pack):
        np.cumsum(np.add.reduceat(st.ex_len[ex[order]].astype(np.int64), pack_ex[:-1]), out=pack_tok[1:])
    bounds = writer.batch_bounds(len(per_pack))
    tok_at = pack_tok[bounds]
    starts = st.ex_start()
    k0 = 0
    while k0 < len(bounds) - 1:
        # the furthest record-batch bound within GROUP_TOKENS of this one (at least the next one)
        k1 = max(k0 + 1, int(np.searchsorted(tok_at, tok_at[k0] + GROUP_TOKENS, side="right")) - 1)
        p0, p1 = int(bounds[k0]), int(bounds[k1])
        sel = ex[order[pack_ex[p0] : pack_ex[p1]]]
        lengths = st.ex_len[sel].astype(np.int64)
        tokens, mask = st.spill.gather(starts[sel], lengths)
        writer.add_packs(tokens, mask, lengths, per_pack[p0:p1], st.ex_row[sel], progress=progress)
        k0 = k1
