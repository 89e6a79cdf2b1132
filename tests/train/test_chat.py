"""train chat's prompt: one user turn after an optional system prompt, with optional tools, through the chat
template; a template that drops either, or a bad --tools file, is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from padless.train.chat import prompt_ids, read_tools
from padless.train.config import TrainError

DEMO_TOKENIZER = Path(__file__).resolve().parents[2] / "prep" / "assets" / "demo_tokenizer"
WITH_TOOLS = (
    "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
USER_ONLY = "{% for m in messages %}{% if m.role == 'user' %}<user>{{ m.content }}{% endif %}{% endfor %}"
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": CITY}}


def _tokenizer(template: str | None) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_TOKENIZER))
    tokenizer.chat_template = template
    return tokenizer


def test_system_prompt_and_tools_reach_the_template() -> None:
    tokenizer = _tokenizer(WITH_TOOLS)
    text = tokenizer.decode(prompt_ids(tokenizer, "hi there", system="Be brief.", tools=[TOOL])[0])
    assert text.index("get_weather") < text.index("Be brief.") < text.index("hi there")
    assert text.rstrip().endswith("<assistant>")
    plain = tokenizer.decode(prompt_ids(tokenizer, "hi there")[0])
    assert "Be brief." not in plain and "get_weather" not in plain and "<user>hi there</user>" in plain


def test_a_template_that_drops_them_is_an_error() -> None:
    tokenizer = _tokenizer(USER_ONLY)
    with pytest.raises(TrainError, match=r"leaves out the system prompt \(--system\)"):
        prompt_ids(tokenizer, "hi", system="Be brief.")
    with pytest.raises(TrainError, match=r"leaves out the tool 'get_weather' \(--tools\)"):
        prompt_ids(tokenizer, "hi", tools=[TOOL])
    with pytest.raises(TrainError, match=r"--system and --tools need a chat template"):
        prompt_ids(_tokenizer(None), "hi", system="Be brief.")


def test_read_tools(tmp_path: Path) -> None:
    one = tmp_path / "one.json"
    one.write_text(json.dumps(TOOL))
    assert read_tools(one) == [TOOL]
    many = tmp_path / "many.json"
    many.write_text(json.dumps([TOOL, TOOL]))
    assert read_tools(many) == [TOOL, TOOL]
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(TrainError, match=r"expected a JSON list of tool schemas"):
        read_tools(bad)
    bad.write_text("{nope")
    with pytest.raises(TrainError, match=r"cannot read a JSON file"):
        read_tools(bad)
    with pytest.raises(TrainError, match=r"cannot read a JSON file"):
        read_tools(tmp_path / "missing.json")


def test_an_empty_prompt_without_a_template_is_an_error() -> None:
    """Plain text to continue: an empty prompt gives the model no token to start from (generate would fail)."""
    with pytest.raises(TrainError, match=r"--prompt '' gives no token: this tokenizer has no chat template"):
        prompt_ids(_tokenizer(None), "")
    assert prompt_ids(_tokenizer(WITH_TOOLS), "").shape[1] > 0  # the template's own tokens
