"""DATASET arguments: the PATH_OR_ID[:SUBSET][@SPLIT] syntax, Hub-style folders (a non-train split by name, subsets
from README configs), save_to_disk splits, files streamed in chunks, and the Hub path through ``datasets``
(``datasets.load_dataset`` replaced by a local stand-in: the tests never reach the Hub)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from padless.prep import load
from padless.prep.errors import PrepError
from padless.prep.load import DatasetSpec, load_rows, open_source, parse_spec
from padless.prep.pipeline import PackConfig, run_pack
from padless.shards.reader import open_shards

from .rows import text_rows, write_jsonl

datasets = pytest.importorskip("datasets")


def _parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def hub_folder(tmp_path: Path) -> Path:
    """A Hub dataset repository's layout: data/{train,test}-*.parquet."""
    folder = tmp_path / "org_ds"
    _parquet(folder / "data" / "train-00000-of-00002.parquet", [{"text": f"train {i}"} for i in range(5)])
    _parquet(folder / "data" / "train-00001-of-00002.parquet", [{"text": f"train {i}"} for i in range(5, 8)])
    _parquet(folder / "data" / "test-00000-of-00001.parquet", [{"text": f"test {i}"} for i in range(3)])
    return folder


@pytest.fixture
def configs_folder(tmp_path: Path) -> Path:
    """Subsets declared in README.md (`configs:`), each with its own splits, as Hub repositories declare them."""
    folder = tmp_path / "multi"
    for subset in ("easy", "hard"):
        (folder / subset).mkdir(parents=True)
        for split in ("train", "validation"):
            write_jsonl(folder / subset / f"{split}.jsonl", [{"text": f"{subset} {split} {i}"} for i in range(4)])
    configs = "".join(
        f"- config_name: {s}\n  data_files:\n  - split: train\n    path: {s}/train.jsonl\n"
        f"  - split: validation\n    path: {s}/validation.jsonl\n"
        for s in ("easy", "hard")
    )
    (folder / "README.md").write_text(f"---\nconfigs:\n{configs}---\n# A dataset\n")
    return folder


def test_the_syntax(tmp_path: Path, hub_folder: Path) -> None:
    odd = tmp_path / "data@v2:x.jsonl"
    write_jsonl(odd, text_rows(2))
    assert parse_spec(str(odd)) == DatasetSpec(str(odd), path=odd), "an existing path is always a path"
    assert parse_spec(f"{hub_folder}@test") == DatasetSpec(f"{hub_folder}@test", path=hub_folder, split="test")
    assert parse_spec(f"{hub_folder}:default@test").subset == "default"
    assert parse_spec("org/name:sub@validation") == DatasetSpec(
        "org/name:sub@validation", hub_id="org/name", subset="sub", split="validation"
    )
    assert parse_spec("org/name@test.v2").split == "test.v2" and parse_spec("org/name").split is None
    with pytest.raises(PrepError, match=r"dataset 'nope/x/y@test' not found: .* PATH_OR_ID\[:SUBSET\]\[@SPLIT\]"):
        parse_spec("nope/x/y@test")
    with pytest.raises(PrepError, match=r"unknown demo dataset 'demo:nope@train'; expected one of"):
        parse_spec("demo:nope@train")


def test_a_hub_id_may_hold_dots(tmp_path: Path, monkeypatch) -> None:
    """Hub names such as teknium/OpenHermes-2.5 are ids; a missing path ending in a data suffix stays a path."""
    monkeypatch.chdir(tmp_path)
    assert parse_spec("teknium/OpenHermes-2.5:default@train") == DatasetSpec(
        "teknium/OpenHermes-2.5:default@train", hub_id="teknium/OpenHermes-2.5", subset="default", split="train"
    )
    assert parse_spec("org/data.v2").hub_id == "org/data.v2"
    for path in ("data/train.jsonl", "data/train.JSONL.gz", "data/notes.txt", "./org/name", "org/name/x"):
        with pytest.raises(PrepError, match=r"not found: no such file or folder \(and it is not a hub id"):
            parse_spec(path)


def test_a_hub_style_folder_is_split_as_datasets_splits_it(hub_folder: Path) -> None:
    assert [r["text"] for r in load_rows(str(hub_folder))] == [f"train {i}" for i in range(8)]
    assert [r["text"] for r in load_rows(f"{hub_folder}@test")] == ["test 0", "test 1", "test 2"]
    with pytest.raises(PrepError, match=r"has no split 'validation'; its splits: train, test \(name one as "):
        load_rows(f"{hub_folder}@validation")
    # Only a test split: nothing is taken silently, the error names the splits.
    only_test = hub_folder.parent / "only_test"
    _parquet(only_test / "data" / "test-00000-of-00001.parquet", [{"text": "t"}])
    with pytest.raises(PrepError, match=r"has no split 'train'; its splits: test \(name one as .*only_test@SPLIT\)"):
        load_rows(str(only_test))


def test_a_folder_of_mixed_file_types_loses_no_file(tmp_path: Path) -> None:
    """`datasets` reads only the most common file type of a folder without README configs: a folder of a.jsonl,
    b.parquet and c.csv is refused, naming what would be left out, unless a README lists the files it means."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", text_rows(3))
    _parquet(folder / "b.parquet", text_rows(4, seed=1))
    (folder / "c.csv").write_text("text\nhello\n")
    with pytest.raises(PrepError, match=r"^folder '.*mixed' mixes data file types in its 'train' split: `datasets` "
                                        r"reads only its .parquet files and would leave out 2 file\(s\) \(a.jsonl, "
                                        r"c.csv\); give the files"):  # fmt: skip
        load_rows(str(folder))
    entry = "- config_name: default\n  data_files:\n  - split: train\n    path: b.parquet\n"
    (folder / "README.md").write_text(f"---\nconfigs:\n{entry}---\n")
    assert load_rows(str(folder)) == text_rows(4, seed=1)


def test_subsets_come_from_the_readme_configs(configs_folder: Path) -> None:
    assert [r["text"] for r in load_rows(f"{configs_folder}:hard@validation")][:2] == [
        "hard validation 0", "hard validation 1"]  # fmt: skip
    assert load_rows(f"{configs_folder}:easy")[0]["text"] == "easy train 0"
    with pytest.raises(PrepError, match=r"cannot open dataset '.*:medium' with `datasets`: .*'medium' not found"):
        load_rows(f"{configs_folder}:medium")
    # No subset named: the error lists them in padless's syntax, not datasets' Python advice.
    with pytest.raises(PrepError, match=r"'.*multi@validation' has several subsets: easy, hard; name one as "
                                        r".*multi:SUBSET@validation$"):  # fmt: skip
        load_rows(f"{configs_folder}@validation")


def test_reader_options_of_the_readme_configs_apply(tmp_path: Path) -> None:
    """A subset whose README entry sets how its files are read (a CSV `sep`, a JSON `field`, Parquet `columns`) gives
    the rows datasets gives, never the file read with default options."""
    for name, option, rows in [
        ("semi.csv", "sep: ';'", [{"instruction": "hi", "output": "there"}]),
        ("wrapped.json", "field: data", [{"text": "a"}, {"text": "b"}]),
        ("wide.parquet", "columns: [text]", [{"text": "c"}]),
    ]:
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        if name.endswith(".csv"):
            (folder / name).write_text("instruction;output\nhi;there\n")
        elif name.endswith(".json"):
            (folder / name).write_text(json.dumps({"version": 2, "data": rows}))
        else:
            _parquet(folder / name, [{"text": "c", "junk": 1}])
        entry = f"- config_name: default\n  {option}\n  data_files:\n  - split: train\n    path: {name}\n"
        (folder / "README.md").write_text(f"---\nconfigs:\n{entry}---\n")
        assert load_rows(str(folder)) == rows, name


def test_save_to_disk_splits(tmp_path: Path) -> None:
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(text_rows(3)),
                               "validation": datasets.Dataset.from_list([{"text": "v"}])})  # fmt: skip
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_rows(str(tmp_path / "dd")) == text_rows(3)
    assert load_rows(f"{tmp_path / 'dd'}@validation") == [{"text": "v"}]
    with pytest.raises(PrepError, match=r"the saved DatasetDict has no split 'test'; its splits: \['train', 'valid"):
        load_rows(f"{tmp_path / 'dd'}@test")
    with pytest.raises(PrepError, match=r"a single file has no subsets or splits"):
        load_rows(f"{write_jsonl(tmp_path / 'a.jsonl', text_rows(2))}@train")


def test_other_file_types_stream_through_datasets(tmp_path: Path) -> None:
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "train.txt").write_text("first line\nsecond line\n")
    (folder / "validation.txt").write_text("held out\n")
    src = open_source(f"{folder}@validation")
    assert src.fingerprint is None, "a streamed source is fingerprinted by what it yields"
    assert [r for c in src.chunks() for r in c] == [{"text": "held out"}]
    assert len(src.fingerprint) == 64 and src.fingerprint != open_source(str(folder)).fingerprint
    # One dataset, however its default split is spelled, has one fingerprint.
    default, train = open_source(str(folder)), open_source(f"{folder}@train")
    assert [list(s.chunks()) for s in (default, train)] and default.fingerprint == train.fingerprint


def test_every_reader_streams_in_chunks(tmp_path: Path) -> None:
    rows = text_rows(23)
    table = pa.Table.from_pylist(rows)
    paths = [write_jsonl(tmp_path / "a.jsonl", rows), write_jsonl(tmp_path / "a.jsonl.gz", rows, gz=True),
             _parquet(tmp_path / "a.parquet", rows), tmp_path / "a.arrow", tmp_path / "s.arrow", tmp_path / "a.csv",
             tmp_path / "a.json"]  # fmt: skip
    with pa.ipc.new_file(str(paths[3]), table.schema) as w:
        w.write_table(table, max_chunksize=10)
    with pa.ipc.new_stream(str(paths[4]), table.schema) as w:
        w.write_table(table, max_chunksize=10)
    with open(paths[5], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text"])
        writer.writeheader()
        writer.writerows(rows)
    paths[6].write_text(json.dumps(rows))
    for p in paths:
        chunks = list(open_source(str(p), chunk_rows=7).chunks())
        assert [r for c in chunks for r in c] == rows, p.name
        assert max(len(c) for c in chunks) <= 7 and len(chunks) >= 4, (p.name, [len(c) for c in chunks])


def test_a_hub_id_streams_its_split_through_datasets(tmp_path: Path, hub_folder: Path, monkeypatch) -> None:
    """owner/name:subset@split reaches datasets.load_dataset(owner/name, subset, split=..., streaming=True)."""
    calls, real = [], datasets.load_dataset

    def load_dataset(name, subset=None, *, split, streaming):
        calls.append((name, subset, split, streaming))
        return real(str(hub_folder), split=split, streaming=True)

    monkeypatch.setattr(load, "_online", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    summary = run_pack(PackConfig(datasets=("someone/rows:default@test",), max_len=64, out=str(tmp_path / "o"),
                                  progress=False))  # fmt: skip
    assert calls == [("someone/rows", "default", "test", True)]
    manifest = open_shards(tmp_path / "o").manifest
    assert manifest["source"]["inputs"] == ["someone/rows:default@test"] and summary["train"]["rows"] == 3
    rows = run_pack(PackConfig(datasets=("someone/rows",), max_len=64, out=str(tmp_path / "t"), progress=False))
    assert calls[-1] == ("someone/rows", None, "train", True) and rows["train"]["rows"] == 8
    assert rows["fingerprint"] != summary["fingerprint"]


def test_pack_a_non_train_split_of_a_hub_style_folder(tmp_path: Path, hub_folder: Path) -> None:
    out = tmp_path / "o"
    summary = run_pack(PackConfig(datasets=(f"{hub_folder}@test",), max_len=64, out=str(out), progress=False))
    assert summary["train"]["rows"] == 3
    ss = open_shards(out)
    assert ss.manifest["source"]["inputs"] == [f"{hub_folder}@test"]
    train = run_pack(PackConfig(datasets=(str(hub_folder),), max_len=64, out=str(tmp_path / "t"), progress=False))
    assert train["train"]["rows"] == 8 and train["fingerprint"] != summary["fingerprint"]


def test_a_dataset_script_folder(tmp_path: Path, hub_folder: Path, monkeypatch) -> None:
    """A folder with a loading script: one error where datasets no longer runs scripts; streamed through datasets
    where it does (its builder names no data files)."""
    folder = tmp_path / "scripted"
    folder.mkdir()
    (folder / "scripted.py").write_text("import datasets\n")
    if int(datasets.__version__.split(".")[0]) >= 4:
        with pytest.raises(PrepError, match=r"cannot open dataset '.*scripted' with `datasets`: .*script"):
            load_rows(str(folder))

    class Builder:
        class config:  # the attribute datasets builders have
            data_files = None

    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda path, subset: Builder())
    monkeypatch.setattr(datasets, "load_dataset", lambda name, subset, *, split, streaming: real(
        str(hub_folder), split=split, streaming=streaming))  # fmt: skip
    assert [r["text"] for r in load_rows(f"{folder}@test")] == ["test 0", "test 1", "test 2"]
