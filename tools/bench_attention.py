"""Benchmark padless varlen attention against PyTorch's packed/padded paths on one GPU (H200 target).

What it measures (bf16, causal): forward and forward+backward time (triton.testing.do_bench median) and useful
TFLOP/s for packs of 4K/16K/64K tokens filled with Alpaca-like lengths (lognormal, median ~95, clipped to
[8, 1024]) or equal lengths of 1K/4K/16K, for:

* ``padless``: ``kernels.attention.varlen_attention`` on the packed stream (GQA without repeating k/v), default
  backward (atomic dQ); ``padless_det``: the same with ``deterministic=True``;
* ``varlen_attn``: ``torch.nn.attention.varlen.varlen_attn`` on the same packed stream (if this torch has it);
* ``sdpa_flash_padded``: SDPA, flash backend, on the same examples padded to a batch (k/v repeated for GQA
  before timing; padding is wasted work, FLOPs still count only the useful part);
* ``flex_document``: compiled FlexAttention with a document-causal block mask on the packed stream (mask built
  once per pack, outside the timing);
* ``matmul_peak``: a bf16 8192^3 matmul, the practical ceiling.

``X@graph`` rows (by default for padless, varlen_attn, sdpa_flash_padded and flex_document) time CUDA-graph
replays of the same calls: GPU time alone, like for like across implementations (flex's BlockMask and its
compilation stay outside the graph). A pass that cannot be captured keeps its row, with the reason as its note.

FLOP convention (FlashAttention's): forward = 4 * sum_i(l_i^2 / 2) * H * D (two matmuls, causal half of each
example); backward = 2.5x forward, so forward+backward = 3.5x forward. Only per-example causal FLOPs count:
masked or padded work is never credited.

``--sweep`` (``bench_attention_sweep``) times a few tilings per (head dim, length bucket, kernel kind) within
``--budget-s`` and ``--write-tuned kernels/attention_tuned.json`` stores the winners, which
``kernels.attention.default_configs`` then reads. ``--compile-check`` (``bench_attention_compile``) compiles
for sm_90 offline. ``--quick`` is a tiny CPU smoke run under the Triton interpreter (no baselines).

Usage on the GPU machine (see docs/bench/attention.md):
    python tools/bench_attention.py --sweep --budget-s 110 --write-tuned kernels/attention_tuned.json --out R
    python tools/bench_attention.py --dims 128 --packs 4096,16384 --out R
    # host overhead per call (eager minus CUDA-graph replay) and a per-kernel profile of the small packs:
    python tools/bench_attention.py --dims 128 --packs 4096 --impls padless,padless@graph,padless_det,flex_document \
        --profile alpaca/4K,eq1K/4K --out R
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench_attention_* modules


@dataclass
class Row:
    case: str
    pack: int
    D: int
    impl: str
    fwd_ms: float | None
    fwdbwd_ms: float | None
    fwd_tflops: float | None
    fwdbwd_tflops: float | None
    note: str = ""


# ------------------------------------------------------------------------------------------------ inputs
def alpaca_lens(total: int, seed: int) -> list[int]:
    """Lognormal lengths (median 95, sigma 0.8) clipped to [8, 1024], the last one cut to fill the pack exactly."""
    g = torch.Generator().manual_seed(seed)
    lens, left = [], total
    while left > 0:
        n = int(min(max(math.exp(math.log(95) + 0.8 * float(torch.randn(1, generator=g))), 8), 1024))
        lens.append(min(n, left))
        left -= lens[-1]
    return lens


def cases(packs: list[int], quick: bool = False) -> list[tuple[str, int, list[int]]]:
    if quick:  # CPU smoke run: tiny examples the interpreter gets through in seconds
        return [("alpaca-tiny", 96, [1, 30, 17, 40, 8]), ("eq32", 96, [32] * 3)]
    out = []
    for pack in packs:
        out.append((f"alpaca/{pack // 1024}K", pack, alpaca_lens(pack, pack)))
        for eq in (1024, 4096, 16384):
            if eq <= pack:
                out.append((f"eq{eq // 1024}K/{pack // 1024}K", pack, [eq] * (pack // eq)))
    return out


def causal_flops(lens: list[int], H: int, D: int) -> float:
    """Forward FLOPs of causal per-example attention: 2 matmuls x 2 FLOP/MAC x l^2/2 x H x D."""
    return 4.0 * sum(n * n / 2 for n in lens) * H * D


def make_cu(lens: list[int], device) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)


# ------------------------------------------------------------------------------------------------ timers
def timer(quick: bool, rep_ms: int = 100) -> Callable[[Callable[[], object]], float]:
    if quick:

        def cpu_time(fn):
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3

        return cpu_time
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def cuda_graphed(step: Callable[[], object]) -> Callable[[], object]:
    """Capture one call of ``step`` in a CUDA graph (after a side-stream warm-up) and return its replay.

    Replays cost no Python, no autograd engine and no Triton launch path: the time is the GPU's alone, so eager
    minus graphed is the host overhead of a call. Capture also proves the call has no host-device sync.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


class NotCapturable(RuntimeError):
    """A call that could not be captured in a CUDA graph (a host sync, an uncapturable op, ...)."""


def graphed_or_why(step: Callable[[], object]) -> Callable[[], object]:
    """``cuda_graphed(step)``, with a capture failure turned into ``NotCapturable`` naming the first error line."""
    try:
        return cuda_graphed(step)
    except Exception as e:
        torch.cuda.synchronize()  # let a failed capture's side-stream work finish before the next case
        raise NotCapturable(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:140]) from e


def fwd_and_fwdbwd(fn, inputs, do, bench, graph: bool = False) -> tuple[float | None, float | None, str]:
    """Times fn(*inputs) and fn + autograd.grad w.r.t. the inputs that require grad (no accumulation).

    ``graph``: time CUDA-graph replays of the same calls instead (GPU time only). A pass that cannot be captured
    gets None and a note that says why (the other pass is still timed).
    """
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def fwdbwd():
        out = fn(*inputs)
        torch.autograd.grad(out, leaves, do)

    if not graph:
        return bench(fwd), bench(fwdbwd), ""
    times, notes = [], []
    for tag, step in (("fwd", fwd), ("fwd+bwd", fwdbwd)):
        try:
            times.append(bench(graphed_or_why(step)))
        except NotCapturable as e:
            times.append(None)
            notes.append(f"{tag} not capturable in a CUDA graph: {e}")
    return times[0], times[1], "; ".join(notes)


def profile_case(fn, inputs, do, path: Path | None, steps: int = 20) -> str:
    """torch.profiler table (GPU kernels and host ops) of ``steps`` eager fwd+bwd calls; written to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    for _ in range(5):
        torch.autograd.grad(fn(*inputs), leaves, do)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            torch.autograd.grad(fn(*inputs), leaves, do)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    table += "\n" + prof.key_averages().table(sort_by="cpu_time_total", row_limit=30)
    if path:
        path.write_text(f"{steps} eager fwd+bwd calls\n{table}")
    return table


# ------------------------------------------------------------------------------------------------ implementations
def ours(lens, H, Hkv, D, device, dtype, fwd_cfg=None, bwd_cfg=None, deterministic=False):
    from padless.kernels.attention import varlen_attention_with_configs

    T = sum(lens)
    q, k, v, do = (torch.randn(T, h, D, device=device, dtype=dtype) for h in (H, Hkv, Hkv, H))
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    cu, m = make_cu(lens, device), max(lens)

    def fn(q, k, v):
        return varlen_attention_with_configs(q, k, v, cu, m, None, True, None, None, deterministic, fwd_cfg=fwd_cfg,
                                             bwd_cfg=bwd_cfg)  # fmt: skip

    return fn, (q, k, v), do


def ours_deterministic(lens, H, Hkv, D, device, dtype):
    return ours(lens, H, Hkv, D, device, dtype, deterministic=True)


def ours_fused_delta(lens, H, Hkv, D, device, dtype):
    """The default tiling with delta recomputed inside the backward kernels (the opt-in fuse_delta A/B)."""
    from padless.kernels.attention import default_configs

    _, bwd = default_configs(D, dtype, max(lens), H // Hkv, sum(lens) / len(lens))
    return ours(lens, H, Hkv, D, device, dtype, bwd_cfg=bwd._replace(fuse_delta=True))


def ours_delta_launch(lens, H, Hkv, D, device, dtype):
    """The default tiling with delta from its own launch before dK/dV (the pre-``dq_first`` order, for A/B)."""
    from padless.kernels.attention import default_configs

    _, bwd = default_configs(D, dtype, max(lens), H // Hkv, sum(lens) / len(lens))
    return ours(lens, H, Hkv, D, device, dtype, bwd_cfg=bwd._replace(dq_first=False))


def torch_varlen(lens, H, Hkv, D, device, dtype):
    from tests.kernels.test_attention import torch_varlen_causal

    T = sum(lens)
    q, k, v, do = (torch.randn(T, h, D, device=device, dtype=dtype) for h in (H, Hkv, Hkv, H))
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    cu, m = make_cu(lens, device), max(lens)
    return (lambda q, k, v: torch_varlen_causal(q, k, v, cu, m)), (q, k, v), do


def sdpa_padded(lens, H, Hkv, D, device, dtype):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    B, L = len(lens), max(lens)
    if B * H * L * D > 2**31 - 1:
        # Session 4: alpaca/64K at D 256 (B*H*L*D = 4.3e9) made PyTorch's flash kernel fault with an illegal memory
        # access (int32 offsets), which poisons the CUDA context and ends the whole run: skip it with a note.
        raise ValueError(f"padded batch of {B * H * L * D:.2e} elements per tensor is past int32 indexing: skipped")
    # Padded batch (B, H, L, D); k/v already repeated to H heads (not timed). Padding is wasted work.
    q, k, v, do = (torch.randn(B, H, L, D, device=device, dtype=dtype) for _ in range(4))
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))

    def fn(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(q, k, v, is_causal=True)

    return fn, (q, k, v), do


_FLEX = {}


def flex_document(lens, H, Hkv, D, device, dtype):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        # ``import torch._dynamo`` here would make ``torch`` a local name of this function (run 3: every flex row
        # failed with UnboundLocalError); bind the submodule under its own name instead.
        from torch import _dynamo as dynamo

        # One static compile per pack shape: lift dynamo's recompile cap (8) so flex never falls back to eager.
        # (Run 1: past the cap flex ran eager and materialised 32 GiB of scores at D 64, 16K.) The accumulated cap
        # counts every recompile of the process: ~2 per case x 13 cases x 3 head dims stays far below 4096.
        for name, cap in (("recompile_limit", 256), ("cache_size_limit", 256), ("accumulated_recompile_limit", 4096)):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, cap)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    T = sum(lens)
    doc = torch.repeat_interleave(torch.arange(len(lens), device=device), torch.tensor(lens, device=device))

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    block_mask = create_block_mask(document_causal, None, None, T, T, device=device)
    q = torch.randn(1, H, T, D, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, Hkv, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    do = torch.randn(1, H, T, D, device=device, dtype=dtype)
    flex = _FLEX["fn"]
    return (lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=Hkv != H)), (q, k, v), do


IMPLS = {
    "padless": ours,
    "padless_det": ours_deterministic,
    "padless_fuse": ours_fused_delta,
    "padless_delta_launch": ours_delta_launch,
    "varlen_attn": torch_varlen,
    "sdpa_flash_padded": sdpa_padded,
    "flex_document": flex_document,
}
# Rows replayed from CUDA graphs by default: ours and every peer, so the GPU-time comparison is like for like. A
# peer whose call cannot be captured still gets its row, with the capture error as the note.
GRAPHED = ("padless", "padless_delta_launch", "varlen_attn", "sdpa_flash_padded", "flex_document")
DEFAULT_IMPLS = [*IMPLS, *(f"{name}@graph" for name in GRAPHED)]


def matmul_peak(bench) -> float:
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / (bench(lambda: a @ b) * 1e-3) / 1e12


# ------------------------------------------------------------------------------------------------ runs
def _measure(args, bench, device, dtype, name, pack, lens, D, impl) -> Row:
    flops = causal_flops(lens, args.H, D)
    try:
        # "<impl>@graph": the same calls replayed from a CUDA graph (GPU time without host overhead).
        fn, inputs, do = IMPLS[impl.removesuffix("@graph")](lens, args.H, args.Hkv, D, device, dtype)
        f, fb, note = fwd_and_fwdbwd(fn, inputs, do, bench, graph=impl.endswith("@graph"))
        return Row(name, pack, D, impl, f, fb, f and flops / f / 1e9, fb and 3.5 * flops / fb / 1e9, note)
    except Exception as e:  # a baseline missing in this torch, or out of memory: record, go on
        return Row(name, pack, D, impl, None, None, None, None, f"{type(e).__name__}: {e}"[:160])
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def median_row(rounds: list[Row]) -> Row:
    """One row from the same (case, impl) timed in several interleaved rounds: median times, the spread as a note."""
    first = rounds[0]
    if len(rounds) == 1:
        return first
    ok = [r for r in rounds if r.fwd_ms is not None and r.fwdbwd_ms is not None]
    if not ok:
        return first
    f, fb = statistics.median(r.fwd_ms for r in ok), statistics.median(r.fwdbwd_ms for r in ok)
    scale_f, scale_fb = ok[0].fwd_tflops * ok[0].fwd_ms, ok[0].fwdbwd_tflops * ok[0].fwdbwd_ms
    spread = (f"median of {len(ok)} interleaved rounds; fwd+bwd ms {min(r.fwdbwd_ms for r in ok):.3f}-"
              f"{max(r.fwdbwd_ms for r in ok):.3f}")  # fmt: skip
    note = "; ".join(x for x in (first.note, spread) if x)
    return Row(first.case, first.pack, first.D, first.impl, f, fb, scale_f / f, scale_fb / fb, note)


def run_table(args, bench, device, dtype) -> list[Row]:
    """Every (D, case, impl); with ``--rounds R`` each case times its impls R times in turn (A, B, A, B, ...), so
    an A/B of two implementations sees the same clocks and host load, and reports the median."""
    rows = []
    for D in args.dims:
        for name, pack, lens in cases(args.packs, args.quick):
            timed: dict[str, list[Row]] = {impl: [] for impl in args.impls}
            for _ in range(args.rounds):
                for impl in args.impls:
                    timed[impl].append(_measure(args, bench, device, dtype, name, pack, lens, D, impl))
                    print(timed[impl][-1], flush=True)
            rows += [median_row(timed[impl]) for impl in args.impls]
    return rows


# ------------------------------------------------------------------------------------------------ report
def environment(args, dtype: torch.dtype) -> dict:
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU interpreter ({platform.machine()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "H": args.H,
        "Hkv": args.Hkv,
        "dtype": str(dtype).removeprefix("torch."),
        "flop_convention": "fwd = 4*sum(l^2/2)*H*D; fwd+bwd = 3.5x fwd (bwd = 2.5x fwd, FlashAttention's)",
    }


def markdown(env: dict, rows: list[Row], peak: float | None) -> str:
    lines = [f"# Varlen attention benchmark: {env['gpu']}", ""]
    lines += [f"- {k}: `{v}`" for k, v in env.items() if k != "gpu"]
    if peak:
        lines.append(f"- measured bf16 matmul peak (8192^3): {peak:.0f} TFLOP/s")
    lines += ["", "useful causal TFLOP/s, fwd / fwd+bwd (ms in parentheses)", ""]
    impls = list(dict.fromkeys(r.impl for r in rows))
    keys = list(dict.fromkeys((r.D, r.case) for r in rows))
    lines.append("| D | case | " + " | ".join(impls) + " |")
    lines.append("|---|---|" + "---|" * len(impls))
    for D, case in keys:
        cells = []
        for impl in impls:
            r = next((r for r in rows if (r.D, r.case, r.impl) == (D, case, impl)), None)
            if r is None or (r.fwd_ms is None and r.fwdbwd_ms is None):
                cells.append("n/a")
            else:
                tf = [("n/a" if x is None else f"{x:.0f}") for x in (r.fwd_tflops, r.fwdbwd_tflops)]
                ms = [("n/a" if x is None else f"{x:.2f}") for x in (r.fwd_ms, r.fwdbwd_ms)]
                cells.append(f"{tf[0]} / {tf[1]} ({ms[0]} / {ms[1]})")
        lines.append(f"| {D} | {case} | " + " | ".join(cells) + " |")
    notes = [f"- {r.impl} {r.case} D={r.D}: {r.note}" for r in rows if r.note]
    if notes:
        lines += ["", "Notes (errors, capture failures, interleaved-round spreads):", *notes]
    if any(r.impl.endswith("@graph") for r in rows):
        lines += [
            "",
            "`X@graph`: CUDA-graph replays of the same calls (GPU time alone: no Python, autograd or "
            "launch path); FlexAttention's BlockMask and compilation happen before capture, outside the graph.",
        ]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run under TRITON_INTERPRET=1")
    p.add_argument("--sweep", action="store_true", help="time alternative tilings of our kernels instead")
    p.add_argument("--budget-s", type=float, default=110.0, help="--sweep: stop starting trials after this many s")
    p.add_argument("--write-tuned", default=None, help="--sweep: merge the winners into this JSON tiling table")
    p.add_argument("--compile-check", action="store_true",
                   help="no GPU needed: compile for sm_90 and print registers/spills/shared memory")  # fmt: skip
    p.add_argument("--candidates", action="store_true", help="--compile-check: every sweep candidate, not defaults")
    p.add_argument("--kinds", default="fwd,bwd_atomic,bwd_kv,bwd_dq", help="--compile-check / --sweep kinds")
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for JSON + markdown (default: $OUT)")
    p.add_argument("--packs", default="4096,16384,65536", help="pack sizes in tokens, comma-separated")
    p.add_argument("--dims", default="128,64,256", help="head dims for the table")
    p.add_argument("--sweep-dims", default="128,64", help="head dims for --sweep")
    p.add_argument("--sweep-buckets", default="short,medium,long",
                   help="length buckets for --sweep, from short,medium,long,xlong (xlong: one 16K example per pack; "
                   "without xlong entries it uses long's tiles)")  # fmt: skip
    p.add_argument("--impls", default=",".join(DEFAULT_IMPLS),
                   help=f"implementations, from {list(IMPLS)}; a name + '@graph' (e.g. padless@graph) times CUDA-graph "
                   "replays: GPU time alone, so eager minus graphed is the host overhead per call")  # fmt: skip
    p.add_argument("--profile", default=None,
                   help="case names (e.g. alpaca/4K,eq1K/4K): write a torch.profiler table of padless fwd+bwd per "
                   "case and D to --out, then the normal table")  # fmt: skip
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time each case's impls this many times in turn (interleaved A/B) and report medians",
    )
    p.add_argument("--H", type=int, default=32)
    p.add_argument("--Hkv", type=int, default=8)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    args.sweep_kinds = args.kinds.split(",")
    args.sweep_buckets = args.sweep_buckets.split(",")
    from padless.kernels.attention import BUCKETS

    if unknown := set(args.sweep_buckets) - set(BUCKETS):
        raise SystemExit(f"--sweep-buckets: unknown {sorted(unknown)}; expected some of {list(BUCKETS)}")
    if args.compile_check:
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise SystemExit("--compile-check compiles real GPU code: unset TRITON_INTERPRET")
        from bench_attention_compile import compile_check

        compile_check([int(x) for x in args.dims.split(",")], args.H // args.Hkv, args.sweep_kinds, args.candidates)
        return
    if args.quick:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.packs, args.dims, args.sweep_dims, args.H, args.Hkv = "96", "16", "16", 4, 2
        args.impls = "padless"
    args.packs = [int(x) for x in args.packs.split(",")]
    args.dims = [int(x) for x in args.dims.split(",")]
    args.sweep_dims = [int(x) for x in args.sweep_dims.split(",")]
    args.impls = args.impls.split(",")
    device = "cpu" if args.quick else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run on the H200, or use --quick for the CPU smoke run")
    dtype = torch.float32 if args.quick else torch.bfloat16
    bench = timer(args.quick, 40 if args.sweep else 100)  # sweep: many trials, shorter medians
    env = environment(args, dtype)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        from bench_attention_sweep import BUCKET_CASES, run_sweep, write_tuned

        lens_of = {name: lens for name, _, lens in cases([16384])}
        if args.quick:  # the CPU smoke run: the two tiny cases stand for the buckets
            tiny = dict((name, lens) for name, _, lens in cases([], quick=True))
            lens_of = {BUCKET_CASES["short"]: tiny["alpaca-tiny"], BUCKET_CASES["long"]: tiny["eq32"]}
        results = run_sweep(args, bench, device, dtype, lens_of, causal_flops)
        if out:
            (out / "attention_sweep.json").write_text(json.dumps({"env": env, "results": results}, indent=1))
        if args.write_tuned:
            for e in write_tuned(Path(args.write_tuned), results, str(dtype).removeprefix("torch.")
                                 .replace("bfloat16", "bf16").replace("float16", "fp16").replace("float32", "fp32"),
                                 env):  # fmt: skip
                print(f"[tuned] {e}", flush=True)
            if out:  # the device machine sends back only --out: a copy to commit as kernels/attention_tuned.json
                (out / "attention_tuned.json").write_text(Path(args.write_tuned).read_text())
        return
    if args.profile and not args.quick:
        wanted = args.profile.split(",")
        for D in args.dims:
            for name, _, lens in cases(args.packs):
                if name in wanted:
                    fn, inputs, do = ours(lens, args.H, args.Hkv, D, device, dtype)
                    path = out / f"attention_profile_D{D}_{name.replace('/', '_')}.txt" if out else None
                    print(f"== profile {name} D={D}\n" + profile_case(fn, inputs, do, path), flush=True)
    peak = None if args.quick else matmul_peak(bench)
    rows = run_table(args, bench, device, dtype)
    md = markdown(env, rows, peak)
    print("\n" + md)
    if out:
        tag = "D" + "-".join(map(str, args.dims)) + "_P" + "-".join(str(p // 1024) + "K" for p in args.packs)
        (out / f"attention_bench_{tag}.json").write_text(
            json.dumps({"env": env, "matmul_peak_tflops": peak, "rows": [asdict(r) for r in rows]}, indent=1)
        )
        (out / f"attention_bench_{tag}.md").write_text(md)


if __name__ == "__main__":
    main()
