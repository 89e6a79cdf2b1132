"""Open the DATASET arguments of ``prep pack`` and stream their rows in chunks, never the whole dataset at once.

A dataset is named ``PATH_OR_ID[:SUBSET][@SPLIT]`` (:func:`parse_spec`):

- a local file: JSON (an array), JSONL, either gzipped, Parquet, CSV (optionally gzipped), Arrow IPC (file or
  stream); no subset or split;
- ``demo:alpaca`` / ``demo:chat``: the datasets shipped in ``prep/assets``;
- a ``datasets`` ``save_to_disk`` folder (read straight from its Arrow files): ``@SPLIT`` picks a split of a saved
  ``DatasetDict`` (default ``train``, else its first split);
- any other folder, laid out as a Hugging Face Hub dataset repository: ``datasets`` decides which files form each
  subset (the ``configs`` of its README.md) and split (``data/test-*.parquet``, ``validation.jsonl``, ...), exactly as
  ``datasets.load_dataset(folder, SUBSET, split=SPLIT)`` would; the default split is ``train`` (a split that mixes
  file types without README ``configs`` is refused: ``datasets`` would read only one type). Files of the types
  above are read by padless's own readers (each row exactly as stored: no schema is imposed on JSON); other types
  (``.txt``, ...), a subset whose README configuration sets reader options (a CSV ``sep``, a JSON ``field``, ...)
  and dataset scripts stream through ``datasets`` (scripts only where the installed ``datasets`` still runs them);
- a Hub id ``owner/name``, when the Hub can be reached: streamed through ``datasets`` (``streaming=True``), split
  ``train`` unless ``@SPLIT`` names another.

A path that exists as given is always a path (``data@v2.jsonl`` is the file of that name). Rows arrive in chunks of
at most ``CHUNK_ROWS`` (JSONL, CSV, Parquet and Arrow are read incrementally; a JSON array file is parsed whole, so
give larger-than-memory data as JSONL). Every source has a fingerprint: the sha256 of its files, or for a streamed
Hub dataset the sha256 of its rows' content, available once its rows have been read.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
import socket
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PrepError

__all__ = ["ASSETS", "CHUNK_ROWS", "DEMO_DATASETS", "DatasetSpec", "Source", "load_rows", "open_source",
           "parse_spec", "readable"]  # fmt: skip

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_DATASETS = {"demo:alpaca": ASSETS / "demo_alpaca.jsonl.gz", "demo:chat": ASSETS / "demo_chat.jsonl.gz"}
_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet", ".csv", ".csv.gz", ".arrow", ".feather")
CHUNK_ROWS = 4096  # rows per chunk: what is held as Python objects at once (per chunk in flight)
# Other files a folder may hold (read through datasets) or a mistyped path may name: never a Hub id.
_OTHER_FILE_SUFFIXES = (".txt", ".tsv", ".gz", ".zip", ".zst", ".xz", ".bz2", ".py")
_HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")  # owner/name as the Hub spells repository ids
_SPLIT = re.compile(r"\w+(?:[.-]\w+)*")  # split names as datasets allows them (train, validation, test.v2, ...)
_ONE_OBJECT_LIMIT = 64 << 20  # bytes of a file parsed whole to tell one JSON object from malformed JSONL
_CSV_FIELD_LIMIT = 2**31 - 1  # characters in one CSV field: the most csv.field_size_limit takes on every platform
_READ_ERRORS = (OSError, EOFError, UnicodeDecodeError, csv.Error, zlib.error)


@dataclass(frozen=True)
class DatasetSpec:
    """A DATASET argument: ``path`` (local) or ``hub_id``, and the subset and split it names (None: not named)."""

    text: str
    path: Path | None = None
    hub_id: str | None = None
    subset: str | None = None
    split: str | None = None


def _is_hub_id(text: str) -> bool:
    """Whether ``text`` reads as a Hub id ``owner/name`` rather than a missing local file.

    Hub names may hold dots (``teknium/OpenHermes-2.5``); a name ending in a data file's suffix (``org/x.jsonl``)
    is a path."""
    return bool(_HUB_ID.fullmatch(text)) and not text.lower().endswith(_SUFFIXES + _OTHER_FILE_SUFFIXES)


def parse_spec(text: str) -> DatasetSpec:
    """``PATH_OR_ID[:SUBSET][@SPLIT]`` -> :class:`DatasetSpec` (an existing path as given always wins)."""
    if text in DEMO_DATASETS:
        return DatasetSpec(text, path=DEMO_DATASETS[text])
    if text.startswith("demo:") and text.split("@")[0] not in DEMO_DATASETS:
        raise PrepError(f"unknown demo dataset {text!r}; expected one of {sorted(DEMO_DATASETS)}")
    whole = Path(text).expanduser()
    if whole.exists():
        return DatasetSpec(text, path=whole)
    base, split = text, None
    head, at, tail = text.rpartition("@")
    if at and head and _SPLIT.fullmatch(tail):
        base, split = head, tail
    subset = None
    head, colon, tail = base.rpartition(":")
    if colon and head and tail and "/" not in tail and base not in DEMO_DATASETS:
        base, subset = head, tail
    path = DEMO_DATASETS.get(base, Path(base).expanduser())
    if path.exists():
        return DatasetSpec(text, path=path, subset=subset, split=split)
    if _is_hub_id(base):
        return DatasetSpec(text, hub_id=base, subset=subset, split=split)
    raise PrepError(
        f"dataset {text!r} not found: no such file or folder (and it is not a hub id owner/name); the syntax is "
        "PATH_OR_ID[:SUBSET][@SPLIT]"
    )


@dataclass
class Source:
    """One opened input: its name as given, its row chunks (one pass), and a fingerprint of its content.

    ``fingerprint`` of a source hashed while it streams is set once :meth:`chunks` has been read to the end.
    ``reads``: what it reads, however it was spelled (to find one dataset given twice): its files' resolved paths, or
    for a dataset streamed through ``datasets`` its Hub id or folder, subset and split."""

    name: str
    _chunks: Iterator[list[dict[str, Any]]] = field(repr=False)
    fingerprint: str | None = None
    _hash: Any = field(default=None, repr=False)
    reads: tuple[str, ...] = ()

    def chunks(self) -> Iterator[list[dict[str, Any]]]:
        try:
            yield from self._chunks
        except _READ_ERRORS as e:
            raise PrepError(f"cannot read dataset {self.name!r}: {e}; expected a readable data file or folder") from e
        if self._hash is not None:
            self.fingerprint = self._hash.hexdigest()


def _sha256_files(files: list[Path]) -> str:
    """The sha256 of ``files`` (names and bytes): the first read of every input, so a file that cannot be read (no
    permission, an I/O error) is named here."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        try:
            with open(f, "rb") as fh:
                while block := fh.read(1 << 22):
                    h.update(block)
        except OSError as e:
            raise PrepError(f"cannot read dataset file {str(f)!r}: {e.strerror or e}; expected a readable file") from e
    return h.hexdigest()


def _open_text(path: Path, newline: str | None = None) -> io.TextIOBase:
    """A text file (gzipped or not) as UTF-8; a leading byte order mark (as Excel and Notepad write) is skipped, not
    read as part of the first JSON value or CSV column name. ``newline`` as for :func:`open` (``""`` for csv, which
    finds line ends itself and keeps the line ends inside a quoted field as written)."""
    if path.name.lower().endswith(".gz"):  # as the suffix that chose this reader: any letter case (DATA.JSONL.GZ)
        return gzip.open(path, "rt", encoding="utf-8-sig", newline=newline)
    return open(path, encoding="utf-8-sig", newline=newline)


def _objects(rows: list[Any], path: Path, first: int) -> list[dict[str, Any]]:
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise PrepError(
                f"{str(path)!r}: row {first + i} is a {type(r).__name__}, expected a JSON object per example"
            )
    return rows


def _json_chunks(path: Path, n: int) -> Iterator[list[dict[str, Any]]]:
    try:
        yield from _json_rows(path, n)
    except _READ_ERRORS as e:
        raise PrepError(f"cannot read {str(path)!r}: {e}; expected a UTF-8 (optionally gzipped) JSON/JSONL file") from e


def _json_rows(path: Path, n: int) -> Iterator[list[dict[str, Any]]]:
    with _open_text(path) as f:
        array = f.read(4096).lstrip().startswith("[")
    with _open_text(path) as f:
        if array:  # one JSON array: parsed whole (JSONL streams)
            text = f.read()  # outside the try: a byte that is not UTF-8 is its own error, not the parser's
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise PrepError(f"malformed JSON in {str(path)!r} at line {e.lineno}, column {e.colno}: {e.msg}") from e
            except (ValueError, RecursionError) as e:
                raise _beyond_parser(path, "its JSON array", e) from e
            rows = rows if isinstance(rows, list) else [rows]
            for a in range(0, len(rows), n):
                yield _objects(rows[a : a + n], path, a)
            return
        rows, count = [], 0
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if count == 0 and not rows:
                    _refuse_one_object(path)
                raise PrepError(
                    f"malformed JSON in {str(path)!r} at line {lineno}, column {e.colno}: {e.msg} "
                    "(expected one JSON object per line, or one JSON array)"
                ) from e
            except (ValueError, RecursionError) as e:
                raise _beyond_parser(path, f"line {lineno}", e) from e
            if len(rows) == n:
                yield _objects(rows, path, count)
                count += n
                rows = []
        if rows:
            yield _objects(rows, path, count)


def _beyond_parser(path: Path, where: str, error: ValueError | RecursionError) -> PrepError:
    """The error for valid JSON that Python's parser refuses: an integer of more than ``sys.get_int_max_str_digits()``
    digits (a ``ValueError``) or nesting deeper than the recursion limit (a ``RecursionError``)."""
    what = "is nested too deeply" if isinstance(error, RecursionError) else "holds a number too long"
    return PrepError(f"{str(path)!r}: {where} {what} for Python's JSON parser ({error}); expected rows of text fields")


def _refuse_one_object(path: Path) -> None:
    """Refuse a JSON file that holds one object over several lines (``{"version": 1, "data": [...]}``, as SQuAD
    ships) as what it is, not as malformed JSONL; return when the file is no such object, or too large to parse
    whole only to word an error."""
    if path.stat().st_size > _ONE_OBJECT_LIMIT:
        return
    with _open_text(path) as f:
        try:
            value = json.load(f)
        except (ValueError, RecursionError):  # not one object (JSONDecodeError), or beyond the parser
            return
    if isinstance(value, dict):
        raise PrepError(
            f"{str(path)!r} holds one JSON object (keys {sorted(value)[:8]}), not rows; expected one JSON object per "
            "line (JSONL) or a JSON array of objects: write the rows it holds out as one of those"
        )


def _malformed_csv(path: Path, line: int, error: csv.Error) -> PrepError:
    return PrepError(
        f"{str(path)!r}: malformed CSV in the record starting at line {line} ({error}); expected each quoted field to "
        'end in a quote followed by a comma or the line end (a quote inside it doubled: "")'
    )


def _csv_records(reader: csv.DictReader, path: Path) -> Iterator[dict[str, Any]]:
    """The rows of ``reader``, a strict reader, as ``csv.DictReader`` makes them (fields past the header under the key
    None, missing ones None; blank lines skipped). The lenient reader reads a quote that never closes as one field
    running to the end of the file (every later row lost in it); a malformed record is an error naming its first
    line, counted here since DictReader skips blank lines inside one step."""
    names, raw = reader.fieldnames or [], reader.reader
    while True:
        start = raw.line_num + 1
        try:
            row = next(raw)
        except StopIteration:
            return
        except csv.Error as e:
            raise _malformed_csv(path, start, e) from e
        if not row:
            continue
        record: dict[Any, Any] = dict(zip(names, row, strict=False))
        if len(row) > len(names):
            record[None] = row[len(names) :]
        elif len(row) < len(names):
            record.update(dict.fromkeys(names[len(row) :]))
        yield record


def _csv_chunks(path: Path, n: int) -> Iterator[list[dict[str, Any]]]:
    """Rows of a CSV file by its header; a header that names a column twice is refused (a row would keep only the
    last of the two values). A field may be as long as a document: csv's own limit (128 KiB) is raised to
    ``_CSV_FIELD_LIMIT``."""
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    with _open_text(path, newline="") as f:
        reader = csv.DictReader(f, strict=True)
        try:
            names = reader.fieldnames or []
        except csv.Error as e:
            raise _malformed_csv(path, 1, e) from e
        twice = sorted({c for c in names if c and names.count(c) > 1})  # empty names: trailing empty columns
        if twice:
            raise PrepError(
                f"{str(path)!r}: the header names the column(s) {twice} more than once; expected one column per name "
                "(rename the copies)"
            )
        rows = []
        for r in _csv_records(reader, path):
            if None in r:  # csv puts the fields past the header under the key None
                raise PrepError(
                    f"{str(path)!r} line {reader.reader.line_num} has more fields than its header "
                    f"({len(reader.fieldnames or [])}); expected one value per column"
                )
            rows.append(r)
            if len(rows) == n:
                yield rows
                rows = []
        if rows:
            yield rows


def _batch_chunks(batches, n: int) -> Iterator[list[dict[str, Any]]]:
    for batch in batches:
        for a in range(0, batch.num_rows, n):
            yield batch.slice(a, n).to_pylist()


def _arrow_chunks(path: Path, n: int) -> Iterator[list[dict[str, Any]]]:
    import pyarrow as pa

    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        try:
            batches = pa.ipc.open_stream(pa.memory_map(str(path)))
        except pa.ArrowInvalid as e:
            raise PrepError(f"{str(path)!r} is not an Arrow IPC file or stream ({e})") from e
    try:
        yield from _batch_chunks(batches, n)
    except pa.ArrowInvalid as e:
        raise PrepError(f"{str(path)!r}: a damaged Arrow record batch ({e})") from e


def _parquet_chunks(path: Path, n: int) -> Iterator[list[dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=n)
        yield from _batch_chunks(batches, n)
    except (OSError, ValueError) as e:  # pyarrow: ArrowInvalid (a ValueError) or OSError for a bad file
        raise PrepError(f"cannot read Parquet file {str(path)!r}: {e}") from e


def readable(path: Path) -> bool:
    """Whether padless reads ``path`` with its own readers (by its suffix)."""
    return path.name.lower().endswith(_SUFFIXES)


def _file_chunks(path: Path, n: int) -> Iterator[list[dict[str, Any]]]:
    name = path.name.lower()
    if name.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
        return _json_chunks(path, n)
    if name.endswith((".csv", ".csv.gz")):
        return _csv_chunks(path, n)
    if name.endswith(".parquet"):
        return _parquet_chunks(path, n)
    if name.endswith((".arrow", ".feather")):
        return _arrow_chunks(path, n)
    raise PrepError(f"{str(path)!r}: unknown file type; expected one of {', '.join(_SUFFIXES)}")


def _files_chunks(files: list[Path], n: int) -> Iterator[list[dict[str, Any]]]:
    for f in files:
        yield from _file_chunks(f, n)


def _save_to_disk_files(folder: Path, spec: DatasetSpec) -> list[Path] | None:
    """Arrow files of a ``datasets`` ``save_to_disk`` folder (a Dataset, or a split of a DatasetDict); None when the
    folder is not one."""
    try:
        if (folder / "dataset_dict.json").is_file():
            splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
            if spec.subset is not None:
                raise PrepError(f"{spec.text!r}: a save_to_disk folder has no subsets; drop ':{spec.subset}'")
            split = spec.split or ("train" if "train" in splits else splits[0])
            if split not in splits:
                raise PrepError(f"{spec.text!r}: the saved DatasetDict has no split {split!r}; its splits: {splits}")
            folder = folder / split
        elif (spec.subset is not None or spec.split is not None) and (folder / "state.json").is_file():
            raise PrepError(
                f"{spec.text!r}: a save_to_disk Dataset folder holds one split and no subsets; name the folder alone"
            )
        state = folder / "state.json"
        if not state.is_file():
            return None
        return [folder / d["filename"] for d in json.loads(state.read_text())["_data_files"]]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise PrepError(
            f"{str(folder)!r} looks like a `datasets` save_to_disk folder but its dataset_dict.json / state.json "
            f"cannot be read ({e!r}); save it again, or point at its data files"
        ) from e


def _open_local(spec: DatasetSpec, n: int) -> Source:
    path = spec.path
    assert path is not None
    if not path.is_dir() and not path.is_file():  # a named pipe, a socket, a device (/dev/stdin)
        raise PrepError(
            f"dataset {spec.text!r} is not a regular file or folder; prep reads each input twice (its fingerprint, "
            "then its rows), so save the data to a file first"
        )
    if not path.is_dir():
        if spec.subset is not None or spec.split is not None:
            raise PrepError(
                f"{spec.text!r}: a single file has no subsets or splits; name the file alone, or a folder of files "
                "laid out as a Hub dataset"
            )
        return Source(spec.text, _file_chunks(path, n), _sha256_files([path]), reads=_resolved([path]))
    files = _save_to_disk_files(path, spec)
    if files is not None:
        return Source(spec.text, _files_chunks(files, n), _sha256_files(files), reads=_resolved(files))
    from .hub import folder_files, stream_dataset

    files = folder_files(path, spec)
    if files is not None and all(readable(f) for f in files):
        return Source(spec.text, _files_chunks(files, n), _sha256_files(files), reads=_resolved(files))
    h = hashlib.sha256(_streamed("folder", spec).encode() + b"\0")
    reads = (_streamed(str(path.resolve()), spec),)
    return Source(spec.text, stream_dataset(str(path), spec, n, h), _hash=h, reads=reads)


def _resolved(files: list[Path]) -> tuple[str, ...]:
    return tuple(str(f.resolve()) for f in files)


def _streamed(name: str, spec: DatasetSpec) -> str:
    """A dataset streamed through ``datasets``: its name, subset and split (``train`` when none is named, as read),
    so that ``x`` and ``x@train`` are one dataset with one fingerprint."""
    return f"{name}:{spec.subset}@{spec.split or 'train'}"


def _online(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "0") != "0":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def open_source(spec: str, chunk_rows: int | None = None) -> Source:
    """Open one DATASET argument (nothing is read yet but what finding its files takes); ``chunk_rows``: rows per
    chunk (default ``CHUNK_ROWS``)."""
    chunk_rows = chunk_rows or CHUNK_ROWS
    s = parse_spec(spec)
    if s.path is not None:
        return _open_local(s, chunk_rows)
    if not _online():
        raise PrepError(
            f"{s.hub_id!r} is not a local file or folder, and the Hugging Face Hub cannot be reached (offline); "
            "give a local path (JSON, JSONL, .gz, Parquet, CSV, Arrow, a save_to_disk or Hub-style folder) or run "
            "online"
        )
    from .hub import stream_dataset

    h = hashlib.sha256(_streamed(f"hub:{s.hub_id}", s).encode() + b"\0")
    return Source(spec, stream_dataset(s.hub_id, s, chunk_rows, h), _hash=h, reads=(_streamed(s.hub_id, s),))


def load_rows(spec: str) -> list[dict[str, Any]]:
    """Every row of one DATASET argument, in memory (for small data and tests; ``prep pack`` streams)."""
    return [r for chunk in open_source(spec).chunks() for r in chunk]
