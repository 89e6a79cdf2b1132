"""``manifest.json``: what a shard set holds, how it was made, and a checksum per shard file.

The manifest is written last (temp file + ``os.replace``), so a folder with a manifest is a complete set.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ShardFormatError
from .schema import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, SCHEMA

__all__ = ["file_sha256", "read_manifest", "schema_description", "write_manifest"]

_REQUIRED = ("format", "format_version", "max_len", "schema", "shards", "totals")


def schema_description() -> list[list[str]]:
    """The schema as ``[[name, arrow type], ...]``, stored in the manifest and compared on open."""
    return [[f.name, str(f.type)] for f in SCHEMA]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    """Write ``folder/manifest.json`` atomically: a temp file in the same folder, then ``os.replace``."""
    final = Path(folder) / MANIFEST_NAME
    tmp = final.with_name(MANIFEST_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Load and check ``folder/manifest.json``: format name, version, schema and required keys."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardFormatError(
            f"shard set {str(folder)!r} is not a folder; expected a folder holding {MANIFEST_NAME} and "
            "shard-*.arrow files (made by `prep pack`)"
        )
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ShardFormatError(
            f"{str(path)!r} not found: {str(folder)!r} is not a padless shard set (or it was never finished); "
            "make one with `prep pack DATASET --max-len N --out DIR`"
        )
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        msg = f"{str(path)!r} is not valid JSON ({e}); the shard set is corrupted, re-run `prep pack`"
        raise ShardFormatError(msg) from e
    if not isinstance(manifest, dict):
        raise ShardFormatError(f"{str(path)!r} holds a {type(manifest).__name__}, expected a JSON object")
    if manifest.get("format") != FORMAT_NAME:
        raise ShardFormatError(
            f"{str(path)!r} has format {manifest.get('format')!r}, expected {FORMAT_NAME!r}: not a padless shard set"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardFormatError(
            f"unsupported shard format version {manifest.get('format_version')!r} in {str(path)!r}; expected "
            f"version {FORMAT_VERSION}. Re-run `prep pack` with this version of padless"
        )
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise ShardFormatError(f"{str(path)!r} lacks the keys {missing}; expected all of {list(_REQUIRED)}")
    if manifest["schema"] != schema_description():
        raise ShardFormatError(
            f"{str(path)!r} declares the schema {manifest['schema']}, expected {schema_description()}"
        )
    return manifest
