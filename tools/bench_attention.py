"""Benchmark padless varlen attention against PyTorch's ``varlen_attn`` and FlexAttention document masks, and sweep
its tilings. Prints a table and appends its rows to docs/bench/results/attention.jsonl.

    python tools/bench_attention.py                                   # D 64/128/256, packs of 4K and 16K tokens
    python tools/bench_attention.py --dims 128 --packs 16384 --graph  # device time from CUDA-graph replays
    python tools/bench_attention.py --dims 128 --packs 131072,524288 --shapes one --impls padless,varlen_attn
    python tools/bench_attention.py --sweep --budget-s 500 --write-tuned   # tune, then update the tuned table
    python tools/bench_attention.py --smoke [--sweep]                 # tiny shapes; on a CPU under TRITON_INTERPRET=1

Table (bf16, causal, H 32 / Hkv 8 unless --heads): forward and forward+backward milliseconds (CUDA events, median;
``--graph``: CUDA-graph replays, no host launch path) and useful TFLOP/s, on packs filled with Alpaca-like examples
(log-normal lengths, median 95, clipped to [8, 1024]; ``--shapes alpaca``), equal lengths of 1K and 4K tokens
(``eq1K``, ``eq4K``) or one example filling the pack (``one``, long context). Cases with examples of 64K tokens or
more time 1 warm-up and 3 calls instead of 3 and 10. Implementations (``--impls``):
``padless`` (``varlen_attention``, default backward), ``padless_det`` (``deterministic=True``), ``varlen_attn``
(``torch.nn.attention.varlen``, when this torch has it) and ``flex`` (compiled FlexAttention, document-causal
BlockMask built outside the timing). FLOPs count only each example's causal half: forward 4 * sum(l^2 / 2) * H * D,
forward+backward 3.5x that.

``--sweep`` times candidate tilings per (D, dtype, length bucket, kind) through ``varlen_attention_with_configs``:
the forward, the atomic-dQ backward (``bwd_atomic``) and the deterministic backward's dK/dV then dQ kernels
(``bwd_kv``, ``bwd_dq``, each timed as the whole deterministic backward). One case stands for each bucket (16K-token
packs: Alpaca-like = short, 1K = medium, 4K = long; xlong: one 64K example, nearer the 128K+ sequences the bucket
serves than a 16K one, whose winners lost at 128K); this GPU's current tuned tiles, if any, are candidates too.
Trials stop starting once ``--budget-s`` is spent. ``--write-tuned [PATH]`` (default ``kernels/attention_tuned.json``)
replaces this GPU's swept cases with the winners, keeps its other cases and other GPUs' tables, validates the
document with ``parse_tuned`` and writes it atomically; ``backward`` is the faster of the two measured backwards.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_harness as H

DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
SMOKE_LENS = [1, 30, 17, 40, 8]


# ---------------------------------------------------------------------------------------------------- inputs
def alpaca_lens(total: int, seed: int) -> list[int]:
    """Log-normal lengths (median 95, sigma 0.8) clipped to [8, 1024], the last one cut to fill the pack."""
    import numpy as np

    rng, lens, left = np.random.default_rng(seed), [], total
    while left > 0:
        lens.append(min(int(np.clip(rng.lognormal(math.log(95), 0.8), 8, 1024)), left))
        left -= lens[-1]
    return lens


SHAPES = ("alpaca", "eq1K", "eq4K", "one")
IMPLS = ("padless", "padless_det", "varlen_attn", "flex")
LONG_EXAMPLE = 65536  # examples this long take seconds per pass: fewer timed calls


def size_label(tokens: int) -> str:
    """128K for 131072 tokens; a size that is not a whole number of K keeps its digits (524416), so two packs
    never share a case name."""
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def table_cases(packs: list[int], shapes: list[str]) -> list[tuple[str, list[int]]]:
    """(name, example lengths) per pack size and shape, in that order."""
    out = []
    for pack, shape in itertools.product(packs, shapes):
        if shape == "alpaca":
            out.append((f"alpaca/{size_label(pack)}", alpaca_lens(pack, pack)))
        elif shape == "one":
            out.append((f"one{size_label(pack)}", [pack]))
        elif (eq := int(shape.removeprefix("eq").removesuffix("K")) * 1024) <= pack:
            out.append((f"eq{eq // 1024}K/{size_label(pack)}", [eq] * (pack // eq)))
    return out


BUCKET_CASES = {"short": ("alpaca/16K", lambda: alpaca_lens(16384, 16384)), "medium": ("eq1K/16K", lambda: [1024] * 16),
                "long": ("eq4K/16K", lambda: [4096] * 4), "xlong": ("one64K", lambda: [65536])}  # fmt: skip


def causal_flops(lens: list[int], heads: int, d: int) -> float:
    return 4.0 * sum(n * n / 2 for n in lens) * heads * d


def make_inputs(lens: list[int], heads: int, kv_heads: int, d: int, device: str, dtype) -> tuple:
    import torch

    t = sum(lens)
    q, k, v, do = (torch.randn(t, h, d, device=device, dtype=dtype) for h in (heads, kv_heads, kv_heads, heads))
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
    return [x.requires_grad_(True) for x in (q, k, v)], do, cu


# ----------------------------------------------------------------------------------------- implementations
def padless_fn(lens, cu, deterministic: bool):
    from padless.kernels.attention import varlen_attention

    m, mean = max(lens), sum(lens) / len(lens)
    return lambda q, k, v: varlen_attention(q, k, v, cu, m, deterministic=deterministic, mean_seqlen=mean)


def varlen_attn_fn(lens, cu, heads, kv_heads):
    """PyTorch's ``varlen_attn`` as this torch spells it: causal through ``window_size=(-1, 0)`` or (older)
    ``is_causal``; grouped k/v heads through ``enable_gqa`` or, where it lacks that, repeated to the query heads
    inside the timed call."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn  # ImportError on a torch without it: the row says so

    params = inspect.signature(varlen_attn).parameters
    m, gqa = max(lens), kv_heads != heads
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if gqa and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    elif gqa:
        group = heads // kv_heads
        return lambda q, k, v: varlen_attn(
            q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), cu, cu, m, m, **kwargs
        )
    return lambda q, k, v: varlen_attn(q, k, v, cu, cu, m, m, **kwargs)


_FLEX: dict[str, Any] = {}


def flex_fn(lens, heads, kv_heads, device):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:  # one static compile per pack shape: lift dynamo's recompile cap so flex never runs eager
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 256)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    t = sum(lens)
    doc = torch.repeat_interleave(torch.arange(len(lens), device=device), torch.tensor(lens, device=device))
    mask = create_block_mask(lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki), None, None, t, t, device=device)
    flex, gqa = _FLEX["fn"], kv_heads != heads
    return lambda q, k, v: flex(q, k, v, block_mask=mask, enable_gqa=gqa)


def time_case(fn, inputs, do, graph: bool, smoke: bool, long: bool = False) -> tuple[float | None, float | None, str]:
    """(forward ms, forward+backward ms, note) of fn(q, k, v); a pass that fails gets None and the reason.
    ``long``: examples of seconds per pass, timed over 1 warm-up and 3 calls."""
    import torch

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def fwdbwd():
        torch.autograd.grad(fn(*inputs), inputs, do)

    times, notes = [], []
    for name, call in (("fwd", fwd), ("fwd+bwd", fwdbwd)):
        try:
            reps = {"warmup": 0, "repeats": 1} if smoke else {"warmup": 1, "repeats": 3} if long else \
                   {"warmup": 3, "repeats": 10}  # fmt: skip
            times.append(H.time_graph_ms([call], calls=5) if graph else H.time_ms(call, **reps))
        except Exception as error:  # a peer missing, out of memory or not capturable: recorded, the table goes on
            times.append(None)
            notes.append(f"{name}: {type(error).__name__}: {str(error)[:100]}")
    return times[0], times[1], "; ".join(notes)


def run_table(args, device: str, dtype) -> list[dict]:
    import torch

    heads, kv_heads = args.heads
    impls = [i for i in args.impls if not args.smoke or i.startswith("padless")]
    cases = [("tiny", SMOKE_LENS)] if args.smoke else table_cases(args.packs, args.shapes)
    rows = []
    for d, (case, lens) in itertools.product(args.dims, cases):
        inputs, do, cu = make_inputs(lens, heads, kv_heads, d, device, dtype)
        flops = causal_flops(lens, heads, d)
        for impl in impls:
            row = {"bench": "table", "case": case, "tokens": sum(lens), "D": d, "heads": heads, "kv_heads": kv_heads,
                   "dtype": DTYPE_NAMES[str(dtype).removeprefix("torch.")], "impl": impl,
                   "timer": "graph" if args.graph else "events"}  # fmt: skip
            try:
                if impl.startswith("padless"):
                    fn = padless_fn(lens, cu, deterministic=impl == "padless_det")
                elif impl == "varlen_attn":
                    fn = varlen_attn_fn(lens, cu, heads, kv_heads)
                else:
                    fn = flex_fn(lens, heads, kv_heads, device)
                # FlexAttention takes (1, H, T, D): its own contiguous copies of the same inputs
                bhtd = lambda x: x.detach().transpose(0, 1).unsqueeze(0).contiguous().requires_grad_(x.requires_grad)
                ins, dout = ([bhtd(x) for x in inputs], bhtd(do)) if impl == "flex" else (inputs, do)
                f, fb, note = time_case(fn, ins, dout, args.graph, args.smoke, long=max(lens) >= LONG_EXAMPLE)
            except Exception as error:  # the peer cannot be built here (missing in this torch, ...)
                f, fb, note = None, None, f"{type(error).__name__}: {str(error)[:100]}"
            row.update(fwd_ms=f, fwdbwd_ms=fb, note=note)
            row.update(fwd_tflops=f and flops / f / 1e9, fwdbwd_tflops=fb and 3.5 * flops / fb / 1e9)
            rows.append(row)
            print(f"D={d} {case} {impl}: fwd {f} ms, fwd+bwd {fb} ms {note}", flush=True)
        del inputs, do
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------------ sweep
def pow2_divisor(n: int, cap: int) -> int:
    p = 1
    while n % (2 * p) == 0 and 2 * p <= cap:
        p *= 2
    return p


def candidates(kind: str, bucket: str, d: int, group: int) -> list[tuple]:
    """Plausible tilings (rows = query tokens x heads per tile, so block_m = rows / hpb, at least 16)."""
    short, big = bucket == "short", d > 128
    hf, hb = pow2_divisor(group, 8 if short else 4), pow2_divisor(group, 4 if short else 2)
    m = lambda rows, hpb: max(16, rows // hpb)
    if kind == "fwd":  # (block_m, hpb, block_n, num_warps, num_stages)
        grid = [(64, 64, 4), (128, 64, 8), (64, 32, 4), (128, 32, 8), (64, 64, 8)] if big else \
               [(128, 64, 8), (128, 128, 8), (64, 64, 4), (128, 32, 4), (128, 64, 4)]  # fmt: skip
        return list(dict.fromkeys((m(rows, hf), hf, n, w, 2 if big else 3) for rows, n, w in grid))
    # Head dims up to 128 also try the backward's first tile with up to 4 heads per tile: fewer, longer head loops
    # (one 128K sequence on an H100: 16 tokens x 4 heads per tile beat 32 x 2).
    h4 = pow2_divisor(group, 4)
    if kind in ("bwd_kv", "bwd_atomic"):  # (kv_block_n, kv_block_m, kv_hpb, kv_warps, kv_stages)
        grid = [(32, 32, 8, 2), (64, 32, 8, 2), (64, 64, 8, 1), (64, 16, 8, 2), (32, 64, 4, 2)] if big else \
               [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2), (64, 128, 8, 2)]  # fmt: skip
        tiles = [(n, m(rows, hb), hb, w, s) for n, rows, w, s in grid]
        if not big:
            n, rows, w, s = grid[0]
            tiles.append((n, m(rows, h4), h4, w, s))
        return list(dict.fromkeys(tiles))
    # bwd_dq: (q_block_m, q_hpb, q_block_n, q_warps, q_stages)
    grid = [(32, 32, 8, 2), (64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)] if big else \
           [(128, 64, 8, 3), (64, 32, 4, 2), (64, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 3)]  # fmt: skip
    tiles = [(m(rows, hb), hb, n, w, s) for rows, n, w, s in grid]
    if not big:
        rows, n, w, s = grid[0]
        tiles.append((m(rows, h4), h4, n, w, s))
    return list(dict.fromkeys(tiles))


def current_tiles(gpu: str, d: int, dtype: str, bucket: str) -> dict[str, tuple]:
    """This GPU's tiles for the case in the tuned table now in the tree ({} when none or unreadable)."""
    from padless.kernels.attention import TUNED_FIELDS, TUNED_PATH

    try:
        doc = json.loads(TUNED_PATH.read_text())
        case = next(c for t in doc["tables"] if t["gpu"] == gpu for c in t["cases"]
                    if (c["D"], c["dtype"], c["bucket"]) == (d, dtype, bucket))  # fmt: skip
        return {k: tuple(v[f] for f in TUNED_FIELDS[k]) for k, v in case["tiles"].items()}
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return {}


def time_trial(q, k, v, do, cu, m: int, fwd_cfg, bwd_cfg, smoke: bool) -> float:
    """Milliseconds of the forward (``fwd_cfg``) or of the backward alone on one recorded forward (``bwd_cfg``)."""
    import torch

    from padless.kernels.attention import varlen_attention_with_configs

    reps = {"warmup": 0, "repeats": 1} if smoke else {"warmup": 3, "repeats": 10}
    if bwd_cfg is None:
        with torch.no_grad():
            return H.time_ms(lambda: varlen_attention_with_configs(q, k, v, cu, m, fwd_cfg=fwd_cfg), **reps)
    out = varlen_attention_with_configs(q, k, v, cu, m, bwd_cfg=bwd_cfg)
    return H.time_ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True), **reps)


def run_sweep(args, device: str, dtype, gpu: str) -> list[dict]:
    """Time every candidate, case by case (D, then bucket), until --budget-s is spent; one dict per trial."""
    from padless.kernels.attention import BwdConfig, FwdConfig, length_bucket

    heads, kv_heads = args.heads
    group, dname = heads // kv_heads, DTYPE_NAMES[str(dtype).removeprefix("torch.")]
    start, results = time.perf_counter(), []
    cases = {"short": ("tiny", SMOKE_LENS)} if args.smoke else {b: (n, f()) for b, (n, f) in BUCKET_CASES.items()}
    for d, bucket in itertools.product(args.dims, args.buckets):
        case, lens = cases[bucket]
        if length_bucket(sum(lens) / len(lens)) != bucket:
            raise SystemExit(f"case {case} (mean {sum(lens) / len(lens):.0f}) is not in bucket {bucket}")
        (q, k, v), do, cu = make_inputs(lens, heads, kv_heads, d, device, dtype)
        m, flops = max(lens), causal_flops(lens, heads, d)
        have = current_tiles(gpu, d, dname, bucket)
        best: dict[str, tuple] = {}
        for kind in ("bwd_atomic", "bwd_kv", "bwd_dq", "fwd"):
            cands = list(dict.fromkeys([*([have[kind]] if kind in have else []), *candidates(kind, bucket, d, group)]))
            for cfg in cands[: 2 if args.smoke else None]:
                if time.perf_counter() - start > args.budget_s:
                    print(f"[sweep] --budget-s {args.budget_s:.0f} spent: stopping", flush=True)
                    return results
                if kind == "fwd":
                    fwd_cfg, bwd_cfg = FwdConfig(*cfg), None
                else:
                    kv = best.get("bwd_kv", (None, candidates("bwd_kv", bucket, d, group)[0]))[1]
                    dq = best.get("bwd_dq", (None, candidates("bwd_dq", bucket, d, group)[0]))[1]
                    if kind != "bwd_dq":
                        kv = cfg
                    else:
                        dq = cfg
                    fwd_cfg, bwd_cfg = None, BwdConfig(*kv, *dq, dq_atomic=kind == "bwd_atomic")
                try:
                    ms, error = time_trial(q, k, v, do, cu, m, fwd_cfg, bwd_cfg, args.smoke), ""
                except Exception as e:  # out of shared memory / registers for this tiling: recorded, the sweep goes on
                    ms, error = None, f"{type(e).__name__}: {str(e)[:100]}"
                tflops = ms and (1.0 if kind == "fwd" else 2.5) * flops / ms / 1e9
                results.append({"bench": "sweep", "case": case, "bucket": bucket, "D": d, "dtype": dname, "kind": kind,
                                "config": list(cfg), "ms": ms, "tflops": tflops, "error": error})  # fmt: skip
                if ms and (kind not in best or ms < best[kind][0]):
                    best[kind] = (ms, cfg)
                print(f"[sweep] {time.perf_counter() - start:5.0f}s D={d} {bucket} {kind} {cfg}: "
                      + (f"{ms:.3f} ms" if ms else error), flush=True)  # fmt: skip
    return results


def winners(results: list[dict]) -> dict[tuple, dict]:
    """The fastest successful trial per (D, dtype, bucket, kind)."""
    best: dict[tuple, dict] = {}
    for r in results:
        key = (r["D"], r["dtype"], r["bucket"], r["kind"])
        if r["ms"] and (key not in best or r["ms"] < best[key]["ms"]):
            best[key] = r
    return best


def write_tuned(path: Path, results: list[dict], gpu: str) -> dict:
    """Replace ``gpu``'s table in the tuned-table document at ``path`` with this sweep's winners (atomically)."""
    import torch
    import triton

    from padless.kernels.attention import TUNED_FIELDS, parse_tuned

    best, cases = winners(results), []
    for d, dtype, bucket in dict.fromkeys(k[:3] for k in best):
        got = {kind: r for (d2, t2, b2, kind), r in best.items() if (d2, t2, b2) == (d, dtype, bucket)}
        case = {"D": d, "dtype": dtype, "bucket": bucket,
                "tiles": {k: dict(zip(TUNED_FIELDS[k], r["config"])) for k, r in got.items()}}  # fmt: skip
        det = got.get("bwd_dq", got.get("bwd_kv"))
        if det and "bwd_atomic" in got:
            case["backward"] = "deterministic" if det["ms"] < got["bwd_atomic"]["ms"] else "atomic"
        case["note"] = f"{got[next(iter(got))]['case']}: " + ", ".join(f"{k} {r['ms']:.3f} ms" for k, r in got.items())
        cases.append(case)
    others, kept = [], []
    if path.exists():
        try:
            old = json.loads(path.read_text())
            parse_tuned(old, str(path))
            others = [t for t in old["tables"] if t["gpu"] != gpu]
            swept = {(c["D"], c["dtype"], c["bucket"]) for c in cases}
            for t in (t for t in old["tables"] if t["gpu"] == gpu):
                # the table's torch/triton/date become this sweep's: an unswept case's note keeps its own
                origin = f"swept {t.get('date')} with torch {t.get('torch')}, triton {t.get('triton')}"
                for c in t["cases"]:
                    if (c["D"], c["dtype"], c["bucket"]) not in swept:
                        note = c.get("note", "")
                        kept.append({**c, "note": note if note.startswith("swept ") else f"{origin}; {note}"})
        except ValueError as error:  # JSONDecodeError is a ValueError too
            print(f"[tuned] {path} is not a valid version-2 table ({error}); writing a new document", flush=True)
    table = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
             "date": datetime.date.today().isoformat(), "cases": [*kept, *cases]}  # fmt: skip
    doc = {"version": 2, "tables": [*others, table]}
    parse_tuned(doc, str(path))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    print(
        f"[tuned] wrote {len(cases)} case(s) for {gpu} to {path} ({len(kept)} unswept case(s) of this GPU and "
        f"{len(others)} other GPU table(s) kept)"
    )
    return doc


# ------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", default="64,128,256", help="head dims D, comma-separated")
    p.add_argument("--packs", default="4096,16384", help="table: pack sizes in tokens, comma-separated")
    p.add_argument("--shapes", default="alpaca,eq1K,eq4K", help=f"table: pack contents, some of {','.join(SHAPES)}")
    p.add_argument("--impls", default=",".join(IMPLS), help="table: implementations, comma-separated")
    p.add_argument("--heads", default="32,8", help="query and key/value heads, H,Hkv")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--graph", action="store_true", help="table: time CUDA-graph replays instead of eager calls")
    p.add_argument("--sweep", action="store_true", help="time candidate tilings instead of the table")
    p.add_argument("--buckets", default="short,medium,long,xlong", help="--sweep: length buckets, comma-separated")
    p.add_argument("--budget-s", type=float, default=540.0, help="--sweep: start no trial after this many seconds")
    p.add_argument("--write-tuned", nargs="?", const="", default=None, metavar="PATH",
                   help="--sweep: write the winners into this tuned table (kernels/attention_tuned.json)")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: Triton interpreter, padless only)")
    H.add_results_args(p, "attention")
    args = p.parse_args(argv)
    args.dims = [int(x) for x in args.dims.split(",")]
    args.packs = [int(x) for x in args.packs.split(",")]
    args.heads = tuple(int(x) for x in args.heads.split(","))
    args.buckets = args.buckets.split(",")
    args.shapes, args.impls = args.shapes.split(","), args.impls.split(",")
    for name, given, known in (("--shapes", args.shapes, SHAPES), ("--impls", args.impls, IMPLS)):
        if unknown := sorted(set(given) - set(known)):
            p.error(f"{name}: unknown {unknown}; expected some of {list(known)}")
    if args.smoke:
        args.dims, args.heads, args.buckets = [16], (4, 2), ["short"]
    if unknown := sorted(set(args.buckets) - set(BUCKET_CASES)):
        p.error(f"--buckets: unknown {unknown}; expected some of {list(BUCKET_CASES)}")
    if args.write_tuned is not None and not args.sweep:
        p.error("--write-tuned needs --sweep")
    if args.write_tuned == "" and args.smoke:
        p.error("--smoke --write-tuned needs a PATH: smoke timings never go into kernels/attention_tuned.json")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    device = H.select_device("bench_attention.py", args.smoke)
    cuda = device == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    torch.manual_seed(0)
    if args.sweep:
        results = run_sweep(args, device, dtype, gpu)
        rows = list(winners(results).values())
        cols = [("D", "D", "d"), ("bucket", "bucket", "s"), ("kind", "kind", "s"), ("config", "tiles", str),
                ("ms", "ms", ".3f"), ("tflops", "TFLOP/s", ".0f")]  # fmt: skip
        print(H.format_table(rows, cols, title=f"\nfastest tiling per case on {gpu} ({len(results)} trials)"))
        if args.write_tuned is not None:
            from padless.kernels.attention import TUNED_PATH

            write_tuned(Path(args.write_tuned) if args.write_tuned else TUNED_PATH, results, gpu)
    else:
        rows = run_table(args, device, dtype)
        cols = [("D", "D", "d"), ("case", "case", "s"), ("impl", "impl", "s"), ("fwd_ms", "fwd ms", ".3f"),
                ("fwd_tflops", "fwd TFLOP/s", ".0f"), ("fwdbwd_ms", "fwd+bwd ms", ".3f"),
                ("fwdbwd_tflops", "fwd+bwd TFLOP/s", ".0f"), ("note", "note", "s")]  # fmt: skip
        print(H.format_table(rows, cols, title=f"\nvarlen attention on {gpu}, H {args.heads[0]} Hkv {args.heads[1]}"))
    H.record(args, "attention", rows, smoke=args.smoke)


if __name__ == "__main__":
    main()
