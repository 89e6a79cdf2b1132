"""Chat rows as the template intends, through ``prep pack``: a ``documents`` column reaches RAG templates, content parts
are rendered as parts or joined (never trained as a list's Python text), ``--chat-template-kwargs`` and
``--template-date`` reach the template and the fingerprint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from padless.prep.cli import main
from padless.prep.errors import PrepError
from padless.prep.tokenize import encode_example
from padless.prep.tokenizer import DEFAULT_TOKENIZER, TokenizerInfo, load_tokenizer
from padless.shards.reader import open_shards
from tests.user_errors import assert_one_line_error

from .rows import trained_pieces, write_jsonl

DATA = Path(__file__).parent / "data"
DOCS = [{"title": "Paris", "text": "Paris is the capital of France."}, {"text": "It rains 111 days a year there."}]
RAG_ROW = {"messages": [{"role": "user", "content": "How rainy is Paris?"},
                        {"role": "assistant", "content": "111 days a year."}], "documents": DOCS}  # fmt: skip


def _folder(tmp_path: Path, template: str) -> Path:
    folder = tmp_path / template
    if not folder.exists():
        shutil.copytree(DEFAULT_TOKENIZER, folder)
        (folder / "chat_template.jinja").write_text((DATA / f"{template}.jinja").read_text())
    return folder


def _tk(tmp_path: Path, template: str, **kw) -> TokenizerInfo:
    return load_tokenizer(_folder(tmp_path, template), **kw)


def _text(row: dict, tk: TokenizerInfo) -> tuple[str, list[str]]:
    ids, mask = encode_example(row, "chat", "completion", tk)
    return tk.tok.decode(ids, skip_special_tokens=False), trained_pieces(ids, mask, tk.tok)


def test_documents_reach_the_template(tmp_path: Path) -> None:
    text, trained = _text(RAG_ROW, _tk(tmp_path, "rag_style"))
    assert '<|start_of_role|>document {"document_id": "0"}<|end_of_role|>\nParis\nParis is the capital' in text
    assert "It rains 111 days a year there.<|end_of_text|>" in text
    assert trained == ["111 days a year.<|end_of_text|>\n<|im_end|>"]  # the tokenizer's EOS ends the example
    as_json = {**RAG_ROW, "documents": json.dumps(DOCS)}  # a JSON string column, as tools may be
    assert _text(as_json, _tk(tmp_path, "rag_style")) == (text, trained)
    with pytest.raises(PrepError, match=r"leaves out document 0 given in the row's `documents`; use a tokenizer"):
        _text(RAG_ROW, load_tokenizer(None))


def test_content_parts_are_rendered_as_parts_or_joined(tmp_path: Path) -> None:
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Look: "},
                                                      {"type": "text", "text": "two parts."}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "Seen."}]}]}  # fmt: skip
    plain = {"messages": [{"role": "user", "content": "Look: two parts."}, {"role": "assistant", "content": "Seen."}]}
    for template in ("mistral_style", "qwen3_thinking_2507", "llama3_style"):
        tk = _tk(tmp_path, template)
        text, trained = _text(row, tk)
        assert (text, trained) == _text(plain, tk), template
        assert "'type'" not in text and "Look: two parts." in text and "Seen." in trained[-1], template


def test_template_kwargs_and_date_reach_the_template_and_the_fingerprint(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [RAG_ROW] * 4)
    folder = str(_folder(tmp_path, "rag_style"))
    base = ["pack", str(src), "--tokenizer", folder, "--max-len", "512", "--no-progress", "--json", "--out"]
    runs = {
        "default": [],
        "kv": ["--chat-template-kwargs", "enable_thinking=false,greeting=hello there"],
        "json": ["--chat-template-kwargs", '{"enable_thinking": false, "greeting": "hello there"}'],
        "date": ["--template-date", "2026-01-31"],
    }
    fp, text = {}, {}
    for name, extra in runs.items():
        r = CliRunner().invoke(main, [*base, str(tmp_path / name), *extra])
        assert r.exit_code == 0, r.output
        fp[name] = json.loads(r.output)["fingerprint"]
        ss = open_shards(tmp_path / name)
        text[name] = load_tokenizer(None).tok.decode(ss[0].input_ids.tolist(), skip_special_tokens=False)
        options = ss.manifest["options"]
        if name in ("kv", "json"):
            assert options["chat_template_kwargs"] == {"enable_thinking": False, "greeting": "hello there"}
        assert options["template_date"] == ("2026-01-31" if name == "date" else "2024-01-01")
    assert "Today's Date: January 01, 2024." in text["default"] and "<think>" not in text["default"]
    assert "Think before you answer." in text["default"] and "Think before" not in text["kv"]
    assert "Today's Date: January 31, 2026." in text["date"]
    assert fp["kv"] == fp["json"] and len({fp["default"], fp["kv"], fp["date"]}) == 3
    # The same inputs and options give the same shards whenever they run: the date is never the clock's.
    r = CliRunner().invoke(main, [*base, str(tmp_path / "again")])
    assert json.loads(r.output)["fingerprint"] == fp["default"]
    assert open_shards(tmp_path / "again").manifest["shards"] == open_shards(tmp_path / "default").manifest["shards"]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--chat-template-kwargs", "enable_thinking"], r"--chat-template-kwargs 'enable_thinking': expected NAME="),
        (["--chat-template-kwargs", "messages=[]"], r"'messages' comes from the data"),
        (["--chat-template-kwargs", "{bad json"], r"is not a JSON object"),
        (["--chat-template-kwargs", "2x=1"], r"'2x' is not a template variable name"),
        (["--template-date", "31/01/2026"], r"--template-date '31/01/2026': expected a date YYYY-MM-DD"),
    ],
    ids=["no-value", "reserved", "json", "name", "date"],
)
def test_bad_template_options_are_one_line(tmp_path: Path, args: list[str], match: str) -> None:
    src = write_jsonl(tmp_path / "c.jsonl", [RAG_ROW])
    r = CliRunner().invoke(main, ["pack", str(src), "--max-len", "64", "--out", str(tmp_path / "o"), *args])
    assert_one_line_error(r, match)
    assert not (tmp_path / "o").exists()
