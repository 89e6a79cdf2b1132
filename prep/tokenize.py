"""Tokenize rendered examples, each on its own, into flat token / loss-mask arrays.

Every example is tokenized alone (never a concatenated stream), so packing cannot contaminate it: the
tokens and mask an example has in a pack are exactly those it has here. Plain formats are tokenized per
segment (prompt, completion) and concatenated, so the mask boundary is exact; chats are rendered whole by
the chat template and each assistant turn's character span (found by rendering the conversation's prefixes)
marks its tokens as trained, so every assistant turn is trained and nothing else. BOS is put in front when the
tokenizer's own post-processor would add it; EOS is appended unless the example already ends with it (or,
for a chat, the template already emits it), so a template's end token is never doubled.

``--num-proc N`` splits the rows into contiguous chunks handled by N processes and joins them in order,
so the output is byte-identical whatever N is.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import PrepError
from .render import ALPACA_HEADERS, render_row
from .tokenizer import TokenizerInfo

__all__ = ["Tokenized", "encode_example", "tokenize_rows"]


@dataclass
class Tokenized:
    """Examples end to end: ``tokens`` uint32 / ``mask`` bool (N,), ``lengths`` int64 (E,), one per input row."""

    tokens: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray


def _finish(ids: list[int], mask: list[bool], tk: TokenizerInfo, eos_trained: bool, chat: bool) -> None:
    eos = tk.eos_id
    if eos is not None and ids and ((chat and eos in ids) or ids[-1] == eos):
        pass  # the text or the template already ends (a) turn(s) with EOS: never double it
    elif eos is not None:
        ids.append(eos)
        mask.append(eos_trained)
    if mask:
        mask[0] = False  # the first token has no prediction inside this example; a shifted loss never crosses


def _chat_ids(messages: list[dict[str, Any]], tk: TokenizerInfo, train_on: str) -> tuple[list[int], list[bool]]:
    full = tk.render_chat(messages)
    spans = []
    for k, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start = None
        for gen in (True, False):  # some templates open the assistant header without add_generation_prompt
            prefix = tk.render_chat(messages[:k], add_generation_prompt=gen) if k else ""
            if full.startswith(prefix):
                start = len(prefix)
                break
        through = tk.render_chat(messages[: k + 1])
        if start is None or not full.startswith(through):
            raise PrepError(
                f"the chat template of {tk.name!r} does not render conversations prefix by prefix, so the assistant "
                "turns cannot be located for loss masking; use --train-on all, or a ChatML-like template"
            )
        spans.append((start, len(through)))
    enc = tk.tok.encode(full, add_special_tokens=False)
    ids = list(enc.ids)
    if train_on == "all":
        mask = [True] * len(ids)
    else:
        mask = [False] * len(ids)
        j = 0
        for t, (s, _e) in enumerate(enc.offsets):
            while j < len(spans) and s >= spans[j][1]:
                j += 1
            if j < len(spans) and spans[j][0] <= s < spans[j][1]:
                mask[t] = True
    return ids, mask


def encode_example(row: dict[str, Any], fmt: str, train_on: str, tk: TokenizerInfo) -> tuple[list[int], list[bool]]:
    """One row alone -> (ids, mask): the reference that the shards must reproduce exactly."""
    r = render_row(row, fmt, train_on)
    if r.messages is not None:
        ids, mask = _chat_ids(r.messages, tk, train_on)
        _finish(ids, mask, tk, r.messages[-1].get("role") == "assistant" or train_on == "all", chat=True)
        return ids, mask
    ids: list[int] = [tk.bos_id] if tk.adds_bos else []
    mask: list[bool] = [False] * len(ids)
    for text, trained in r.segments:
        seg = tk.tok.encode(text, add_special_tokens=False).ids
        ids.extend(seg)
        mask.extend([trained] * len(seg))
    _finish(ids, mask, tk, r.segments[-1][1], chat=False)
    return ids, mask


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


_WORK: tuple[str, str, TokenizerInfo] | None = None


def _encode_chunk(rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fmt, train_on, tk = _WORK
    ids_all: list[int] = []
    mask_all: list[bool] = []
    lengths = np.zeros(len(rows), np.int64)
    if fmt in ("chat", "sharegpt"):
        for i, row in enumerate(rows):
            ids, mask = encode_example(row, fmt, train_on, tk)
            ids_all += ids
            mask_all += mask
            lengths[i] = len(ids)
    else:
        # Batch-encode all segments of the chunk at once (same ids as one by one: each text is encoded alone).
        rendered = [render_row(r, fmt, train_on).segments for r in rows]
        cache = _PrefixCache(tk, ALPACA_HEADERS if fmt == "alpaca" else ())
        texts, heads = [], []
        for segs in rendered:
            for t, _ in segs:
                hit = cache.split(t) if cache.headers else None
                heads.append(hit[0] if hit else None)
                texts.append(hit[1] if hit else t)
        enc = getattr(tk.tok, "encode_batch_fast", tk.tok.encode_batch)(texts, add_special_tokens=False)
        k = 0
        bos = [tk.bos_id] if tk.adds_bos else []
        for i, segs in enumerate(rendered):
            ids = list(bos)
            mask = [False] * len(ids)
            for _, trained in segs:
                seg = enc[k].ids if heads[k] is None else heads[k] + enc[k].ids
                k += 1
                ids += seg
                mask += [trained] * len(seg)
            _finish(ids, mask, tk, segs[-1][1], chat=False)
            ids_all += ids
            mask_all += mask
            lengths[i] = len(ids)
    return np.array(ids_all, np.uint32), np.array(mask_all, np.bool_), lengths


def tokenize_rows(
    rows: list[dict[str, Any]], fmt: str, train_on: str, tk: TokenizerInfo, num_proc: int = 1, progress=None
) -> Tokenized:
    """Tokenize every row alone; ``progress(n)`` is called as chunks finish."""
    global _WORK
    if fmt in ("chat", "sharegpt") and tk.chat_template is None:
        tk.render_chat([])  # raises the clear no-template error before any work starts
    _WORK = (fmt, train_on, tk)
    n_chunks = max(1, min(len(rows), num_proc * 8 if num_proc > 1 else (len(rows) + 4095) // 4096))
    bounds = np.linspace(0, len(rows), n_chunks + 1).astype(int)
    chunks = [rows[a:b] for a, b in itertools.pairwise(bounds)]
    parts = []
    if num_proc > 1 and len(chunks) > 1:
        # Fork: workers inherit the tokenizer; Rust-side threads off in them (tokenizers warns otherwise).
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(num_proc) as pool:
            for part, chunk in zip(pool.imap(_encode_chunk, chunks), chunks):
                parts.append(part)
                if progress:
                    progress(len(chunk))
    else:
        for chunk in chunks:
            parts.append(_encode_chunk(chunk))
            if progress:
                progress(len(chunk))
    _WORK = None
    if not parts:
        return Tokenized(np.zeros(0, np.uint32), np.zeros(0, np.bool_), np.zeros(0, np.int64))
    return Tokenized(
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        np.concatenate([p[2] for p in parts]),
    )
