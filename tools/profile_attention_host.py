"""Where the host time of one eager varlen-attention call goes (GPU only): a table of microseconds per call.

Why: on small packs (Alpaca-like 4K) an eager forward+backward is host-bound (0.61 ms against 0.24 ms of GPU
work in session 3's run 4), and a torch.profiler trace cannot tell autograd's engine from our Python. Here each
path is timed on its own with the GPU kept busy by a long ``torch.cuda._sleep``, so the wall clock measures only
the enqueue (never a wait for the device):

- ``fwd no_grad``: the public call without autograd;
- ``fwd + autograd node``: the same call recording the graph;
- ``bwd via autograd.grad``: the engine, its device thread, our backward;
- ``bwd direct``: ``_VarlenAttention.backward``'s body (``flash_bwd``) on the calling thread;
- ``bwd direct, other thread``: the same from a fresh Python thread (as the engine's device thread runs it);
- ``identity Function grad``: an empty autograd.Function's backward, the engine's own floor;
- ``3 empty launches``: three launches of a trivial Triton kernel (the launch path alone);
- the autograd rows again with ``torch.autograd.set_multithreading_enabled(False)`` (no device thread).

Then a cProfile of the direct backward (top functions by total time). Usage:
``python3 tools/profile_attention_host.py --out DIR [--case alpaca/4K]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_attention import cases, make_cu

from padless.kernels.attention import varlen_attention
from padless.kernels.attention_bwd import flash_bwd


@triton.jit
def _empty_kernel(x_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + i, 0.0, mask=i < n)


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


def host_us(fn, reps: int = 60, rounds: int = 5) -> float:
    """Median over ``rounds`` of the mean wall time of ``reps`` calls enqueued behind a long GPU sleep."""
    fn()
    torch.cuda.synchronize()
    means = []
    for _ in range(rounds):
        torch.cuda._sleep(200_000_000)  # ~100 ms of GPU time: every call below only enqueues
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        means.append((time.perf_counter() - t0) / reps * 1e6)
        torch.cuda.synchronize()
    return statistics.median(means)


def in_thread(fn):
    """``fn`` run to completion on a new Python thread (the autograd engine runs backwards on its own)."""

    def call():
        t = threading.Thread(target=fn)
        t.start()
        t.join()

    return call


def timeline_rows(fwd, leaves, do, reps: int = 200) -> list[tuple[str, float]]:
    """Where one eager forward + ``autograd.grad`` spends its host time, from timestamps taken on both threads:
    forward, hand-off to the engine's device thread (grad called -> our backward entered), our backward, hand-back
    (backward returned -> grad returned), and the same loop with Python's GC off. Medians over ``reps`` calls
    enqueued behind a GPU sleep (the GPU never makes the host wait)."""
    import gc

    from padless.kernels import attention as attention_mod

    fn_cls = attention_mod._VarlenAttention
    inner = fn_cls.backward
    stamps: list[float] = []

    def timed_backward(ctx, dout):
        stamps.append(time.perf_counter())
        grads = inner(ctx, dout)
        stamps.append(time.perf_counter())
        return grads

    fn_cls.backward = staticmethod(timed_backward)
    try:
        torch.autograd.grad(fwd(), leaves, do)
        parts: dict[str, list[float]] = {k: [] for k in ("fwd", "hand-off", "our bwd", "hand-back", "total")}
        torch.cuda.synchronize()
        torch.cuda._sleep(400_000_000)
        for _ in range(reps):
            stamps.clear()
            t0 = time.perf_counter()
            out = fwd()
            t1 = time.perf_counter()
            torch.autograd.grad(out, leaves, do)
            t4 = time.perf_counter()
            t2, t3 = stamps
            for key, val in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
                parts[key].append(val * 1e6)
        torch.cuda.synchronize()
    finally:
        fn_cls.backward = inner
    rows = [(f"timeline: {k}", statistics.median(v)) for k, v in parts.items()]
    gc.disable()
    try:
        rows.append(("fwd+bwd (autograd), gc off", host_us(lambda: torch.autograd.grad(fwd(), leaves, do))))
    finally:
        gc.enable()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", default="alpaca/4K")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_attention_host.py measures the CUDA launch path: it needs a CUDA GPU.")
    dev, dt, H, Hkv, D = torch.device("cuda"), torch.bfloat16, 32, 8, 128
    by_name = {name: lens for name, _, lens in cases([4096, 16384])}
    lens = by_name[args.case]
    T = sum(lens)
    q, k, v, do = (torch.randn(T, h, D, device=dev, dtype=dt) for h in (H, Hkv, Hkv, H))
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    cu, m = make_cu(lens, dev), max(lens)

    def fwd_nograd():
        with torch.no_grad():
            varlen_attention(q, k, v, cu, m)

    def fwd_graph():
        return varlen_attention(q, k, v, cu, m)

    out = fwd_graph()
    node = out.grad_fn

    def bwd_autograd():
        torch.autograd.grad(out, (q, k, v), do, retain_graph=True)

    saved = node.saved_tensors
    softmax_scale, causal, window, softcap, bwd_cfg, long_idx = node.args

    def bwd_direct():
        qq, kk, vv, oo, lse, cus, s_kv, s_q = saved
        flash_bwd(do, qq, kk, vv, oo, lse, cus, s_kv, s_q, softmax_scale, causal, window, softcap, bwd_cfg,
                  long_indexing=long_idx)  # fmt: skip

    x = torch.randn(16, device=dev, requires_grad=True)
    y = _Identity.apply(x)
    g = torch.ones_like(x)

    def identity_grad():
        torch.autograd.grad(y, (x,), g, retain_graph=True)

    buf = torch.empty(1024, device=dev)

    def three_launches():
        for _ in range(3):
            _empty_kernel[(1,)](buf, 1024, BLOCK=1024)

    rows = [
        ("fwd no_grad", host_us(fwd_nograd)),
        ("fwd + autograd node", host_us(fwd_graph)),
        ("bwd via autograd.grad", host_us(bwd_autograd)),
        ("bwd direct", host_us(bwd_direct)),
        ("bwd direct, other thread", host_us(in_thread(bwd_direct))),
        ("empty thread start+join", host_us(in_thread(lambda: None))),
        ("identity Function grad", host_us(identity_grad)),
        ("3 empty launches", host_us(three_launches)),
        ("fwd+bwd (autograd)", host_us(lambda: torch.autograd.grad(fwd_graph(), (q, k, v), do))),
        ("fwd+bwd, retain_graph", host_us(lambda: torch.autograd.grad(fwd_graph(), (q, k, v), do, retain_graph=True))),
    ]
    with torch.autograd.set_multithreading_enabled(False):  # the backward runs on the calling thread
        rows += [
            ("bwd via autograd.grad, engine on caller thread", host_us(bwd_autograd)),
            ("fwd+bwd, engine on caller thread", host_us(lambda: torch.autograd.grad(fwd_graph(), (q, k, v), do))),
        ]
    rows += timeline_rows(fwd_graph, (q, k, v), do)
    prof = cProfile.Profile()
    torch.cuda._sleep(400_000_000)
    prof.enable()
    for _ in range(100):
        bwd_direct()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    lines = [f"# host us per call, {args.case} (T {T}, {len(lens)} examples), D {D}, bf16; "
             f"{torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}", "",
             "| path | host us / call |", "|---|---|"] + [f"| {n} | {u:.1f} |" for n, u in rows]  # fmt: skip
    text = "\n".join(lines) + "\n\ncProfile of 100 direct backward calls (tottime):\n" + s.getvalue()
    print(text, flush=True)
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "attention_host.md").write_text(text)
        (out_dir / "attention_host.json").write_text(json.dumps(dict(rows), indent=1))


if __name__ == "__main__":
    main()
