"""prep's own chat template rendering against transformers' ``apply_chat_template(..., tokenize=False)``, byte for
byte: every fixture template (the demo tokenizer's, Qwen3-Thinking-2507, Qwen2.5-Instruct, a LLaMA-Factory Qwen2
ChatML, and Llama-3-, Mistral- and RAG-style templates written for these tests) on system prompts, multi-turn chats,
generation prompts, tools and tool calls, documents, content parts, reasoning fields, None-valued keys, template
variables (``--chat-template-kwargs``) and ``strftime_now`` (transformers' clock is pinned to prep's date).

Content parts: a template that renders parts (the Mistral-style one) gets them as they are, so the text is
transformers'; any other template gets each list content joined to text, so the text is transformers' on the joined
conversation (transformers itself would print the list's Python text, or fail).

prep never imports transformers (the prep path stays torch-free); this test may.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
from pathlib import Path

import pytest

from padless.prep.chat import join_text
from padless.prep.errors import PrepError
from padless.prep.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

transformers = pytest.importorskip("transformers")
chat_utils = importlib.import_module("transformers.utils.chat_template_utils")

DATA = Path(__file__).parent / "data"
TEMPLATES = {
    "demo": json.loads((DEFAULT_TOKENIZER / "tokenizer_config.json").read_text())["chat_template"],
    **{p.stem: p.read_text() for p in sorted(DATA.glob("*.jinja"))},
}
RENDERS_PARTS = {"mistral_style"}  # iterates content parts (the others print, drop or reject a list)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
DOCS = [{"title": "Paris", "text": "Paris is the capital of France."}, {"text": "It rains 111 days a year there."}]


def _parts(*texts: str) -> list[dict]:
    return [{"type": "text", "text": t} for t in texts]


# name -> (messages, tools, documents, add_generation_prompt)
CASES = {
    "system-multi-turn": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                           {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Weather?"},
                           {"role": "assistant", "content": "Sunny."}], None, None, False),
    "generation-prompt": ([{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
                           {"role": "user", "content": "u2"}], None, None, True),
    "tools": ([{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [CALL]},
               {"role": "tool", "content": '{"temp": 21}'},
               {"role": "assistant", "content": "21 degrees."}], [WEATHER], None, False),
    "documents": ([{"role": "user", "content": "How rainy is Paris?"},
                   {"role": "assistant", "content": "111 rainy days."}], None, DOCS, False),
    "parts": ([{"role": "system", "content": _parts("Be brief.")},
               {"role": "user", "content": _parts("Look: ", "two parts.")},
               {"role": "assistant", "content": _parts("Seen ", "both.")}], None, None, False),
    "reasoning": ([{"role": "user", "content": "2+2?"},
                   {"role": "assistant", "content": "4", "reasoning_content": "Two and two."}], None, None, False),
    "tools-and-documents": ([{"role": "user", "content": "Weather?"}], [WEATHER], DOCS, True),
}  # fmt: skip
# Cases whose message normalization (None-valued keys dropped, reasoning aliases) only newer transformers does.
NEW_CASES = {
    "none-keys": ([{"role": "user", "content": "Weather in Paris?", "name": None},
                   {"role": "assistant", "content": None, "tool_calls": [CALL]},
                   {"role": "tool", "content": "21"}, {"role": "assistant", "content": "21.", "tool_calls": None}],
                  [WEATHER], None, False),
    "reasoning-alias": ([{"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4", "reasoning": "Two and two."}], None, None, False),
}  # fmt: skip
KWARGS = {
    "rag_style": [{"enable_thinking": False}],
    "llama3_style": [{"tools_in_user_message": False}, {"date_string": "26 Jul 2024"}],
}
DATE = datetime.datetime(2024, 1, 1)


class _PinnedClock(datetime.datetime):
    """transformers' ``strftime_now`` reads ``datetime.now()``: here it is prep's default template date."""

    @classmethod
    def now(cls, tz=None):
        return DATE


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(DEFAULT_TOKENIZER))


def _ours(template: str, kwargs: dict, date: str | None = None):
    tk = dataclasses.replace(load_tokenizer(None), chat_template=template, template_kwargs=kwargs, template_date=date)
    tk._env = None
    return tk.chat


def _outcome(render) -> str:
    try:
        return render()
    except (PrepError, ValueError, TypeError, chat_utils.jinja2.exceptions.TemplateError) as e:
        return f"<refused: {type(e).__name__}>"


def _joined(messages: list[dict]) -> list[dict]:
    return [{**m, "content": join_text(m["content"])} if isinstance(m.get("content"), list) else m for m in messages]


def _cases():
    has_new = hasattr(chat_utils, "_alias_reasoning_fields") and hasattr(chat_utils, "_normalize_chat_messages")
    for name in TEMPLATES:
        for kwargs in [{}, *KWARGS.get(name, [])]:
            for case in [*CASES, *(NEW_CASES if has_new else ())]:
                tag = ",".join(f"{k}={v}" for k, v in kwargs.items())
                yield pytest.param(name, case, kwargs, id=f"{name}-{case}" + (f"-{tag}" if tag else ""))


@pytest.mark.parametrize(("name", "case", "kwargs"), list(_cases()))
def test_rendering_matches_transformers(hf_tokenizer, monkeypatch, name: str, case: str, kwargs: dict) -> None:
    monkeypatch.setattr(chat_utils, "datetime", _PinnedClock)
    template = TEMPLATES[name]
    messages, tools, documents, gen = {**CASES, **NEW_CASES}[case]
    tpl = _ours(template, kwargs)
    ours = _outcome(lambda: tpl.render(tpl.prepare(messages, tools, documents), gen, tools, documents))
    given = messages if name in RENDERS_PARTS else _joined(messages)
    want = _outcome(lambda: hf_tokenizer.apply_chat_template(
        given, tools=tools, documents=documents, add_generation_prompt=gen, chat_template=template, tokenize=False,
        **kwargs))  # fmt: skip
    if ours.startswith("<refused") or want.startswith("<refused"):
        assert ours.startswith("<refused") and want.startswith("<refused"), (ours, want)
    else:
        assert ours == want


def test_the_parity_cases_exercise_what_they_name(hf_tokenizer) -> None:
    """The cases are not vacuous: tools, documents, parts, kwargs and the date change what the templates render."""
    msgs, tools, docs, _ = CASES["tools-and-documents"]
    rag = _ours(TEMPLATES["rag_style"], {})
    text = rag.render(msgs, True, tools, docs)
    assert "get_weather" in text and DOCS[0]["text"] in text and "January 01, 2024" in text and "<think>" in text
    off = _ours(TEMPLATES["rag_style"], {"enable_thinking": False}).render(msgs, True, tools, docs)
    assert "<think>" not in off and "Think before" not in off
    assert "31 Jan 2026" in _ours(TEMPLATES["llama3_style"], {}, "2026-01-31").render(msgs, True)
    parts = CASES["parts"][0]
    mistral = _ours(TEMPLATES["mistral_style"], {})
    assert mistral.prepare(parts) is parts, "a template that renders parts gets them as they are"
    for name in ("demo", "qwen2_5_instruct", "qwen3_thinking_2507", "llama3_style"):
        tpl = _ours(TEMPLATES[name], {})
        assert tpl.prepare(parts) == _joined(parts), name
        text = tpl.render(tpl.prepare(parts))
        assert "Look: two parts." in text and "'type'" not in text and "[{" not in text, name
    # transformers itself prints the Python text of a list under a template that does not iterate parts.
    raw = hf_tokenizer.apply_chat_template(parts, chat_template=TEMPLATES["llama3_style"], tokenize=False)
    assert "{'type': 'text'" in raw
