"""No silent garbage: a bad row is an error naming the row and the field (or, asked for, skipped and counted), a
set with nothing to train is an error, every column a format defines is used, and a prompt meets its completion
with the separator a user expects."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from padless.prep.cli import main
from padless.prep.errors import PrepError
from padless.prep.pipeline import PackConfig, run_pack
from padless.prep.render import ALPACA_NO_INPUT, FORMATS
from padless.prep.tokenize import encode_example
from padless.prep.tokenizer import DEFAULT_TOKENIZER, load_tokenizer
from padless.shards.reader import open_shards
from tests.user_errors import assert_one_line_error

from .rows import alpaca_rows, chat_rows, text_rows, trained_pieces, write_jsonl

TK = load_tokenizer(None)
OK_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
OK_SG = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
OK_ALPACA = {"instruction": "say hi", "input": "", "output": "hi"}
FIX = r"; fix the row, or pass --skip-bad-rows to leave out such rows$"


def pack(tmp_path: Path, *files: list[dict], name: str = "out", **kw):
    paths = [write_jsonl(tmp_path / f"in{i}.jsonl", rows) for i, rows in enumerate(files)]
    kw.setdefault("max_len", 256)
    cfg = PackConfig(datasets=tuple(map(str, paths)), out=str(tmp_path / name), progress=False, **kw)
    return run_pack(cfg), tmp_path / name


def _sg(*turns: tuple[str, object], **extra) -> dict:
    return {"conversations": [{"from": f, "value": v} for f, v in turns], **extra}


BAD = [
    ("text-list", [{"text": "ok"}, {"text": ["a", "b"]}], r"^row 1: `text` is a list, expected a string"),
    ("text-object", [{"text": {"a": 1}}], r"^row 0: `text` is an object, expected a string"),
    ("text-number", [{"text": "ok"}, {"text": 5}], r"^row 1: `text` is a number, expected a string"),
    ("text-null", [{"text": "ok"}, {"text": None}], r"^row 1: `text` is missing"),
    ("alpaca-no-output", [OK_ALPACA, {"instruction": "x"}], r"^row 1: `output` is missing"),
    ("alpaca-list", [OK_ALPACA, {**OK_ALPACA, "instruction": ["x"]}], r"^row 1: `instruction` is a list"),
    ("alpaca-input", [{**OK_ALPACA, "input": {"k": 1}}], r"^row 0: `input` is an object, expected a string"),
    ("alpaca-history", [{**OK_ALPACA, "history": [["q"]]}], r"`history\[0\]` is a list, expected an \[instruction, "
                                                            r"response\] pair of strings"),
    ("alpaca-history-str", [{**OK_ALPACA, "history": "q"}], r"`history` is a string, expected a list of"),
    ("completion-list", [{"prompt": "p", "completion": ["c"]}], r"^row 0: `completion` is a list, expected a string"),
    ("messages-number", [OK_CHAT, {"messages": 3}], r"^row 1: `messages` is a number, expected a list of "
                                                    r"\{role, content\} objects"),
    ("messages-empty", [OK_CHAT, {"messages": []}], r"^row 1: `messages` is empty"),
    ("message-string", [{"messages": ["hi"]}], r"`messages\[0\]` is a string, expected a \{role, content\} object"),
    ("message-no-role", [{"messages": [{"content": "hi"}]}], r"^row 0: `messages\[0\]` has no `role`"),
    ("message-no-content", [{"messages": [{"role": "user"}]}], r"^row 0: `messages\[0\]` has no `content`"),
    ("content-image", [OK_CHAT, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image", "url": "cat.png"}]}]}],
     r"^row 1: `messages\[0\].content\[1\]` is a part of type 'image'; only text parts can be packed"),
    ("content-number", [{"messages": [{"role": "user", "content": 5}]}],
     r"`messages\[0\].content` is a number, expected a string or a list of text parts"),
    ("content-part-text", [{"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}],
     r"`messages\[0\].content\[0\].text` is a number, expected a string"),
    ("documents-type", [{**OK_CHAT, "documents": [1]}], r"`documents`: expected a list of documents"),
    ("role-typo", [{"messages": [{"role": "user", "content": "a"}, {"role": "asistant", "content": "b"}]}],
     r"`messages\[1\].role` is 'asistant', expected one of system, developer, user, assistant"),
    ("chat-system-clash", [{**OK_CHAT, "messages": [{"role": "system", "content": "a"}, *OK_CHAT["messages"]],
                            "system": "b"}], r"`system` and the conversation's own system message differ"),
    ("tool-call-no-name", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None,
                                                                             "tool_calls": [{"function": {}}]}]}],
     r"`messages\[1\].tool_calls` must be a list of \{function: \{name, arguments\}\} objects"),
    ("tool-call-arguments", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{}"}}, {"function": {"name": "g", "arguments": [1, 2]}}]}]}],
     r"^row 0: `messages\[1\].tool_calls\[1\].function.arguments` is a list, expected an object or a JSON string"),
    ("tool-call-arguments-json", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": '{city: "Oslo"'}}]}]}],
     r"^row 0: `messages\[1\].tool_calls\[0\].function.arguments` is not valid JSON \(Expecting property name "
     r"enclosed in double quotes at column 2\); expected an object or a JSON string of one"),
    ("tool-call-arguments-scalar", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant",
        "tool_calls": [{"name": "f", "arguments": '"Oslo"'}]}]}],
     r"^row 0: `messages\[1\].tool_calls\[0\].arguments` is the JSON of a string, not of an object"),
    ("reasoning-number", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b",
                                                                             "reasoning_content": 5}]}],
     r"^row 0: `messages\[1\].reasoning_content` is a number, expected a string"),
    ("sharegpt-system-clash", [_sg(("System", "a"), ("human", "q"), ("gpt", "b"), system="c")],
     r"^row 0: `system` and the conversation's own system message differ"),
    ("sharegpt-from", [OK_SG, _sg(("human", "a"), ("bot", "b"))], r"^row 1: `conversations\[1\].from` is 'bot'"),
    ("sharegpt-no-value", [{"conversations": [{"from": "human"}]}], r"`conversations\[0\]` has no `value`"),
    ("sharegpt-value", [_sg(("human", ["a"]))], r"`conversations\[0\].value` is a list, expected a string"),
    ("function-call-json", [_sg(("human", "a"), ("function_call", "get_weather(city=1)"))],
     r"`conversations\[1\].value` \(a function_call\) is not JSON"),
    ("function-call-name", [_sg(("human", "a"), ("function_call", '{"arguments": {}}'))],
     r"\(a function_call\): expected each call to be a JSON object with a \"name\" string"),
    ("function-call-arguments-json", [_sg(("human", "a"), ("function_call", '{"name": "f", "arguments": "{city"}'))],
     r"\(a function_call\): \"arguments\" is not valid JSON \(Expecting property name .*\); expected an object"),
    ("tools-json", [_sg(("human", "a"), ("gpt", "b"), tools="[{'name': 'x'}]")], r"`tools` is not valid JSON"),
    ("tools-type", [_sg(("human", "a"), ("gpt", "b"), tools="[1, 2]")], r"`tools`: expected a list of tool schemas"),
    ("text-surrogate", [{"text": "ok"}, {"text": "cut emoji \ud83d"}],
     r"^row 1: `text` holds a lone surrogate \(an unpaired \\ud800-\\udfff escape\), which is not Unicode text"),
    ("alpaca-surrogate", [{**OK_ALPACA, "history": [["q", "a\udc00"]]}], r"^row 0: `history\[0\]\[1\]` holds a lone"),
    ("chat-surrogate", [{"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}],
     r"^row 0: `messages\[0\].content\[0\].text` holds a lone surrogate"),
    ("sharegpt-surrogate", [OK_SG, _sg(("human", "\udfff"), ("gpt", "b"))],
     r"^row 1: `conversations\[0\].value` holds a lone surrogate"),
    ("key-surrogate", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": {"ci\udc00ty": "Oslo"}}}]}]}],
     r"^row 0: `messages\[1\].tool_calls\[0\].function.arguments.ci\\udc00ty` holds a lone surrogate"),
]  # fmt: skip


@pytest.mark.parametrize(("rows", "match"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_row_is_an_error_naming_row_and_field(tmp_path: Path, rows: list[dict], match: str) -> None:
    with pytest.raises(PrepError, match=match[:-1] if match.endswith("$") else match) as info:
        pack(tmp_path, rows)
    assert str(info.value).endswith("; fix the row, or pass --skip-bad-rows to leave out such rows")
    assert not (tmp_path / "out").exists()


def test_bad_rows_name_the_input_and_the_mapped_column(tmp_path: Path) -> None:
    with pytest.raises(PrepError, match=r"^row 2 of '.*in1.jsonl': `text` is a list, expected a string" + FIX):
        pack(tmp_path, text_rows(3), [*text_rows(2), {"text": ["x"]}])
    qa = [{"question": "q", "answer": "a"}, {"question": "q", "answer": ["a"]}]
    with pytest.raises(PrepError, match=r"^row 1: `completion` \(column `answer`\) is a list, expected a string"):
        pack(tmp_path, qa, maps=("prompt=question", "completion=answer"))
    # A row lacking a column that the first rows have (format detection looks at the first 100 rows only).
    with pytest.raises(PrepError, match=r"^row 150: `output` is missing" + FIX):
        pack(tmp_path, [*alpaca_rows(150), {"instruction": "x", "response": "y"}])


def test_skip_bad_rows_counts_and_records_them(tmp_path: Path) -> None:
    rows = text_rows(10)
    rows[1] = {"text": ["a", "b"]}
    rows[4] = {"txt": "typo"}
    summary, out = pack(tmp_path, rows, skip_bad_rows=True)
    want = ["row 1: `text` is a list, expected a string", "row 4: `text` is missing"]
    assert summary["bad_rows_skipped"] == 2 and summary["bad_rows_first"] == want
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prep"]["bad_rows_skipped"] == 2 and manifest["prep"]["bad_rows_first"] == want
    assert manifest["options"]["skip_bad_rows"] is True and manifest["prep"]["rows"] == 8
    ss = open_shards(out)
    kept = sorted(int(i) for k in range(len(ss)) for i in ss[k].example_index)
    assert kept == [0, 2, 3, 5, 6, 7, 8, 9], "example_index keeps the source row numbers"
    # The option enters the fingerprint; the command line reports the skipped rows.
    clean = write_jsonl(tmp_path / "clean.jsonl", text_rows(10))
    fps = [run_pack(PackConfig(datasets=(str(clean),), max_len=64, out=str(tmp_path / f"c{flag}"), progress=False,
                               skip_bad_rows=flag))["fingerprint"] for flag in (False, True)]  # fmt: skip
    assert fps[0] != fps[1]
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    r = CliRunner().invoke(main, ["pack", str(src), "--max-len", "64", "--out", str(tmp_path / "cli"),
                                  "--skip-bad-rows", "--no-progress"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "skipped 2 bad rows (--skip-bad-rows): row 1: `text` is a list, expected a string; row 4:" in r.output
    r = CliRunner().invoke(main, ["stats", str(tmp_path / "cli")])
    assert r.exit_code == 0 and "; bad rows skipped 2" in r.output, r.output


def test_only_a_few_reasons_are_kept_and_all_bad_is_an_error(tmp_path: Path) -> None:
    rows = [{"text": i} for i in range(12)] + text_rows(2)
    summary, _ = pack(tmp_path, rows, skip_bad_rows=True)
    assert summary["bad_rows_skipped"] == 12 and len(summary["bad_rows_first"]) == 5
    with pytest.raises(PrepError, match=r"all 3 rows are bad \(row 0: `text` is a number, .*\); nothing left to pack"):
        pack(tmp_path, [{"text": 1}] * 3, name="o2", skip_bad_rows=True)


def test_a_row_the_chat_template_rejects_is_named_or_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "strict"
    shutil.copytree(DEFAULT_TOKENIZER, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace(
        "{% for message in messages %}",
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ raise_exception('no system') }}"
        "{% endif %}",
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    rows = chat_rows(6, seed=3)
    rows[2] = {"messages": [{"role": "system", "content": "s"}, *OK_CHAT["messages"]]}
    rows = [r if "system" not in {m["role"] for m in r["messages"]} or i == 2 else OK_CHAT for i, r in enumerate(rows)]
    with pytest.raises(PrepError, match=r"^row 2: the chat template of .* rejected a conversation: no system"):
        pack(tmp_path, rows, tokenizer=str(folder))
    summary, _ = pack(tmp_path, rows, tokenizer=str(folder), skip_bad_rows=True, num_proc=2)
    assert summary["bad_rows_skipped"] == 1 and summary["bad_rows_first"][0].startswith("row 2: the chat template")


def _no_eos_tokenizer(tmp_path: Path) -> Path:
    folder = tmp_path / "no_eos"
    shutil.copytree(DEFAULT_TOKENIZER, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_nothing_to_train_is_an_error_that_says_what_to_change(tmp_path: Path) -> None:
    # Chats without an assistant turn: nothing is trained under --train-on completion; the advice works.
    user_only = [{"messages": [{"role": "user", "content": f"question {i}"}]} for i in range(4)]
    with pytest.raises(PrepError, match=r"^the train set has no trainable token \(4 examples\): no conversation has an "
                                        r"assistant turn .*; use --train-on all, or check the data$"):  # fmt: skip
        pack(tmp_path, user_only)
    assert pack(tmp_path, user_only, train_on="all")[0]["train"]["trainable"] > 0
    # Empty completions and a tokenizer without EOS.
    empty = [{"prompt": f"p {i}", "completion": ""} for i in range(3)]
    no_eos = str(_no_eos_tokenizer(tmp_path))
    with pytest.raises(
        PrepError, match=r"every response \(output / completion\) is empty and the tokenizer has no EOS"
    ):
        pack(tmp_path, empty, name="o2", tokenizer=no_eos)
    assert pack(tmp_path, empty, name="o2", tokenizer=no_eos, train_on="all")[0]["train"]["trainable"] > 0
    # Prompts longer than --max-len: truncation cuts every response; the advice (--overlong split) works.
    long = [{"instruction": " ".join(["word"] * 80), "output": "short answer"} for _ in range(3)]
    with pytest.raises(PrepError, match=r"--overlong truncate at --max-len 32 cut every trained token .*; raise "
                                        r"--max-len, or use --overlong split$"):  # fmt: skip
        pack(tmp_path, long, name="o3", max_len=32)
    assert pack(tmp_path, long, name="o3", max_len=32, overlong="split")[0]["train"]["trainable"] > 0
    # Empty texts: --train-on does not apply to text, so it is not the advice.
    with pytest.raises(PrepError, match=r"\(2 examples\): every example is a single token \(the first token of an "
                                        r"example has no target\); check the data$"):  # fmt: skip
        pack(tmp_path, [{"text": ""}] * 2, name="o4")


def test_the_eval_split_needs_trainable_tokens_too(tmp_path: Path) -> None:
    rows = [{"prompt": f"p {i}", "completion": "c" if i else ""} for i in range(5)]
    no_eos = str(_no_eos_tokenizer(tmp_path))
    for seed in range(50):  # a seed whose one eval row is the empty one
        try:
            pack(tmp_path, rows, tokenizer=no_eos, eval_examples=1, seed=seed, overwrite=True)
        except PrepError as e:
            assert str(e).startswith("the eval set has no trainable token (1 examples)")
            break
    else:
        pytest.fail("no seed put row 0 into the eval split")


def test_examples_without_a_trained_token_are_counted(tmp_path: Path) -> None:
    rows = [OK_CHAT, {"messages": [{"role": "user", "content": "no answer"}]}, OK_CHAT]
    summary, out = pack(tmp_path, rows)
    assert summary["train"]["untrained"] == 1
    r = CliRunner().invoke(main, ["stats", str(out)])
    assert r.exit_code == 0 and ", with no trained token 1" in r.output, r.output


def test_alpaca_history_and_system_are_earlier_turns(tmp_path: Path) -> None:
    """LIMA's multi-turn rows: every earlier response is trained and ends with EOS, the prompts are not."""
    row = {"instruction": "q2", "input": "", "output": "a2", "history": [["q1", "a1"], ["q1b", "a1b"]]}
    ids, mask = encode_example(row, "alpaca", "completion", TK)
    head = ALPACA_NO_INPUT[: ALPACA_NO_INPUT.index("### Instruction")]
    turn = "### Instruction:\n{}\n\n### Response:\n"
    want = (head + turn.format("q1") + "a1<|im_end|>\n\n" + turn.format("q1b") + "a1b<|im_end|>\n\n"
            + turn.format("q2") + "a2<|im_end|>")  # fmt: skip
    assert TK.tok.decode(ids, skip_special_tokens=False) == want
    assert trained_pieces(ids, mask, TK.tok) == ["a1<|im_end|>", "a1b<|im_end|>", "a2<|im_end|>"]
    ids, _ = encode_example({**row, "history": [], "system": "Answer tersely."}, "alpaca", "completion", TK)
    assert TK.tok.decode(ids, skip_special_tokens=False) == "Answer tersely.\n\n" + turn.format("q2") + "a2<|im_end|>"
    # Without history or system the rendering is the plain Stanford prompt, as before.
    ids, _ = encode_example({**row, "history": None}, "alpaca", "completion", TK)
    assert TK.tok.decode(ids, skip_special_tokens=False) == ALPACA_NO_INPUT.format(instruction="q2") + "a2<|im_end|>"
    summary, _ = pack(tmp_path, [row, {**OK_ALPACA, "history": []}])
    assert summary["train"]["trainable"] == sum(
        sum(encode_example(r, "alpaca", "completion", TK)[1]) for r in (row, {**OK_ALPACA, "history": []})
    )


@pytest.mark.parametrize(
    ("prompt", "completion", "separator", "joined"),
    [
        ("two plus two", "four", " ", "two plus two four"),
        ("two plus two =", "4", " ", "two plus two = 4"),
        ("Q: two plus two?\nA:", " four", " ", "Q: two plus two?\nA: four"),
        ("Question\n", "four", " ", "Question\nfour"),
        ("two plus two", "four", "", "two plus twofour"),
        ("two plus two", "four", "\n", "two plus two\nfour"),
        ("", "four", " ", "four"),
    ],
)
def test_prompt_and_completion_get_a_separator(prompt: str, completion: str, separator: str, joined: str) -> None:
    row = {"prompt": prompt, "completion": completion}
    ids, mask = encode_example(row, "prompt-completion", "completion", TK, separator=separator)
    assert TK.tok.decode(ids, skip_special_tokens=False) == joined + "<|im_end|>"
    if prompt:  # (an example's first token is never trained)
        trained = joined[len(prompt) :]
        assert trained_pieces(ids, mask, TK.tok) == [trained + "<|im_end|>"], "the separator goes with the completion"


def test_prompt_separator_option(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "two plus two", "completion": "four"}] * 2)
    help_text = " ".join(CliRunner().invoke(main, ["pack", "--help"], terminal_width=200).output.split())
    assert (
        "--prompt-separator TEXT prompt-completion: text put in front of the completion when neither side" in help_text
    )
    assert "Default: one space; '' joins as is." in help_text
    fps = []
    for sep in (" ", "", "\n"):
        r = CliRunner().invoke(main, ["pack", str(src), "--max-len", "32", "--out", str(tmp_path / f"o{len(fps)}"),
                                      "--prompt-separator", sep, "--no-progress", "--json"])  # fmt: skip
        assert r.exit_code == 0, r.output
        fps.append(json.loads(r.output)["fingerprint"])
    assert len(set(fps)) == 3
    r = CliRunner().invoke(main, ["pack", str(src), "--max-len", "32", "--prompt-separator"])
    assert_one_line_error(r, r"Option '--prompt-separator' requires an argument")


@pytest.mark.parametrize(
    ("name", "data", "match"),
    [
        ("bin.csv", b"text\n\xff\xfe,1\n", r"cannot read dataset '.*bin.csv': 'utf-8' codec can't decode byte 0xff"),
        ("latin.json", b'[{"text": "' + b"a" * 20_000 + b'\xe9"}]',
         r"cannot read '.*latin.json': 'utf-8' codec can't decode byte 0xe9 .*; expected a UTF-8"),
        ("wide.csv", b"text\nhello,world\n", r"'.*wide.csv' line 2 has more fields than its header \(1\)"),
        ("stray.csv", b'text\nfirst\n"stray quote\nsecond\nthird\n',
         r"'.*stray.csv': malformed CSV in the record starting at line 3 \(unexpected end of data\); expected each "
         r"quoted field to end in a quote"),
        ("after.csv", b'text,input\n"a"b,c\n', r"'.*after.csv': malformed CSV in the record starting at line 2"),
        ("blanks.csv", b'text\nfirst\n\n\n"stray quote\nsecond\n',
         r"'.*blanks.csv': malformed CSV in the record starting at line 5 "),
        ("twice.csv", b"text,input,text\na,b,c\n",
         r"'.*twice.csv': the header names the column\(s\) \['text'\] more than once; expected one column per name"),
        ("cut.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 500, mtime=0)[:-12],
         r"cannot read '.*cut.jsonl.gz': Compressed file ended before the end-of-stream marker"),
        ("bad.arrow", b"ARROW1\x00\x00garbage", r"'.*bad.arrow' is not an Arrow IPC file or stream"),
        ("long.jsonl", b'{"text": "a"}\n{"text": "b", "id": 1' + b"0" * 5000 + b"}\n",
         r"'.*long.jsonl': line 2 holds a number too long for Python's JSON parser \(Exceeds the limit"),
        ("deep.jsonl", b'{"text": "a", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
         r"'.*deep.jsonl': line 1 is nested too deeply for Python's JSON parser"),
        ("deep.json", b"[" * 100_000 + b"]" * 100_000, r"'.*deep.json': its JSON array is nested too deeply"),
    ],
    ids=["not-utf8-csv", "not-utf8-json-array", "wide-csv", "unclosed-csv-quote", "text-after-csv-quote",
         "csv-quote-after-blank-lines", "duplicate-csv-column", "truncated-gzip", "not-arrow", "long-int", "deep-jsonl",
         "deep-json"],
)  # fmt: skip
def test_an_unreadable_dataset_is_one_line(tmp_path: Path, name: str, data: bytes, match: str) -> None:
    (tmp_path / name).write_bytes(data)
    r = CliRunner().invoke(main, ["pack", str(tmp_path / name), "--max-len", "64", "--out", str(tmp_path / "o")])
    assert_one_line_error(r, match)
    assert not (tmp_path / "o").exists()


_VALUES = [None, "", "x", 0, 1.5, True, [], ["a"], [["q", "a"]], [["q"]], {}, {"a": 1}, {"role": "user"},
           [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "yo"}, {"role": "tool"}],
           [{"from": "human", "value": "a"}, {"from": "function_call", "value": "[]"}],
           '[{"name": "f"}]', "[1]", '{"name": "g", "parameters": {}}', [{"name": "h"}], "<|im_end|>"]  # fmt: skip
_VALID = [
    {"text": "some text"},
    {"instruction": "do it", "input": "", "output": "done", "history": [["q", "a"]], "system": "Be brief."},
    {"prompt": "two plus two", "completion": "four"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
                  "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "content": "r"},
                  {"role": "assistant", "content": "b"}], "tools": [{"name": "f"}]},
    {"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": '{"name": "f"}'},
                       {"from": "observation", "value": "r"}, {"from": "gpt", "value": "b"}],
     "tools": '[{"name": "f"}]'},
]  # fmt: skip


def _mutate(rng, row: dict) -> dict:
    """A copy of ``row`` with one field (or one element of a list field) replaced by a value of another shape."""
    row = json.loads(json.dumps(row))
    key = rng.choice(list(row))
    if isinstance(row[key], list) and row[key] and rng.random() < 0.5:
        i = rng.randrange(len(row[key]))
        if isinstance(row[key][i], dict) and rng.random() < 0.7:
            row[key][i][rng.choice(list(row[key][i]))] = rng.choice(_VALUES)
        else:
            row[key][i] = rng.choice(_VALUES)
    elif rng.random() < 0.2:
        del row[key]
    else:
        row[key] = rng.choice(_VALUES)
    return row


def test_no_row_shape_reaches_the_user_as_a_traceback(tmp_path: Path) -> None:
    """Seeded mutations of valid rows of every format (a field or an element of another shape, or missing), under
    random options: each run packs or ends in one error line, never another exception."""
    import random

    rng = random.Random(18)
    outcomes = {0: 0, 2: 0}
    for trial in range(150):
        base = rng.choice(_VALID)
        rows = [_mutate(rng, base) if rng.random() < 0.4 else base for _ in range(rng.randint(1, 4))]
        src = write_jsonl(tmp_path / f"r{trial}.jsonl", rows)
        args = ["pack", str(src), "--max-len", "64", "--out", str(tmp_path / f"o{trial}"), "--no-progress"]
        args += rng.choice([[], ["--skip-bad-rows"], ["--train-on", "all"], ["--format", rng.choice(list(FORMATS))]])
        r = CliRunner().invoke(main, args)
        assert r.exception is None or isinstance(r.exception, SystemExit), (rows, args, r.exception)
        if r.exit_code:
            assert_one_line_error(r, r"^error: ")
        outcomes[r.exit_code] += 1
    assert min(outcomes.values()) > 30, outcomes  # both packing and refusing were exercised


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_tool_call_arguments_string_is_a_call_without_arguments(blank: str) -> None:
    """Some exports write a call without arguments as ``"arguments": ""``: such a row is valid and its call renders
    with ``{}``, in chat messages (either call shape) and ShareGPT function_call turns; the row is not changed."""
    from padless.prep.render import render_row
    from padless.prep.validate import row_problem

    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": blank}}, {"name": "g", "arguments": blank},
        {"name": "h", "arguments": '{"x": 1}'}]}]}  # fmt: skip
    assert row_problem(chat, "chat") is None
    calls = render_row(chat, "chat", "completion").messages[1]["tool_calls"]
    assert calls == [{"type": "function", "function": {"name": "f", "arguments": {}}}, {"name": "g", "arguments": {}},
                     {"name": "h", "arguments": '{"x": 1}'}]  # fmt: skip
    assert chat["messages"][1]["tool_calls"][0]["function"]["arguments"] == blank
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "a"},
            {"from": "function_call", "value": json.dumps({"name": "f", "arguments": blank})},
        ]
    }
    assert row_problem(sharegpt, "sharegpt") is None
    assert render_row(sharegpt, "sharegpt", "completion").messages[1]["tool_calls"][0]["function"]["arguments"] == {}
