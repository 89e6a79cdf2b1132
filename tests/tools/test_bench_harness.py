"""The benchmark harness: results rows, timers, the environment record and the table printer."""

from __future__ import annotations

import argparse
import json
import re
import time

import pytest
import torch


def test_append_rows_appends_valid_rows_with_the_environment(harness, tmp_path) -> None:
    path = tmp_path / "results" / "kernels.jsonl"
    assert harness.append_rows("kernels", [{"op": "rope", "ms": 1.5}], path) == path
    harness.append_rows("kernels", [{"op": "swiglu", "ms": 2.0}, {"op": "geglu", "ms": None}], path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["op"] for r in rows] == ["rope", "swiglu", "geglu"]  # appended, the first row kept
    for row in rows:
        assert set(harness.REQUIRED_KEYS) <= set(row)
        assert row["area"] == "kernels"
        assert row["versions"]["torch"] == torch.__version__
        assert isinstance(row["command"], str) and row["command"]
    assert rows[0]["ms"] == 1.5 and rows[2]["ms"] is None


def test_append_rows_refuses_unknown_areas_and_clashing_keys(harness, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"area='kernel': expected one of \('prep', 'kernels'"):
        harness.append_rows("kernel", [{"x": 1}], tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match=r"row keys \['gpu'\] would overwrite"):
        harness.append_rows("train", [{"gpu": "mine"}], tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def test_record_follows_the_options(harness, tmp_path) -> None:
    path = tmp_path / "prep.jsonl"
    options = lambda **kw: argparse.Namespace(**{"results": None, "no_record": False, **kw})
    harness.record(options(results=str(path), no_record=True), "prep", [{"x": 1}])
    harness.record(options(), "prep", [{"x": 1}], smoke=True)  # a smoke run writes only to an explicit file
    assert not path.exists()
    harness.record(options(results=str(path)), "prep", [{"x": 1}], smoke=True)
    assert len(path.read_text().splitlines()) == 1


def test_time_ms_measures_wall_clock_on_the_cpu(harness) -> None:
    calls = []
    ms = harness.time_ms(lambda: (calls.append(1), time.sleep(0.005)), warmup=2, repeats=5, cuda=False)
    assert len(calls) == 7
    assert 4.5 <= ms < 200
    with pytest.raises(ValueError, match="repeats=0 must be >= 1"):
        harness.time_ms(lambda: None, repeats=0, cuda=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback")
def test_time_graph_ms_falls_back_to_wall_clock_per_call(harness) -> None:
    ms = harness.time_graph_ms([lambda: time.sleep(0.002), lambda: time.sleep(0.004)])
    assert 2.5 <= ms < 100
    assert harness.input_sets(10**9) == 1


def test_environment_has_every_key(harness, monkeypatch) -> None:
    monkeypatch.delenv("PADLESS_COMMIT", raising=False)
    env = harness.environment()
    assert set(harness.REQUIRED_KEYS) - {"area"} <= set(env)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", env["date"])
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", env["commit"])  # the tests run in a git checkout
    assert env["versions"]["torch"] == torch.__version__ and "transformers" in env["versions"]
    assert env["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")


def test_format_table_aligns_formats_and_marks_missing_values(harness) -> None:
    rows = [{"name": "padless", "ms": 1.23456, "stages": {"pack": 0.5}}, {"name": "eager", "ms": None}]
    cols = [("name", "impl", "s"), ("ms", "ms", ".2f"), ("stages.pack", "pack s", ".1f"), ("ms", "x", lambda v: "!")]
    lines = harness.format_table(rows, cols, title="T").splitlines()
    assert lines[0] == "T"
    assert lines[1].split() == ["impl", "ms", "pack", "s", "x"]
    assert lines[3].split() == ["padless", "1.23", "0.5", "!"]
    assert lines[4].split() == ["eager", "-", "-", "-"]
    assert len({len(line) for line in lines[1:]}) == 1  # every row as wide as the header


def test_model_shapes_hold_the_shards_vocabulary(harness) -> None:
    family, shape = harness.model_shape("llama3-8b", 151_646)  # a Qwen tokenizer on Llama-3's shape
    assert family == "llama" and shape["vocab_size"] == 151_680 and shape["hidden_size"] == 4096
    assert harness.model_shape("qwen3-8b", 151_646)[1]["vocab_size"] == 151_936
    assert "vocab_size" not in harness.model_shape("tiny", 3072)[1]  # the tiny model takes the shards' own


def test_an_explicit_commit_names_the_code_that_ran(harness, monkeypatch) -> None:
    """A wheel installed into a copied checkout: the copy's .git is not the code's commit."""
    monkeypatch.setenv("PADLESS_COMMIT", "0123abc")
    assert harness.environment()["commit"] == "0123abc"
