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
"""

from __future__ import annotations

import json
from typing import Any

from .errors import PrepError

__all__ = ["ChatTemplate", "assistant_spans", "check_rendered"]

# Replaces a turn's payload to locate it: private-use characters no real text starts or ends with.
_PROBE = "\ue000padless\ue001"


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
    """A compiled chat template. ``name`` is the tokenizer's, for messages."""

    def __init__(self, source: str, name: str, bos_token: str, eos_token: str) -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str):
            raise jinja2.exceptions.TemplateError(msg)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        if not isinstance(source, str):
            raise PrepError(f"the chat template of {name!r} is {type(source).__name__}, expected Jinja text")
        generation = _generation_extension()
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", generation]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: "2024-01-01"  # fixed: output must not depend on the date
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise PrepError(f"the chat template of {name!r} is not valid Jinja ({e})") from e
        self._tracker = env.extensions[generation.identifier]
        self.name = name
        self.has_generation_markers = any(
            n.identifier == generation.identifier for n in env.parse(source).find_all(jinja2.nodes.ExtensionAttribute)
        )
        self._special = {"bos_token": bos_token, "eos_token": eos_token}

    def _run(self, messages: list[dict[str, Any]], add_generation_prompt: bool, tools, track: bool = False) -> str:
        """Render; with ``track`` the ``{% generation %}`` spans are recorded (from the output yielded so far)."""
        blocks: list[str] = []
        self._tracker.spans = []
        self._tracker.blocks = blocks if track else None
        try:
            for block in self._template.generate(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=tools, **self._special
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

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, tools=None) -> str:
        """The template applied to ``messages`` (as text); ``tools``: tool schemas or None."""
        return self._run(messages, add_generation_prompt, tools)

    def render_marked(self, messages: list[dict[str, Any]], tools=None) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation and the spans of its ``{% generation %}`` blocks."""
        text = self._run(messages, False, tools, track=True)
        return text, list(self._tracker.spans)


def _try(tpl: ChatTemplate, messages: list[dict[str, Any]], gen: bool, tools) -> str | None:
    try:
        return tpl.render(messages, gen, tools)
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


def _payload(tpl: ChatTemplate, messages: list[dict[str, Any]], k: int, tools, full: str) -> tuple[int, int] | None:
    """Where assistant message k's payload (content, reasoning, tool calls) sits in ``full``: what changes when only
    that payload is replaced."""
    probe = [*messages[:k], {"role": "assistant", "content": _PROBE}, *messages[k + 1 :]]
    other = _try(tpl, probe, False, tools)
    if other is None or other == full:
        return None
    p, s = _diff(full, other)
    return p, len(full) - s


def _end_of_turn(tpl: ChatTemplate, messages: list[dict[str, Any]], k: int, tools) -> str | None:
    """What the template writes after an assistant payload when turn k ends the conversation."""
    through = _try(tpl, messages[: k + 1], False, tools)
    other = _try(tpl, [*messages[:k], {"role": "assistant", "content": _PROBE}], False, tools)
    if through is None or other is None:
        return None
    _, s = _diff(through, other)
    return through[len(through) - s :]


def check_rendered(tpl: ChatTemplate, messages: list[dict[str, Any]], tools, full: str) -> None:
    """Refuse a rendering that silently leaves out part of the conversation: a message's text, a tool call, a tool.

    Templates that know no tools (or no tool role) render such messages as nothing; training on the rest would teach
    the model a conversation that never happened. Assistant text is not checked (templates may rewrite it, e.g. drop
    earlier reasoning), but their tool calls are, by function name."""
    for k, m in enumerate(messages):
        role, content = m.get("role"), (m.get("content") or "").strip()
        if role != "assistant" and content and content not in full:
            raise PrepError(
                f"the chat template of {tpl.name!r} leaves out message {k} (role {role!r}): its text is not in the "
                f"rendering; use a tokenizer whose chat template renders {role} messages"
            )
        for call in m.get("tool_calls") or ():
            name = (call.get("function") or call).get("name")
            if isinstance(name, str) and name not in full:
                raise PrepError(
                    f"the chat template of {tpl.name!r} leaves out the tool call {name!r} of message {k}; use a "
                    "tokenizer whose chat template renders tool calls"
                )
    for tool in tools or ():
        name = (tool.get("function") or tool).get("name")
        if isinstance(name, str) and name not in full:
            raise PrepError(
                f"the chat template of {tpl.name!r} leaves out the tool {name!r} given in the row's `tools`; use a "
                "tokenizer whose chat template renders tools"
            )


def assistant_spans(tpl: ChatTemplate, messages: list[dict[str, Any]], tools, full: str) -> list[tuple[int, int]]:
    """``[(start, end)]`` character spans in ``full`` (the rendering of ``messages``) of every assistant turn.

    Raises :class:`PrepError` when a turn cannot be located (the message says what works instead)."""
    spans: list[tuple[int, int]] = []
    prev = 0
    for k, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        head = _try(tpl, messages[:k], True, tools)
        start = len(head) if head is not None and len(head) >= prev and full.startswith(head) else None
        through = _try(tpl, messages[: k + 1], False, tools)
        ok_end = through is not None and len(through) >= max(prev, start or 0) and full.startswith(through)
        end = len(through) if ok_end else None
        if start is None or end is None:
            where = _payload(tpl, messages, k, tools, full)
            tail = _end_of_turn(tpl, messages, k, tools) if end is None else ""
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
