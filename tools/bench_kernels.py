"""Benchmark padless's fused kernels against eager PyTorch (our ``*_reference``, Hugging Face's math) and Liger-Kernel
(when ``liger_kernel`` is importable) on one GPU. Prints a table and appends its rows to
docs/bench/results/kernels.jsonl.

    python tools/bench_kernels.py                                # every op at T = 4096 and 16384 tokens
    python tools/bench_kernels.py --ops rmsnorm,linear_ce --tokens 16384
    python tools/bench_kernels.py --smoke                        # tiny shapes; on a CPU under TRITON_INTERPRET=1

Shapes are Qwen3-8B's, bf16: H 32, Hkv 8, D 128, hidden E 4096, intermediate I 12288, vocab V 151936.
Ops: ``rope`` (q, k in place), ``swiglu``, ``geglu`` (tanh), ``rmsnorm`` (weight gradient), ``rmsnorm_frozen`` (no
weight gradient, the LoRA case), ``rmsnorm_head`` (Qwen3's per-head q norm, frozen), ``linear_ce`` (lm_head + next-token
cross-entropy, frozen and trainable weight; for the frozen weight also ``--memory low``'s streamed loss, with the
weight in pinned host memory and on the GPU).

Memory-bound ops: device time from CUDA-graph replays over enough input sets that L2 cannot serve them; backward =
graph(forward + backward) - graph(forward with autograd recording); GB/s of the useful traffic (bf16: RoPE reads and
writes q and k; GLU fwd reads gate, up and writes out = 3 x T x I x 2 B, bwd 5 x; RMSNorm fwd 2 x T x E x 2 B, bwd
3 x), also as % of a measured 1 GiB device-to-device copy. Fused linear CE: forward+backward as one
``torch.autograd.grad`` (CUDA events, median), TFLOP/s of its matmuls (4 T E V frozen, 6 T E V trainable) and the
extra memory of one call (peak minus inputs minus the returned gradients).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import bench_harness as H

QWEN3_8B = {"H": 32, "Hkv": 8, "D": 128, "E": 4096, "I": 12288, "V": 151936}
SMOKE = {"H": 4, "Hkv": 2, "D": 16, "E": 64, "I": 96, "V": 256}
OPS = ("rope", "swiglu", "geglu", "rmsnorm", "rmsnorm_frozen", "rmsnorm_head", "linear_ce")
GiB = 2**30


def optional(module: str) -> tuple[Any, str]:
    """(module, "") or (None, why): Liger is an optional peer, any import failure is its row's note."""
    try:
        return importlib.import_module(module), ""
    except Exception as error:  # an optional peer: whatever fails, the row says so and the table goes on
        return None, f"n/a ({type(error).__name__}: {error})"[:90]


@dataclass
class Impl:
    """One implementation of one op: ``forward(s, grad)`` on input set s, ``full(s)`` = forward + backward."""

    name: str
    forward: Callable[[int, bool], Any] | None = None
    full: Callable[[int], Any] | None = None
    note: str = ""


def autograd_impl(name: str, fn: Callable, inputs: list[tuple], grads: list, wrt: Callable[[int], tuple]) -> Impl:
    import torch

    def forward(s: int, grad: bool) -> Any:
        with torch.set_grad_enabled(grad):
            return fn(*inputs[s])

    def full(s: int) -> Any:
        return torch.autograd.grad(fn(*inputs[s]), wrt(s), grads[s])

    return Impl(name, forward, full)


def leaf(shape: tuple, device: str, scale: float = 1.0, grad: bool = True):
    import torch

    return (torch.randn(*shape, device=device, dtype=torch.bfloat16) * scale).requires_grad_(grad)


# --------------------------------------------------------------------------------------------- op builders
def rope_case(t: int, shape: dict, device: str) -> tuple[list[Impl], int, int]:
    import torch

    from padless.kernels.rope import rope_, rope_reference

    h, hkv, d = shape["H"], shape["Hkv"], shape["D"]
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    freqs = torch.arange(max(t, 4096), device=device, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = freqs.cos(), freqs.sin()
    pos = torch.arange(t, device=device) % 1024  # packed examples of 1024 tokens
    nbytes = 2 * t * (h + hkv) * d * 2 + t * d * 4 + t * 8  # q, k read + write; cos/sin rows; positions
    sets = H.input_sets(nbytes)
    qk = [(leaf((t, h, d), device), leaf((t, hkv, d), device)) for _ in range(sets)]
    grads = [(torch.randn_like(q), torch.randn_like(k)) for q, k in qk]

    def ours_forward(s: int, grad: bool) -> Any:
        q, k = qk[s]
        if not grad:  # in place on the inputs' storage: the benchmark's data is noise either way
            with torch.no_grad():
                return rope_(q.detach(), k.detach(), cos, sin, pos)
        return rope_(q.clone(), k.clone(), cos, sin, pos)  # a leaf that requires grad cannot be rotated in place

    def ours_full(s: int) -> Any:  # the backward rotates the gradient buffers in place
        return torch.autograd.grad(ours_forward(s, True), qk[s], grads[s])

    eager = autograd_impl("eager", lambda q, k: rope_reference(q, k, cos, sin, pos), qk, grads, lambda s: qk[s])
    impls = [Impl("padless", ours_forward, ours_full), eager]
    liger, why = optional("liger_kernel.transformers.rope")
    if liger is None:
        impls.append(Impl("liger", note=why))
    else:  # Liger's layout: q (1, H, T, D) (a transposed view of ours), cos/sin (1, T, D) in HF's duplicated form
        cos_hf, sin_hf = (torch.cat((x[pos], x[pos]), -1)[None].to(torch.bfloat16) for x in (cos, sin))
        view = lambda x: x.view(1, t, x.shape[1], d).transpose(1, 2)
        fn = lambda q, k: liger.liger_rotary_pos_emb(view(q), view(k), cos_hf, sin_hf)
        vgrads = [(view(gq), view(gk)) for gq, gk in grads]
        impls.append(autograd_impl("liger", fn, qk, vgrads, lambda s: qk[s]))
    return impls, nbytes, nbytes


def glu_case(t: int, shape: dict, device: str, geglu: bool) -> tuple[list[Impl], int, int]:
    import torch

    from padless.kernels import swiglu as S

    elem = t * shape["I"] * 2
    sets = H.input_sets(3 * elem)
    inputs = [(leaf((t, shape["I"]), device), leaf((t, shape["I"]), device)) for _ in range(sets)]
    grads = [torch.randn_like(g) for g, _ in inputs]
    fns = {"padless": (lambda g, u: S.geglu(g, u, "tanh")) if geglu else S.swiglu,
           "eager": (lambda g, u: S.geglu_reference(g, u, "tanh")) if geglu else S.swiglu_reference}  # fmt: skip
    impls = [autograd_impl(name, fn, inputs, grads, lambda s: inputs[s]) for name, fn in fns.items()]
    liger, why = optional("liger_kernel.ops.geglu" if geglu else "liger_kernel.ops.swiglu")
    if liger is None:
        impls.append(Impl("liger", note=why))
    else:
        fn = liger.LigerGELUMulFunction.apply if geglu else liger.LigerSiLUMulFunction.apply
        impls.append(autograd_impl("liger", fn, inputs, grads, lambda s: inputs[s]))
    return impls, 3 * elem, 5 * elem


def rmsnorm_case(t: int, shape: dict, device: str, weight_grad: bool, per_head: bool) -> tuple[list[Impl], int, int]:
    import torch

    from padless.kernels.rmsnorm import rms_norm, rms_norm_reference

    xshape = (t, shape["H"], shape["D"]) if per_head else (t, shape["E"])
    elem = xshape[0] * xshape[1] * (xshape[2] if per_head else 1) * 2
    sets = H.input_sets(2 * elem)
    w = (1 + 0.1 * torch.randn(xshape[-1], device=device)).to(torch.bfloat16).requires_grad_(weight_grad)
    inputs = [(leaf(xshape, device), w) for _ in range(sets)]
    grads = [torch.randn(xshape, device=device, dtype=torch.bfloat16) for _ in range(sets)]
    wrt = (lambda s: inputs[s]) if weight_grad else (lambda s: inputs[s][:1])
    fns = {"padless": lambda x, w: rms_norm(x, w, 1e-6), "eager": lambda x, w: rms_norm_reference(x, w, 1e-6)}
    liger, why = optional("liger_kernel.ops.rms_norm")
    if liger is not None:
        fns["liger"] = lambda x, w: liger.LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama")
    impls = [autograd_impl(name, fn, inputs, grads, wrt) for name, fn in fns.items()]
    return impls + ([Impl("liger", note=why)] if liger is None else []), 2 * elem, 3 * elem


def measure_memory_bound(op: str, t: int, impl: Impl, fwd_bytes: int, bwd_bytes: int, copy_gbps: float) -> dict:
    import torch

    row: dict[str, Any] = {"op": op, "T": t, "impl": impl.name, "note": impl.note}
    if impl.forward is None:
        return row
    sets = range(H.input_sets(fwd_bytes))
    try:
        fwd = H.time_graph_ms([lambda s=s: impl.forward(s, False) for s in sets])
        fwd_grad = H.time_graph_ms([lambda s=s: impl.forward(s, True) for s in sets])
        full = H.time_graph_ms([lambda s=s: impl.full(s) for s in sets])
        row.update(fwd_ms=fwd, bwd_ms=max(full - fwd_grad, 1e-6))
        row.update(fwd_gbps=fwd_bytes / fwd / 1e6, bwd_gbps=bwd_bytes / row["bwd_ms"] / 1e6)
        row.update(fwd_pct_copy=100 * row["fwd_gbps"] / copy_gbps, bwd_pct_copy=100 * row["bwd_gbps"] / copy_gbps)
    except Exception as error:  # one failing peer must not stop the table: its row says why
        row["note"] = f"{type(error).__name__}: {error}"[:160]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def extra_memory_gib(fn: Callable[[], Any], returned_bytes: int) -> float | None:
    """Peak memory one call allocates beyond its inputs and the gradients it returns (GiB); None on the CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return max(0.0, (torch.cuda.max_memory_allocated() - base - returned_bytes) / GiB)


def linear_ce_rows(t: int, shape: dict, device: str, repeats: int) -> list[dict]:
    import torch

    from padless.kernels.cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
    from padless.kernels.streamed_cross_entropy import streamed_linear_cross_entropy

    e, v = shape["E"], shape["V"]
    h = leaf((t, e), device, 0.5)
    w_train = leaf((v, e), device, 0.02)
    labels = torch.randint(0, v, (t,), device=device)
    labels[:: max(1, t // 64)] = -100  # a few ignored tokens (example starts)
    liger, why = optional("liger_kernel.transformers")
    liger_loss = liger.LigerFusedLinearCrossEntropyLoss(reduction="sum") if liger is not None else None

    def liger_fn(h, w):
        out = liger_loss(w, h[:-1], labels[1:])
        return out[0] if isinstance(out, tuple) else out

    fns = {"padless": lambda h, w: fused_linear_cross_entropy(h, w, labels)[0],
           "eager": lambda h, w: fused_linear_cross_entropy_reference(h, w, labels)[0],
           "liger": liger_fn if liger_loss is not None else None}  # fmt: skip
    # --memory low's loss on a frozen weight: streamed from pinned host memory, and the same code with the weight
    # already on the GPU (what the online softmax costs without the bus).
    w_host = w_train.detach().cpu().pin_memory() if device == "cuda" else None
    streamed = {"streamed_gpu": lambda h, w: streamed_linear_cross_entropy(h, w, labels)[0],
                "streamed_host": lambda h, w: streamed_linear_cross_entropy(h, w_host, labels)[0]}  # fmt: skip
    rows = []
    for weight, w in (("frozen", w_train.detach()), ("trainable", w_train)):
        wrt = (h, w) if w.requires_grad else (h,)
        returned = sum(x.numel() * x.element_size() for x in wrt)
        flop = (6 if w.requires_grad else 4) * t * e * v
        impls = dict(fns, **streamed) if weight == "frozen" else fns
        for name, fn in impls.items():
            missing = why
            if name == "streamed_host" and w_host is None:
                fn, missing = None, "n/a (needs a CUDA device and pinned host memory)"
            row: dict[str, Any] = {"op": f"linear_ce_{weight}", "T": t, "impl": name, "note": "" if fn else missing}
            if fn is not None:
                try:
                    call = lambda fn=fn, w=w, wrt=wrt: torch.autograd.grad(fn(h, w), wrt)
                    row["fwdbwd_ms"] = H.time_ms(call, warmup=1, repeats=repeats)
                    row["tflops"] = flop / row["fwdbwd_ms"] / 1e9
                    row["extra_gib"] = extra_memory_gib(call, returned)
                except Exception as error:  # e.g. the eager reference out of memory: recorded, the table goes on
                    row["note"] = f"{type(error).__name__}: {error}"[:160]
            rows.append(row)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def copy_bandwidth(nbytes: int, device: str) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (read + write counted), by graph replay."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / H.time_graph_ms([lambda: dst.copy_(src)]) / 1e6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {','.join(OPS)}")
    p.add_argument("--tokens", default="4096,16384", help="packed tokens T, comma-separated")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of the fused linear CE (median)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: Triton interpreter, no Liger)")
    H.add_results_args(p, "kernels")
    args = p.parse_args(argv)
    args.ops = [o for o in args.ops.split(",") if o]
    if unknown := sorted(set(args.ops) - set(OPS)):
        p.error(f"--ops: unknown {unknown}; expected some of {list(OPS)}")
    args.tokens = [int(x) for x in args.tokens.split(",") if x]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    device = H.select_device("bench_kernels.py", args.smoke)
    shape, tokens = (SMOKE, [13]) if args.smoke else (QWEN3_8B, args.tokens)
    torch.manual_seed(0)
    copy_gbps = copy_bandwidth(2**20 if args.smoke else GiB, device)
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s", flush=True)
    cases = {
        "rope": lambda t: rope_case(t, shape, device),
        "swiglu": lambda t: glu_case(t, shape, device, geglu=False),
        "geglu": lambda t: glu_case(t, shape, device, geglu=True),
        "rmsnorm": lambda t: rmsnorm_case(t, shape, device, weight_grad=True, per_head=False),
        "rmsnorm_frozen": lambda t: rmsnorm_case(t, shape, device, weight_grad=False, per_head=False),
        "rmsnorm_head": lambda t: rmsnorm_case(t, shape, device, weight_grad=False, per_head=True),
    }
    rows, ce_rows = [], []
    for t in tokens:
        for op in args.ops:
            if op == "linear_ce":
                ce_rows += linear_ce_rows(t, shape, device, 1 if args.smoke else args.repeats)
                continue
            impls, fwd_bytes, bwd_bytes = cases[op](t)
            rows += [measure_memory_bound(op, t, i, fwd_bytes, bwd_bytes, copy_gbps) for i in impls]
            print(f"{op} T={t} done", flush=True)
    for r in rows + ce_rows:
        r.update(dtype="bf16", shape=shape, copy_gbps=copy_gbps, smoke=args.smoke)
    gpu = H.environment()["gpu"]
    print(H.format_table(rows, [("op", "op", "s"), ("T", "T", "d"), ("impl", "impl", "s"),
                                ("fwd_ms", "fwd ms", ".4f"), ("fwd_gbps", "fwd GB/s", ".0f"),
                                ("fwd_pct_copy", "fwd % copy", ".0f"), ("bwd_ms", "bwd ms", ".4f"),
                                ("bwd_gbps", "bwd GB/s", ".0f"), ("bwd_pct_copy", "bwd % copy", ".0f"),
                                ("note", "note", "s")], title=f"\nmemory-bound kernels on {gpu}"))  # fmt: skip
    if ce_rows:
        print(H.format_table(ce_rows, [("op", "op", "s"), ("T", "T", "d"), ("impl", "impl", "s"),
                                       ("fwdbwd_ms", "fwd+bwd ms", ".2f"), ("tflops", "TFLOP/s", ".0f"),
                                       ("extra_gib", "extra GiB", ".2f"), ("note", "note", "s")],
                             title=f"\nfused linear cross-entropy on {gpu}"))  # fmt: skip
    H.record(args, "kernels", rows + ce_rows, smoke=args.smoke)


if __name__ == "__main__":
    main()
