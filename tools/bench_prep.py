"""Benchmark the offline stage: ``prep pack`` wall time per stage, the numba packer alone, packing quality and shard
bytes. Prints a table and appends its rows to docs/bench/results/prep.jsonl.

    python tools/bench_prep.py                                  # Alpaca 52K + GSM8K, Qwen2 tokenizer, 1024 and 4096
    python tools/bench_prep.py --data alpaca --max-len 1024     # one data set, one pack size
    python tools/bench_prep.py --data demo:alpaca --max-len 512 --packer-examples 100000   # a fresh clone

Data: ``--data`` takes a known name (``alpaca``, ``gsm8k``: files under ``--data-dir``, default ../shared/data), a
file, or ``demo:alpaca`` (bundled); the default is alpaca and gsm8k when ``--data-dir`` exists, else demo:alpaca.
``--tokenizer`` defaults to ``--data-dir``/tokenizers/qwen2 when it exists (else prep's bundled demo tokenizer).

Rows: ``pack`` (one per data set and max_len: wall time including interpreter start-up, in-process time, each
stage's seconds, packs against the lower bound ceil(tokens / max_len), fill, shard bytes and bytes per token) and
``packer`` (``padless.prep.pack.plan_packs`` on synthetic log-normal lengths: median seconds, examples/s, packs
against the lower bound). The first ``prep pack`` run is an untimed warm-up (numba cache, page cache).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_harness as H
import numpy as np

DEFAULT_DATA_DIR = H.REPO.parent / "shared" / "data"
KNOWN = {  # name -> (file under the data folder, extra prep pack options)
    "alpaca": ("alpaca/alpaca_data_en_52k.jsonl.gz", []),
    "gsm8k": ("gsm8k/train.jsonl.gz", ["--map", "prompt=question", "--map", "completion=answer"]),
}


def resolve(data: str, data_dir: Path) -> tuple[str, list[str]]:
    """(input for prep pack, extra options) of a --data value."""
    if data in KNOWN:
        rel, extra = KNOWN[data]
        path = data_dir / rel
        if not path.is_file():
            raise SystemExit(f"--data {data}: {path} not found; pass --data-dir or a file path")
        return str(path), extra
    if data.startswith("demo:") or Path(data).is_file():
        return data, []
    raise SystemExit(f"--data {data!r}: expected one of {sorted(KNOWN)}, demo:alpaca or an existing file")


def bench_pack(data: str, max_len: int, args: argparse.Namespace, out: Path) -> dict:
    """One ``prep pack`` run in a fresh interpreter, timed from outside; its JSON summary gives the stages."""
    source, extra = resolve(data, args.data_dir)
    tok = ["--tokenizer", args.tokenizer] if args.tokenizer else []
    cmd = [sys.executable, "-m", "padless.prep", "pack", source, *tok, "--max-len", str(max_len), "--out",
           str(out), "--overwrite", "--no-progress", "--json", *extra]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"prep pack failed ({' '.join(cmd)}):\n{res.stderr[-2000:]}")
    summary = json.loads(res.stdout)
    train = summary["train"]
    shard_bytes = json.loads((out / "manifest.json").read_text())["totals"]["bytes"]
    return {
        "bench": "pack",
        "data": data,
        "tokenizer": args.tokenizer or "demo",
        "max_len": max_len,
        "rows": train["rows"],
        "examples": train["examples"],
        "tokens": train["tokens"],
        "wall_s": wall,
        "in_process_s": summary["wall_s"],
        "stages_s": summary["stages"],
        "packs": train["packs"],
        "lower_bound": train["lower_bound_packs"],
        "packs_ratio": train["packs"] / train["lower_bound_packs"],
        "fill": train["fill"],
        "shard_bytes": shard_bytes,
        "bytes_per_token": shard_bytes / train["tokens"],
    }


def bench_packer(n: int, max_len: int, repeats: int) -> dict:
    """``plan_packs`` (FFD + shuffled pack layout) on n log-normal lengths (median ~90 tokens, long tail)."""
    from padless.prep.pack import plan_packs

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(4.5, 0.9, size=n), 1, max_len).astype(np.int64)
    seconds = H.time_ms(lambda: plan_packs(lengths, max_len, seed=1), warmup=1, repeats=repeats, cuda=False) / 1e3
    packs = len(plan_packs(lengths, max_len, seed=1).examples_per_pack)
    lower = -(-int(lengths.sum()) // max_len)
    return {"bench": "packer", "data": "synthetic", "max_len": max_len, "examples": n, "median_s": seconds,
            "examples_per_s": n / seconds, "packs": packs, "lower_bound": lower,
            "packs_ratio": packs / lower}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", action="append", help="alpaca, gsm8k, demo:alpaca or a file (repeatable)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder of the known data sets")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: DATA_DIR/tokenizers/qwen2)")
    p.add_argument("--max-len", type=int, action="append", help="pack size in tokens (repeatable; 1024, 4096)")
    p.add_argument("--packer-examples", type=int, default=10_000_000, help="synthetic lengths for the packer alone")
    p.add_argument("--repeats", type=int, default=3, help="packer repeats (median)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed first prep pack run")
    H.add_results_args(p, "prep")
    args = p.parse_args(argv)
    have_dir = args.data_dir.is_dir()
    args.data = args.data or (list(KNOWN) if have_dir else ["demo:alpaca"])
    args.max_len = args.max_len or [1024, 4096]
    if args.tokenizer is None and have_dir and (args.data_dir / "tokenizers" / "qwen2").is_dir():
        args.tokenizer = str(args.data_dir / "tokenizers" / "qwen2")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-prep-") as tmp:
        if not args.no_warmup:
            bench_pack(args.data[0], args.max_len[0], args, Path(tmp) / "warmup")
        for data in args.data:
            for max_len in args.max_len:
                rows.append(bench_pack(data, max_len, args, Path(tmp) / f"{len(rows)}"))
                print(f"packed {data} at {max_len}: {rows[-1]['wall_s']:.2f} s", flush=True)
    for max_len in args.max_len:
        rows.append(bench_packer(args.packer_examples, max_len, args.repeats))
    stages = list(dict.fromkeys(k for r in rows for k in r.get("stages_s", {})))
    columns = [("bench", "bench", "s"), ("data", "data", "s"), ("max_len", "max_len", "d"),
               ("tokens", "tokens", ",d"), ("wall_s", "wall s", ".2f"), ("in_process_s", "in-process s", ".2f"),
               *((f"stages_s.{k}", f"{k} s", ".2f") for k in stages), ("median_s", "packer s", ".3f"),
               ("examples_per_s", "examples/s", lambda x: f"{x / 1e6:.1f}M"), ("packs", "packs", ",d"),
               ("packs_ratio", "packs / bound", ".4f"), ("bytes_per_token", "bytes/token", ".3f")]  # fmt: skip
    print(H.format_table(rows, columns, title=f"\nprep benchmark ({H.environment()['cpu']})"))
    H.record(args, "prep", rows)


if __name__ == "__main__":
    main()
