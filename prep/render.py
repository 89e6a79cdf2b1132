"""Turn a dataset row into what gets tokenized: text segments marked trained or not, or a chat.

Formats (``--format``, else detected from the columns, after ``--map NAME=COLUMN`` renames); ``prep.validate``
checks every row against these shapes first, so rendering assumes well-formed rows:

- ``chat``: ``messages`` = [{role, content}, ...] (system/user/assistant/tool; an assistant message may carry
  ``tool_calls`` instead of content; content is text or a list of text parts ``[{"type": "text", "text": ...}]``),
  rendered by the chat template (``prep.chat``: parts as the template renders them); optional ``tools`` (tool
  schemas) and ``documents`` (RAG documents, objects such as ``{"title", "text"}``), each a list or a JSON string of
  one, go to the template's ``tools`` and ``documents`` arguments; an optional ``system`` column is the system
  message when the messages have none;
- ``sharegpt``: ``conversations`` = [{from, value}, ...], converted to ``chat``: ``human``/``gpt`` turns become
  user/assistant messages, ``function_call`` turns (JSON ``{"name", "arguments"}``, or a list of them) assistant
  tool calls, ``observation`` turns tool messages; the row's ``tools``, ``documents`` and ``system`` as for
  ``chat``;
- ``alpaca``: ``instruction`` / ``input`` (optional) / ``output``, the Stanford Alpaca prompt, response trained;
  ``history`` ([[instruction, response], ...], as in LIMA) gives earlier turns, each response trained and ended
  with EOS; ``system`` replaces the prompt's opening sentence;
- ``prompt-completion``: ``prompt`` / ``completion``, completion trained; the separator (``--prompt-separator``,
  default one space) goes in front of the completion when neither side has whitespace at the join;
- ``text``: ``text``, all trained.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from typing import Any

from .config import Format
from .errors import PrepError

__all__ = ["ALPACA_HEADERS", "EOS", "FORMATS", "SHAREGPT_ROLES", "Rendered", "apply_maps", "call_arguments",
           "detect_format", "parse_documents", "parse_maps", "parse_tools", "render_row"]  # fmt: skip

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
_FIELDS = ("text", "instruction", "input", "output", "history", "prompt", "completion", "messages", "conversations",
           "system", "tools", "documents")  # fmt: skip

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
_ALPACA_TURN = "### Instruction:\n{instruction}\n\n### Response:\n"
SHAREGPT_ROLES = {
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
# A segment whose text is EOS stands for the tokenizer's end-of-sequence token (none when it has no EOS).
EOS = None


@dataclass
class Rendered:
    """``segments``: [(text or EOS, trained)] for plain formats; ``messages`` (+ ``tools``, ``documents``) for
    chat."""

    segments: list[tuple[str | None, bool]] | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, Any]] | None = None


def parse_maps(maps: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``["prompt=question", ...]`` -> ``{"prompt": "question"}``, checking names."""
    out = {}
    for m in maps:
        name, sep, column = m.partition("=")
        if not sep or not name or not column:
            raise PrepError(f"--map {m!r}: expected NAME=COLUMN, e.g. --map prompt=question")
        if name not in _FIELDS:
            raise PrepError(f"--map {m!r}: unknown field {name!r}; expected one of {', '.join(_FIELDS)}")
        if name in out:  # the later one would win without a word
            raise PrepError(f"--map {name}={out[name]} and --map {m}: the field {name!r} is mapped twice; map it once")
        out[name] = column
    return out


def apply_maps(rows: list[dict[str, Any]], maps: dict[str, str], source: str | None) -> list[dict[str, Any]]:
    """``rows`` with each ``--map`` COLUMN renamed to its field NAME: a mapped column no other map names as a field
    leaves the row, so it cannot decide the format (``--map prompt=instruction --map completion=output`` makes
    Alpaca rows prompt-completion rows). ``source``: the input's name, to check first that these rows (the first 100)
    have every mapped column; None skips the check (later chunks of a checked input)."""
    if not maps:
        return rows
    if source is not None:
        columns = _columns(rows)
        missing = [c for c in maps.values() if c not in columns]
        if missing:
            raise PrepError(
                f"--map names columns {missing} that {source!r} does not have; its columns: {sorted(columns)}"
            )
    moved = set(maps.values()) - set(maps)
    out = []
    for r in rows:
        row = {k: v for k, v in r.items() if k not in moved}
        row.update((name, r.get(col)) for name, col in maps.items())
        out.append(row)
    return out


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


def _json_objects(value: Any, what: str) -> list[dict[str, Any]] | None:
    """``value`` (a list of objects, one object, or a JSON string of either) as a list; None when empty. Raises
    ``ValueError`` (or ``json.JSONDecodeError``) naming ``what`` was expected otherwise."""
    if value is None or value == "":
        return None
    items = json.loads(value) if isinstance(value, str) else value
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ValueError(f"expected a list of {what}, got {type(items).__name__}")
    return items or None


def parse_tools(value: Any) -> list[dict[str, Any]] | None:
    """A row's ``tools`` (a list, or a JSON string of one) as the template's ``tools``: None when empty.

    A bare schema (``{"name", "description", "parameters"}``, as in glaive / LLaMA-Factory data) is wrapped as
    ``{"type": "function", "function": schema}``, the form transformers passes to chat templates. Raises
    ``ValueError`` (or ``json.JSONDecodeError``) for a value that is not a list of objects."""
    tools = _json_objects(value, "tool schemas (objects)")
    if tools is None:
        return None
    return [t if "function" in t or "name" not in t else {"type": "function", "function": t} for t in tools]


def parse_documents(value: Any) -> list[dict[str, Any]] | None:
    """A row's ``documents`` (a list of objects, or a JSON string of one) as the template's ``documents``: None when
    empty. Raises ``ValueError`` (or ``json.JSONDecodeError``) for a value that is not a list of objects."""
    return _json_objects(value, "documents (objects such as {title, text})")


def call_arguments(text: str) -> dict[str, Any]:
    """A tool call's ``arguments`` string as the object it holds; a blank string is a call without arguments (some
    exports write those as ``""``): ``{}``. Anything else is a ``ValueError`` that says why."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"is not valid JSON ({e.msg} at column {e.colno})") from e
    except (ValueError, RecursionError) as e:  # valid JSON beyond Python's parser
        raise ValueError(f"cannot be parsed ({e})") from e
    if not isinstance(value, dict):
        kind = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list"}.get(type(value))
        raise ValueError(f"is the JSON of {kind or 'null'}, not of an object")
    return value


def tool_calls(value: str) -> list[dict[str, Any]]:
    """A ShareGPT ``function_call`` value (JSON: one ``{"name", "arguments"}`` or a list) as message tool calls.

    ``arguments`` given as a JSON string of an object become that object (templates serialise it themselves); a
    string that is not one is a ``ValueError``."""
    calls = json.loads(value)
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not calls:
        raise ValueError("expected a JSON object {name, arguments} or a non-empty list of them")
    out = []
    for c in calls:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"]:
            raise ValueError('expected each call to be a JSON object with a "name" string')
        args = c.get("arguments", {})
        if isinstance(args, str):
            try:
                args = call_arguments(args)
            except ValueError as e:
                raise ValueError(f'"arguments" {e}; expected an object or a JSON string of one') from e
        if not isinstance(args, dict):
            raise ValueError(f'expected "arguments" to be an object, got {type(args).__name__}')
        out.append({"type": "function", "function": {"name": c["name"], "arguments": args}})
    return out


def _alpaca(row: dict[str, Any], all_: bool) -> list[tuple[str | None, bool]]:
    inp = _str(row.get("input")).strip()
    tmpl = ALPACA_WITH_INPUT if inp else ALPACA_NO_INPUT
    instruction = _str(row.get("instruction")).strip()
    output = _str(row.get("output"))
    history = row.get("history") or []
    system = _str(row.get("system")).strip()
    if not history and not system:  # the plain Stanford prompt (starts with a cached header)
        return [(tmpl.format(instruction=instruction, input=inp), all_), (output, True)]
    turn = tmpl.index("### Instruction:")
    text = system + "\n\n" if system else tmpl[:turn]
    segments: list[tuple[str | None, bool]] = []
    for question, answer in history:
        segments += [(text + _ALPACA_TURN.format(instruction=_str(question).strip()), all_), (_str(answer), True)]
        segments.append((EOS, True))
        text = "\n\n"
    segments += [(text + tmpl[turn:].format(instruction=instruction, input=inp), all_), (output, True)]
    return segments


def _join(prompt: str, completion: str, separator: str) -> str:
    """The completion with ``separator`` in front when neither side has whitespace at the join."""
    if separator and prompt and completion and not prompt[-1].isspace() and not completion[0].isspace():
        return separator + completion
    return completion


def _with_system(msgs: list[dict[str, Any]], system: Any) -> list[dict[str, Any]]:
    if system and not (msgs and msgs[0].get("role") == "system"):
        return [{"role": "system", "content": _str(system)}, *msgs]
    return msgs


def _blank_arguments_as_empty(message: dict[str, Any]) -> dict[str, Any]:
    """``message`` with each tool call whose ``arguments`` string is blank given ``{}`` instead (a call without
    arguments, as the template renders one); every other call as given."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return message
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        target = fn if isinstance(fn, dict) else call
        args = target.get("arguments") if isinstance(target, dict) else None
        if isinstance(args, str) and not args.strip():
            target = {**target, "arguments": {}}
            call = {**call, "function": target} if isinstance(fn, dict) else target
        out.append(call)
    return {**message, "tool_calls": out}


def render_row(row: dict[str, Any], fmt: str, train_on: str, separator: str = " ") -> Rendered:
    """Render one (validated) row; ``train_on`` is ``completion`` or ``all`` (text always trains everything).

    ``separator``: what joins a prompt and a completion that have no whitespace between them ("" = as is)."""
    all_ = train_on == "all"
    if fmt == "text":
        return Rendered(segments=[(_str(row.get("text")), True)])
    if fmt == "alpaca":
        return Rendered(segments=_alpaca(row, all_))
    if fmt == "prompt-completion":
        prompt, completion = _str(row.get("prompt")), _str(row.get("completion"))
        return Rendered(segments=[(prompt, all_), (_join(prompt, completion, separator), True)])
    if fmt == "chat":
        msgs = [_blank_arguments_as_empty(dict(m)) for m in row["messages"]]  # content as given: text, parts, or absent
        return Rendered(
            messages=_with_system(msgs, row.get("system")),
            tools=parse_tools(row.get("tools")),
            documents=parse_documents(row.get("documents")),
        )
    if fmt == "sharegpt":
        msgs = []
        for turn in row["conversations"]:
            who, value = _str(turn.get("from")).lower(), _str(turn.get("value"))
            if who == "function_call":
                msgs.append({"role": "assistant", "content": "", "tool_calls": tool_calls(value)})
            else:
                msgs.append({"role": SHAREGPT_ROLES[who], "content": value})
        return Rendered(
            messages=_with_system(msgs, row.get("system")),
            tools=parse_tools(row.get("tools")),
            documents=parse_documents(row.get("documents")),
        )
    raise PrepError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
