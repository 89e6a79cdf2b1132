"""Loaders for every supported input, and every bad input: a clear, pinned message and nothing written."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from padless.prep.errors import PrepError
from padless.prep.load import load_rows
from padless.prep.pipeline import PackConfig, run_pack

from .rows import alpaca_rows, chat_rows, write_jsonl

ROWS = alpaca_rows(20, 1)


def test_every_local_format_loads_the_same_rows(tmp_path):
    paths = {
        "jsonl": write_jsonl(tmp_path / "a.jsonl", ROWS),
        "jsonl.gz": write_jsonl(tmp_path / "a.jsonl.gz", ROWS, gz=True),
        "json": tmp_path / "a.json",
        "parquet": tmp_path / "a.parquet",
        "csv": tmp_path / "a.csv",
        "arrow": tmp_path / "a.arrow",
    }
    paths["json"].write_text(json.dumps(ROWS, indent=1))
    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, paths["parquet"])
    with pa.ipc.new_file(str(paths["arrow"]), table.schema) as w:
        w.write_table(table)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
        w.writeheader()
        w.writerows(ROWS)
    for kind, p in paths.items():
        assert load_rows(str(p)) == ROWS, kind
    # A folder of files (no split in their names: all are the train split), concatenated in name order.
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "1.jsonl", ROWS[:5])
    write_jsonl(tmp_path / "dir" / "2.jsonl", ROWS[5:])
    assert load_rows(str(tmp_path / "dir")) == ROWS


def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path):
    """UTF-8 files that start with a BOM (Excel's "CSV UTF-8", Notepad) load the same rows as without one."""
    bom = b"\xef\xbb\xbf"
    paths = {
        "jsonl": write_jsonl(tmp_path / "a.jsonl", ROWS),
        "jsonl.gz": write_jsonl(tmp_path / "a.jsonl.gz", ROWS, gz=True),
        "json": tmp_path / "a.json",
        "csv": tmp_path / "a.csv",
    }
    paths["json"].write_text(json.dumps(ROWS))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
        w.writeheader()
        w.writerows(ROWS)
    for kind, p in paths.items():
        if kind.endswith(".gz"):
            p.write_bytes(gzip.compress(bom + gzip.decompress(p.read_bytes())))
        else:
            p.write_bytes(bom + p.read_bytes())
        assert load_rows(str(p)) == ROWS, kind
    assert run(tmp_path, [paths["csv"]])["train"]["rows"] == len(ROWS)


def test_suffixes_match_in_any_letter_case(tmp_path):
    """Files named by Windows tools (``DATA.JSONL.GZ``, ``Data.Csv.Gz``) are read as their suffix says, gzip
    included."""
    paths = [write_jsonl(tmp_path / "DATA.JSONL", ROWS), write_jsonl(tmp_path / "DATA.JSONL.GZ", ROWS, gz=True)]
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
        w.writeheader()
        w.writerows(ROWS)
    paths.append(tmp_path / "Data.Csv.Gz")
    paths[-1].write_bytes(gzip.compress((tmp_path / "a.csv").read_bytes()))
    for p in paths:
        assert load_rows(str(p)) == ROWS, p.name


def test_a_named_pipe_is_refused_not_read_twice(tmp_path):
    """A FIFO named like a data file would be drained by the fingerprint and then block the row reader forever."""
    fifo = tmp_path / "live.jsonl"
    os.mkfifo(fifo)
    code = "from padless.prep.load import open_source; open_source(__import__('sys').argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=60)
    assert "PrepError: dataset '" in proc.stderr and "is not a regular file or folder" in proc.stderr, proc.stderr


def test_an_unreadable_file_is_named(tmp_path, monkeypatch):
    """A file without read permission (chmod 000, for anyone but root) or with an I/O error is one error naming it."""
    from padless.prep import load

    bad = write_jsonl(tmp_path / "locked.jsonl", ROWS)
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "ok.jsonl", ROWS)
    write_jsonl(tmp_path / "dir" / "locked.jsonl", ROWS)

    def no_access(path, *args, **kwargs):
        if Path(path).name == "locked.jsonl":
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(load, "open", no_access, raising=False)
    for dataset in (bad, tmp_path / "dir"):
        with pytest.raises(PrepError, match=r"^cannot read dataset file '.*locked.jsonl': Permission denied; expected"):
            load_rows(str(dataset))


def test_csv_fields_keep_their_line_ends(tmp_path):
    """A line end (CR LF, CR or LF) inside a quoted CSV field is kept as written, in a plain or gzipped file whose
    own lines end in CR LF."""
    rows = [{"text": "one\r\ntwo"}, {"text": "three\rfour"}, {"text": "five\nsix"}]
    plain, zipped = tmp_path / "a.csv", tmp_path / "a.csv.gz"
    with open(plain, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text"])  # lineterminator \r\n
        w.writeheader()
        w.writerows(rows)
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    assert load_rows(str(plain)) == rows
    assert load_rows(str(zipped)) == rows


def test_a_csv_header_may_end_in_empty_columns(tmp_path):
    """Spreadsheets write a header like ``text,,`` when cells past the data were formatted: the named columns load
    (empty names are no duplicate column)."""
    path = tmp_path / "a.csv"
    path.write_text("text,,\nhello,,\nworld,,\n")
    assert [r["text"] for r in load_rows(str(path))] == ["hello", "world"]


def test_a_csv_field_may_be_a_long_document(tmp_path):
    """A text field past csv's default limit (131,072 characters) is read whole."""
    rows = [{"text": "long " * 60_000}, {"text": "short"}]
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text"])
        w.writeheader()
        w.writerows(rows)
    assert load_rows(str(tmp_path / "a.csv")) == rows


def test_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert load_rows(str(tmp_path / "ds")) == ROWS
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    assert load_rows(str(tmp_path / "dd")) == ROWS


def run(tmp_path, datasets, **kw):
    kw.setdefault("max_len", 128)
    kw.setdefault("out", str(tmp_path / "out"))
    return run_pack(PackConfig(datasets=tuple(str(d) for d in datasets), progress=False, **kw))


def assert_nothing_written(tmp_path, before):
    after = {p.name for p in tmp_path.iterdir()}
    assert after == before, f"left behind: {after - before}"


def _bad_json(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    return [p], {}


def _bad_json_array(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n{"text": "ok"},\n{"text": "ok",}\n]')
    return [p], {}


def _json_object(tmp_path):
    p = tmp_path / "squad.json"
    p.write_text(json.dumps({"version": "1.1", "data": [{"text": "ok"}]}, indent=2))
    return [p], {}


def _unknown_format(tmp_path):
    return [write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}])], {}


def _empty(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    return [p], {}


def _missing(tmp_path):
    return [tmp_path / "nope.jsonl"], {}


def _short(tmp_path):
    return [write_jsonl(tmp_path / "a.jsonl", ROWS)], {"max_len": 8}


def _existing_out(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    return [write_jsonl(tmp_path / "a.jsonl", ROWS)], {}


def _bad_format_option(tmp_path):
    return [write_jsonl(tmp_path / "a.jsonl", ROWS)], {"format": "chat"}


def _offline_hub(tmp_path):
    return ["someone/some-dataset"], {}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_missing, r"dataset '.*nope.jsonl' not found: no such file or folder"),
        (_bad_json, r"malformed JSON in '.*bad.jsonl' at line 3, column 10"),
        (_bad_json_array, r"malformed JSON in '.*bad.json' at line 3"),
        (_json_object, r"'.*squad.json' holds one JSON object \(keys \['data', 'version'\]\), not rows; expected one "
                       r"JSON object per line \(JSONL\) or a JSON array of objects"),
        (_unknown_format, r"cannot detect the format of .*columns are \['answer', 'question'\]; known formats"),
        (_empty, r"dataset '.*empty.jsonl' is empty: no rows found"),
        (_short, r"--max-len 8 is below 16"),
        (_existing_out, r"--out '.*out' already exists and is not empty; .* --overwrite"),
        (_bad_format_option, r"--format chat needs columns \['messages'\] but .* lacks \['messages'\]"),
        (_offline_hub, r"'someone/some-dataset' is not a local file or folder, and the Hugging Face Hub cannot be "
                       r"reached \(offline\)"),
    ],
    ids=["missing", "bad-jsonl", "bad-json", "json-object", "unknown-format", "empty", "max-len", "existing-out",
         "format-cols", "offline"],
)  # fmt: skip
def test_bad_input_clear_error_and_nothing_written(tmp_path, monkeypatch, make, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets, kw = make(tmp_path)
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(PrepError, match=message):
        run(tmp_path, datasets, **kw)
    assert_nothing_written(tmp_path, before)
    if (tmp_path / "out").exists():
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_chat_without_template_is_refused(tmp_path, no_template_tokenizer):
    src = write_jsonl(tmp_path / "c.jsonl", chat_rows(5))
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(PrepError, match=r"tokenizer .* has no chat template, so chat data .* cannot be rendered"):
        run(tmp_path, [src], tokenizer=str(no_template_tokenizer))
    assert_nothing_written(tmp_path, before)


def test_overwrite_replaces(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", ROWS)
    run(tmp_path, [src])
    run(tmp_path, [src], overwrite=True, max_len=64)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["max_len"] == 64
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
