"""Streaming: rows are read a chunk at a time and tokenized before the next chunks are read (bounded memory), the
output does not depend on chunk size, tokenizer processes, write groups or how the spill is read back, and the
spill never outlives the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from padless.prep import load, stream
from padless.prep.errors import PrepError
from padless.prep.pipeline import PackConfig, run_pack

from .rows import alpaca_rows, write_jsonl


def _events(monkeypatch) -> list[str]:
    """Record 'read' for every chunk a file reader yields and 'spill' for every chunk appended to the spill."""
    events: list[str] = []
    file_chunks, append = load._file_chunks, stream.Spill.append

    def chunks(path, n):
        for c in file_chunks(path, n):
            events.append("read")
            yield c

    def spill(self, tokens, mask):
        events.append("spill")
        append(self, tokens, mask)

    monkeypatch.setattr(load, "_file_chunks", chunks)
    monkeypatch.setattr(stream.Spill, "append", spill)
    return events


@pytest.mark.parametrize("num_proc", [1, 2])
def test_rows_stream_a_bounded_number_of_chunks_at_a_time(tmp_path: Path, monkeypatch, num_proc: int) -> None:
    monkeypatch.setattr(load, "CHUNK_ROWS", 8)
    events = _events(monkeypatch)
    src = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(200))
    run_pack(PackConfig(datasets=(str(src),), max_len=128, out=str(tmp_path / "o"), num_proc=num_proc, progress=False))
    assert events.count("read") == events.count("spill") == 25
    ahead = max(events[: i + 1].count("read") - events[:i].count("spill") for i in range(len(events)))
    assert ahead <= 1 + 2 * num_proc, f"{ahead} chunks read ahead of the tokenizer"


def _shards(out: Path) -> list[str]:
    return [s["sha256"] for s in json.loads((out / "manifest.json").read_text())["shards"]]


def test_the_output_is_the_same_however_it_streams(tmp_path: Path, monkeypatch) -> None:
    src = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(300, 2, hi=90))
    kw = {"max_len": 64, "overlong": "split", "eval_examples": 20, "tokens_per_batch": 256, "progress": False}
    base = run_pack(PackConfig(datasets=(str(src),), out=str(tmp_path / "base"), **kw))
    monkeypatch.setattr(load, "CHUNK_ROWS", 7)
    monkeypatch.setattr(stream, "GROUP_TOKENS", 100)  # many add_packs calls
    monkeypatch.setattr(stream, "IN_MEMORY_BYTES", 0)  # the spill read back example by example
    other = run_pack(PackConfig(datasets=(str(src),), out=str(tmp_path / "other"), num_proc=2, **kw))
    assert other["fingerprint"] == base["fingerprint"] and other["train"] == base["train"]
    assert len(_shards(tmp_path / "base")) == 1 and base["train"]["split"] > 0
    for sub in ("", "eval"):
        assert _shards(tmp_path / "base" / sub) == _shards(tmp_path / "other" / sub), sub


def test_the_spill_never_outlives_the_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(load, "CHUNK_ROWS", 16)
    rows = alpaca_rows(100)
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    run_pack(PackConfig(datasets=(str(src),), max_len=64, out=str(tmp_path / "o"), progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "o"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["config.yaml", "manifest.json", "shard-00000.arrow"]
    # A bad row in a late chunk fails after earlier chunks were spilled: the staging folder goes with the spill.
    bad = write_jsonl(tmp_path / "b.jsonl", [*rows, {"instruction": "x"}])
    with pytest.raises(PrepError, match=r"^row 100: `output` is missing"):
        run_pack(PackConfig(datasets=(str(bad),), max_len=64, out=str(tmp_path / "p"), progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "o"]


def test_a_dataset_named_twice_is_refused(tmp_path: Path, monkeypatch) -> None:
    """Two copies of one dataset's rows could land on both sides of the held-out split."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10))
    write_jsonl(tmp_path / "b.jsonl", alpaca_rows(10, seed=1))
    for kw, match in [
        ({"datasets": ("a.jsonl", "b.jsonl", "a.jsonl")}, r"^'a.jsonl' is given twice; give each dataset once"),
        ({"datasets": ("a.jsonl", "./a.jsonl")}, r"^'a.jsonl' and './a.jsonl' are one dataset; give each dataset once"),
        ({"mix": ("a.jsonl=0.5,./a.jsonl=0.5",)}, r"^'a.jsonl' and './a.jsonl' are one dataset; .* use --mix"),
    ]:
        with pytest.raises(PrepError, match=match):
            run_pack(PackConfig(max_len=64, out="out", eval_examples=3, progress=False, **kw))
        assert not (tmp_path / "out").exists()
    assert run_pack(PackConfig(datasets=("a.jsonl", "b.jsonl"), max_len=64, out="out", progress=False))


def test_a_dataset_spelled_two_ways_is_refused(tmp_path: Path, monkeypatch) -> None:
    """A saved DatasetDict and its default split, a Hub-style folder and its train split, a folder and a file in it:
    each pair reads the same rows."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(alpaca_rows(6)),
                          "test": datasets.Dataset.from_list(alpaca_rows(3, seed=1))}).save_to_disk("dd")  # fmt: skip
    (tmp_path / "hub" / "data").mkdir(parents=True)
    write_jsonl(tmp_path / "hub" / "data" / "train-0.jsonl", alpaca_rows(6, seed=2))
    write_jsonl(tmp_path / "hub" / "data" / "train-1.jsonl", alpaca_rows(6, seed=3))
    for specs, match in [
        (("dd", "dd@train"), r"^'dd' and 'dd@train' are one dataset; give each dataset once"),
        (("hub@train", "hub"), r"^'hub@train' and 'hub' are one dataset"),
        (("hub", "hub/data/train-1.jsonl"), r"^'hub' and 'hub/data/train-1.jsonl' both read '.*train-1.jsonl'"),
    ]:
        with pytest.raises(PrepError, match=match):
            run_pack(PackConfig(datasets=specs, max_len=64, out="out", progress=False))
        assert not (tmp_path / "out").exists()
    assert run_pack(PackConfig(datasets=("dd", "dd@test", "hub"), max_len=64, out="out", progress=False))
