"""Benchmark padless's memory-bound kernels and fused linear cross-entropy on one GPU (H200 target).

What it measures (bf16, Qwen3-8B shapes: H 32, Hkv 8, D 128, hidden E 4096, intermediate I 12288, V 151936;
T = 4K, 16K, 64K packed tokens), for each kernel and its baselines:

* forward time and backward time (``triton.testing.do_bench`` median, ms); forward+backward = their sum;
* achieved bandwidth = bytes counted / time (TB/s), next to a measured device-to-device copy (``copy_`` of
  1 GiB; counts read + write);
* peak extra memory of one forward+backward (``torch.cuda.max_memory_allocated`` above the inputs, minus the
  gradients returned to the caller).

Implementations: ``padless`` (ours), ``eager`` (our plain-PyTorch ``*_reference``, i.e. Hugging Face's math),
``liger`` (Liger-Kernel's equivalent op; "n/a" when ``liger_kernel`` is not installed).

Bytes counted (useful traffic only; bf16 = 2 B): RoPE fwd and bwd each read and write q and k once
(2 x T x (H + Hkv) x D x 2 B) plus the gathered cos/sin rows; SwiGLU/GeGLU fwd reads gate and up and writes
the output (3 x T x I x 2 B), bwd reads dy, gate, up and writes dgate, dup (5 x); RMSNorm fwd reads x and
writes y (2 x T x E x 2 B), bwd reads dy, x and writes dx (3 x). Baselines are credited the same bytes.

Timing of backward: for ``eager``/``liger`` and out-of-place kernels, ``torch.autograd.grad(..., retain_graph)``
on one graph; for our in-place RoPE, the backward launcher itself (what its ``autograd.Function`` runs), since a
fresh non-leaf per call would add a copy as large as the kernel's own traffic.

``--sweep`` times alternative block sizes / warps / program counts of our kernels and prints the fastest per
shape, so the defaults in ``kernels/*.py`` can be set from one GPU run. ``--quick`` is a tiny CPU smoke run under
the Triton interpreter (wall-clock timer, no memory numbers).

Usage on the GPU machine (pip install liger-kernel first for the Liger column):
    python tools/bench_kernels.py --out results/kernels            # table (+ fused linear CE)
    python tools/bench_kernels.py --sweep --out results/kernels    # also the block-size sweep
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GiB = 2**30


@dataclass
class Row:
    kernel: str
    T: int
    impl: str
    fwd_ms: float | None = None
    bwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    fwd_tbps: float | None = None
    bwd_tbps: float | None = None
    fwdbwd_tbps: float | None = None
    extra_gib: float | None = None
    note: str = ""


# ----------------------------------------------------------------------------------------------- utilities
def make_timer(cuda: bool) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of fn: do_bench on the GPU, a few wall-clock reps on the CPU interpreter."""
    if cuda:
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def cpu_time(fn):
        # The interpreter compiles nothing, so there is no warm-up; two reps keep the smoke run short.
        times = []
        for _ in range(2):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cpu_time


def extra_memory_gib(fn: Callable[[], object], returned_bytes: int, cuda: bool) -> float | None:
    """Peak memory one call allocates beyond what it returns (GiB); None on the CPU."""
    if not cuda:
        return None
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return max(0.0, (peak - base - returned_bytes) / GiB)


def tbps(nbytes: float, ms: float | None) -> float | None:
    return None if not ms else nbytes / (ms * 1e-3) / 1e12


def copy_bandwidth(bench, device, quick: bool) -> float:
    import torch

    n = (2**20 if quick else GiB) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return tbps(2 * src.numel() * 2, bench(lambda: dst.copy_(src)))


def try_import(module: str):
    import importlib

    try:
        return importlib.import_module(module), ""
    except Exception as error:  # an optional baseline: any failure to import means "n/a", said in the note
        return None, f"{module}: {type(error).__name__}: {error}"[:160]


def measure(kernel, t, impl, fwd, bwd_builder, fwd_bytes, bwd_bytes, bench, cuda, returned_bytes) -> Row:
    """fwd: () -> outputs; bwd_builder: () -> (bwd_fn, fwd_bwd_fn) where fwd_bwd_fn runs one full step."""
    row = Row(kernel, t, impl)
    try:
        row.fwd_ms = bench(fwd)
        bwd, full = bwd_builder()
        row.bwd_ms = bench(bwd)
        row.fwdbwd_ms = row.fwd_ms + row.bwd_ms
        row.fwd_tbps, row.bwd_tbps = tbps(fwd_bytes, row.fwd_ms), tbps(bwd_bytes, row.bwd_ms)
        row.fwdbwd_tbps = tbps(fwd_bytes + bwd_bytes, row.fwdbwd_ms)
        row.extra_gib = extra_memory_gib(full, returned_bytes, cuda)
    except Exception as error:  # one failing baseline must not stop the table; the note says why
        row.note = f"{type(error).__name__}: {error}"[:200]
    return row


# ------------------------------------------------------------------------------------------------- kernels
def rope_rows(t, shape, bench, device, cuda) -> list[Row]:
    import torch

    from kernels import rope as R

    h, hkv, d = shape["H"], shape["Hkv"], shape["D"]
    dt = torch.bfloat16
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    freqs = torch.arange(max(t, 4096), device=device, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = freqs.cos(), freqs.sin()
    pos = (torch.arange(t, device=device) % 1024).long()  # packed examples of 1024 tokens
    q = torch.randn(t, h, d, device=device, dtype=dt)
    k = torch.randn(t, hkv, d, device=device, dtype=dt)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    qk_bytes = 2 * (q.numel() + k.numel()) * 2 + t * d * 4 + t * 8  # q, k read+write; cos/sin rows; positions
    returned = (q.numel() + k.numel()) * 2
    rows = []

    def ours_bwd_builder():
        def bwd():
            R._launch_rope(gq, gk, cos, sin, pos, backward=True)

        def full():  # forward and backward, both in place: nothing may be allocated
            with torch.no_grad():
                R.rope_(q, k, cos, sin, pos)
            bwd()

        return bwd, full

    def ours_fwd():
        with torch.no_grad():
            return R.rope_(q, k, cos, sin, pos)

    rows.append(measure("rope", t, "padless", ours_fwd, ours_bwd_builder, qk_bytes, qk_bytes, bench, cuda, 0))

    def eager_fwd():
        with torch.no_grad():
            return R.rope_reference(q, k, cos, sin, pos)

    def eager_bwd_builder():
        ql, kl = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
        out = R.rope_reference(ql, kl, cos, sin, pos)

        def full():
            return torch.autograd.grad(R.rope_reference(ql, kl, cos, sin, pos), (ql, kl), (gq, gk))

        return (lambda: torch.autograd.grad(out, (ql, kl), (gq, gk), retain_graph=True)), full

    rows.append(measure("rope", t, "eager", eager_fwd, eager_bwd_builder, qk_bytes, qk_bytes, bench, cuda, returned))

    liger, why = try_import("liger_kernel.transformers.rope")
    if liger is None:
        rows.append(Row("rope", t, "liger", note="n/a: " + why))
        return rows
    # Liger's layout: q (1, H, T, D) (a transposed view of ours), cos/sin (1, T, D) in HF's duplicated form.
    cos_hf = torch.cat((cos[pos], cos[pos]), -1)[None].to(dt)
    sin_hf = torch.cat((sin[pos], sin[pos]), -1)[None].to(dt)

    def bhtd(x, heads):
        return x.view(1, t, heads, d).transpose(1, 2)

    def liger_fwd():
        with torch.no_grad():
            return liger.liger_rotary_pos_emb(bhtd(q, h), bhtd(k, hkv), cos_hf, sin_hf)

    def liger_bwd_builder():
        ql, kl = bhtd(q, h).detach().requires_grad_(True), bhtd(k, hkv).detach().requires_grad_(True)
        g = (bhtd(gq, h), bhtd(gk, hkv))
        out = liger.liger_rotary_pos_emb(ql, kl, cos_hf, sin_hf)

        def full():
            return torch.autograd.grad(liger.liger_rotary_pos_emb(ql, kl, cos_hf, sin_hf), (ql, kl), g)

        return (lambda: torch.autograd.grad(out, (ql, kl), g, retain_graph=True)), full

    rows.append(measure("rope", t, "liger", liger_fwd, liger_bwd_builder, qk_bytes, qk_bytes, bench, cuda, returned))
    return rows


def glu_rows(t, shape, bench, device, cuda, approximate: str | None) -> list[Row]:
    """approximate None: SwiGLU; "tanh": GeGLU (Gemma's gelu_pytorch_tanh)."""
    import torch

    from kernels import swiglu as S

    name = "swiglu" if approximate is None else f"geglu_{approximate}"
    i = shape["I"]
    dt = torch.bfloat16
    gate = torch.randn(t, i, device=device, dtype=dt, requires_grad=True)
    up = torch.randn(t, i, device=device, dtype=dt, requires_grad=True)
    dy = torch.randn(t, i, device=device, dtype=dt)
    elem = t * i * 2
    impls: dict[str, Callable | None] = {
        "padless": S.swiglu if approximate is None else (lambda g, u: S.geglu(g, u, approximate)),
        "eager": S.swiglu_reference if approximate is None else (lambda g, u: S.geglu_reference(g, u, approximate)),
    }
    notes = {}
    module, why = try_import("liger_kernel.ops.swiglu" if approximate is None else "liger_kernel.ops.geglu")
    if module is None:
        impls["liger"], notes["liger"] = None, "n/a: " + why
    elif approximate is None:
        impls["liger"] = module.LigerSiLUMulFunction.apply
    elif approximate == "tanh":
        impls["liger"] = module.LigerGELUMulFunction.apply
    else:
        impls["liger"], notes["liger"] = None, "n/a: Liger has only the tanh GeGLU"
    rows = []
    for impl, fn in impls.items():
        if fn is None:
            rows.append(Row(name, t, impl, note=notes[impl]))
            continue

        def builder(fn=fn):
            out = fn(gate, up)

            def full():
                return torch.autograd.grad(fn(gate, up), (gate, up), dy)

            return (lambda: torch.autograd.grad(out, (gate, up), dy, retain_graph=True)), full

        def fwd(fn=fn):
            with torch.no_grad():
                return fn(gate, up)

        rows.append(measure(name, t, impl, fwd, builder, 3 * elem, 5 * elem, bench, cuda, 2 * elem))
    return rows


def rmsnorm_rows(t, shape, bench, device, cuda, per_head: bool) -> list[Row]:
    import torch

    from kernels import rmsnorm as N

    dt = torch.bfloat16
    xshape = (t, shape["H"], shape["D"]) if per_head else (t, shape["E"])
    name = "rmsnorm_qk_head" if per_head else "rmsnorm"
    x = torch.randn(*xshape, device=device, dtype=dt, requires_grad=True)
    w = (1 + 0.1 * torch.randn(xshape[-1], device=device, dtype=dt)).requires_grad_(True)
    dy = torch.randn(*xshape, device=device, dtype=dt)
    elem = x.numel() * 2
    impls: dict[str, Callable | None] = {
        "padless": lambda a, b: N.rms_norm(a, b, 1e-6),
        "eager": lambda a, b: N.rms_norm_reference(a, b, 1e-6),
    }
    module, why = try_import("liger_kernel.ops.rms_norm")
    impls["liger"] = (lambda a, b: module.LigerRMSNormFunction.apply(a, b, 1e-6, 0.0, "llama")) if module else None
    rows = []
    for impl, fn in impls.items():
        if fn is None:
            rows.append(Row(name, t, impl, note="n/a: " + why))
            continue

        def builder(fn=fn):
            out = fn(x, w)

            def full():
                return torch.autograd.grad(fn(x, w), (x, w), dy)

            return (lambda: torch.autograd.grad(out, (x, w), dy, retain_graph=True)), full

        def fwd(fn=fn):
            with torch.no_grad():
                return fn(x, w)

        rows.append(measure(name, t, impl, fwd, builder, 2 * elem, 3 * elem, bench, cuda, elem + w.numel() * 2))
    return rows


def cross_entropy_rows(t, shape, bench, device, cuda) -> list[Row]:
    """lm_head + CE forward+backward (sum over counted tokens): time and extra memory; no bandwidth column."""
    import torch
    import torch.nn.functional as F

    e, v = shape["E"], shape["V"]
    dt = torch.bfloat16
    h = (torch.randn(t, e, device=device, dtype=dt) * 0.5).requires_grad_(True)
    w = (torch.randn(v, e, device=device, dtype=dt) * 0.02).requires_grad_(True)
    labels = torch.randint(0, v, (t,), device=device)
    labels[:: max(1, t // 64)] = -100  # a few masked tokens (example starts)
    returned = (h.numel() + w.numel()) * 2

    def eager():
        logits = (h @ w.T)[:-1].float()
        return F.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum")

    impls: dict[str, Callable | None] = {"eager": eager}
    notes = {}
    ce, why = try_import("kernels.cross_entropy")
    if ce is not None and hasattr(ce, "fused_linear_cross_entropy"):
        impls["padless"] = lambda: ce.fused_linear_cross_entropy(h, w, labels)[0]
    else:
        impls["padless"], notes["padless"] = None, "n/a: " + (why or "no fused_linear_cross_entropy yet")
    liger, why = try_import("liger_kernel.transformers")
    if liger is not None and hasattr(liger, "LigerFusedLinearCrossEntropyLoss"):
        loss_fn = liger.LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def liger_ce():
            out = loss_fn(w, h[:-1], labels[1:])
            return out[0] if isinstance(out, tuple) else out  # some Liger versions also return extras

        impls["liger"] = liger_ce
    else:
        impls["liger"], notes["liger"] = None, "n/a: " + why
    rows = []
    for impl in ("padless", "eager", "liger"):
        fn = impls[impl]
        if fn is None:
            rows.append(Row("linear_ce", t, impl, note=notes[impl]))
            continue
        row = Row("linear_ce", t, impl)
        try:
            with torch.no_grad():
                row.fwd_ms = bench(fn)

            def full(fn=fn):
                return torch.autograd.grad(fn(), (h, w))

            row.fwdbwd_ms = bench(full)
            row.bwd_ms = row.fwdbwd_ms - row.fwd_ms
            row.extra_gib = extra_memory_gib(full, returned, cuda)
        except Exception as error:  # one failing implementation must not stop the table
            row.note = f"{type(error).__name__}: {error}"[:200]
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------- sweep
def sweep(t, shape, bench, device, quick: bool) -> list[dict]:
    """Time our launchers over block sizes / warps / programs; the fastest per (kernel, direction, T) wins."""
    import functools

    import torch

    from kernels import rmsnorm as N
    from kernels import rope as R
    from kernels import swiglu as S

    dt = torch.bfloat16
    results: list[dict] = []
    h, hkv, d, i, e = shape["H"], shape["Hkv"], shape["D"], shape["I"], shape["E"]

    def grid(*axes):
        combos = list(itertools.product(*axes))
        return combos[:2] if quick else combos  # the interpreter is slow: two configs prove the plumbing

    def record(kernel, direction, cfg, fn, nbytes):
        ms = bench(fn)
        results.append({"kernel": kernel, "dir": direction, "T": t, "cfg": cfg, "ms": ms, "tbps": tbps(nbytes, ms)})

    q = torch.randn(t, h, d, device=device, dtype=dt)
    k = torch.randn(t, hkv, d, device=device, dtype=dt)
    freqs = torch.randn(max(t, 16), d // 2, device=device)
    cos, sin, pos = freqs.cos(), freqs.sin(), torch.arange(t, device=device)
    rope_bytes = 2 * (q.numel() + k.numel()) * 2
    for block_t, warps in grid((1, 2, 4, 8, 16), (2, 4, 8, 16)):
        fn = functools.partial(R._launch_rope, q, k, cos, sin, pos, False, block_t=block_t, num_warps=warps)
        record("rope", "fwd", {"block_t": block_t, "num_warps": warps}, fn, rope_bytes)

    gate, up, dy = (torch.randn(t, i, device=device, dtype=dt) for _ in range(3))
    for block, warps in grid((1024, 2048, 4096, 8192), (4, 8, 16)):
        cfg = {"block": block, "num_warps": warps}
        fwd = functools.partial(S._launch_glu_fwd, gate, up, S._SILU, block=block, num_warps=warps)
        record("swiglu", "fwd", cfg, fwd, 3 * t * i * 2)
        bwd = functools.partial(S._launch_glu_bwd, dy, gate, up, S._SILU, block=block, num_warps=warps)
        record("swiglu", "bwd", cfg, bwd, 5 * t * i * 2)

    for name, xshape in (("rmsnorm", (t, e)), ("rmsnorm_qk_head", (t, h, d))):
        x = torch.randn(*xshape, device=device, dtype=dt)
        w = torch.randn(xshape[-1], device=device, dtype=dt)
        dyn = torch.randn_like(x)
        _, rstd = N._launch_fwd(x, w, 1e-6, 0.0)
        nbytes = x.numel() * 2
        rows_options = (1, 2, 4, 8) if name == "rmsnorm" else (8, 16, 32, 64)
        for block_r, warps in grid(rows_options, (4, 8, 16)):
            fn = functools.partial(N._launch_fwd, x, w, 1e-6, 0.0, block_r=block_r, num_warps=warps)
            record(name, "fwd", {"block_r": block_r, "num_warps": warps}, fn, 2 * nbytes)
        sms = torch.cuda.get_device_properties(device).multi_processor_count if x.is_cuda else 2
        for block_r, warps, per_sm in grid(rows_options[:3], (8, 16), (1, 2, 4, 8)):
            cfg = {"block_r": block_r, "num_warps": warps, "programs_per_sm": per_sm}
            fn = functools.partial(
                N._launch_bwd, dyn, x, w, rstd, 0.0, True, True, block_r, warps, programs=sms * per_sm
            )
            record(name, "bwd", cfg, fn, 3 * nbytes)
    return results


def best_of_sweep(results: list[dict]) -> list[dict]:
    best: dict[tuple, dict] = {}
    for r in results:
        key = (r["kernel"], r["dir"], r["T"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    return list(best.values())


# -------------------------------------------------------------------------------------------------- report
def environment(args) -> dict:
    import torch
    import triton

    liger, _ = try_import("liger_kernel")
    cuda = torch.cuda.is_available()
    version = None
    if liger is not None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        try:
            version = dist_version("liger-kernel")
        except PackageNotFoundError:
            version = "unknown"
    return {
        "machine": platform.node(),
        "gpu": torch.cuda.get_device_name() if cuda else "none (CPU, Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "liger_kernel": version,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "quick": args.quick,
    }


def fmt(value, digits=3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(env: dict, copy_tbps: float, rows: list[Row], best: list[dict]) -> str:
    lines = [
        "# padless kernel benchmark",
        "",
        *(f"- {k}: `{v}`" for k, v in env.items()),
        f"- device-to-device copy: **{fmt(copy_tbps, 2)} TB/s** (read + write)",
        "",
        "| kernel | T | impl | fwd ms | fwd TB/s | bwd ms | bwd TB/s | fwd+bwd ms | fwd+bwd TB/s | % copy (fwd/bwd)"
        " | extra GiB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pct = "n/a"
        if r.fwd_tbps and r.bwd_tbps and copy_tbps:
            pct = f"{100 * r.fwd_tbps / copy_tbps:.0f}% / {100 * r.bwd_tbps / copy_tbps:.0f}%"
        lines.append(
            f"| {r.kernel} | {r.T} | {r.impl} | {fmt(r.fwd_ms)} | {fmt(r.fwd_tbps, 2)} | {fmt(r.bwd_ms)} | "
            f"{fmt(r.bwd_tbps, 2)} | {fmt(r.fwdbwd_ms)} | {fmt(r.fwdbwd_tbps, 2)} | {pct} | {fmt(r.extra_gib, 2)} | "
            f"{r.note} |"
        )
    if best:
        lines += ["", "## Sweep: fastest configuration per kernel, direction and T", "",
                  "| kernel | dir | T | config | ms | TB/s |", "|---|---|---|---|---|---|"]  # fmt: skip
        for b in sorted(best, key=lambda b: (b["kernel"], b["dir"], b["T"])):
            lines.append(
                f"| {b['kernel']} | {b['dir']} | {b['T']} | `{b['cfg']}` | {fmt(b['ms'])} | {fmt(b['tbps'], 2)} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for kernels.json / kernels.md")
    p.add_argument("--tokens", default="4096,16384,65536", help="comma-separated T values (packed tokens)")
    p.add_argument("--ce-tokens", default="4096,16384", help="T values for the fused linear CE rows")
    p.add_argument("--only", default="rope,swiglu,geglu,rmsnorm,linear_ce", help="comma-separated kernels")
    p.add_argument("--sweep", action="store_true", help="also sweep block sizes of our kernels (prints winners)")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run under the Triton interpreter")
    args = p.parse_args()

    if args.quick and "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported by our kernels
    import torch

    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    if args.quick:
        shape = {"H": 4, "Hkv": 2, "D": 64, "E": 128, "I": 96, "V": 512}
        tokens, ce_tokens = [13], [29]
    else:
        if not cuda:
            sys.exit("bench_kernels.py needs a CUDA GPU (or --quick for a CPU smoke run).")
        shape = {"H": 32, "Hkv": 8, "D": 128, "E": 4096, "I": 12288, "V": 151936}
        tokens = [int(x) for x in args.tokens.split(",") if x]
        ce_tokens = [int(x) for x in args.ce_tokens.split(",") if x]
    only = set(args.only.split(","))
    bench = make_timer(cuda)
    torch.manual_seed(0)
    copy_rate = copy_bandwidth(bench, device, args.quick)
    print(f"device-to-device copy: {copy_rate:.2f} TB/s", flush=True)

    rows: list[Row] = []
    for t in tokens:
        if "rope" in only:
            rows += rope_rows(t, shape, bench, device, cuda)
        if "swiglu" in only:
            rows += glu_rows(t, shape, bench, device, cuda, None)
        if "geglu" in only:
            rows += glu_rows(t, shape, bench, device, cuda, "tanh")
        if "rmsnorm" in only:
            rows += rmsnorm_rows(t, shape, bench, device, cuda, per_head=False)
            rows += rmsnorm_rows(t, shape, bench, device, cuda, per_head=True)
        for r in rows:
            if t == r.T:
                print(f"{r.kernel:16s} T={t:6d} {r.impl:8s} fwd {fmt(r.fwd_tbps, 2)} TB/s  bwd "
                      f"{fmt(r.bwd_tbps, 2)} TB/s  extra {fmt(r.extra_gib, 2)} GiB {r.note}", flush=True)  # fmt: skip
        if cuda:
            torch.cuda.empty_cache()
    if "linear_ce" in only:
        for t in ce_tokens:
            rows += cross_entropy_rows(t, shape, bench, device, cuda)
            if cuda:
                torch.cuda.empty_cache()

    best: list[dict] = []
    sweep_results: list[dict] = []
    if args.sweep:
        for t in tokens:
            sweep_results += sweep(t, shape, bench, device, args.quick)
            if cuda:
                torch.cuda.empty_cache()
        best = best_of_sweep(sweep_results)

    env = environment(args)
    report = markdown(env, copy_rate, rows, best)
    print()
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"environment": env, "copy_tbps": copy_rate, "shape": shape, "rows": [asdict(r) for r in rows],
                   "sweep": sweep_results, "sweep_best": best}  # fmt: skip
        (out / "kernels.json").write_text(json.dumps(payload, indent=1))
        (out / "kernels.md").write_text(report)
        print(f"wrote {out / 'kernels.json'} and {out / 'kernels.md'}")


if __name__ == "__main__":
    main()
