"""Benchmark padless's memory-bound kernels and fused linear cross-entropy on one GPU (H200 target).

What it measures (bf16, Qwen3-8B shapes: H 32, Hkv 8, D 128, hidden E 4096, intermediate I 12288, V 151936;
T = 4K, 16K, 64K packed tokens) for ours (``padless``), ``eager`` (our plain-PyTorch ``*_reference``, i.e.
Hugging Face's math) and ``liger`` (Liger-Kernel's equivalent op; "n/a" when ``liger_kernel`` is missing):

* graph time (device-bound, what the bandwidth targets are about): N calls captured in one CUDA graph, replays
  timed with events, inputs rotated over enough sets that L2 cannot serve them (``bench_kernels_timing``);
  backward = graph(forward + backward) - graph(forward);
* plain time: ``triton.testing.do_bench`` median of one call (includes the host launch path; backward on a
  recorded graph with ``retain_graph``), as in run 1;
* achieved bandwidth = bytes counted / time (TB/s), next to a measured device-to-device copy (``copy_`` of 1 GiB,
  read + write), and % of copy from the graph time;
* extra memory of one forward+backward: peak above the inputs, minus the gradients returned;
* fused linear CE (``bench_kernels_ce``): frozen (LoRA) and trainable lm_head weight, fwd+bwd as one unit.

``--sweep`` (a separate invocation, own output files) times alternative block sizes / warps / program counts of
our kernels by graph replay (``bench_kernels_sweep``). ``--quick`` is a tiny CPU smoke run under the Triton
interpreter (wall-clock timers, no memory numbers). ``--budget-s`` skips what is left (noted in the table) once
the run has taken that long, so one device run cannot overrun its slot.

Usage on the GPU machine (liger-kernel installed for the Liger column):
    python tools/bench_kernels.py --out results/kernels             # table + fused linear CE (~60-90 s)
    python tools/bench_kernels.py --sweep --out results/kernels     # sweep only (~60 s), kernels_sweep.{json,md}
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench_kernels_* modules
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # padless's packages from a plain checkout

from bench_kernels_timing import Row, Timer, tbps, try_import

QWEN3_8B = {"H": 32, "Hkv": 8, "D": 128, "E": 4096, "I": 12288, "V": 151936}
TINY = {"H": 4, "Hkv": 2, "D": 64, "E": 128, "I": 96, "V": 512}


def copy_bandwidth(timer: Timer, device, quick: bool) -> float:
    import torch

    n = (2**20 if quick else 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return tbps(2 * src.numel() * 2, timer.plain(lambda: dst.copy_(src)))


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


def pct(value: float | None, copy: float) -> str:
    return "n/a" if value is None or not copy else f"{100 * value / copy:.0f}%"


def kernel_markdown(copy_tbps: float, rows: list[Row]) -> list[str]:
    lines = [
        "## Memory-bound kernels",
        "",
        "graph = CUDA-graph replay (device time; inputs rotated over `sets` so L2 cannot serve them); plain =",
        "do_bench of one call (includes the host launch path). % copy uses the graph time.",
        "",
        "| kernel | T | impl | graph fwd ms | fwd TB/s | graph bwd ms | bwd TB/s | % copy fwd / bwd | plain fwd ms"
        " | plain bwd ms | plain TB/s fwd / bwd | extra GiB | sets | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.kernel} | {r.T} | {r.impl} | {fmt(r.g_fwd_ms, 4)} | {fmt(r.g_fwd_tbps, 2)} | {fmt(r.g_bwd_ms, 4)} | "
            f"{fmt(r.g_bwd_tbps, 2)} | {pct(r.g_fwd_tbps, copy_tbps)} / {pct(r.g_bwd_tbps, copy_tbps)} | "
            f"{fmt(r.p_fwd_ms, 4)} | {fmt(r.p_bwd_ms, 4)} | {fmt(r.p_fwd_tbps, 2)} / {fmt(r.p_bwd_tbps, 2)} | "
            f"{fmt(r.extra_gib, 2)} | {r.sets} | {r.note} |"
        )
    return lines


def header(env: dict, copy_tbps: float, title: str) -> list[str]:
    return [f"# {title}", "", *(f"- {k}: `{v}`" for k, v in env.items()),
            f"- device-to-device copy: **{fmt(copy_tbps, 2)} TB/s** (read + write)", ""]  # fmt: skip


def write(out: str | None, stem: str, payload: dict, report: str) -> None:
    if not out:
        return
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    (path / f"{stem}.md").write_text(report)
    print(f"wrote {path / (stem + '.json')} and {path / (stem + '.md')}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for kernels{,_sweep}.{json,md}")
    p.add_argument("--tokens", default="4096,16384,65536", help="comma-separated T values (packed tokens)")
    p.add_argument("--ce-tokens", default="4096,16384", help="T values for the fused linear CE rows")
    p.add_argument("--only", default="rope,swiglu,geglu,rmsnorm,linear_ce", help="comma-separated kernels")
    p.add_argument("--sweep", action="store_true", help="run only the block-size sweep of our kernels")
    p.add_argument("--budget-s", type=float, default=85.0, help="skip what is left after this many seconds")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run under the Triton interpreter")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.quick and "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported by our kernels
    import torch
    from bench_kernels_cases import glu_rows, rmsnorm_rows, rope_rows
    from bench_kernels_ce import ce_markdown, cross_entropy_rows
    from bench_kernels_sweep import best_of_sweep, sweep, sweep_markdown

    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    if args.quick:
        shape, tokens, ce_tokens = TINY, [13], [29]
    else:
        if not cuda:
            sys.exit("bench_kernels.py needs a CUDA GPU (or --quick for a CPU smoke run).")
        shape = QWEN3_8B
        tokens = [int(x) for x in args.tokens.split(",") if x]
        ce_tokens = [int(x) for x in args.ce_tokens.split(",") if x]
    only = set(args.only.split(","))
    timer = Timer(cuda)
    torch.manual_seed(0)
    copy_rate = copy_bandwidth(timer, device, args.quick)
    print(f"device-to-device copy: {copy_rate:.2f} TB/s", flush=True)
    skipped: list[str] = []

    def in_budget(what: str) -> bool:
        elapsed = time.perf_counter() - started
        if elapsed > args.budget_s:
            skipped.append(what)
            print(f"[{elapsed:5.1f}s] skipped {what}: over --budget-s {args.budget_s:.0f}", flush=True)
            return False
        print(f"[{elapsed:5.1f}s] {what}", flush=True)
        return True

    env = environment(args)
    if args.sweep:
        results: list[dict] = []
        for t in tokens:
            if in_budget(f"sweep T={t}"):
                results += sweep(t, shape, timer, device, args.quick)
                if cuda:
                    torch.cuda.empty_cache()
        lines = header(env, copy_rate, "padless kernel block-size sweep") + sweep_markdown(results)
        lines += [f"- skipped (time budget): {', '.join(skipped)}"] if skipped else []
        report = "\n".join(lines) + "\n"
        print("\n" + report)
        write(args.out, "kernels_sweep", {"environment": env, "copy_tbps": copy_rate, "shape": shape,
                                          "sweep": results, "sweep_best": best_of_sweep(results)}, report)  # fmt: skip
        return

    cases = {
        "rope": lambda t: rope_rows(t, shape, timer, device),
        "swiglu": lambda t: glu_rows(t, shape, timer, device, None),
        "geglu": lambda t: glu_rows(t, shape, timer, device, "tanh"),
        "rmsnorm": lambda t: rmsnorm_rows(t, shape, timer, device, False) + rmsnorm_rows(t, shape, timer, device, True),
    }
    # Fused linear CE first: its frozen/trainable rows are new in this run; if the time budget runs out, the
    # large-T kernel rows (already measured in run 1) are the ones skipped.
    ce_rows: list[dict] = []
    if "linear_ce" in only:
        for t in ce_tokens:
            if in_budget(f"linear_ce T={t}"):
                ce_rows += cross_entropy_rows(t, shape, timer, device)
                if cuda:
                    torch.cuda.empty_cache()
    rows: list[Row] = []
    for t in tokens:
        for name, case in cases.items():
            if name not in only or not in_budget(f"{name} T={t}"):
                continue
            new = case(t)
            for r in new:
                print(f"  {r.kernel:16s} T={t:6d} {r.impl:8s} graph fwd {fmt(r.g_fwd_tbps, 2)} bwd "
                      f"{fmt(r.g_bwd_tbps, 2)} TB/s | plain fwd {fmt(r.p_fwd_tbps, 2)} bwd {fmt(r.p_bwd_tbps, 2)} "
                      f"TB/s | extra {fmt(r.extra_gib, 2)} GiB {r.note}", flush=True)  # fmt: skip
            rows += new
            if cuda:
                torch.cuda.empty_cache()

    lines = header(env, copy_rate, "padless kernel benchmark") + kernel_markdown(copy_rate, rows)
    lines += ["", *ce_markdown(ce_rows)] if ce_rows else []
    lines += ["", f"- skipped (time budget): {', '.join(skipped)}"] if skipped else []
    lines += ["", f"- wall time: {time.perf_counter() - started:.0f} s"]
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    payload = {"environment": env, "copy_tbps": copy_rate, "shape": shape, "rows": [asdict(r) for r in rows],
               "linear_ce": ce_rows, "skipped": skipped}  # fmt: skip
    write(args.out, "kernels", payload, report)


if __name__ == "__main__":
    main()
