"""A seeded mutation fuzzer over one shard set; ``test_fuzz.py`` runs it as a worker process.

Usage, from the repository root: ``python -m tests.shards.fuzz PRISTINE_SET SEED START STOP``. The worker copies
the set to a scratch folder, reads every pack once as the reference, then runs cases START..STOP-1. Case i draws its
mutation from a generator seeded with (SEED, i), so any case can be replayed alone. Each case mutates the scratch
copy, opens it and reads every pack, then restores the copy. Per case the worker prints ``start i`` before and
``done i OUTCOME DETAIL`` after (one line each, flushed), so the driver can name the case behind a crash or a hang.

Outcomes: ``error-open`` / ``error-read`` (a ``ShardFormatError`` on open or on reading a pack), ``unchanged`` (every
pack equal to the reference; then ``prep stats`` must report on it, and ``verify_shard_set`` pass or raise a
``ShardFormatError``), and for
``shard-forged`` cases (a shard mutated and its manifest checksum and size forged to match) ``forged-valid``: the
mutation decoded to other data that keeps every guarantee a reader gives (``pack_guarantee_problem``). Anything else is
a failure: ``changed`` (other data handed out silently), ``exception`` (any other exception type).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from padless.shards.errors import ShardFormatError
from padless.shards.manifest import file_sha256
from padless.shards.reader import open_shards
from padless.shards.verify import verify_shard_set

from .guarantees import pack_guarantee_problem

KINDS = ("shard-bytes", "shard-forged", "manifest-bytes", "manifest-json")
WEIGHTS = (0.2, 0.25, 0.2, 0.35)
FAILURES = ("changed", "exception", "crash", "hang")
RAW = "@@RAW@@"  # placeholder in an edited manifest for JSON text json.dumps cannot produce

# Replacement values of a type-changing edit (JSON values, or raw JSON text after RAW).
PALETTE: list[Any] = [
    None, True, False, 0, -1, 1, 2, 2**31, 2**31 - 1, 2**32, 2**63, 2**64, 10**30, -(2**63) - 1, 0.5, -0.0, 1e308,
    "", "x", "1", "64", "shard-00000.arrow", "../shard-00000.arrow", "/etc/passwd", "\u00e9\u4e2d", "\ud800",
    "a\u0000b", "x" * 100_000, [], {}, [1, 2], [[]], {"a": 1}, [None], ["list<item: uint32>"],
    RAW + "NaN", RAW + "Infinity", RAW + "-Infinity", RAW + "1e400", RAW + "-1e400", RAW + "1" * 5000,
    RAW + "[" * 5000 + "]" * 5000, RAW + "[" * 70 + "]" * 70, RAW + '"\\udc80"', RAW + "1E2", RAW + "-0",
]  # fmt: skip
FIELD_NAMES = [
    "file", "batches", "packs", "examples", "tokens", "trainable", "bytes", "sha256", "vocab_size", "bos_id",
    "eos_id", "pad_id", "name", "hash", "content_hash", "rows", "max_len", "extra", "",
]  # fmt: skip


def _same(a: Any, b: Any) -> bool:
    names = ("input_ids", "position_ids", "cu_seqlens", "loss_mask", "labels", "example_index")
    return all(np.array_equal(getattr(a, k), getattr(b, k)) and getattr(a, k).dtype == getattr(b, k).dtype
               for k in names) and (a.num_tokens, a.num_trainable, a.max_seqlen) == (b.num_tokens, b.num_trainable,
                                                                                   b.max_seqlen)  # fmt: skip


def _paths(v: Any, path: tuple = ()) -> list[tuple]:
    """Every JSON path in ``v`` (the root included)."""
    out = [path]
    if isinstance(v, dict):
        for k, x in v.items():
            out += _paths(x, (*path, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            out += _paths(x, (*path, i))
    return out


def _dumps(v: Any) -> str:
    """JSON text of an edited manifest, with RAW placeholders replaced by their raw text."""
    text = json.dumps(v, indent=1)
    if RAW not in text:
        return text
    for raw in {x for x in PALETTE if isinstance(x, str) and x.startswith(RAW)}:
        text = text.replace(json.dumps(raw), raw[len(RAW) :])
    return text


class Fuzzer:
    """The scratch copy of one pristine set, its reference read, and the mutations."""

    def __init__(self, pristine: Path, seed: int) -> None:
        self.seed = seed
        self.work = Path(tempfile.mkdtemp(prefix="padless-fuzz-"))
        self.root = self.work / "set"
        shutil.copytree(pristine, self.root)
        self.files = {p.name: p.read_bytes() for p in self.root.iterdir() if p.is_file()}
        self.manifest = json.loads(self.files["manifest.json"])
        self.shards = [s["file"] for s in self.manifest["shards"]]
        ss = open_shards(self.root)
        self.reference = list(ss)
        self.max_len, self.vocab = ss.max_len, ss.vocab_size
        # Byte-identical copies of the shards outside the set: a reader that followed an entry or a link out of the
        # set would read them back unchanged, so the cases that point there must end in an error.
        self.outside = self.work / "outside"
        self.outside.mkdir()
        for name in self.shards:
            (self.outside / name).write_bytes(self.files[name])

    def restore(self) -> None:
        for p in list(self.root.iterdir()):
            if p.is_symlink() or p.name not in self.files:
                p.unlink() if p.is_symlink() or p.is_file() else shutil.rmtree(p)
        for name, data in self.files.items():
            f = self.root / name
            if not f.exists() or f.read_bytes() != data:
                f.write_bytes(data)

    # -- mutations: each returns a short description and whether only an error is acceptable ------------------
    def mutate(self, rng: np.random.Generator, kind: str) -> tuple[str, bool]:
        if kind == "shard-bytes":
            return self._bytes(rng, rng.choice(self.shards), forge=False), False
        if kind == "shard-forged":
            return self._bytes(rng, rng.choice(self.shards), forge=True), False
        if kind == "manifest-bytes":
            return self._bytes(rng, "manifest.json", forge=False), False
        return self._json(rng)

    def _bytes(self, rng: np.random.Generator, name: str, *, forge: bool) -> str:
        data = bytearray(self.files[name])
        op = rng.choice(["flip", "truncate", "insert", "zero-run"])
        at = int(rng.integers(0, len(data)))
        if op == "flip":
            for _ in range(int(rng.integers(1, 5))):
                data[int(rng.integers(0, len(data)))] ^= int(rng.integers(1, 256))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = rng.integers(0, 256, size=int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
        else:
            data[at : at + int(rng.integers(1, 64))] = bytes(min(64, len(data) - at))
        (self.root / name).write_bytes(bytes(data))
        if forge:
            m = json.loads(self.files["manifest.json"])
            entry = m["shards"][self.shards.index(name)]
            m["totals"]["bytes"] += len(data) - entry["bytes"]
            entry.update(bytes=len(data), sha256=file_sha256(self.root / name))
            (self.root / "manifest.json").write_text(json.dumps(m))
        return f"{name} {op} at {at}"

    def _json(self, rng: np.random.Generator) -> tuple[str, bool]:
        m = json.loads(self.files["manifest.json"])
        op = rng.choice(["replace", "replace", "replace", "tweak", "delete", "add", "duplicate", "swap", "file"])
        must_fail = False
        if op == "file":
            desc, must_fail = self._file_edit(rng, m)
        else:
            paths = _paths(m)
            path = paths[int(rng.integers(0, len(paths)))]
            parent = m
            for k in path[:-1]:
                parent = parent[k]
            desc = f"{op} {'.'.join(map(str, path)) or 'root'}"
            if op == "replace" or not path:
                value = PALETTE[int(rng.integers(0, len(PALETTE)))]
                if not path:
                    m = value
                else:
                    parent[path[-1]] = value
                desc += f" = {str(value)[:40]!r}"
            elif op == "tweak":
                old = parent[path[-1]]
                if isinstance(old, bool) or not isinstance(old, (int, float)):
                    old = 0
                options = [old + 1, old - 1, old * 2, -old, old + 2**32, float(old), str(old)]
                parent[path[-1]] = options[int(rng.integers(0, len(options)))]
                desc += f" {old} -> {parent[path[-1]]!r}"
            elif op == "delete":
                del parent[path[-1]]
            elif op == "add":
                target = parent[path[-1]] if isinstance(parent[path[-1]], (dict, list)) else parent
                value = PALETTE[int(rng.integers(0, len(PALETTE)))]
                if isinstance(target, dict):
                    target[FIELD_NAMES[int(rng.integers(0, len(FIELD_NAMES)))]] = value
                else:
                    target.append(value)
                desc += f" + {str(value)[:40]!r}"
            elif op in ("duplicate", "swap"):
                container = parent[path[-1]] if isinstance(parent[path[-1]], list) else parent
                if isinstance(container, list) and container:
                    i, j = (int(x) for x in rng.integers(0, len(container), size=2))
                    if op == "duplicate":
                        container.insert(j, json.loads(json.dumps(container[i])))
                    else:
                        container[i], container[j] = container[j], container[i]
                    desc += f" [{i}] [{j}]"
        (self.root / "manifest.json").write_text(_dumps(m))
        return desc, must_fail

    def _file_edit(self, rng: np.random.Generator, m: dict) -> tuple[str, bool]:
        """Point a shard entry elsewhere: outside the set (only an error is acceptable), or at another name."""
        i = int(rng.integers(0, len(self.shards)))
        name = self.shards[i]
        choice = rng.choice(["dotdot", "absolute", "link-out", "link-out-dir", "other", "alias", "missing", "subdir"])
        if choice == "dotdot":
            m["shards"][i]["file"] = f"../outside/{name}"
        elif choice == "absolute":
            m["shards"][i]["file"] = str(self.outside / name)
        elif choice == "link-out":  # the entry's own name, now a link to the identical copy outside the set
            (self.root / name).unlink()
            (self.root / name).symlink_to(self.outside / name)
        elif choice == "link-out-dir":
            (self.root / "sub").symlink_to(self.outside, target_is_directory=True)
            m["shards"][i]["file"] = f"sub/{name}"
        elif choice == "other":
            m["shards"][i]["file"] = self.shards[(i + 1) % len(self.shards)]
        elif choice == "alias":  # a link inside the set to its own file
            (self.root / "alias.arrow").symlink_to(self.root / name)
            m["shards"][i]["file"] = "alias.arrow"
        elif choice == "missing":
            (self.root / name).unlink()
        else:
            (self.root / "sub").mkdir()
            (self.root / "sub" / name).write_bytes(self.files[name])
            m["shards"][i]["file"] = f"sub/{name}"
        return f"file shards[{i}] {choice}", choice in ("dotdot", "absolute", "link-out", "link-out-dir")

    # -- one case --------------------------------------------------------------------------------------------
    def run(self, i: int) -> tuple[str, str]:
        rng = np.random.default_rng([self.seed, i])
        kind = KINDS[int(rng.choice(len(KINDS), p=WEIGHTS))]
        desc = "?"
        try:
            desc, must_fail = self.mutate(rng, kind)
            desc = f"{kind}: {desc}"
            try:
                ss = open_shards(self.root)
            except ShardFormatError as e:
                return "error-open", f"{desc} | {str(e)[:160]}"
            try:
                packs = list(ss)
            except ShardFormatError as e:
                return "error-read", f"{desc} | {str(e)[:160]}"
            if len(packs) == len(self.reference) and all(map(_same, packs, self.reference)):
                if must_fail:
                    return "changed", f"{desc} | read a file from outside the set"
                _prep_stats(self.root)  # `prep stats` reports any set the reader accepts
                try:
                    verify_shard_set(self.root)
                except ShardFormatError as e:  # counts the reads do not use, edited consistently: verify's to catch
                    desc += f" | verify: {str(e)[:120]}"
                return "unchanged", desc
            if kind == "shard-forged":
                problems = {pack_guarantee_problem(p, ss.max_len, ss.vocab_size) for p in packs} - {None}
                if not problems:
                    return "forged-valid", desc
                return "changed", f"{desc} | a pack breaks {sorted(problems)}"
            return "changed", f"{desc} | {len(packs)} packs, not the reference's {len(self.reference)} or different"
        except BaseException as e:  # any other exception is the finding: report it, do not die
            tb = traceback.format_exception(e)[-3:]
            return "exception", f"{desc} | {type(e).__name__}: {str(e)[:200]} | {''.join(tb)[-600:]!r}"
        finally:
            self.restore()


def _prep_stats(path: Path) -> None:
    from padless.prep.config import CostConfig
    from padless.prep.report import format_stats, shard_stats

    format_stats(shard_stats(str(path), CostConfig()))


def main(argv: list[str]) -> None:
    pristine, seed, start, stop = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    fz = Fuzzer(pristine, seed)
    try:
        for i in range(start, stop):
            print(f"start {i}", flush=True)
            outcome, detail = fz.run(i)
            print(f"done {i} {outcome} {json.dumps(detail)}", flush=True)
    finally:
        shutil.rmtree(fz.work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
