"""Host cost of the attention launches: Triton's ``kernel[grid](...)`` against the direct path, and the schedule cache.

Two tables (bf16, one GPU):

1. Per kernel: host microseconds per launch, normal (``kernel[grid]``) vs direct (``kernels.attention_launch``),
   on the real arguments of one fwd+bwd call on a tiny pack (so the GPU never holds the host back: the time is
   the enqueue cost alone). The same arguments go both ways.
2. Per call of ``varlen_attention`` on a pack (default: Alpaca-like 4K tokens, H 32, Hkv 8, D 128), eagerly, in
   four modes {normal, direct} x {schedule built every call, schedule cached}: host microseconds to enqueue one
   call (no sync), wall time per call (``triton.testing.do_bench`` median) and useful causal TFLOP/s (fwd and
   fwd+bwd, FLOPs as in ``bench_attention``), plus the CUDA-graph replay time (GPU alone) for reference.
   A cached schedule is what every attention layer after the first of a micro-batch gets.

Usage on the GPU machine:
    python tools/bench_attention_launch.py --out R
    python tools/bench_attention_launch.py --pack 16384 --dims 128,64 --out R
``--quick``: a tiny CPU smoke run under the Triton interpreter (always the normal path there; times meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES = [("normal", False, False), ("normal+cache", False, True), ("direct", True, False), ("direct+cache", True, True)]


def record_launches(lens: list[int], H: int, Hkv: int, D: int, device, dtype, deterministic: bool) -> list[tuple]:
    """(kernel, grid, args, constexprs, num_warps, num_stages) of every launch of one fwd+bwd call."""
    from padless.kernels import attention_bwd, attention_fwd
    from padless.kernels.attention import varlen_attention
    from padless.kernels.attention_cache import set_schedule_cache
    from padless.kernels.attention_launch import launch

    seen = []

    def rec(fn, grid, args, constexprs, num_warps, num_stages):
        seen.append((fn, grid, args, dict(constexprs), num_warps, num_stages))
        return launch(fn, grid, args, constexprs, num_warps, num_stages)

    q, k, v, do, cu = make_inputs(lens, H, Hkv, D, device, dtype)
    saved = attention_fwd.launch, attention_bwd.launch
    attention_fwd.launch = attention_bwd.launch = rec
    set_schedule_cache(False)
    try:
        out = varlen_attention(q, k, v, cu, max(lens), deterministic=deterministic)
        torch.autograd.grad(out, (q, k, v), do)
    finally:
        attention_fwd.launch, attention_bwd.launch = saved
        set_schedule_cache(True)
    return seen


def make_inputs(lens, H, Hkv, D, device, dtype, seed=0):
    from bench_attention import make_cu

    g = torch.Generator(device=device).manual_seed(seed)
    T = sum(lens)
    q, k, v, do = (torch.randn(T, h, D, device=device, dtype=dtype, generator=g) for h in (H, Hkv, Hkv, H))
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    return q, k, v, do, make_cu(lens, device)


def sync(device) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def host_us(fn, n: int, device, rounds: int = 5) -> float:
    """Median over ``rounds`` of the host time to enqueue ``n`` calls, per call (the GPU drained before each round)."""
    fn()
    times = []
    for _ in range(rounds):
        sync(device)
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n * 1e6)
    sync(device)
    return sorted(times)[len(times) // 2]


def per_kernel(args, device, dtype) -> list[dict]:
    from padless.kernels.attention_launch import direct_launch_info, launch, set_direct_launch

    rows = []
    for det in (False, True):
        for fn, grid, kargs, consts, warps, stages in record_launches([1, 30, 17, 40, 8], 8, 2, args.dims[0], device,
                                                                      dtype, det):  # fmt: skip
            name = getattr(fn, "__name__", str(fn)) + (" (atomic dQ)" if consts.get("ATOMIC_DQ") else "")
            name += " (zeroes dQ)" if consts.get("ZERO_DQ") else ""
            if any(r["kernel"] == name for r in rows):
                continue  # the same kernel variant as in the other run

            def normal(fn=fn, grid=grid, kargs=kargs, consts=consts, warps=warps, stages=stages):
                fn[grid](*kargs, **consts, num_warps=warps, num_stages=stages)

            def direct(fn=fn, grid=grid, kargs=kargs, consts=consts, warps=warps, stages=stages):
                launch(fn, grid, kargs, consts, warps, stages)

            set_direct_launch(True)
            before = direct_launch_info()["direct"]
            d = host_us(direct, args.launches, device, args.rounds)
            went_direct = direct_launch_info()["direct"] > before
            n = host_us(normal, args.launches, device, args.rounds)
            rows.append({"kernel": name, "normal_us": n, "direct_us": d, "went_direct": went_direct})
            print(rows[-1], flush=True)
    return rows


def per_call(args, device, dtype) -> list[dict]:
    from bench_attention import alpaca_lens

    rows = []
    for D in args.dims:
        lens = [1, 30, 17, 40, 8] if args.quick else alpaca_lens(args.pack, args.pack)
        rows += per_call_one(args, device, dtype, D, lens)
    return rows


def per_call_one(args, device, dtype, D: int, lens: list[int]) -> list[dict]:
    from bench_attention import causal_flops, cuda_graphed, timer

    from padless.kernels.attention import varlen_attention
    from padless.kernels.attention_cache import clear_schedule_cache, set_schedule_cache
    from padless.kernels.attention_launch import set_direct_launch

    bench = timer(args.quick)
    flops = causal_flops(lens, args.H, D)
    q, k, v, do, cu = make_inputs(lens, args.H, args.Hkv, D, device, dtype)
    m = max(lens)

    def fwd():
        with torch.no_grad():
            varlen_attention(q, k, v, cu, m)

    def fwdbwd():
        torch.autograd.grad(varlen_attention(q, k, v, cu, m), (q, k, v), do)

    rows = []
    for mode, direct, cache in MODES:
        set_direct_launch(direct)
        set_schedule_cache(cache)
        clear_schedule_cache()
        row = {"D": D, "pack": sum(lens), "mode": mode}
        for tag, fn, mult in (("fwd", fwd, 1.0), ("fwdbwd", fwdbwd, 3.5)):
            row[f"{tag}_host_us"] = host_us(fn, args.calls, device, args.rounds)
            ms = bench(fn)
            row[f"{tag}_ms"], row[f"{tag}_tflops"] = ms, mult * flops / ms / 1e9
        rows.append(row)
        print(row, flush=True)
    set_direct_launch(True)
    set_schedule_cache(True)
    if device == "cuda":
        row = {"D": D, "pack": sum(lens), "mode": "@graph (GPU time)"}
        for tag, fn, mult in (("fwd", fwd, 1.0), ("fwdbwd", fwdbwd, 3.5)):
            ms = bench(cuda_graphed(fn))
            row[f"{tag}_host_us"], row[f"{tag}_ms"], row[f"{tag}_tflops"] = None, ms, mult * flops / ms / 1e9
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(env: dict, kernel_rows: list[dict], call_rows: list[dict]) -> str:
    lines = [f"# Attention launch overhead: {env['gpu']}", ""]
    lines += [f"- {k}: `{v}`" for k, v in env.items() if k != "gpu"]
    lines += ["", "Host microseconds per launch (tiny pack, real arguments)", ""]
    lines += ["| kernel | kernel[grid] | direct | saved | went direct |", "|---|---|---|---|---|"]
    for r in kernel_rows:
        lines.append(f"| {r['kernel']} | {r['normal_us']:.1f} | {r['direct_us']:.1f} | "
                     f"{r['normal_us'] - r['direct_us']:.1f} | {r['went_direct']} |")  # fmt: skip
    lines += ["", "Per varlen_attention call, eager: host us to enqueue / wall ms / useful TFLOP/s", ""]
    lines += ["| D | pack | mode | fwd host us | fwd ms | fwd TF/s | fwd+bwd host us | fwd+bwd ms | fwd+bwd TF/s |"]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for r in call_rows:
        h = ["-" if r[f"{t}_host_us"] is None else f"{r[f'{t}_host_us']:.0f}" for t in ("fwd", "fwdbwd")]
        lines.append(f"| {r['D']} | {r['pack']} | {r['mode']} | {h[0]} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} | "
                     f"{h[1]} | {r['fwdbwd_ms']:.3f} | {r['fwdbwd_tflops']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run under TRITON_INTERPRET=1")
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for JSON + markdown (default: $OUT)")
    p.add_argument("--pack", type=int, default=4096, help="tokens per pack for the per-call table (Alpaca-like)")
    p.add_argument("--dims", default="128", help="head dims, comma-separated")
    p.add_argument("--launches", type=int, default=200, help="launches per timing round (per-kernel table)")
    p.add_argument("--calls", type=int, default=50, help="calls per timing round (per-call table)")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds (the median is reported)")
    p.add_argument("--H", type=int, default=32)
    p.add_argument("--Hkv", type=int, default=8)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.quick:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.dims, args.H, args.Hkv, args.launches, args.calls, args.rounds = "16", 4, 2, 1, 1, 1
    args.dims = [int(x) for x in args.dims.split(",")]
    device = "cpu" if args.quick else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run on the H200, or use --quick for the CPU smoke run")
    dtype = torch.float32 if args.quick else torch.bfloat16
    from bench_attention import environment

    env = environment(args, dtype)
    kernel_rows = per_kernel(args, device, dtype)
    call_rows = per_call(args, device, dtype)
    md = markdown(env, kernel_rows, call_rows)
    print("\n" + md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = "D" + "-".join(map(str, args.dims)) + f"_P{args.pack // 1024}K"
        payload = {"env": env, "per_kernel": kernel_rows, "per_call": call_rows}
        (out / f"attention_launch_{tag}.json").write_text(json.dumps(payload, indent=1, default=str))
        (out / f"attention_launch_{tag}.md").write_text(md)


if __name__ == "__main__":
    main()
