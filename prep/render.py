"""Turn a dataset row into what gets tokenized: text segments marked trained or not, or a chat.

Formats (``--format``, else detected from the columns, after ``--map NAME=COLUMN`` renames):

- ``chat``: ``messages`` = [{role, content}, ...] (system/user/assistant/tool), rendered by the chat template;
- ``sharegpt``: ``conversations`` = [{from, value}, ...], converted to ``chat``;
- ``alpaca``: ``instruction`` / ``input`` (optional) / ``output``, the Stanford Alpaca prompt, response trained;
- ``prompt-completion``: ``prompt`` / ``completion``, concatenated as is, completion trained;
- ``text``: ``text``, all trained.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

from .config import Format
from .errors import PrepError

__all__ = ["ALPACA_HEADERS", "FORMATS", "Rendered", "apply_maps", "detect_format", "parse_maps", "render_row"]

# The columns of each format, in detection order (it matters: a chat row may also carry a `text` column).
_REQUIRED = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt-completion": ("prompt", "completion"),
    "text": ("text",),
}
FORMATS: tuple[str, ...] = typing.get_args(Format)
assert set(_REQUIRED) == set(FORMATS), "every format has its columns"
_FIELDS = ("text", "instruction", "input", "output", "prompt", "completion", "messages", "conversations", "system")

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# The constant opening of every Alpaca prompt: tokenized once and reused when that is exact (see tokenize.py).
ALPACA_HEADERS = tuple(t[: t.index("{instruction}")] for t in (ALPACA_WITH_INPUT, ALPACA_NO_INPUT))
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}


@dataclass
class Rendered:
    """``segments``: [(text, trained)] for plain formats; ``messages`` for chat (rendered by the template)."""

    segments: list[tuple[str, bool]] | None = None
    messages: list[dict[str, Any]] | None = None


def parse_maps(maps: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``["prompt=question", ...]`` -> ``{"prompt": "question"}``, checking names."""
    out = {}
    for m in maps:
        name, sep, column = m.partition("=")
        if not sep or not name or not column:
            raise PrepError(f"--map {m!r}: expected NAME=COLUMN, e.g. --map prompt=question")
        if name not in _FIELDS:
            raise PrepError(f"--map {m!r}: unknown field {name!r}; expected one of {', '.join(_FIELDS)}")
        out[name] = column
    return out


def apply_maps(rows: list[dict[str, Any]], maps: dict[str, str], source: str) -> list[dict[str, Any]]:
    if not maps:
        return rows
    columns = _columns(rows)
    missing = [c for c in maps.values() if c not in columns]
    if missing:
        raise PrepError(f"--map names columns {missing} that {source!r} does not have; its columns: {sorted(columns)}")
    return [{**r, **{name: r.get(col) for name, col in maps.items()}} for r in rows]


def _columns(rows: list[dict[str, Any]]) -> set[str]:
    cols: set[str] = set()
    for r in rows[:100]:
        cols.update(r)
    return cols


def detect_format(rows: list[dict[str, Any]], source: str, forced: str | None = None) -> str:
    """The format of ``rows``: ``forced`` if given (checked), else the first whose columns are all present."""
    columns = _columns(rows)
    if forced is not None:
        if forced not in _REQUIRED:
            raise PrepError(f"--format {forced!r} is unknown; known formats: {', '.join(FORMATS)}")
        need = [c for c in _REQUIRED[forced] if c not in columns]
        if need:
            raise PrepError(
                f"--format {forced} needs columns {list(_REQUIRED[forced])} but {source!r} lacks {need}; "
                f"its columns: {sorted(columns)} (rename with --map NAME=COLUMN)"
            )
        return forced
    for fmt, need in _REQUIRED.items():
        if all(c in columns for c in need):
            return fmt
    known = "; ".join(f"{f}: {', '.join(c)}" for f, c in _REQUIRED.items())
    raise PrepError(
        f"cannot detect the format of {source!r}: its columns are {sorted(columns)}; known formats and their "
        f"columns: {known}. Choose one with --format or rename columns with --map NAME=COLUMN"
    )


def _str(v: Any) -> str:
    return "" if v is None else str(v)


def render_row(row: dict[str, Any], fmt: str, train_on: str) -> Rendered:
    """Render one row; ``train_on`` is ``completion`` or ``all`` (text is always trained on everything)."""
    all_ = train_on == "all"
    if fmt == "text":
        return Rendered(segments=[(_str(row.get("text")), True)])
    if fmt == "alpaca":
        inp = _str(row.get("input")).strip()
        tmpl = ALPACA_WITH_INPUT if inp else ALPACA_NO_INPUT
        prompt = tmpl.format(instruction=_str(row.get("instruction")).strip(), input=inp)
        return Rendered(segments=[(prompt, all_), (_str(row.get("output")), True)])
    if fmt == "prompt-completion":
        return Rendered(segments=[(_str(row.get("prompt")), all_), (_str(row.get("completion")), True)])
    if fmt == "chat":
        msgs = row.get("messages")
        if not isinstance(msgs, list):
            raise PrepError(f"`messages` must be a list of {{role, content}} objects, got {type(msgs).__name__}")
        return Rendered(messages=[{**m, "content": _str(m.get("content"))} for m in msgs])
    if fmt == "sharegpt":
        conv = row.get("conversations")
        if not isinstance(conv, list):
            raise PrepError(f"`conversations` must be a list of {{from, value}} objects, got {type(conv).__name__}")
        msgs = []
        if row.get("system"):
            msgs.append({"role": "system", "content": _str(row["system"])})
        for turn in conv:
            who = _str(turn.get("from")).lower()
            if who not in _SHAREGPT_ROLES:
                raise PrepError(f"ShareGPT turn from {who!r} is unknown; expected one of {sorted(_SHAREGPT_ROLES)}")
            msgs.append({"role": _SHAREGPT_ROLES[who], "content": _str(turn.get("value"))})
        return Rendered(messages=msgs)
    raise PrepError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
