"""Assistant-only loss under real chat templates, including ones that re-render history (Qwen3 drops the reasoning
of earlier turns), tool calls and tool schemas, ``{% generation %}`` markers, and templates that would silently
drop part of a conversation. The templates are the committed fixtures in ``tests/prep/data`` on the demo
tokenizer (so the tests need no downloaded tokenizer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from padless.prep.cli import main
from padless.prep.errors import PrepError
from padless.prep.pipeline import PackConfig, run_pack
from padless.prep.render import render_row
from padless.prep.tokenize import encode_example
from padless.prep.tokenizer import DEFAULT_TOKENIZER, TokenizerInfo, load_tokenizer
from tests.user_errors import assert_one_line_error

from .rows import chat_rows, trained_pieces, write_jsonl

DATA = Path(__file__).parent / "data"
CHATML = (DEFAULT_TOKENIZER / "tokenizer_config.json").read_text()
DEMO_TEMPLATE = json.loads(CHATML)["chat_template"]
TEMPLATES = {
    "demo": DEMO_TEMPLATE,
    "qwen2-llamafactory": (DATA / "qwen2_llamafactory.jinja").read_text(),
    "qwen2.5": (DATA / "qwen2_5_instruct.jinja").read_text(),
    "qwen3": (DATA / "qwen3_thinking_2507.jinja").read_text(),
}
WEATHER = {"name": "get_weather", "description": "Weather now", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}}, "required": ["city"]}}  # fmt: skip
GLAIVE_ROW = {  # the shape of glaive-function-calling / LLaMA-Factory ShareGPT tool data
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": json.dumps({"temp": 21})},
        {"from": "gpt", "value": "It is 21 degrees in Paris."},
        {"from": "human", "value": "Thanks!"},
        {"from": "gpt", "value": "You are welcome."},
    ],
    "tools": json.dumps([WEATHER]),
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


CALL_ROW = {  # OpenAI-style messages with one tool call, and the tool's schema
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "21"},
        {"role": "assistant", "content": "It is 21 degrees."},
    ],
    "tools": [{"type": "function", "function": WEATHER}],
}  # fmt: skip
# Lists the tools' names in a header but writes no tool call: the call's name is in the rendering all the same.
TOOLS_NOT_CALLS = (
    "{% if tools %}Tools:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content or '' }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tokenizer(tmp_path: Path, template: str, name: str = "tok") -> TokenizerInfo:
    folder = tmp_path / name
    shutil.copytree(DEFAULT_TOKENIZER, folder)
    (folder / "chat_template.jinja").write_text(template)
    return load_tokenizer(folder)


def pieces(row: dict, fmt: str, tk: TokenizerInfo, train_on: str = "completion") -> tuple[str, list[str]]:
    ids, mask = encode_example(row, fmt, train_on, tk)
    return tk.tok.decode(ids, skip_special_tokens=False), trained_pieces(ids, mask, tk.tok)


def conversation(*contents: str, system: str | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    for i, c in enumerate(contents):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": c})
    return {"messages": msgs}


def test_qwen3_template_trains_every_assistant_turn(tmp_path: Path) -> None:
    """Qwen3 renders an earlier turn without its reasoning, so no prefix of the conversation renders as the start of
    the whole one; each turn is still found: the earlier one as it appears, the last one from the generation prompt
    on (`<think>\\n`), reasoning included."""
    tk = tokenizer(tmp_path, TEMPLATES["qwen3"])
    row = conversation("u1", "<think>\nr1\n</think>\n\nans1", "u2", "<think>\nr2\n</think>\n\nans2")
    full, trained = pieces(row, "chat", tk)
    assert full == tk.render_chat(row["messages"])
    assert "r1" not in full and "ans1" in full
    assert trained == ["ans1<|im_end|>\n", "r2\n</think>\n\nans2<|im_end|>\n"]
    _, trained = pieces(conversation("u1", "ans1", "u2", "ans2", "u3", "ans3"), "chat", tk)
    assert trained == ["ans1<|im_end|>\n", "ans2<|im_end|>\n", "\n</think>\n\nans3<|im_end|>\n"]
    # --train-on all never needs the turns: every token but the first is trained.
    _, mask = encode_example(row, "chat", "all", tk)
    assert not mask[0] and all(mask[1:])


def test_qwen3_tool_calls_and_tools(tmp_path: Path) -> None:
    tk = tokenizer(tmp_path, TEMPLATES["qwen3"])
    full, trained = pieces(GLAIVE_ROW, "sharegpt", tk)
    schema = json.dumps({"type": "function", "function": WEATHER}, ensure_ascii=False)
    assert f"<tools>\n{schema}\n</tools>" in full, "the row's tools reach the template, wrapped as transformers does"
    assert f"<|im_start|>assistant\n{CALL}<|im_end|>" in full
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>' in full
    assert trained == [CALL + "<|im_end|>\n", "It is 21 degrees in Paris.<|im_end|>\n",
                       "\n</think>\n\nYou are welcome.<|im_end|>\n"]  # fmt: skip


@pytest.mark.parametrize("name", ["demo", "qwen2-llamafactory", "qwen2.5"])
def test_prefix_stable_templates_train_content_and_end_of_turn(tmp_path: Path, name: str) -> None:
    tk = tokenizer(tmp_path, TEMPLATES[name])
    row = conversation("u1", "a1", "u2", "a2", "u3", "a3", system="Be brief.")
    full, trained = pieces(row, "chat", tk)
    assert full == tk.render_chat(row["messages"])
    assert trained == ["a1<|im_end|>\n", "a2<|im_end|>\n", "a3<|im_end|>\n"]


def test_qwen2_5_tool_calls_and_a_tools_column_in_chat_rows(tmp_path: Path) -> None:
    tk = tokenizer(tmp_path, TEMPLATES["qwen2.5"])
    full, trained = pieces(GLAIVE_ROW, "sharegpt", tk)
    assert trained == [CALL + "<|im_end|>\n", "It is 21 degrees in Paris.<|im_end|>\n", "You are welcome.<|im_end|>\n"]
    # The same conversation in OpenAI chat form (tool_calls, role tool, a `tools` list column) renders the same.
    chat = {"messages": render_row(GLAIVE_ROW, "sharegpt", "completion").messages, "tools": [WEATHER]}
    assert pieces(chat, "chat", tk) == (full, trained)


def test_rendering_matches_transformers(tmp_path: Path) -> None:
    """Our sandboxed rendering gives transformers' apply_chat_template text, tools and tool calls included, and the
    same assistant tokens for a template with generation markers."""
    transformers = pytest.importorskip("transformers")
    for name in ("qwen3", "qwen2.5"):
        tk = tokenizer(tmp_path, TEMPLATES[name], name)
        hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tk.folder / "tokenizer.json"),
                                                  eos_token="<|im_end|>", bos_token="<|endoftext|>")  # fmt: skip
        r = render_row(GLAIVE_ROW, "sharegpt", "completion")
        want = hf.apply_chat_template(r.messages, tools=r.tools, chat_template=TEMPLATES[name], tokenize=False)
        assert tk.render_chat(r.messages, tools=r.tools) == want, name
    # {% generation %} spans give the tokens transformers' assistant mask gives.
    tk = tokenizer(tmp_path, MARKED, "marked")
    row = conversation("hello there", "general kenobi", "you are a bold one", "kill him")
    out = hf.apply_chat_template(row["messages"], chat_template=MARKED, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)  # fmt: skip
    ids, mask = encode_example(row, "chat", "completion", tk)
    assert ids == out["input_ids"] and mask == [bool(m) for m in out["assistant_masks"]]


MARKED = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_generation_markers_define_the_spans(tmp_path: Path) -> None:
    """With {% generation %} markers the template's author decides: here the content only, not the end token."""
    tk = tokenizer(tmp_path, MARKED)
    assert (
        tk.chat.has_generation_markers and not tokenizer(tmp_path, DEMO_TEMPLATE, "plain").chat.has_generation_markers
    )
    row = conversation("u1", "a1", "u2", "a2")
    full, trained = pieces(row, "chat", tk)
    assert full == tk.render_chat(row["messages"]) and trained == ["a1", "a2"]
    text, spans = tk.chat.render_marked(row["messages"])
    assert [text[a:b] for a, b in spans] == ["a1", "a2"]


def test_a_template_that_rewrites_history_is_located_in_one_rendering(tmp_path: Path) -> None:
    """A header that counts the turns changes with every prefix: the turns are found inside the whole rendering and
    trained exactly as under the plain template."""
    counted = "{{ messages | length }} turns\n" + DEMO_TEMPLATE
    tk = tokenizer(tmp_path, counted)
    rows = chat_rows(20, seed=5)
    plain = tokenizer(tmp_path, DEMO_TEMPLATE, "plain")
    for row in rows:
        want = [m["content"] + "<|im_end|>\n" for m in row["messages"] if m["role"] == "assistant"]
        assert pieces(row, "chat", tk)[1] == want == pieces(row, "chat", plain)[1]


UNLOCATABLE = (  # renders no assistant text and a header that changes with every prefix
    "{{ messages | length }}\n{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}"
    "\n{% endfor %}"
)


def test_an_unlocatable_turn_is_one_error_whose_advice_works(tmp_path: Path) -> None:
    tk = tokenizer(tmp_path, UNLOCATABLE)
    src = write_jsonl(tmp_path / "c.jsonl", [conversation("u1", "a1", "u2", "a2")] * 3)
    args = ["pack", str(src), "--max-len", "64", "--tokenizer", str(tk.folder), "--no-progress", "--out"]
    r = CliRunner().invoke(main, [*args, str(tmp_path / "o")])
    assert_one_line_error(r, r"^error: row 0: cannot locate assistant message 1 in the rendering of the chat template "
                             r".*; use --train-on all \(trains every token, needs no turn boundaries\), or a template "
                             r"with \{% generation %\} markers")  # fmt: skip
    assert not (tmp_path / "o").exists()
    r = CliRunner().invoke(main, [*args, str(tmp_path / "o"), "--train-on", "all"])
    assert r.exit_code == 0, r.output


def test_qwen3_packs_end_to_end_with_either_train_on(tmp_path: Path) -> None:
    tk = tokenizer(tmp_path, TEMPLATES["qwen3"])
    rows = [*chat_rows(10, seed=2), conversation("u", "<think>\nhm\n</think>\n\nok", "v", "fine")]
    chats = write_jsonl(tmp_path / "c.jsonl", rows)
    tools = write_jsonl(tmp_path / "t.jsonl", [GLAIVE_ROW] * 3)
    for train_on in ("completion", "all"):
        cfg = PackConfig(datasets=(str(chats), str(tools)), max_len=512, out=str(tmp_path / train_on),
                         tokenizer=str(tk.folder), train_on=train_on, progress=False)  # fmt: skip
        assert run_pack(cfg)["train"]["trainable"] > 0


@pytest.mark.parametrize(
    ("template", "row", "match"),
    [
        (DEMO_TEMPLATE, GLAIVE_ROW, r"leaves out the tool call 'get_weather' of message 1; use a tokenizer whose "
                                    r"chat template renders tool calls"),
        (TEMPLATES["qwen2-llamafactory"], GLAIVE_ROW, r"leaves out the tool call 'get_weather'"),
        (TEMPLATES["qwen2-llamafactory"], {**conversation("u", "a"), "tools": [WEATHER]},
         r"leaves out the tool 'get_weather' given in the row's `tools`"),
        (TEMPLATES["qwen2-llamafactory"], {"messages": [{"role": "user", "content": "u"},
                                                        {"role": "tool", "content": "result 42"}]},
         r"leaves out message 1 \(role 'tool'\): its text is not in the rendering"),
        (TOOLS_NOT_CALLS, CALL_ROW, r"leaves out the tool call 'get_weather' of message 1"),
        (DEMO_TEMPLATE, {"messages": [{**CALL_ROW["messages"][0], "content": "Use get_weather for Paris"},
                                      {**CALL_ROW["messages"][1], "content": "Checking."}, *CALL_ROW["messages"][2:]]},
         r"leaves out the tool call 'get_weather' of message 1"),
    ],
    ids=["demo-tool-call", "qwen2-tool-call", "qwen2-tools", "qwen2-tool-message", "schema-names-the-tool",
         "user-names-the-tool"],
)  # fmt: skip
def test_a_template_that_drops_part_of_a_conversation_is_refused(tmp_path: Path, template, row, match) -> None:
    tk = tokenizer(tmp_path, template)
    fmt = "sharegpt" if "conversations" in row else "chat"
    for train_on in ("completion", "all"):
        with pytest.raises(PrepError, match=match):
            encode_example(row, fmt, train_on, tk)


def test_a_template_that_is_not_jinja_is_one_line(tmp_path: Path) -> None:
    tk_folder = tokenizer(tmp_path, "{% for m in messages %}{{ m.content }").folder
    src = write_jsonl(tmp_path / "c.jsonl", [conversation("u", "a")])
    r = CliRunner().invoke(main, ["pack", str(src), "--max-len", "64", "--tokenizer", str(tk_folder)])
    assert_one_line_error(r, r"the chat template of .* is not valid Jinja")
