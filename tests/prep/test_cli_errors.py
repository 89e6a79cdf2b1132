"""``prep``'s user errors: one ``error: ...`` line on stderr, exit status 2, no traceback; the options come from
``PackConfig`` / ``CostConfig`` (one help source), and the configs check their own fields for library callers."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from padless.prep.cli import main
from padless.prep.config import CostConfig, PackConfig, parse_param_count
from padless.prep.errors import PrepError
from padless.prep.tokenizer import DEFAULT_TOKENIZER
from tests.user_errors import assert_one_line_error, assert_one_line_error_in_process

from .rows import alpaca_rows, write_jsonl

PREP = str(Path(sys.executable).parent / "prep")


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def alpaca_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "a.jsonl", alpaca_rows(20))


def test_pack_keeps_its_flags_and_takes_its_help_from_the_config() -> None:
    help_text = " ".join(CliRunner().invoke(main, ["pack", "--help"], terminal_width=200).output.split())
    flags = ["--max-len", "--out", "--tokenizer", "--format", "--map NAME=COLUMN", "--train-on", "--overlong",
             "--max-examples-per-pack", "--seed", "--eval-fraction", "--eval-examples", "--num-proc", "--overwrite",
             "--progress / --no-progress", "--json", "DATASETS..."]  # fmt: skip
    for flag in flags:
        assert flag in help_text, flag
    for config in (PackConfig, CostConfig):
        for f in dataclasses.fields(config):
            if "help" in f.metadata and not f.metadata.get("positional"):
                assert " ".join(f.metadata["help"].split()) in help_text or config is CostConfig, f.name
    stats_help = " ".join(CliRunner().invoke(main, ["stats", "--help"], terminal_width=200).output.split())
    for f in dataclasses.fields(CostConfig):
        assert " ".join(f.metadata["help"].split()) in stats_help, f.name


def test_pack_flags_reach_the_config(alpaca_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    r = _invoke("pack", str(alpaca_file), "--max-len", "64", "--out", str(out), "--map", "output=output",
                "--train-on", "all", "--overlong", "split", "--max-examples-per-pack", "3", "--seed", "5",
                "--eval-examples", "2", "--num-proc", "1", "--no-progress", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    options = json.loads((out / "manifest.json").read_text())["options"]
    assert options["train_on"] == "all" and options["overlong"] == "split" and options["maps"] == ["output=output"]
    assert options["max_examples_per_pack"] == 3 and options["seed"] == 5 and options["eval_examples"] == 2


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--max-len", "8"], r"^error: --max-len 8 is below 16; expected at least 16 tokens per pack$"),
        (
            ["--max-len", str(2**31)],
            r"^error: --max-len 2147483648 is above 2147483647, the most tokens a pack can hold$",
        ),
        (["--max-len", "64", "--format", "csv"], r"Invalid value for '--format': 'csv' is not one of 'text', "),
        (["--max-len", "64", "--train-on", "some"], r"Invalid value for '--train-on': 'some' is not one of"),
        (["--max-len", "sixty"], r"Invalid value for '--max-len': 'sixty' is not a valid integer"),
        (["--max-len", "64", "--eval-fraction", "1.5"], r"--eval-fraction 1.5: expected a fraction in \[0, 1\)"),
        (["--max-len", "64", "--seed", "-1"], r"^error: --seed -1: expected an integer >= 0$"),
        (["--max-len", "64", "--num-proc", "0"], r"--num-proc 0: expected >= 1"),
        (["--max-len", "64", "--map", "prompt"], r"--map 'prompt': expected NAME=COLUMN"),
        (["--max-len", "64", "--map", "prompt=nope"], r"--map names columns \['nope'\]"),
        (
            ["--max-len", "64", "--map", "prompt=instruction", "--map", "prompt=input"],
            r"^error: --map prompt=instruction and --map prompt=input: the field 'prompt' is mapped twice; map it "
            r"once$",
        ),
        (["--max-len", "64", "--format", "chat"], r"--format chat needs columns \['messages'\]"),
        (["--max-len", "64", "--tokenizer", "/no/such/tokenizer"], r"Hugging Face Hub cannot be reached|no such"),
        ([], r"Missing option '--max-len'"),
    ],
)
def test_pack_user_errors(alpaca_file: Path, tmp_path: Path, monkeypatch, args: list[str], match: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_one_line_error(_invoke("pack", str(alpaca_file), "--out", str(tmp_path / "o"), *args), match)
    assert not (tmp_path / "o").exists()


def test_pack_data_and_tokenizer_errors(tmp_path: Path) -> None:
    assert_one_line_error(_invoke("pack", str(tmp_path / "missing.jsonl"), "--max-len", "64"), r"not found")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": \n')
    assert_one_line_error(_invoke("pack", str(bad), "--max-len", "64"), r"malformed JSON .* line 2")
    # A tokenizer folder whose tokenizer.json is not one, and one whose config is not JSON.
    broken = tmp_path / "tok"
    shutil.copytree(DEFAULT_TOKENIZER, broken)
    (broken / "tokenizer.json").write_text("{}")
    args = ["pack", str(write_jsonl(tmp_path / "a.jsonl", alpaca_rows(5))), "--max-len", "64", "--tokenizer"]
    assert_one_line_error(_invoke(*args, str(broken)), r"is not a tokenizer.json that `tokenizers` can read")
    shutil.copy(DEFAULT_TOKENIZER / "tokenizer.json", broken / "tokenizer.json")
    (broken / "tokenizer_config.json").write_text("{not json")
    assert_one_line_error(_invoke(*args, str(broken)), r"cannot read .*tokenizer_config.json.*expected a JSON object")


def test_a_chat_template_that_cannot_be_read_is_one_line(tmp_path: Path) -> None:
    """A tokenizer folder whose named chat templates are malformed or lack a default, or whose chat_template.jinja is
    not UTF-8: one line that names the file or the templates (text data needs no template and still packs)."""
    chats = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "yo"}]}])  # fmt: skip
    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])

    def folder(name: str, template: object = None, jinja: bytes | None = None) -> str:
        tok = tmp_path / name
        shutil.copytree(DEFAULT_TOKENIZER, tok)
        config = json.loads((tok / "tokenizer_config.json").read_text())
        config["chat_template"] = template if template is not None else config["chat_template"]
        (tok / "tokenizer_config.json").write_text(json.dumps(config))
        if jinja is not None:
            (tok / "chat_template.jinja").write_bytes(jinja)
        return str(tok)

    cases = [
        (folder("nameless", [{"template": "{{ messages }}"}]),
         r"tokenizer_config.json': chat_template is a list, but not of \{name, template\} objects"),
        (folder("no_default", [{"name": "tool_use", "template": "{{ messages }}"}]),
         r"has named chat templates \['tool_use'\] but none named 'default'"),
        (folder("latin1", jinja=b"\xff{{ messages }}"),
         r"cannot read '.*chat_template.jinja' \('utf-8' codec can't decode .*\); expected a UTF-8 Jinja chat"),
    ]  # fmt: skip
    for i, (tok, match) in enumerate(cases):
        r = _invoke("pack", str(chats), "--max-len", "64", "--tokenizer", tok, "--out", str(tmp_path / f"o{i}"))
        assert_one_line_error(r, match)
        assert not (tmp_path / f"o{i}").exists()
    r = _invoke("pack", str(texts), "--max-len", "64", "--tokenizer", cases[1][0], "--out", str(tmp_path / "text"))
    assert r.exit_code == 0, r.output


def test_a_chat_template_that_rejects_a_conversation_is_a_user_error(tmp_path: Path) -> None:
    strict = tmp_path / "strict"
    shutil.copytree(DEFAULT_TOKENIZER, strict)
    config = json.loads((strict / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    (strict / "tokenizer_config.json").write_text(json.dumps(config))
    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a"}]}]  # fmt: skip
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    r = _invoke("pack", str(src), "--max-len", "64", "--tokenizer", str(strict), "--out", str(tmp_path / "o"))
    assert_one_line_error(r, r"chat template of .* rejected a conversation: System role not supported")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--gpu", "H300"], r"Invalid value for '--gpu': 'H300' is not one of 'b200', "),
        (["--mfu", "2"], r"--mfu 2.0: expected a fraction in \(0, 1\]"),
        (["--model-params", "seven"], r"--model-params 'seven': expected a number > 0 like 7e9"),
        (["--model-params", "."], r"--model-params '.': expected a number > 0 like 7e9"),
        (["--model-params", "0"], r"--model-params '0': expected a number > 0 like 7e9"),
        (["--model-params", "1e400"], r"--model-params '1e400': expected a number > 0 like 7e9"),
        (["--epochs", "0"], r"--epochs 0.0: expected a finite number > 0"),
        (["--epochs", "inf"], r"--epochs inf: expected a finite number > 0"),
        (["--price-per-hour", "nan"], r"--price-per-hour nan: expected a finite number >= 0"),
    ],
)
def test_stats_user_errors(tmp_path: Path, args: list[str], match: str) -> None:
    assert_one_line_error(_invoke("stats", str(tmp_path), *args), match)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (b"[1, 2]", r"--model-config '[^']*model' is a JSON list; expected a Hugging Face config object"),
        (b"\xff{}", r"--model-config '[^']*model': cannot read a config.json \('utf-8' codec can't decode"),
        (b'{"hidden_size": "64", "num_hidden_layers": 2, "vocab_size": 100}',
         r"--model-config '[^']*model': hidden_size is '64'; expected a positive integer"),
        (b'{"hidden_size": null, "num_hidden_layers": 2, "vocab_size": 100}',
         r"--model-config '[^']*model' lacks 'hidden_size'"),
        (b'{"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100, "num_attention_heads": 0}',
         r"--model-config '[^']*model': num_attention_heads is 0; expected a positive integer"),
    ],
    ids=["list", "not-utf8", "string-size", "null-size", "zero-heads"],
)  # fmt: skip
def test_a_model_config_that_cannot_be_counted_is_one_line(
    alpaca_file: Path, tmp_path: Path, config: bytes, match: str
) -> None:
    out = tmp_path / "o"
    assert _invoke("pack", str(alpaca_file), "--max-len", "64", "--out", str(out), "--no-progress").exit_code == 0
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_bytes(config)
    assert_one_line_error(_invoke("stats", str(out), "--model-config", str(tmp_path / "model")), match)


def test_show_and_verify_exit_codes(alpaca_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert _invoke("pack", str(alpaca_file), "--max-len", "64", "--out", str(out), "--no-progress").exit_code == 0
    assert_one_line_error(_invoke("show", str(out), "--pack", "999"), r"--pack 999 out of range")
    assert_one_line_error(_invoke("show", str(tmp_path / "nope")), r"is not a folder")
    assert_one_line_error(_invoke("verify"), r"Missing argument 'SHARD_SET'")
    assert_one_line_error(_invoke("verify", str(tmp_path / "nope")), r"is not a folder")  # a missing path: exit 2
    # A shard set that fails verification is a result, not a usage error: exit status 1, said in the help.
    assert "1 when it fails verification" in " ".join(_invoke("verify", "--help").output.split())
    shard = out / "shard-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:-10])
    r = _invoke("verify", str(out))
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


def test_configs_reject_values_outside_their_types() -> None:
    with pytest.raises(PrepError, match=r"train_on='some' \(--train-on\): expected one of 'completion', 'all'"):
        PackConfig(datasets=("x",), max_len=64, train_on="some")
    with pytest.raises(PrepError, match=r"format='csv' \(--format\): expected one of 'text', .* or None"):
        PackConfig(datasets=("x",), max_len=64, format="csv")
    with pytest.raises(PrepError, match=r"max_len='64' \(--max-len\): expected an int"):
        PackConfig(datasets=("x",), max_len="64")
    with pytest.raises(PrepError, match=r"datasets='x.jsonl': expected a tuple of strings"):
        PackConfig(datasets="x.jsonl", max_len=64)
    with pytest.raises(PrepError, match=r"no DATASET given"):
        PackConfig(datasets=(), max_len=64)
    with pytest.raises(PrepError, match=r"gpu='h300' \(--gpu\): expected one of 'B200', 'H200', 'H100'"):
        CostConfig(gpu="h300")
    assert CostConfig(gpu="h200").gpu == "H200"
    with pytest.raises(PrepError, match=r"mfu='0.5' \(--mfu\): expected a number"):
        CostConfig(mfu="0.5")
    assert [parse_param_count(t) for t in ("7e9", "1E9", "1.5B", ".5b", "500M")] == [7e9, 1e9, 1.5e9, 5e8, 5e8]


def test_installed_command_prints_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [PREP, "pack", "demo:alpaca", "--max-len", "8", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert_one_line_error_in_process(proc, r"^error: --max-len 8 is below 16")
    proc = subprocess.run([PREP, "stats", str(tmp_path), "--gpu", "H300"], capture_output=True, text=True, timeout=120)
    assert_one_line_error_in_process(proc, r"^error: Invalid value for '--gpu': 'H300' .*\(see prep stats --help\)$")
