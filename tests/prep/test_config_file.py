"""``prep pack --config``: a shard set keeps its resolved settings in ``config.yaml``, and packing again from that
file alone (into another folder) writes the same shards, byte for byte."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from padless.prep import output
from padless.prep.cli import main
from padless.prep.config import PackConfig
from padless.prep.tokenizer import DEFAULT_TOKENIZER
from padless.shards.config_file import read_config_file, write_config_file
from padless.shards.verify import verify_with_eval
from tests.user_errors import assert_one_line_error

from .rows import alpaca_rows, chat_rows, write_jsonl

# Settings that differ from the defaults in every way that changes the shards.
FLAGS = ["--max-len", "80", "--seed", "5", "--overlong", "split", "--train-on", "all", "--eval-examples", "7",
         "--max-examples-per-pack", "3", "--prompt-separator", "\n### Response:\n", "--no-progress"]  # fmt: skip


def _pack(*args: str):
    r = CliRunner().invoke(main, ["pack", *args])
    assert r.exit_code == 0, r.output
    return r


def _set_bytes(folder: Path) -> dict[str, bytes]:
    """Every shard file of the set and of its eval/ set, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("shard-*.arrow"))}


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.fixture
def packed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``prep pack data.jsonl *FLAGS --out a`` run twice from ``tmp_path`` (the second time with --overwrite)."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", alpaca_rows(150, 3, hi=40))
    _pack("data.jsonl", *FLAGS, "--out", "a", "--seed", "4")
    _pack("data.jsonl", *FLAGS, "--out", "a", "--overwrite")  # a set holding config.yaml is still a shard set
    return tmp_path


def test_the_saved_config_is_every_resolved_setting(packed: Path) -> None:
    text = (packed / "a" / "config.yaml").read_text()
    assert "prep pack --config a/config.yaml --out NEW_FOLDER" in text
    saved = yaml.safe_load(text)
    assert saved["datasets"] == ["data.jsonl"] and saved["out"] == "a"  # as given: relative stays relative
    assert (saved["max_len"], saved["seed"], saved["overlong"], saved["eval_examples"]) == (80, 5, "split", 7)
    assert saved["prompt_separator"] == "\n### Response:\n" and saved["progress"] is False
    assert saved["overwrite"] is False  # a replay replaces a folder only when asked
    assert not (packed / "a" / "eval" / "config.yaml").exists()
    verify_with_eval(packed / "a")  # the reader and verify ignore it


def test_packing_again_from_the_saved_config_writes_the_same_shards(packed: Path) -> None:
    _pack("--config", "a/config.yaml", "--out", "b")
    a, b = packed / "a", packed / "b"
    for sub in ("", "eval"):
        assert _manifest(a / sub)["fingerprint"] == _manifest(b / sub)["fingerprint"]
        assert _manifest(a / sub)["shards"] == _manifest(b / sub)["shards"]
    assert _set_bytes(a) == _set_bytes(b) and "eval/shard-00000.arrow" in _set_bytes(a)
    assert _manifest(b)["options"]["seed"] == 5 and _manifest(b)["options"]["overlong"] == "split"
    # The replay's own config differs only in where it wrote.
    assert (b / "config.yaml").read_text() == (a / "config.yaml").read_text().replace("a/", "b/").replace(
        "out: a\n", "out: b\n"
    )


def test_an_option_given_with_the_config_wins(packed: Path) -> None:
    _pack("--config", "a/config.yaml", "--out", "c", "--seed", "6", "--overlong", "truncate")
    options = _manifest(packed / "c")["options"]
    assert (options["seed"], options["overlong"], options["max_len"]) == (6, "truncate", 80)
    assert _manifest(packed / "c")["fingerprint"] != _manifest(packed / "a")["fingerprint"]


def test_a_replay_into_the_same_folder_needs_overwrite(packed: Path) -> None:
    r = CliRunner().invoke(main, ["pack", "--config", "a/config.yaml"])
    assert_one_line_error(r, r"--out 'a' already exists and is not empty; choose another folder or pass --overwrite")


@pytest.mark.parametrize(
    ("spoil", "allowed"),
    [
        (lambda s: None, True),
        (lambda s: (s / "config.yaml").unlink(), True),  # a set written before config.yaml was kept
        (lambda s: (s / "eval" / "config.yaml").write_text("x: 1\n"), False),
        (lambda s: (s / "config.yaml").unlink() or (s / "config.yaml").mkdir(), False),
        (lambda s: (s / "config.yaml").unlink() or (s / "config.yaml").symlink_to(s / "manifest.json"), False),
    ],
    ids=["as-written", "without", "in-eval", "a-folder", "a-symlink"],
)
def test_a_shard_set_may_hold_its_config_yaml_and_nothing_else(packed: Path, spoil, allowed: bool) -> None:
    spoil(packed / "a")
    assert (output.not_a_shard_set(packed / "a") is None) == allowed


def test_prep_stats_takes_a_config_file_too(packed: Path) -> None:
    (packed / "cost.yaml").write_text("gpu: h200\nmodel-params: 7e9\nepochs: 2\n")
    cost = json.loads(_stats("a", "--config", "cost.yaml").output)["cost"]
    assert (cost["gpu"], cost["params"], cost["epochs"]) == ("H200", 7e9, 2.0)
    cost = json.loads(_stats("a", "--config", "cost.yaml", "--gpu", "a100").output)["cost"]
    assert (cost["gpu"], cost["params"]) == ("A100", 7e9)


def _stats(*args: str):
    r = CliRunner().invoke(main, ["stats", *args, "--json"])
    assert r.exit_code == 0, r.output
    return r


# Every PackConfig field away from its default, values YAML would read otherwise when plain (a date, a bool, a
# number, JSON, a colon, a line break), once with DATASETS and once with --mix (each pair of fields that cannot be
# given together split between the two).
ALL_SET = {"max_len": 77, "out": "out: 1", "tokenizer": "org/tok", "format": "chat",
           "maps": ("messages=conv", "off"), "chat_template_kwargs": ("enable_thinking=false", '{"a": [1, "x"]}'),
           "template_date": "2026-01-31", "train_on": "all", "overlong": "split", "max_examples_per_pack": 3,
           "seed": 9, "eval_fraction": 0.25, "num_proc": 2, "overwrite": True, "skip_bad_rows": True,
           "prompt_separator": "\n### Response:\n", "progress": False, "zstd_level": 7, "tokens_per_batch": 1000,
           "extra": {"note": "yes", "n": [1, 2]}}  # fmt: skip
WITH_DATASETS = PackConfig(datasets=("org/ds:sub@validation", "2024-01-01", "a b.jsonl"), **ALL_SET)
WITH_MIX = PackConfig(mix=("org/ds:sub@validation=0.7,c.jsonl=0.3", "null=1"),
                      **{**ALL_SET, "mix_examples": 50, "eval_fraction": 0.0, "eval_examples": 5})  # fmt: skip


def test_every_pack_setting_reads_back_from_a_written_config(tmp_path: Path) -> None:
    """Every field differs from its default in one of the two configs, so a new field must be set above too."""
    defaults = PackConfig(datasets=("x",), max_len=16)
    for f in dataclasses.fields(PackConfig):
        default = getattr(defaults, f.name)
        assert getattr(WITH_DATASETS, f.name) != default or getattr(WITH_MIX, f.name) != default, f.name
    for cfg in (WITH_DATASETS, WITH_MIX):
        path = write_config_file(cfg, tmp_path / "config.yaml")
        assert PackConfig(**read_config_file(PackConfig, path)) == cfg


def test_a_mix_of_subsets_with_template_settings_replays_from_its_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--mix (a Hub-style folder's subset@split and a file), --mix-examples, --chat-template-kwargs and
    --template-date are saved in config.yaml, and the replay writes the same shards."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "multi"
    for subset in ("easy", "hard"):
        (folder / subset).mkdir(parents=True)
        for split in ("train", "validation"):
            write_jsonl(folder / subset / f"{split}.jsonl", chat_rows(30, seed=len(subset + split)))
    configs = "".join(
        f"- config_name: {s}\n  data_files:\n  - split: train\n    path: {s}/train.jsonl\n"
        f"  - split: validation\n    path: {s}/validation.jsonl\n"
        for s in ("easy", "hard")
    )
    (folder / "README.md").write_text(f"---\nconfigs:\n{configs}---\n# A dataset\n")
    write_jsonl(tmp_path / "c.jsonl", chat_rows(20, seed=7))
    shutil.copytree(DEFAULT_TOKENIZER, tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").write_text(
        (Path(__file__).parent / "data" / "rag_style.jinja").read_text()
    )
    _pack("--mix", "multi:hard@validation=0.7,c.jsonl=0.3", "--mix-examples", "40", "--tokenizer", "tok",
          "--chat-template-kwargs", "enable_thinking=false", "--template-date", "2026-01-31", "--max-len", "256",
          "--eval-examples", "4", "--no-progress", "--out", "a")  # fmt: skip
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["datasets"] == [] and saved["mix"] == ["multi:hard@validation=0.7,c.jsonl=0.3"]
    assert (saved["mix_examples"], saved["template_date"]) == (40, "2026-01-31")
    assert saved["chat_template_kwargs"] == ["enable_thinking=false"]
    _pack("--config", "a/config.yaml", "--out", "b")
    a, b = tmp_path / "a", tmp_path / "b"
    assert _manifest(a)["fingerprint"] == _manifest(b)["fingerprint"]
    assert _manifest(b)["source"]["mix"]["examples"] == 40
    assert _manifest(b)["options"]["chat_template_kwargs"] == {"enable_thinking": False}
    assert _set_bytes(a) == _set_bytes(b) and "eval/shard-00000.arrow" in _set_bytes(a)
