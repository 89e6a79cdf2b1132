"""Load dataset rows from local files and folders (or the hub when online) into a list of dicts.

Supported: JSON (an array, or JSONL), JSONL, gzipped JSON/JSONL, Parquet, CSV, Arrow IPC (file or stream),
and a ``datasets`` ``save_to_disk`` folder (read straight from its Arrow files, so ``datasets`` is not imported
on the local path). ``demo:alpaca`` / ``demo:chat`` name the datasets shipped in ``prep/assets``. Every source
also gets a fingerprint (sha256 of its bytes), so the same input gives the same shard-set fingerprint.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import socket
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PrepError

__all__ = ["ASSETS", "DEMO_DATASETS", "Source", "load_sources"]

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_DATASETS = {"demo:alpaca": ASSETS / "demo_alpaca.jsonl.gz", "demo:chat": ASSETS / "demo_chat.jsonl.gz"}
_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet", ".csv", ".csv.gz", ".arrow", ".feather")


@dataclass
class Source:
    """One loaded input: its name as given, the rows, and a fingerprint of its content."""

    name: str
    rows: list[dict[str, Any]]
    fingerprint: str


def _sha256_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        with _open_text(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise PrepError(f"cannot read {str(path)!r}: {e}; expected a UTF-8 (optionally gzipped) JSON/JSONL file") from e
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise PrepError(f"malformed JSON in {str(path)!r} at line {e.lineno}, column {e.colno}: {e.msg}") from e
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PrepError(
                    f"malformed JSON in {str(path)!r} at line {lineno}, column {e.colno}: {e.msg} "
                    "(expected one JSON object per line, or one JSON array)"
                ) from e
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise PrepError(f"{str(path)!r}: row {i} is a {type(r).__name__}, expected a JSON object per example")
    return rows


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        rows = []
        for r in reader:
            if None in r:  # csv puts the fields past the header under the key None
                raise PrepError(
                    f"{str(path)!r} line {reader.line_num} has more fields than its header "
                    f"({len(reader.fieldnames or [])}); expected one value per column"
                )
            rows.append(r)
        return rows


def _read_arrow(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa

    try:
        return pa.ipc.open_file(pa.memory_map(str(path))).read_all().to_pylist()
    except pa.ArrowInvalid:
        try:
            return pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()
        except pa.ArrowInvalid as e:
            raise PrepError(f"{str(path)!r} is not an Arrow IPC file or stream ({e})") from e


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a bad file; all mean the same to the user
        raise PrepError(f"cannot read Parquet file {str(path)!r}: {e}") from e


def _read_file(path: Path) -> list[dict[str, Any]]:
    name = path.name.lower()
    if name.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
        return _read_json(path)
    if name.endswith((".csv", ".csv.gz")):
        return _read_csv(path)
    if name.endswith(".parquet"):
        return _read_parquet(path)
    if name.endswith((".arrow", ".feather")):
        return _read_arrow(path)
    raise PrepError(f"{str(path)!r}: unknown file type; expected one of {', '.join(_SUFFIXES)}")


def _save_to_disk_files(folder: Path) -> list[Path] | None:
    """Arrow files of a ``datasets`` ``save_to_disk`` folder (a Dataset, or the train split of a DatasetDict)."""
    try:
        if (folder / "dataset_dict.json").is_file():
            splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
            split = "train" if "train" in splits else splits[0]
            folder = folder / split
        state = folder / "state.json"
        if not state.is_file():
            return None
        return [folder / d["filename"] for d in json.loads(state.read_text())["_data_files"]]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise PrepError(
            f"{str(folder)!r} looks like a `datasets` save_to_disk folder but its dataset_dict.json / state.json "
            f"cannot be read ({e!r}); save it again, or point at its data files"
        ) from e


def _load_local(path: Path) -> tuple[list[dict[str, Any]], str]:
    if path.is_dir():
        files = _save_to_disk_files(path)
        if files is not None:
            return [r for f in files for r in _read_arrow(f)], _sha256_files(files)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(_SUFFIXES))
        if not files:
            raise PrepError(
                f"folder {str(path)!r} holds no data files; expected files ending in {', '.join(_SUFFIXES)}"
            )
        return [r for f in files for r in _read_file(f)], _sha256_files(files)
    return _read_file(path), _sha256_files([path])


def _online(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "0") != "0":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub(name: str) -> tuple[list[dict[str, Any]], str]:
    if not _online():
        raise PrepError(
            f"{name!r} is not a local file or folder, and the Hugging Face Hub cannot be reached (offline); "
            "give a local path (JSON, JSONL, .gz, Parquet, CSV, Arrow, a save_to_disk folder) or run online"
        )
    import datasets  # heavy; only for hub ids

    try:
        ds = datasets.load_dataset(name, split="train")
    except (OSError, ValueError) as e:  # datasets: not found / no access (OSError), no train split (ValueError)
        raise PrepError(f"cannot load the hub dataset {name!r}: {e}") from e
    return ds.to_list(), hashlib.sha256(f"hub:{name}:{ds._fingerprint}".encode()).hexdigest()


def load_sources(specs: list[str]) -> list[Source]:
    """Load every DATASET argument, in order."""
    if not specs:
        raise PrepError("no DATASET given; expected a file, a folder, demo:alpaca / demo:chat, or a hub id")
    out = []
    for spec in specs:
        path = DEMO_DATASETS.get(spec, Path(spec).expanduser())
        if spec.startswith("demo:") and spec not in DEMO_DATASETS:
            raise PrepError(f"unknown demo dataset {spec!r}; expected one of {sorted(DEMO_DATASETS)}")
        if path.exists():
            try:
                rows, fp = _load_local(path)
            except (OSError, EOFError, UnicodeDecodeError, csv.Error, zlib.error) as e:
                raise PrepError(f"cannot read dataset {spec!r}: {e}; expected a readable data file or folder") from e
        elif "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1 and not Path(spec).suffix:
            rows, fp = _load_hub(spec)
        else:
            raise PrepError(f"dataset {spec!r} not found: no such file or folder (and it is not a hub id owner/name)")
        out.append(Source(spec, rows, fp))
    return out
