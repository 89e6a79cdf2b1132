"""Check every row against its format before anything is tokenized: a missing field or a wrong type is named.

:func:`row_problem` returns why a row cannot be rendered (``None`` when it can). The pipeline turns a problem into
one error naming the row and the field, or, with ``--skip-bad-rows``, leaves the row out and counts it. The shapes
are those ``prep.render`` documents; text fields must be strings (a number, list or object where text belongs is
an error, never silently turned into text) of Unicode text (a lone surrogate, which no tokenizer encodes, is named).
"""

from __future__ import annotations

import json
from typing import Any

from .chat import REASONING_FIELDS, join_text
from .render import SHAREGPT_ROLES, call_arguments, parse_documents, parse_tools, tool_calls

__all__ = ["CHAT_ROLES", "row_name", "row_problem"]

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
# The fields each format renders (what reaches the tokenizer); other columns of a row are never read.
_RENDERED = {
    "text": ("text",),
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "prompt-completion": ("prompt", "completion"),
    "chat": ("messages", "system", "tools", "documents"),
    "sharegpt": ("conversations", "system", "tools", "documents"),
}


def row_name(i: int, source: str | None) -> str:
    """How errors name a row: its 0-based index in its input, and the input when there are several."""
    return f"row {i}" if source is None else f"row {i} of {source!r}"


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return f"a {type(v).__name__}"


class _Fields:
    """Field labels for messages: `output`, or `output` (column `answer`) under --map."""

    def __init__(self, columns: dict[str, str]) -> None:
        self.columns = columns

    def __call__(self, name: str, sub: str = "") -> str:
        col = self.columns.get(name, name)
        return f"`{name}{sub}`" + (f" (column `{col}`)" if col != name else "")

    def text(self, row: dict[str, Any], name: str, required: bool) -> str | None:
        v = row.get(name)
        if v is None:
            return f"{self(name)} is missing" if required else None
        if not isinstance(v, str):
            return f"{self(name)} is {_kind(v)}, expected a string"
        return None


def _is_call(call: Any) -> bool:
    """An OpenAI-style tool call: ``{"function": {"name", "arguments"}}`` (or the function object itself)."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    return isinstance(fn, dict) and isinstance(fn.get("name"), str) and bool(fn["name"])


def _tools(row: dict[str, Any], f: _Fields) -> str | None:
    for name, parse, what in (("tools", parse_tools, "tool schemas"), ("documents", parse_documents, "documents")):
        try:
            parse(row.get(name))
        except json.JSONDecodeError as e:
            return f"{f(name)} is not valid JSON ({e.msg} at column {e.colno}); expected a list of {what}"
        except ValueError as e:
            return f"{f(name)}: {e}"
    return None


def _call_arguments(calls: list | None, f: _Fields, at: str) -> str | None:
    """Each tool call's ``arguments``: an object, or a string (JSON of one, as OpenAI data gives it), or absent; a
    list, a number or a string that is not a JSON object would reach the template as a tool call no model should
    learn to emit."""
    for j, call in enumerate(calls or ()):
        fn = call.get("function", call)
        args = fn.get("arguments")
        where = f"{at}.tool_calls[{j}]" + (".function" if "function" in call else "") + ".arguments"
        if args is not None and not isinstance(args, (dict, str)):
            return f"{f('messages', where)} is {_kind(args)}, expected an object or a JSON string of one"
        if isinstance(args, str):
            try:
                call_arguments(args)
            except ValueError as e:
                return f"{f('messages', where)} {e}; expected an object or a JSON string of one"
    return None


def _reasoning(message: dict[str, Any], f: _Fields, at: str) -> str | None:
    """A message's reasoning (``reasoning_content``, ``thinking``, ``reasoning``) is text when given; templates test
    ``is string`` and would drop anything else without a word."""
    for key in REASONING_FIELDS:
        v = message.get(key)
        if v is not None and not isinstance(v, str):
            return f"{f('messages', f'{at}.{key}')} is {_kind(v)}, expected a string"
    return None


def _content(content: Any, f: _Fields, at: str) -> str | None:
    """A message content: text, or a list of text parts ``{"type": "text", "text": ...}``."""
    if isinstance(content, str):
        return None
    if not isinstance(content, list):
        return f"{f('messages', at + '.content')} is {_kind(content)}, expected a string or a list of text parts"
    for j, part in enumerate(content):
        where = f"{at}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(part, dict):
            return f"{f('messages', where)} is {_kind(part)}, expected a {{type, text}} part"
        if kind != "text":
            return (
                f"{f('messages', where)} is a part of type {kind!r}; only text parts can be packed (prep trains on "
                "text), so drop non-text parts or the row"
            )
        if not isinstance(part.get("text"), str):
            return f"{f('messages', where + '.text')} is {_kind(part.get('text'))}, expected a string"
    return None


def _system(row: dict[str, Any], f: _Fields, first: Any) -> str | None:
    if (p := f.text(row, "system", required=False)) is not None:
        return p
    s = row.get("system")
    if s and isinstance(first, dict) and first.get("role") == "system" and join_text(first.get("content")) != s:
        return f"{f('system')} and the conversation's own system message differ; keep one of them"
    return None


def _list(row: dict[str, Any], name: str, f: _Fields, what: str) -> tuple[list | None, str | None]:
    v = row.get(name)
    if v is None:
        return None, f"{f(name)} is missing"
    if not isinstance(v, list):
        return None, f"{f(name)} is {_kind(v)}, expected a list of {what}"
    if not v:
        return None, f"{f(name)} is empty; expected at least one {what[:-1]}"
    return v, None


def _chat(row: dict[str, Any], f: _Fields) -> str | None:
    msgs, p = _list(row, "messages", f, "{role, content} objects")
    if p:
        return p
    for i, m in enumerate(msgs):
        at = f"[{i}]"
        if not isinstance(m, dict):
            return f"{f('messages', at)} is {_kind(m)}, expected a {{role, content}} object"
        role = m.get("role")
        if role is None:
            return f"{f('messages', at)} has no `role`"
        if role not in CHAT_ROLES:
            return f"{f('messages', at + '.role')} is {role!r}, expected one of {', '.join(CHAT_ROLES)}"
        calls = m.get("tool_calls")
        if calls is not None and (role != "assistant" or not isinstance(calls, list) or not all(map(_is_call, calls))):
            return (
                f"{f('messages', at + '.tool_calls')} must be a list of {{function: {{name, arguments}}}} objects on "
                "an assistant message"
            )
        if (p := _call_arguments(calls, f, at)) is not None or (p := _reasoning(m, f, at)) is not None:
            return p
        content = m.get("content")
        if content is None and not calls:
            return f"{f('messages', at)} has no `content`"
        if content is not None and (p := _content(content, f, at)) is not None:
            return p
    return _system(row, f, msgs[0]) or _tools(row, f)


def _sharegpt(row: dict[str, Any], f: _Fields) -> str | None:
    conv, p = _list(row, "conversations", f, "{from, value} objects")
    if p:
        return p
    for i, turn in enumerate(conv):
        at = f"[{i}]"
        if not isinstance(turn, dict):
            return f"{f('conversations', at)} is {_kind(turn)}, expected a {{from, value}} object"
        who, value = turn.get("from"), turn.get("value")
        if who is None:
            return f"{f('conversations', at)} has no `from`"
        if not isinstance(who, str) or who.lower() not in SHAREGPT_ROLES:
            return f"{f('conversations', at + '.from')} is {who!r}, expected one of {', '.join(SHAREGPT_ROLES)}"
        if value is None:
            return f"{f('conversations', at)} has no `value`"
        if not isinstance(value, str):
            return f"{f('conversations', at + '.value')} is {_kind(value)}, expected a string"
        if who.lower() == "function_call":
            try:
                tool_calls(value)
            except json.JSONDecodeError as e:
                return f"{f('conversations', at + '.value')} (a function_call) is not JSON ({e.msg})"
            except ValueError as e:
                return f"{f('conversations', at + '.value')} (a function_call): {e}"
    first = {"role": "system", "content": conv[0]["value"]} if conv[0]["from"].lower() == "system" else None
    return _system(row, f, first) or _tools(row, f)


def _alpaca(row: dict[str, Any], f: _Fields) -> str | None:
    for name, required in (("instruction", True), ("output", True), ("input", False), ("system", False)):
        if (p := f.text(row, name, required)) is not None:
            return p
    history = row.get("history")
    if history is None:
        return None
    if not isinstance(history, list):
        return f"{f('history')} is {_kind(history)}, expected a list of [instruction, response] pairs"
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            return f"{f('history', f'[{i}]')} is {_kind(pair)}, expected an [instruction, response] pair of strings"
    return None


def _is_unicode(text: str) -> bool:
    """Whether ``text`` holds no lone surrogate: UTF-8 encodes everything else (in C, faster than a regex search)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _surrogate_path(value: Any) -> list[str] | None:
    """The path (``["[2]", ".content"]``, ``[]`` for ``value`` itself) to the first string inside ``value`` that holds
    a lone UTF-16 surrogate, or None. An ASCII string (most text) is cleared by one C-level check."""
    if isinstance(value, str):
        return [] if not value.isascii() and not _is_unicode(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and not key.isascii() and not _is_unicode(key):  # keys are rendered too
                return [f".{key.encode('utf-8', 'backslashreplace').decode()}"]
            path = _surrogate_path(item)
            if path is not None:
                return [f".{key}", *path]
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            path = _surrogate_path(item)
            if path is not None:
                return [f"[{i}]", *path]
    return None


def _not_unicode(row: dict[str, Any], fmt: str, f: _Fields) -> str | None:
    """A rendered field holding a lone surrogate (JSON allows an unpaired ``\\ud800`` escape; scraped text that cut
    an emoji in half has them): no tokenizer can encode it, as it is not Unicode text."""
    for name in _RENDERED[fmt]:
        path = _surrogate_path(row.get(name))
        if path is not None:
            return (
                f"{f(name, ''.join(path))} holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not "
                "Unicode text; expected valid text (drop or replace that character)"
            )
    return None


def row_problem(row: dict[str, Any], fmt: str, columns: dict[str, str] | None = None) -> str | None:
    """Why ``row`` is not a valid ``fmt`` row (naming the field), or None. ``columns``: the --map renames."""
    f = _Fields(columns or {})
    if fmt == "text":
        why = f.text(row, "text", required=True)
    elif fmt == "alpaca":
        why = _alpaca(row, f)
    elif fmt == "prompt-completion":
        why = f.text(row, "prompt", required=True) or f.text(row, "completion", required=True)
    elif fmt == "chat":
        why = _chat(row, f)
    elif fmt == "sharegpt":
        why = _sharegpt(row, f)
    else:
        raise AssertionError(f"unknown format {fmt!r}")
    return why or _not_unicode(row, fmt, f)
