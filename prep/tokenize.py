"""Tokenize rendered examples, each on its own, into flat token / loss-mask arrays.

Every example is tokenized alone (never a concatenated stream), so packing cannot contaminate it: the
tokens and mask an example has in a pack are exactly those it has here. Plain formats are tokenized per
segment (prompt, completion) and concatenated, so the mask boundary is exact; chats are rendered whole by
the chat template and each assistant turn's character span (``prep.chat.assistant_spans``) marks its tokens as
trained, so every assistant turn is trained and nothing else (``--train-on all`` needs no spans). BOS is put in
front when the tokenizer's own post-processor would add it; EOS is appended unless the example already ends with
it (or, for a chat, the template already emits it), so a template's end token is never doubled.

A row the chat template rejects (or whose turns cannot be located) is an error naming the row, or with
``skip_bad_rows`` an empty example reported in ``Tokenized.bad``. Rows given as ``None`` (left out by the caller's
checks) become empty examples.

Rows come in chunks (``prep.load.CHUNK_ROWS``); ``--num-proc N`` tokenizes N chunks at a time in worker processes
and takes their results in order, so the output is byte-identical whatever N is (:class:`Encoder`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import unicodedata
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .chat import assistant_spans, check_rendered
from .errors import PrepError
from .render import ALPACA_HEADERS, render_row
from .tokenizer import TokenizerInfo
from .validate import row_name

__all__ = ["Encoder", "Task", "Tokenized", "encode_example"]


@dataclass
class Tokenized:
    """Examples end to end: ``tokens`` uint32 / ``mask`` bool (N,), ``lengths`` int64 (E,), one per input row;
    ``bad``: (row, reason) of rows skipped here (their length is 0)."""

    tokens: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    bad: list[tuple[int, str]] = field(default_factory=list)


def _finish(ids: list[int], mask: list[bool], tk: TokenizerInfo, eos_trained: bool, chat: bool) -> None:
    eos = tk.eos_id
    if eos is not None and ids and ((chat and eos in ids) or ids[-1] == eos):
        pass  # the text or the template already ends (a) turn(s) with EOS: never double it
    elif eos is not None:
        ids.append(eos)
        mask.append(eos_trained)
    if mask:
        mask[0] = False  # the first token has no prediction inside this example; a shifted loss never crosses


def _chat_ids(
    messages: list[dict[str, Any]], tools: list | None, documents: list | None, tk: TokenizerInfo, train_on: str
) -> tuple[list[int], list[bool]]:
    tpl = tk.chat
    messages = tpl.prepare(messages, tools, documents)
    if train_on == "all":
        full, spans = tpl.render(messages, tools=tools, documents=documents), []
    elif tpl.has_generation_markers:
        full, spans = tpl.render_marked(messages, tools, documents)
    else:
        full = tpl.render(messages, tools=tools, documents=documents)
        spans = assistant_spans(tpl, messages, tools, full, documents)
    check_rendered(tpl, messages, tools, full, documents)
    enc = tk.tok.encode(full, add_special_tokens=False)
    ids = list(enc.ids)
    if train_on == "all":
        mask = [True] * len(ids)
    else:
        # A token is trained when it overlaps a span (as transformers' assistant mask: the token holding a span's
        # first character through the one holding its last), so a token straddling the start is trained too.
        mask = [False] * len(ids)
        j = 0
        for t, (s, e) in enumerate(enc.offsets):
            while j < len(spans) and s >= spans[j][1]:
                j += 1
            if j < len(spans) and s < spans[j][1] and e > spans[j][0] and spans[j][0] < spans[j][1]:
                mask[t] = True
    return ids, mask


def _encode_segments(segments: list[tuple[str | None, bool]], tk: TokenizerInfo, encoded) -> tuple[list, list]:
    """Segments -> (ids, mask); ``encoded`` yields the ids of each text segment in order (EOS segments take none)."""
    ids: list[int] = [tk.bos_id] if tk.adds_bos else []
    mask: list[bool] = [False] * len(ids)
    for text, trained in segments:
        seg = next(encoded) if text is not None else ([tk.eos_id] if tk.eos_id is not None else [])
        ids += seg
        mask += [trained] * len(seg)
    _finish(ids, mask, tk, segments[-1][1], chat=False)
    return ids, mask


def encode_example(
    row: dict[str, Any], fmt: str, train_on: str, tk: TokenizerInfo, separator: str = " "
) -> tuple[list[int], list[bool]]:
    """One row alone -> (ids, mask): the reference that the shards must reproduce exactly."""
    r = render_row(row, fmt, train_on, separator)
    if r.messages is not None:
        ids, mask = _chat_ids(r.messages, r.tools, r.documents, tk, train_on)
        _finish(ids, mask, tk, r.messages[-1].get("role") == "assistant" or train_on == "all", chat=True)
        return ids, mask
    texts = (tk.tok.encode(t, add_special_tokens=False).ids for t, _ in r.segments if t is not None)
    return _encode_segments(r.segments, tk, texts)


class _PrefixCache:
    """Reuse the ids of a constant prompt opening (the Alpaca header, ~35 of ~100 tokens per example).

    ``ids(header + rest) == ids(header) + ids(rest)`` holds when the split is a pre-token boundary (BPE never
    merges across one) and normalization acts per character there. The header ends in a newline and ``rest``
    starts with the stripped instruction, so for byte-level BPE splitters (GPT-2, Llama-3, Qwen) it holds; it is
    checked once per tokenizer and first character of ``rest`` (pre-tokenizer boundary + probe encodings), and
    a tokenizer that fails (e.g. SentencePiece's prepended space) simply encodes the whole prompt.
    """

    def __init__(self, tk: TokenizerInfo, headers: tuple[str, ...]) -> None:
        self.tk = tk
        self.headers = headers
        self.ok: dict[tuple[str, str], bool] = {}
        self.ids: dict[str, list[int]] = {}

    def _enc(self, text: str) -> list[int]:
        return self.tk.tok.encode(text, add_special_tokens=False).ids

    def _check(self, header: str, c: str) -> bool:
        if c.isspace() or unicodedata.combining(c):
            return False
        if header not in self.ids:
            self.ids[header] = self._enc(header)
        pre = self.tk.tok.pre_tokenizer
        if pre is not None and len(header) not in {o[0] for _, o in pre.pre_tokenize_str(header + c)}:
            return False
        probes = ("", "ab", " x", "1", ".")
        return all(self._enc(header + c + t) == self.ids[header] + self._enc(c + t) for t in probes)

    def split(self, text: str) -> tuple[list[int], str] | None:
        for h in self.headers:
            if len(text) > len(h) and text.startswith(h):
                key = (h, text[len(h)])
                ok = self.ok.get(key)
                if ok is None:
                    ok = self.ok[key] = self._check(*key)
                return (self.ids[h], text[len(h) :]) if ok else None
        return None


@dataclass(frozen=True)
class Task:
    """How to tokenize the rows of one input (small: sent with every chunk to a worker process)."""

    fmt: str
    train_on: str
    separator: str = " "
    skip_bad_rows: bool = False
    source: str | None = None  # the input's name in row errors (None: the only input)


_TK: TokenizerInfo | None = None  # the tokenizer of this process's encodes (inherited by forked workers)


def _encode_chunk(task: Task, offset: int, rows: list[dict[str, Any] | None]):
    """Rows ``offset ...`` of one input -> (tokens, mask, length per row, [(row, reason)] of rows it rejected)."""
    tk = _TK
    assert tk is not None, "the encoder's tokenizer is set"
    ids_all: list[int] = []
    mask_all: list[bool] = []
    lengths = np.zeros(len(rows), np.int64)
    bad: list[tuple[int, str]] = []
    if task.fmt in ("chat", "sharegpt"):
        for i, row in enumerate(rows):
            if row is None:
                continue
            try:
                ids, mask = encode_example(row, task.fmt, task.train_on, tk, task.separator)
            except PrepError as e:
                if not task.skip_bad_rows:
                    raise PrepError(f"{row_name(offset + i, task.source)}: {e}") from e
                bad.append((offset + i, str(e)))
                continue
            ids_all += ids
            mask_all += mask
            lengths[i] = len(ids)
    else:
        # Batch-encode all segments of the chunk at once (same ids as one by one: each text is encoded alone).
        rendered = [None if r is None else render_row(r, task.fmt, task.train_on, task.separator).segments
                    for r in rows]  # fmt: skip
        cache = _PrefixCache(tk, ALPACA_HEADERS if task.fmt == "alpaca" else ())
        texts, heads = [], []
        for segs in rendered:
            for t, _ in segs or ():
                if t is None:
                    continue
                hit = cache.split(t) if cache.headers else None
                heads.append(hit[0] if hit else None)
                texts.append(hit[1] if hit else t)
        enc = getattr(tk.tok, "encode_batch_fast", tk.tok.encode_batch)(texts, add_special_tokens=False)
        pieces = (e.ids if h is None else h + e.ids for e, h in zip(enc, heads))
        for i, segs in enumerate(rendered):
            if segs is None:
                continue
            ids, mask = _encode_segments(segs, tk, pieces)
            ids_all += ids
            mask_all += mask
            lengths[i] = len(ids)
    return np.array(ids_all, np.uint32), np.array(mask_all, np.bool_), lengths, bad


def _set_tokenizer(tk: TokenizerInfo | None) -> None:
    global _TK
    _TK = tk


def _start_worker(tk: TokenizerInfo | None) -> None:
    """A worker process's start: its tokenizer, and SIGTERM's default action. The parent's Python handler (``prep
    pack`` turns SIGTERM into a clean exit) would run only once the worker's current batch left the tokenizer's native
    code, so the parent's ``terminate()`` would wait out each busy worker's batch."""
    _set_tokenizer(tk)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Encoder:
    """Tokenizes chunks of rows, each example alone, in order: in this process, or in ``num_proc`` worker processes
    with at most ``2 * num_proc`` chunks in flight (so memory holds a bounded number of chunks, never the input).

    ``put(task, offset, rows)`` returns the results that are complete, in the order the chunks were put;
    ``finish()`` the rest. A result is ``Tokenized`` (tokens, mask, a length per row (0 for a row given as None or
    rejected), and the rejected rows). The output is identical for any ``num_proc``.
    """

    def __init__(self, tk: TokenizerInfo, num_proc: int = 1) -> None:
        self.tk = tk
        self.num_proc = num_proc
        self._pool = None
        self._pending: deque = deque()

    def __enter__(self) -> Encoder:
        if self.num_proc > 1:
            # Fork: workers inherit the tokenizer; Rust-side threads off in them (tokenizers warns otherwise).
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            self._pool = ctx.Pool(self.num_proc, initializer=_start_worker, initargs=(self.tk,))
        else:
            _set_tokenizer(self.tk)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        _set_tokenizer(None)
        self._pending.clear()

    @staticmethod
    def _result(part) -> Tokenized:
        return Tokenized(*part)

    def put(self, task: Task, offset: int, rows: list[dict[str, Any] | None]) -> list[Tokenized]:
        if self._pool is None:
            return [self._result(_encode_chunk(task, offset, rows))]
        self._pending.append(self._pool.apply_async(_encode_chunk, (task, offset, rows)))
        done = []
        while len(self._pending) >= 2 * self.num_proc or (self._pending and self._pending[0].ready()):
            done.append(self._result(self._pending.popleft().get()))
        return done

    def finish(self) -> list[Tokenized]:
        done = [self._result(p.get()) for p in self._pending]
        self._pending.clear()
        return done
