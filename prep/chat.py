"""Chat templates: render a conversation as transformers' ``apply_chat_template`` does, and find its assistant turns.

The template runs in a jinja2 sandbox set up the way transformers sets it up (trim_blocks, lstrip_blocks, loop
controls, ``raise_exception``, ``tojson``, the ``{% generation %}`` tag); ``tools`` reach it as the ``tools``
argument. :func:`assistant_spans` returns the character span of every assistant turn in one rendering of the whole
conversation, for assistant-only loss:

1. a template with ``{% generation %}`` markers: the marked text, as the template's author defines it;
2. otherwise, per assistant turn k: the turn starts where the generation prompt of the conversation's first k
   messages ends and ends where the rendering of the first k + 1 messages ends, when the whole rendering
   continues those prefixes (ChatML-like templates: exact, header excluded, end-of-turn token included);
3. where it does not (templates that re-render history, e.g. Qwen3's, which drops the reasoning of earlier
   turns), the turn is located inside the one rendering: rendering the conversation again with only that turn's
   payload replaced shows where the payload sits (the text that differs), and the rendering of the first k + 1
   messages shows what the template writes after an assistant payload (its end-of-turn text), which must follow.

No step needs the template to render prefixes of a conversation the same way as the whole one.

What the template sees is what transformers' ``apply_chat_template`` gives it: the messages with their None-valued
keys dropped and a reasoning field (``reasoning_content``, ``thinking`` or ``reasoning``) offered under the names
templates read; ``tools`` and ``documents`` (RAG templates) as arguments; the tokenizer's named special tokens
(``bos_token``, ``eos_token``, ``pad_token``, ...); and the ``--chat-template-kwargs`` (``enable_thinking``, ...).
``strftime_now`` formats a fixed date (``--template-date``, default 2024-01-01), never the clock. Content given as a
list of parts (``[{"type": "text", "text": ...}]``) reaches a template that renders parts as they are; a template
that does not (it would print the list's Python text, drop it or fail) gets each such content as its text parts
joined without a separator, which is how part-iterating templates render them. ``tests/prep/test_chat_parity.py``
checks the renderings against transformers byte for byte.
"""

from __future__ import annotations

import datetime
import json
from collections import Counter
from typing import Any

from .errors import PrepError

__all__ = ["REASONING_FIELDS", "ChatTemplate", "assistant_spans", "check_rendered", "join_text", "normalize"]

# Replaces a turn's payload to locate it: private-use characters no real text starts or ends with.
_PROBE = "\ue000padless\ue001"
# Names a message's reasoning is passed under (transformers' order); the first is the one most templates read.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def normalize(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as transformers hands them to a template: None-valued keys dropped (many templates render a
    literal "None" or fail on them), a message's reasoning also under ``thinking`` and ``reasoning_content``."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def join_text(content: Any) -> str:
    """A message content as text: a string as is, a list of parts as its text parts joined."""
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "" if content is None else str(content)


def _renders_parts(full: str, messages: list[dict[str, Any]]) -> bool:
    """Whether ``full`` renders every list content as parts: each text part's text present, no list or part printed
    as Python or JSON text."""
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list):
            continue
        if str(content) in full:
            return False
        for part in content:
            if str(part) in full or json.dumps(part, ensure_ascii=False) in full:
                return False
            text = part.get("text") if isinstance(part, dict) else None
            if isinstance(text, str) and text.strip() and text.strip() not in full:
                return False
    return True


def _generation_extension():
    """The ``{% generation %}...{% endgeneration %}`` tag: records the character span of its output."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = frozenset({"generation"})

        def __init__(self, environment) -> None:
            super().__init__(environment)
            self.blocks: list[str] | None = None
            self.spans: list[tuple[int, int]] = []

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller) -> str:
            text = caller()
            if self.blocks is not None:
                start = sum(len(b) for b in self.blocks)
                self.spans.append((start, start + len(text)))
            return text

    return Generation


class ChatTemplate:
    """A compiled chat template. ``name`` is the tokenizer's, for messages; ``special_tokens``: the tokenizer's named
    special tokens (``bos_token``, ...); ``template_kwargs``: extra template variables; ``date``: what
    ``strftime_now`` formats."""

    def __init__(
        self,
        source: str,
        name: str,
        special_tokens: dict[str, str],
        template_kwargs: dict[str, Any] | None = None,
        date: datetime.datetime | None = None,
    ) -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        from .config import DEFAULT_TEMPLATE_DATE, template_datetime

        def raise_exception(msg: str):
            raise jinja2.exceptions.TemplateError(msg)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        if not isinstance(source, str):
            raise PrepError(f"the chat template of {name!r} is {type(source).__name__}, expected Jinja text")
        day = date or template_datetime(DEFAULT_TEMPLATE_DATE)
        generation = _generation_extension()
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", generation]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = day.strftime  # fixed: the output must not depend on the day it ran
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise PrepError(f"the chat template of {name!r} is not valid Jinja ({e})") from e
        self._tracker = env.extensions[generation.identifier]
        self.name = name
        self.has_generation_markers = any(
            n.identifier == generation.identifier for n in env.parse(source).find_all(jinja2.nodes.ExtensionAttribute)
        )
        self._variables = {**special_tokens, **(template_kwargs or {})}  # as transformers: kwargs override tokens

    def _run(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, tools, documents, track: bool = False
    ) -> str:
        """Render; with ``track`` the ``{% generation %}`` spans are recorded (from the output yielded so far)."""
        blocks: list[str] = []
        self._tracker.spans = []
        self._tracker.blocks = blocks if track else None
        try:
            for block in self._template.generate(
                messages=normalize(messages),
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **self._variables,
            ):
                blocks.append(block)
            return "".join(blocks)
        except Exception as e:  # the template's raise_exception(...), or any failure of the template's own code
            raise PrepError(
                f"the chat template of {self.name!r} rejected a conversation: {e}; fix the data (e.g. roles must "
                "alternate user/assistant for some templates) or use a tokenizer with another template"
            ) from e
        finally:
            self._tracker.blocks = None

    def render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, tools=None, documents=None
    ) -> str:
        """The template applied to ``messages`` (as text); ``tools``: tool schemas, ``documents``: RAG documents."""
        return self._run(messages, add_generation_prompt, tools, documents)

    def render_marked(
        self, messages: list[dict[str, Any]], tools=None, documents=None
    ) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation and the spans of its ``{% generation %}`` blocks."""
        text = self._run(messages, False, tools, documents, track=True)
        return text, list(self._tracker.spans)

    def prepare(self, messages: list[dict[str, Any]], tools=None, documents=None) -> list[dict[str, Any]]:
        """``messages`` in the form this template renders: list contents passed through when it renders them as
        parts, else joined to text (every list content of the conversation, so it renders one way)."""
        if not any(isinstance(m.get("content"), list) for m in messages):
            return messages
        try:
            if _renders_parts(self.render(messages, tools=tools, documents=documents), messages):
                return messages
        except PrepError:  # e.g. '...' + message['content'] on a list
            pass
        return [{**m, "content": join_text(m["content"])} if isinstance(m.get("content"), list) else m
                for m in messages]  # fmt: skip


def _try(tpl: ChatTemplate, messages: list[dict[str, Any]], gen: bool, ctx: dict[str, Any]) -> str | None:
    try:
        return tpl.render(messages, gen, **ctx)
    except PrepError:  # e.g. a template that cannot render a prefix (or no messages) on its own
        return None


def _common_prefix(a: str, b: str) -> int:
    """Length of the common prefix of two strings (compared 64 characters at a time, then one by one)."""
    n, i = min(len(a), len(b)), 0
    while i + 64 <= n and a[i : i + 64] == b[i : i + 64]:
        i += 64
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _diff(a: str, b: str) -> tuple[int, int]:
    """(common prefix length, common suffix length not overlapping it) of two strings."""
    p = _common_prefix(a, b)
    limit = min(len(a), len(b)) - p
    return p, _common_prefix(a[::-1][:limit], b[::-1][:limit])


def _probe_turn(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant turn whose whole payload is the probe text, in the content form of ``message``."""
    parts = isinstance(message.get("content"), list)
    return {"role": "assistant", "content": [{"type": "text", "text": _PROBE}] if parts else _PROBE}


def _payload(
    tpl: ChatTemplate, messages: list[dict[str, Any]], k: int, ctx: dict[str, Any], full: str
) -> tuple[int, int] | None:
    """Where assistant message k's payload (content, reasoning, tool calls) sits in ``full``: what changes when only
    that payload is replaced."""
    probe = [*messages[:k], _probe_turn(messages[k]), *messages[k + 1 :]]
    other = _try(tpl, probe, False, ctx)
    if other is None or other == full:
        return None
    p, s = _diff(full, other)
    return p, len(full) - s


def _end_of_turn(tpl: ChatTemplate, messages: list[dict[str, Any]], k: int, ctx: dict[str, Any]) -> str | None:
    """What the template writes after an assistant payload when turn k ends the conversation."""
    through = _try(tpl, messages[: k + 1], False, ctx)
    other = _try(tpl, [*messages[:k], _probe_turn(messages[k])], False, ctx)
    if through is None or other is None:
        return None
    _, s = _diff(through, other)
    return through[len(through) - s :]


def _texts(content: Any) -> list[str]:
    """The text pieces of a content that must each appear in a rendering (one per text part)."""
    if isinstance(content, list):
        return [p["text"].strip() for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return [content.strip()] if isinstance(content, str) else []


def _without_tool_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with every tool call taken out (a message left with no content gets empty text)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {key: value for key, value in m.items() if key != "tool_calls"}
            if m.get("content") is None:
                m["content"] = ""
        out.append(m)
    return out


def check_rendered(tpl: ChatTemplate, messages: list[dict[str, Any]], tools, full: str, documents=None) -> None:
    """Refuse a rendering that silently leaves out part of the conversation: a message's text, a tool call, a tool, a
    document.

    Templates that know no tools (or no tool role, or no documents) render such inputs as nothing; training on the
    rest would teach the model a conversation that never happened. Assistant text is not checked (templates may
    rewrite it, e.g. drop earlier reasoning), but their tool calls are: each function name must be in the text that
    the calls themselves add (a name found only in the tools' schemas or in some message does not count)."""
    calls: Counter[str] = Counter()  # function name -> tool calls of it in the conversation
    first_call: dict[str, int] = {}  # function name -> the first message that calls it
    for k, m in enumerate(messages):
        for call in m.get("tool_calls") or ():
            name = (call.get("function") or call).get("name")
            if isinstance(name, str):
                calls[name] += 1
                first_call.setdefault(name, k)
    if calls:
        # One more rendering per row, without any tool call: each name must appear once more per call than there.
        bare = _try(tpl, _without_tool_calls(messages), False, {"tools": tools, "documents": documents})
        for name, n in calls.items():
            if full.count(name) - (bare.count(name) if bare is not None else 0) < n:
                k = first_call[name]
                raise PrepError(
                    f"the chat template of {tpl.name!r} leaves out the tool call {name!r} of message {k}; use a "
                    "tokenizer whose chat template renders tool calls"
                )
    for k, m in enumerate(messages):
        role = m.get("role")
        if role != "assistant" and any(t and t not in full for t in _texts(m.get("content"))):
            raise PrepError(
                f"the chat template of {tpl.name!r} leaves out message {k} (role {role!r}): its text is not in the "
                f"rendering; use a tokenizer whose chat template renders {role} messages"
            )
    for tool in tools or ():
        name = (tool.get("function") or tool).get("name")
        if isinstance(name, str) and name not in full:
            raise PrepError(
                f"the chat template of {tpl.name!r} leaves out the tool {name!r} given in the row's `tools`; use a "
                "tokenizer whose chat template renders tools"
            )
    for k, doc in enumerate(documents or ()):
        text = doc.get("text", doc.get("content"))
        if isinstance(text, str) and text.strip() and text.strip() not in full:
            raise PrepError(
                f"the chat template of {tpl.name!r} leaves out document {k} given in the row's `documents`; use a "
                "tokenizer whose chat template renders documents (a RAG template)"
            )


def assistant_spans(
    tpl: ChatTemplate, messages: list[dict[str, Any]], tools, full: str, documents=None
) -> list[tuple[int, int]]:
    """``[(start, end)]`` character spans in ``full`` (the rendering of ``messages``) of every assistant turn.

    Raises :class:`PrepError` when a turn cannot be located (the message says what works instead)."""
    ctx = {"tools": tools, "documents": documents}
    spans: list[tuple[int, int]] = []
    prev = 0
    for k, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        head = _try(tpl, messages[:k], True, ctx)
        start = len(head) if head is not None and len(head) >= prev and full.startswith(head) else None
        through = _try(tpl, messages[: k + 1], False, ctx)
        ok_end = through is not None and len(through) >= max(prev, start or 0) and full.startswith(through)
        end = len(through) if ok_end else None
        if start is None or end is None:
            where = _payload(tpl, messages, k, ctx, full)
            tail = _end_of_turn(tpl, messages, k, ctx) if end is None else ""
            if where is not None and start is None:
                start = where[0]
            if where is not None and end is None and tail is not None and full.startswith(tail, where[1]):
                end = where[1] + len(tail)
        if start is None or end is None or not prev <= start <= end:
            raise PrepError(
                f"cannot locate assistant message {k} in the rendering of the chat template of {tpl.name!r}, so its "
                "tokens cannot be marked for --train-on completion; use --train-on all (trains every token, needs no "
                "turn boundaries), or a template with {% generation %} markers around assistant turns"
            )
        spans.append((start, end))
        prev = end
    return spans
