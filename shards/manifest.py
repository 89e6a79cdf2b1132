"""``manifest.json``: what a shard set holds, how it was made, and a checksum per shard file.

The manifest is written last (temp file + ``os.replace``), so a folder with a manifest is a complete set.
``read_manifest`` trusts nothing in it: the bytes must be UTF-8 strict JSON (no NaN/Infinity, nesting at most
``MAX_DEPTH`` levels, at most ``MAX_MANIFEST_BYTES``), and every field that the reader, ``prep`` or the trainer
uses is type- and range-checked once into a :class:`Manifest`. A bad field is one ``ShardFormatError`` that names
its JSON path (``shards[3].batches[2]``), the value and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from .errors import ShardFormatError
from .schema import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, SCHEMA, shard_file_name

__all__ = [
    "MAX_DEPTH",
    "MAX_MANIFEST_BYTES",
    "Manifest",
    "ShardEntry",
    "TokenizerInfo",
    "Totals",
    "check_metadata",
    "file_sha256",
    "parse_manifest",
    "read_manifest",
    "schema_description",
    "write_manifest",
]

REQUIRED = ("format", "format_version", "max_len", "schema", "shards", "totals")
# 64 MiB holds ~16M record-batch entries: ~10^12 tokens at the default 2^16 tokens per batch.
MAX_MANIFEST_BYTES = 64 << 20
MAX_DEPTH = 64
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
UINT32_LIMIT = 2**32  # input_ids are uint32, so a vocabulary holds at most 2^32 ids
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
COUNTS = ("packs", "examples", "tokens", "trainable", "bytes")
# The `prep` counts that `prep stats` prints.
PREP_COUNTS = ("rows", "truncated", "split", "dropped", "empty", "untrained", "bad_rows_skipped")


@dataclass(frozen=True)
class TokenizerInfo:
    """The manifest's ``tokenizer`` block: ids in the shards are all below ``vocab_size``."""

    vocab_size: int
    name: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    hash: str | None = None
    content_hash: str | None = None


@dataclass(frozen=True)
class ShardEntry:
    """One ``shards[i]`` entry: a file of the set, its record batches (packs per batch), counts and checksum."""

    file: str
    batches: tuple[int, ...]
    packs: int
    examples: int
    tokens: int
    trainable: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Totals:
    """The manifest's ``totals``: the per-shard counts summed."""

    packs: int
    examples: int
    tokens: int
    trainable: int
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """A checked ``manifest.json``; ``raw`` is the JSON object itself (metadata of the writer's caller included)."""

    max_len: int
    shards: tuple[ShardEntry, ...]
    totals: Totals
    tokenizer: TokenizerInfo | None
    tokenizer_source: str | None
    fingerprint: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)


def schema_description() -> list[list[str]]:
    """The schema as ``[[name, arrow type], ...]``, stored in the manifest and compared on open."""
    return [[f.name, str(f.type)] for f in SCHEMA]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 18) -> str:
    """Hex sha256 of a file, read into one reused 256 KiB buffer (1.8x faster than fresh 4 MiB reads: no copies)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def write_manifest(folder: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    """Write ``folder/manifest.json`` atomically: a temp file in the same folder, then ``os.replace``."""
    final = Path(folder) / MANIFEST_NAME
    tmp = final.with_name(MANIFEST_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=False, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


# -- showing a hostile value in a message -----------------------------------------------------------------
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxlong, _REPR.maxother = 2, 4, 4, 60, 40, 60


_KIND = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number", bool: "a boolean"}


def _brief(value: Any) -> str:
    """A short, safe rendering of any JSON value, in JSON spelling (depth, length and digits bounded)."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return _REPR.repr(value)


def _show(value: Any) -> str:
    """``_brief`` plus the value's JSON type."""
    kind = _KIND.get(type(value))
    return _brief(value) + (f" ({kind})" if kind else "")


class _Fields:
    """Typed access to a JSON object's fields; every failure names ``where`` and the field's JSON path."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, value: Any, expected: str) -> NoReturn:
        raise ShardFormatError(
            f"{self.where}: {path} is {_show(value)}; expected {expected}. The shard set is damaged or was not "
            "written by padless; re-run `prep pack`"
        )

    def get(self, obj: dict[str, Any], key: str, path: str, *, required: bool = True) -> Any:
        if key not in obj:
            if required:
                raise ShardFormatError(f"{self.where}: {_join(path, key)} is missing; the shard set is damaged")
            return None
        return obj[key]

    def obj(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path, value, "an object")
        return value

    def int_(self, value: Any, path: str, lo: int, hi: int, what: str = "") -> int:
        if type(value) is not int or not lo <= value <= hi:
            self.fail(path, value, f"an integer in [{lo}, {hi}]{what}")
        return value

    def opt_int(self, value: Any, path: str, lo: int, hi: int, what: str = "") -> int | None:
        return None if value is None else self.int_(value, path, lo, hi, what)

    def str_(self, value: Any, path: str, pattern: re.Pattern[str] | None = None, expected: str = "a string") -> str:
        if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
            self.fail(path, value, expected)
        return value

    def opt_str(self, value: Any, path: str) -> str | None:
        return None if value is None else self.str_(value, path, expected="a string or null")


def _join(path: str, key: str | int) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)


def _check_tree(value: Any, f: _Fields) -> None:
    """Nesting at most ``MAX_DEPTH`` levels and every string (keys too) encodable as UTF-8 (no lone surrogates)."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    f.fail(path or "the top level", v, "a string of Unicode characters (a lone surrogate escape)")
            continue
        if not isinstance(v, (dict, list)):
            continue
        if depth >= MAX_DEPTH:
            f.fail(path or "the top level", v, f"JSON nested at most {MAX_DEPTH} levels deep")
        if isinstance(v, dict):
            for k, x in v.items():
                stack.append((k, path, depth))
                if isinstance(x, (dict, list, str)):
                    stack.append((x, _join(path, k), depth + 1))
        elif not all(type(x) is int for x in v):  # fast path for the long `batches` lists
            stack += [(x, _join(path, i), depth + 1) for i, x in enumerate(v) if isinstance(x, (dict, list, str))]


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"{text} overflows a finite number")
    return x


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """Load ``folder/manifest.json`` and check every field (see :func:`parse_manifest`)."""
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
        with open(path, "rb") as fh:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise ShardFormatError(f"{str(path)!r} cannot be read ({e})") from e
    if len(data) > MAX_MANIFEST_BYTES:
        raise ShardFormatError(
            f"{str(path)!r} is over {MAX_MANIFEST_BYTES} bytes; a padless manifest is far smaller: not a shard set"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        msg = f"{str(path)!r} is not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r}); re-run `prep pack`"
        raise ShardFormatError(msg) from e
    try:
        obj = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, digit limits, NaN/Infinity, nesting
        msg = f"{str(path)!r} is not valid JSON ({str(e)[:200]}); the shard set is corrupted, re-run `prep pack`"
        raise ShardFormatError(msg) from None
    return parse_manifest(obj, where=repr(str(path)))


def parse_manifest(obj: Any, *, where: str = MANIFEST_NAME) -> Manifest:
    """Check a decoded manifest and return it as a :class:`Manifest`; ``where`` names it in messages."""
    f = _Fields(where)
    if not isinstance(obj, dict):
        raise ShardFormatError(f"{where} holds {_show(obj)}, expected a JSON object")
    _check_tree(obj, f)
    if obj.get("format") != FORMAT_NAME:
        raise ShardFormatError(
            f"{where} has format {_brief(obj.get('format'))}, expected {FORMAT_NAME!r}: not a padless shard set"
        )
    version = obj.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ShardFormatError(
            f"unsupported shard format version {_show(version)} in {where}; expected version {FORMAT_VERSION}. "
            "Re-run `prep pack` with this version of padless"
        )
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise ShardFormatError(f"{where} lacks the keys {missing}; expected all of {list(REQUIRED)}")
    if obj["schema"] != schema_description():
        raise ShardFormatError(f"{where} declares the schema {_show(obj['schema'])}, expected {schema_description()}")
    max_len = f.int_(obj["max_len"], "max_len", 1, INT32_MAX, " (tokens per pack)")
    caller = _caller_fields(obj, f)
    shards_raw = obj["shards"]
    if not isinstance(shards_raw, list) or not shards_raw:
        f.fail("shards", shards_raw, "a non-empty array of shard entries")
    shards = tuple(_shard(s, i, max_len, f) for i, s in enumerate(shards_raw))
    t = f.obj(obj["totals"], "totals")
    for k in COUNTS:
        want = sum(getattr(s, k) for s in shards)
        f.int_(f.get(t, k, "totals"), f"totals.{k}", 0, INT64_MAX)
        if t[k] != want:
            f.fail(f"totals.{k}", t[k], f"{want}, the sum over the shards")
    totals = Totals(**{k: t[k] for k in COUNTS})
    return Manifest(max_len=max_len, shards=shards, totals=totals, raw=obj, **caller)


def _shard(value: Any, i: int, max_len: int, f: _Fields) -> ShardEntry:
    path = f"shards[{i}]"
    s = f.obj(value, path)
    # Entry i names the file shard-0000i.arrow, a plain name inside the set: nothing outside it is ever read, and no
    # entry can be reordered or repeated.
    name = shard_file_name(i)
    if f.get(s, "file", path) != name:
        f.fail(f"{path}.file", s["file"], f"{name!r} (entry i of shards names shard file i of this folder)")
    batches = f.get(s, "batches", path)
    if not isinstance(batches, list) or not batches:
        f.fail(f"{path}.batches", batches, "a non-empty array of packs per record batch")
    for j, n in enumerate(batches):
        f.int_(n, f"{path}.batches[{j}]", 1, INT32_MAX, " (packs in a record batch)")
    c = {k: f.int_(f.get(s, k, path), f"{path}.{k}", 0, INT64_MAX) for k in COUNTS}
    if c["packs"] != sum(batches):
        f.fail(f"{path}.packs", c["packs"], f"{sum(batches)}, the sum of {path}.batches")
    if not c["packs"] <= c["examples"] <= c["tokens"]:
        f.fail(f"{path}.examples", c["examples"], f"between packs={c['packs']} and tokens={c['tokens']}")
    if c["tokens"] > c["packs"] * max_len:
        f.fail(f"{path}.tokens", c["tokens"], f"at most packs x max_len = {c['packs'] * max_len}")
    if c["trainable"] > c["tokens"] - c["examples"]:
        f.fail(f"{path}.trainable", c["trainable"], f"at most tokens - examples = {c['tokens'] - c['examples']}")
    if c["bytes"] < 1:
        f.fail(f"{path}.bytes", c["bytes"], "an integer >= 1 (the file's size)")
    sha = f.str_(f.get(s, "sha256", path), f"{path}.sha256", SHA256_HEX, "64 lowercase hex digits")
    return ShardEntry(file=name, batches=tuple(batches), sha256=sha, **c)


def _caller_fields(obj: dict[str, Any], f: _Fields) -> dict[str, Any]:
    """The metadata keys that `prep` and the trainer read: ``tokenizer``, ``tokenizer_source``, ``fingerprint``,
    ``prep``, ``options``, ``source``. Each is optional; present, it must have the expected shape."""
    tok = None
    if "tokenizer" in obj:
        t = f.obj(obj["tokenizer"], "tokenizer")
        vocab = f.int_(f.get(t, "vocab_size", "tokenizer"), "tokenizer.vocab_size", 1, UINT32_LIMIT)
        ids = {
            k: f.opt_int(t.get(k), f"tokenizer.{k}", 0, vocab - 1, " or null") for k in ("bos_id", "eos_id", "pad_id")
        }
        strs = {k: f.opt_str(t.get(k), f"tokenizer.{k}") for k in ("name", "hash", "content_hash")}
        if "has_chat_template" in t and not isinstance(t["has_chat_template"], bool):
            f.fail("tokenizer.has_chat_template", t["has_chat_template"], "true or false")
        tok = TokenizerInfo(vocab_size=vocab, **ids, **strs)
    for key in ("prep", "options", "source"):
        if key in obj:
            f.obj(obj[key], key)
    for k in PREP_COUNTS:
        if k in obj.get("prep", {}):
            f.int_(obj["prep"][k], f"prep.{k}", 0, INT64_MAX)
    return {
        "tokenizer": tok,
        "tokenizer_source": f.opt_str(obj.get("tokenizer_source"), "tokenizer_source"),
        "fingerprint": f.opt_str(obj.get("fingerprint"), "fingerprint"),
    }


def check_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Writer metadata as plain JSON values; refuses what the reader would refuse (not strict JSON, too deep, or a
    key that `prep` / the trainer read in the wrong shape)."""
    try:
        obj = json.loads(json.dumps(dict(metadata), allow_nan=False, ensure_ascii=False).encode("utf-8"))
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(
            f"metadata must be strict JSON (finite numbers, str keys, UTF-8 text): {str(e)[:200]}"
        ) from None
    f = _Fields("metadata")
    _check_tree(obj, f)
    _caller_fields(obj, f)
    return obj
