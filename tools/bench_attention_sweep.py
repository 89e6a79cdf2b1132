"""Tiling sweep for the varlen attention kernels, bounded by a time budget, and the tuned-table writer.

One case per length bucket (Alpaca-like = short, 1K = medium, 4K = long, one 16K example = xlong, in a 16K
pack; ``--sweep-buckets`` picks some); per
(head dim, bucket, kind) a handful of plausible tilings (the built-in default first, so the winner is never
worse than it). Kinds: ``bwd_atomic`` (the default backward: dK/dV kernel with atomic dQ), ``fwd``, ``bwd_kv``
and ``bwd_dq`` (the deterministic backward's two kernels). Trials run most important first (atomic backward
then the deterministic pair's dK/dV and dQ kernels, then the forward; D 128 before D 64) and stop when
``--budget-s`` is spent. A bwd_kv/bwd_dq trial times the whole deterministic backward, so the tuned table also
tells ``default_configs`` whether the atomic or the deterministic backward is faster per bucket.
``--write-tuned PATH`` merges the winners into the JSON that ``kernels.attention.default_configs`` reads.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

__all__ = ["BUCKET_CASES", "run_sweep", "sweep_candidates", "write_tuned"]

# The case that stands for each length bucket (names as in bench_attention.cases).
BUCKET_CASES = {"short": "alpaca/16K", "medium": "eq1K/16K", "long": "eq4K/16K", "xlong": "eq16K/16K"}
KIND_ORDER = ("bwd_atomic", "bwd_kv", "bwd_dq", "fwd")


def _rows(rows: int, hpb: int) -> int:
    return max(16, rows // hpb)


def sweep_candidates(kind: str, bucket: str, D: int, group: int) -> list[tuple]:
    """The built-in default first, then alternatives that compile without spills at sm_90 (checked offline with
    ``--compile-check --candidates``, which compiles the bwd_kv form: the atomic kernel needs more shared memory,
    so a few bwd_atomic trials fail with OutOfResources on the GPU and are recorded as errors). Key blocks of the
    dK/dV kernel stay >= 64 where registers allow (wgmma needs M >= 64)."""
    from padless.kernels.attention import _builtin_configs, _pow2_divisor

    default = _builtin_configs(D, bucket, group)[kind]
    short, big = bucket == "short", D > 128
    h4, h2 = _pow2_divisor(group, 4), _pow2_divisor(group, 2)
    hs = h4 if short else h2
    if kind in ("bwd_atomic", "bwd_kv"):
        if big:  # 64-key blocks: wgmma (M >= 64) for the dK/dV dots; dK + dV fp32 need 8 warps' registers
            alts = [(64, _rows(32, hs), hs, 8, 2), (64, _rows(32, hs), hs, 8, 1), (64, _rows(64, hs), hs, 8, 1),
                    (64, _rows(16, hs), hs, 8, 2), (32, _rows(64, hs), hs, 4, 2),
                    (64, _rows(32, h4), h4, 8, 2), (64, _rows(64, h4), h4, 8, 1),
                    # 64 rows with two stages, 128 rows with one (197 KB shared memory each, compile-checked)
                    (64, _rows(64, hs), hs, 8, 2), (64, _rows(128, hs), hs, 8, 1),
                    (64, _rows(128, h4), h4, 8, 1)]  # fmt: skip
        elif short:
            alts = [(64, _rows(64, h4), h4, 4, 3), (64, _rows(128, h4), h4, 8, 2), (128, _rows(64, h4), h4, 8, 2),
                    (32, _rows(64, h4), h4, 4, 2)]  # fmt: skip
        else:  # the pre-run-2 default (64 keys x 64 rows, 8 warps) among them
            alts = [(128, _rows(64, h2), h2, 8, 2), (64, _rows(64, h2), h2, 4, 2), (64, _rows(64, h2), h2, 8, 2),
                    (128, 64, 1, 8, 3)]  # fmt: skip
    elif kind == "bwd_dq":
        if big:
            alts = [(_rows(64, hs), hs, 32, 4, 2), (_rows(64, hs), hs, 64, 8, 2), (_rows(64, hs), hs, 64, 4, 2),
                    (_rows(128, hs), hs, 32, 8, 2), (_rows(64, hs), hs, 32, 8, 2),
                    (_rows(128, h4), h4, 32, 8, 2), (_rows(128, h4), h4, 64, 8, 1),
                    (_rows(128, hs), hs, 32, 8, 3), (_rows(128, h4), h4, 32, 8, 3)]  # fmt: skip
        else:
            alts = [(_rows(64, hs), hs, 64, 8, 2), (_rows(64, hs), hs, 64, 4, 2), (_rows(128, hs), hs, 32, 8, 3)]
    else:  # fwd: already ahead of every peer; only nearby tilings
        hf = _pow2_divisor(group, 8 if short else 4)
        if big:  # D 256: 64-row tiles are one warpgroup's wgmma M; the fp32 accumulator is 64 x 256
            alts = [(_rows(64, hf), hf, 64, 4, 2), (_rows(128, hf), hf, 64, 8, 2), (_rows(64, hf), hf, 32, 4, 2),
                    (_rows(128, hf), hf, 32, 8, 2), (_rows(64, hf), hf, 64, 8, 2)]  # fmt: skip
        else:
            alts = [(_rows(128, hf), hf, 64, 8, 3), (_rows(64, hf), hf, 64, 4, 3)]
        if short and not big:
            alts.append((_rows(128, hf), hf, 64, 4, 3))
    return list(dict.fromkeys([default, *alts]))


def _bwd_from(kind: str, cfg: tuple, d_bwd):
    from padless.kernels.attention import BwdConfig

    if kind == "bwd_dq":
        return BwdConfig(*d_bwd[:5], *cfg, dq_atomic=False, fuse_delta=d_bwd.fuse_delta, dq_first=d_bwd.dq_first)
    atomic = kind == "bwd_atomic"
    return BwdConfig(*cfg, *d_bwd[5:10], dq_atomic=atomic, fuse_delta=d_bwd.fuse_delta,
                     dq_first=d_bwd.dq_first and not atomic)  # fmt: skip


def _with_best_kv(d_bwd, results: list[dict], D: int, bucket: str):
    """``d_bwd`` with its dK/dV half replaced by the fastest bwd_kv trial of ``results`` for (D, bucket), if any."""
    best = winners(results).get((D, bucket, "bwd_kv"))
    if best is None:
        return d_bwd
    return d_bwd._replace(**dict(zip(("kv_block_n", "kv_block_m", "kv_hpb", "kv_warps", "kv_stages"), best["config"],
                                     strict=True)))  # fmt: skip


def run_sweep(args, bench, device, dtype, lens_of: dict, causal_flops) -> list[dict]:
    """Time candidates in priority order until ``args.budget_s`` is spent; one result dict per trial."""
    from padless.kernels.attention import FwdConfig, default_configs, varlen_attention_with_configs

    t0 = time.perf_counter()
    group = args.H // args.Hkv
    plan = []
    for D in args.sweep_dims:
        for kind in [k for k in KIND_ORDER if k in args.sweep_kinds]:
            for bucket, case in BUCKET_CASES.items():
                if case in lens_of and bucket in args.sweep_buckets:
                    plan += [(kind, D, bucket, case, c) for c in sweep_candidates(kind, bucket, D, group)]
    inputs, results = {}, []
    for n_done, (kind, D, bucket, case, cfg) in enumerate(plan):
        spent = time.perf_counter() - t0
        if spent > args.budget_s:
            print(f"[sweep] budget {args.budget_s:.0f} s spent after {n_done}/{len(plan)} trials", flush=True)
            break
        lens = lens_of[case]
        if (case, D) not in inputs:
            T = sum(lens)
            q, k, v, do = (torch.randn(T, h, D, device=device, dtype=dtype) for h in (args.H, args.Hkv, args.Hkv,
                                                                                        args.H))  # fmt: skip
            cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
            inputs[(case, D)] = ([x.requires_grad_(True) for x in (q, k, v)], do, cu)
        (q, k, v), do, cu = inputs[(case, D)]
        m = max(lens)
        d_fwd, d_bwd = default_configs(D, dtype, m, group, sum(lens) / len(lens), deterministic=kind != "bwd_atomic")
        try:
            if kind == "fwd":
                with torch.no_grad():
                    ms = bench(lambda: varlen_attention_with_configs(q, k, v, cu, m, fwd_cfg=FwdConfig(*cfg)))  # noqa: B023
            else:
                if kind == "bwd_dq":
                    # The dQ kernel runs beside the dK/dV kernel: time it with the best dK/dV tiling this sweep
                    # found, so a bwd_dq entry's ms is the whole deterministic backward at both winners (the atomic
                    # vs deterministic choice in kernels.attention compares these times).
                    d_bwd = _with_best_kv(d_bwd, results, D, bucket)
                bcfg = _bwd_from(kind, cfg, d_bwd)
                out = varlen_attention_with_configs(q, k, v, cu, m, fwd_cfg=d_fwd, bwd_cfg=bcfg)
                ms = bench(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))  # noqa: B023
            err = ""
        except Exception as e:  # out of shared memory / registers for this tiling: record and go on
            ms, err = None, f"{type(e).__name__}: {e}"[:160]
        flops = (1.0 if kind == "fwd" else 2.5) * causal_flops(lens, args.H, D)
        r = {"case": case, "bucket": bucket, "D": D, "kind": kind, "config": list(cfg), "ms": ms,
             "tflops": flops / ms / 1e9 if ms else None, "error": err}  # fmt: skip
        results.append(r)
        print(f"[sweep] {time.perf_counter() - t0:5.0f}s {kind} D={D} {bucket} {cfg}: "
              + (f"{ms:.3f} ms {r['tflops']:.0f} TFLOP/s" if ms else err), flush=True)  # fmt: skip
    return results


def winners(results: list[dict]) -> dict[tuple, dict]:
    """Fastest successful trial per (D, bucket, kind)."""
    best: dict[tuple, dict] = {}
    for r in results:
        key = (r["D"], r["bucket"], r["kind"])
        if r["ms"] and (key not in best or r["ms"] < best[key]["ms"]):
            best[key] = r
    return best


def write_tuned(path: Path, results: list[dict], dtype_name: str, env: dict) -> list[dict]:
    """Merge the winners into the tuned JSON (entries not re-measured are kept); validated by re-loading it."""
    from padless.kernels.attention import TUNED_FIELDS, TUNED_VERSION, load_tuned

    old = json.loads(path.read_text())["entries"] if path.exists() else []
    new = []
    for (D, bucket, kind), r in sorted(winners(results).items()):
        new.append({"D": D, "dtype": dtype_name, "bucket": bucket, "kind": kind,
                    "config": dict(zip(TUNED_FIELDS[kind], r["config"], strict=True)), "ms": round(r["ms"], 4),
                    "note": f"{r['case']}, {r['tflops']:.0f} TFLOP/s"})  # fmt: skip
    fresh = {(e["D"], e["dtype"], e["bucket"], e["kind"]) for e in new}
    entries = [e for e in old if (e["D"], e["dtype"], e["bucket"], e["kind"]) not in fresh] + new
    env_short = {k: env[k] for k in ("gpu", "torch", "triton") if k in env}
    path.write_text(json.dumps({"version": TUNED_VERSION, "measured_on": env_short, "entries": entries}, indent=1)
                    + "\n")  # fmt: skip
    load_tuned.cache_clear()
    load_tuned(path)  # fails loudly if what we wrote is not what default_configs accepts
    return new
