"""A/B of the RMSNorm tuning variants (``kernels/rmsnorm_config.py``) on one GPU: device time and % of copy.

For each variant, T in --tokens (default 4K, 16K, 64K), the hidden norm x (T, 4096) and Qwen3's per-head q/k norm
x (T x 32, 128), bf16, trainable weight: forward (``_launch_fwd``) and backward (``_launch_bwd``: dx and dw,
every launch the variant makes) timed separately by CUDA-graph replay (``bench_kernels_timing.Timer.graph``)
over >= 4 rotated input sets, and >= 4 x L2 bytes between two uses of one set, so L2 cannot serve them.
Bytes counted (what must move): forward reads x, writes y and the fp32 rstd; backward reads x, dy and rstd,
writes dx and dw. % copy is against a device-to-device ``copy_`` of 1 GiB timed as in tools/bench_kernels.py.
Variants with the same forward (or backward) configuration share one measurement, so each kernel configuration
is compiled and timed once. ``two_launch`` is run 4's behaviour (the old default).

Usage on the GPU machine (~30-50 s):
    python tools/bench_rmsnorm_variants.py --out results/rmsnorm     # rmsnorm_variants.{json,md}
``--quick``: a tiny CPU smoke run under the Triton interpreter (wall clock, numbers meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_kernels_timing, bench_kernels
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # padless's packages from a plain checkout

from bench_kernels_timing import Timer, rotation_sets, tbps

HIDDEN, HEADS, HEAD_DIM = 4096, 32, 128
MIN_SETS = 4


def _fwd_key(variant, n_cols: int) -> tuple:
    from padless.kernels.rmsnorm_config import fwd_config

    return (*fwd_config(n_cols, variant.fwd_elements, variant.fwd_per_thread), variant.fwd_programs_per_sm,
            variant.pdl)  # fmt: skip


def _bwd_key(variant) -> tuple:
    return (variant.one_launch, variant.reducers if variant.one_launch else 0, variant.balanced, variant.pdl)


def same_traffic_us(data: list, timer: Timer) -> tuple[float | None, float | None]:
    """Device time of PyTorch elementwise ops with each kernel's traffic, on the kernels' own rotated tensors:
    ``y.copy_(x)`` for the forward (read x, write y) and ``torch.add(x, dy, out=dx)`` for the backward (read x
    and dy, write dx), graph-timed like the kernels. A stream of that many bytes, launch, ramp and tail included:
    the ceiling a norm kernel moving them in one launch can expect at this T (the 1 GiB copy rate hides the ramp
    and tail that a 4K-token call pays). Session 4's ``copy_`` into separate same-size buffers disagreed with
    itself across shapes; this one touches exactly the kernels' tensors."""
    import torch

    outs = [torch.empty_like(x) for x, _, _ in data]
    try:
        fwd = timer.graph([lambda x=x, o=o: o.copy_(x) for (x, _, _), o in zip(data, outs, strict=True)]) * 1e3
        bwd = timer.graph([lambda x=x, dy=dy, o=o: torch.add(x, dy, out=o) for (x, dy, _), o in
                           zip(data, outs, strict=True)]) * 1e3  # fmt: skip
    except Exception:  # an informational column: a failed capture leaves it n/a
        return None, None
    return fwd, bwd


def measure(t: int, kind: str, variants: list, timer: Timer, device, quick: bool) -> list[dict]:
    """Rows (one per variant) for one T and one norm kind ('hidden' or 'per_head')."""
    import torch

    from padless.kernels import rmsnorm as N

    dt = torch.bfloat16
    hidden, heads, head_dim = (96, 3, 32) if quick else (HIDDEN, HEADS, HEAD_DIM)
    shape = (t, hidden) if kind == "hidden" else (t, heads, head_dim)
    n_cols = shape[-1]
    rows = t if len(shape) == 2 else t * shape[1]
    elem = rows * n_cols
    fwd_bytes = 2 * elem * 2 + rows * 4
    bwd_bytes = 3 * elem * 2 + rows * 4 + n_cols * 2
    sets = max(MIN_SETS, rotation_sets(2 * elem * 2, device))
    w = (1 + 0.1 * torch.randn(n_cols, device=device)).to(dt)
    data = []
    for _ in range(sets):
        x = torch.randn(*shape, device=device, dtype=dt)
        data.append((x, torch.randn_like(x), N._launch_fwd(x, w, 1e-6, 0.0, variant="two_launch")[1]))
    fwd_ms: dict[tuple, float | str] = {}
    bwd_ms: dict[tuple, float | str] = {}
    frozen_ms: dict[tuple, float | str] = {}
    copy_fwd_us, copy_bwd_us = same_traffic_us(data, timer)
    out = []
    for v in variants:
        fk, bk = _fwd_key(v, n_cols), _bwd_key(v)
        for cache, key, fns in (
            (fwd_ms, fk, [lambda x=x, v=v: N._launch_fwd(x, w, 1e-6, 0.0, variant=v.name) for x, _, _ in data]),
            (bwd_ms, bk, [lambda x=x, dy=dy, r=r, v=v: N._launch_bwd(dy, x, w, r, 0.0, True, True, variant=v.name)
                          for x, dy, r in data]),
            # A frozen weight (LoRA): dx only, no dw partials and no reduction.
            (frozen_ms, bk, [lambda x=x, dy=dy, r=r, v=v: N._launch_bwd(dy, x, w, r, 0.0, True, False,
                                                                        variant=v.name) for x, dy, r in data]),
        ):  # fmt: skip
            if key not in cache:
                try:
                    cache[key] = timer.graph(fns)
                except Exception as error:  # one variant failing (compile, capture) must not stop the A/B
                    cache[key] = f"{type(error).__name__}: {error}"[:160]
        f, b, fz = fwd_ms[fk], bwd_ms[bk], frozen_ms[bk]
        out.append({
            "bwd_frozen_us": fz * 1e3 if isinstance(fz, float) else None,
            "bwd_frozen_tbps": tbps(bwd_bytes - n_cols * 2, fz) if isinstance(fz, float) else None,
            "copy_fwd_us": copy_fwd_us, "copy_bwd_us": copy_bwd_us,
            "variant": v.name, "kind": kind, "T": t, "rows": rows, "E": n_cols, "sets": sets,
            "fwd_us": f * 1e3 if isinstance(f, float) else None, "bwd_us": b * 1e3 if isinstance(b, float) else None,
            "fwd_tbps": tbps(fwd_bytes, f) if isinstance(f, float) else None,
            "bwd_tbps": tbps(bwd_bytes, b) if isinstance(b, float) else None,
            "fwd_bytes": fwd_bytes, "bwd_bytes": bwd_bytes,
            "error": "; ".join(e for e in (f, b) if isinstance(e, str)),
        })  # fmt: skip
    del data
    return out


def markdown(rows: list[dict], copy_tbps: float, env: dict) -> str:
    def num(value, digits):
        return "n/a" if value is None else f"{value:.{digits}f}"

    def pct(value):
        return "n/a" if value is None or not copy_tbps else f"{100 * value / copy_tbps:.0f}%"

    lines = ["# RMSNorm variants (CUDA-graph device time per call, bf16)", "",
             f"- {env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['time']}",
             f"- device-to-device copy: **{num(copy_tbps, 2)} TB/s** (read + write)", "",
             "| variant | norm | T | fwd us | fwd % copy | bwd us | bwd % copy | fwd+bwd us | | bwd frozen w us "
             "| % copy | same-traffic elementwise us fwd / bwd |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    best: dict[tuple, float] = {}
    for r in rows:
        if r["fwd_us"] is not None and r["bwd_us"] is not None:
            key = (r["kind"], r["T"])
            best[key] = min(best.get(key, 1e30), r["fwd_us"] + r["bwd_us"])
    for r in rows:
        total = None if r["fwd_us"] is None or r["bwd_us"] is None else r["fwd_us"] + r["bwd_us"]
        mark = "*" if total is not None and total == best.get((r["kind"], r["T"])) else r["error"]
        lines.append(f"| {r['variant']} | {r['kind']} | {r['T']} | {num(r['fwd_us'], 1)} | {pct(r['fwd_tbps'])} | "
                     f"{num(r['bwd_us'], 1)} | {pct(r['bwd_tbps'])} | {num(total, 1)} | {mark} | "
                     f"{num(r.get('bwd_frozen_us'), 1)} | {pct(r.get('bwd_frozen_tbps'))} | "
                     f"{num(r.get('copy_fwd_us'), 1)} / {num(r.get('copy_bwd_us'), 1)} |")  # fmt: skip
    lines += ["", "* = fastest forward + backward per norm and T. per_head: x (T x 32, 128), weight (128,).",
              "bwd frozen w: dx only (a LoRA run's norms). same-traffic elementwise: y.copy_(x) (fwd) and "
              "torch.add(x, dy, out=dx) (bwd) on the kernels' own rotated tensors, graph-timed: the stream ceiling "
              "at this T, launch, ramp and tail included."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for rmsnorm_variants.{json,md}")
    p.add_argument("--tokens", default="4096,16384,65536", help="comma-separated T values (packed tokens)")
    p.add_argument("--variants", default="", help="comma-separated variant names (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run under the Triton interpreter")
    args = p.parse_args(argv)
    started = time.perf_counter()
    if args.quick and "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported by our kernels
    import torch
    import triton
    from bench_kernels import copy_bandwidth

    from padless.kernels.rmsnorm_config import VARIANTS, get_variant

    cuda = torch.cuda.is_available() and not args.quick
    if not cuda and not args.quick:
        sys.exit("bench_rmsnorm_variants.py needs a CUDA GPU (or --quick for a CPU smoke run).")
    device = torch.device("cuda" if cuda else "cpu")
    names = [n for n in args.variants.split(",") if n] or list(VARIANTS)
    variants = [get_variant(n) for n in names]
    tokens = [13] if args.quick else [int(x) for x in args.tokens.split(",") if x]
    timer = Timer(cuda)
    torch.manual_seed(0)
    copy_rate = copy_bandwidth(timer, device, args.quick)
    print(f"device-to-device copy: {copy_rate:.2f} TB/s", flush=True)
    env = {"gpu": torch.cuda.get_device_name(device) if cuda else "cpu (interpreter)", "torch": torch.__version__,
           "triton": triton.__version__, "python": platform.python_version(),
           "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}  # fmt: skip
    rows: list[dict] = []
    for t in tokens:
        for kind in ("hidden", "per_head"):
            new = measure(t, kind, variants, timer, device, args.quick)
            for r in new:
                print(
                    f"[{time.perf_counter() - started:5.1f}s] {r['variant']:18s} {kind:8s} T={t:6d} "
                    f"fwd {r['fwd_us'] or 0:8.1f} us  bwd {r['bwd_us'] or 0:8.1f} us {r['error']}",
                    flush=True,
                )
            rows += new
            if cuda:
                torch.cuda.empty_cache()
    report = markdown(rows, copy_rate, env) + f"\n- wall time: {time.perf_counter() - started:.0f} s\n"
    print("\n" + report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"environment": env, "copy_tbps": copy_rate, "variants": {v.name: asdict(v) for v in variants},
                   "rows": rows}  # fmt: skip
        (out / "rmsnorm_variants.json").write_text(json.dumps(payload, indent=1))
        (out / "rmsnorm_variants.md").write_text(report)
        print(f"wrote {out / 'rmsnorm_variants.json'} and {out / 'rmsnorm_variants.md'}")


if __name__ == "__main__":
    main()
