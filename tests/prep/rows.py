"""Row builders for the prep tests: small generated datasets, written in the formats prep reads."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

__all__ = ["WORDS", "alpaca_rows", "chat_rows", "sentence", "text_rows", "trained_pieces", "write_jsonl"]

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "river",
    "stone",
    "cloud",
    "seven",
    "ninety",
    "apple",
    "übung",
    "café",
    "数字",
    "—",
    "ok",
    "!",
]


def sentence(rng: random.Random, lo: int = 1, hi: int = 30) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def alpaca_rows(n: int, seed: int = 0, hi: int = 30) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"instruction": sentence(rng, 1, 8), "input": sentence(rng, 0, 5) if rng.random() < 0.4 else "",
         "output": sentence(rng, 1, hi)}
        for _ in range(n)
    ]  # fmt: skip


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        msgs = [{"role": "system", "content": sentence(rng, 1, 5)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 4)):
            msgs += [{"role": "user", "content": sentence(rng)}, {"role": "assistant", "content": sentence(rng)}]
        rows.append({"messages": msgs})
    return rows


def text_rows(n: int, seed: int = 0, hi: int = 60) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": sentence(rng, 1, hi)} for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> Path:
    """``rows`` as UTF-8 JSONL; a lone surrogate (no UTF-8 for it) is written as its JSON escape ``\\ud800``."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8", errors="backslashreplace") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8", errors="backslashreplace")
    return path


def trained_pieces(ids: list[int], mask: list[bool], tok) -> list[str]:
    """The runs of trained tokens of one example, each decoded (special tokens kept)."""
    pieces, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            pieces.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
    if cur:
        pieces.append(tok.decode(cur, skip_special_tokens=False))
    return pieces
