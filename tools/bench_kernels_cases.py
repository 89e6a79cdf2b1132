"""The memory-bound kernel rows of tools/bench_kernels.py: RoPE, SwiGLU/GeGLU, RMSNorm (ours, eager, Liger).

Every implementation is described by three closures over input set ``s`` (see ``rotation_sets``):
``fwd(s)`` (forward under no_grad), ``full(s)`` (forward + backward, returning the gradients) and, for the
plain timer only, ``bwd_builder()`` (a backward on one recorded graph, ``retain_graph=True``). The graph timer
times ``fwd`` and ``full``; graph backward = graph(full) - graph(fwd) (both captured the same way, so the
forward's cost cancels). Our in-place RoPE is the exception: its ``full`` is the in-place forward followed by
the backward launcher (what its ``autograd.Function`` runs), because a fresh non-leaf q, k per call would add a
copy as large as the kernel's own traffic.

Bytes counted (useful traffic only; bf16 = 2 B): RoPE fwd and bwd each read and write q and k once plus the
gathered cos/sin rows; SwiGLU/GeGLU fwd reads gate and up and writes the output (3 x T x I x 2 B), bwd reads dy,
gate, up and writes dgate, dup (5 x); RMSNorm fwd reads x and writes y (2 x T x E x 2 B), bwd reads dy, x and
writes dx (3 x; the weight gradient is E values). Baselines are credited the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench_kernels_timing import Row, Timer, extra_memory_gib, rotation_sets, tbps, try_import

__all__ = ["glu_rows", "rmsnorm_rows", "rope_rows"]


@dataclass
class Impl:
    name: str
    fwd: Callable[[int], object] | None = None
    full: Callable[[int], object] | None = None
    bwd_builder: Callable[[], Callable[[], object]] | None = None
    returned_bytes: int = 0
    note: str = ""


def _measure(kernel: str, t: int, impl: Impl, sets: int, fwd_bytes: int, bwd_bytes: int, timer: Timer) -> Row:
    row = Row(kernel, t, impl.name, sets=sets, note=impl.note)
    if impl.fwd is None:
        return row
    step = "plain fwd"
    try:
        row.p_fwd_ms = timer.plain(lambda: impl.fwd(0))
        step = "plain bwd"
        row.p_bwd_ms = timer.plain(impl.bwd_builder())
        row.p_fwd_tbps, row.p_bwd_tbps = tbps(fwd_bytes, row.p_fwd_ms), tbps(bwd_bytes, row.p_bwd_ms)
        step = "memory"
        row.extra_gib = extra_memory_gib(lambda: impl.full(0), impl.returned_bytes, timer.cuda)
        step = "graph fwd"
        row.g_fwd_ms = timer.graph([lambda s=s: impl.fwd(s) for s in range(sets)], row.p_fwd_ms)
        step = "graph fwd+bwd"
        full_ms = timer.graph([lambda s=s: impl.full(s) for s in range(sets)], row.p_fwd_ms + row.p_bwd_ms)
        row.g_bwd_ms = full_ms - row.g_fwd_ms
        row.g_fwd_tbps, row.g_bwd_tbps = tbps(fwd_bytes, row.g_fwd_ms), tbps(bwd_bytes, row.g_bwd_ms)
    except Exception as error:  # one failing baseline must not stop the table; the note says where and why
        row.note = f"{step}: {type(error).__name__}: {error}"[:200]
    return row


# ----------------------------------------------------------------------------------------------------- RoPE
def rope_rows(t: int, shape: dict, timer: Timer, device) -> list[Row]:
    import torch

    from padless.kernels import rope as R

    h, hkv, d = shape["H"], shape["Hkv"], shape["D"]
    dt = torch.bfloat16
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    freqs = torch.arange(max(t, 4096), device=device, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = freqs.cos(), freqs.sin()
    pos = (torch.arange(t, device=device) % 1024).long()  # packed examples of 1024 tokens
    nbytes = 2 * (t * (h + hkv) * d) * 2 + t * d * 4 + t * 8  # q, k read + write; cos/sin rows; positions
    sets = rotation_sets(nbytes, device)
    qs = [torch.randn(t, h, d, device=device, dtype=dt) for _ in range(sets)]
    ks = [torch.randn(t, hkv, d, device=device, dtype=dt) for _ in range(sets)]
    gqs, gks = [torch.randn_like(q) for q in qs], [torch.randn_like(k) for k in ks]
    returned = (qs[0].numel() + ks[0].numel()) * 2
    impls = []

    def ours_fwd(s):
        with torch.no_grad():
            return R.rope_(qs[s], ks[s], cos, sin, pos)

    def ours_bwd(s):
        R._launch_rope(gqs[s], gks[s], cos, sin, pos, backward=True)

    def ours_full(s):  # forward and backward, both in place: nothing may be allocated
        ours_fwd(s)
        ours_bwd(s)

    impls.append(Impl("padless", ours_fwd, ours_full, lambda: lambda: ours_bwd(0)))

    def leaves(s, view=lambda x, n: x):
        return view(qs[s], h).detach().requires_grad_(True), view(ks[s], hkv).detach().requires_grad_(True)

    def eager_fwd(s):
        with torch.no_grad():
            return R.rope_reference(qs[s], ks[s], cos, sin, pos)

    eager_leaves = [leaves(s) for s in range(sets)]

    def eager_full(s):
        ql, kl = eager_leaves[s]
        return torch.autograd.grad(R.rope_reference(ql, kl, cos, sin, pos), (ql, kl), (gqs[s], gks[s]))

    def eager_bwd_builder():
        ql, kl = eager_leaves[0]
        out = R.rope_reference(ql, kl, cos, sin, pos)
        return lambda: torch.autograd.grad(out, (ql, kl), (gqs[0], gks[0]), retain_graph=True)

    impls.append(Impl("eager", eager_fwd, eager_full, eager_bwd_builder, returned))

    liger, why = try_import("liger_kernel.transformers.rope")
    if liger is None:
        impls.append(Impl("liger", note="n/a: " + why))
    else:
        # Liger's layout: q (1, H, T, D) (a transposed view of ours), cos/sin (1, T, D) in HF's duplicated form.
        cos_hf = torch.cat((cos[pos], cos[pos]), -1)[None].to(dt)
        sin_hf = torch.cat((sin[pos], sin[pos]), -1)[None].to(dt)

        def bhtd(x, heads):
            return x.view(1, t, heads, d).transpose(1, 2)

        def liger_fwd(s):
            with torch.no_grad():
                return liger.liger_rotary_pos_emb(bhtd(qs[s], h), bhtd(ks[s], hkv), cos_hf, sin_hf)

        liger_leaves = [leaves(s, bhtd) for s in range(sets)]
        liger_grads = [(bhtd(gqs[s], h), bhtd(gks[s], hkv)) for s in range(sets)]

        def liger_full(s):
            ql, kl = liger_leaves[s]
            return torch.autograd.grad(liger.liger_rotary_pos_emb(ql, kl, cos_hf, sin_hf), (ql, kl), liger_grads[s])

        def liger_bwd_builder():
            ql, kl = liger_leaves[0]
            out = liger.liger_rotary_pos_emb(ql, kl, cos_hf, sin_hf)
            return lambda: torch.autograd.grad(out, (ql, kl), liger_grads[0], retain_graph=True)

        impls.append(Impl("liger", liger_fwd, liger_full, liger_bwd_builder, returned))
    return [_measure("rope", t, impl, sets, nbytes, nbytes, timer) for impl in impls]


# ----------------------------------------------------------------------------------------------- SwiGLU/GeGLU
def _autograd_impls(
    fns: dict[str, Callable | None], notes: dict[str, str], inputs: list[tuple], dys: list, returned: int
) -> list[Impl]:
    """Impl closures for out-of-place functions fn(*inputs[s]) whose inputs are leaves requiring grad."""
    import torch

    impls = []
    for name, fn in fns.items():
        if fn is None:
            impls.append(Impl(name, note=notes.get(name, "n/a")))
            continue

        def fwd(s, fn=fn):
            with torch.no_grad():
                return fn(*inputs[s])

        def full(s, fn=fn):
            return torch.autograd.grad(fn(*inputs[s]), inputs[s], dys[s])

        def bwd_builder(fn=fn):
            out = fn(*inputs[0])
            return lambda: torch.autograd.grad(out, inputs[0], dys[0], retain_graph=True)

        impls.append(Impl(name, fwd, full, bwd_builder, returned))
    return impls


def glu_rows(t: int, shape: dict, timer: Timer, device, approximate: str | None) -> list[Row]:
    """approximate None: SwiGLU; "tanh": GeGLU (Gemma's gelu_pytorch_tanh)."""
    import torch

    from padless.kernels import swiglu as S

    name = "swiglu" if approximate is None else f"geglu_{approximate}"
    i = shape["I"]
    dt = torch.bfloat16
    elem = t * i * 2
    sets = rotation_sets(3 * elem, device)

    def leaf():
        return torch.randn(t, i, device=device, dtype=dt, requires_grad=True)

    inputs = [(leaf(), leaf()) for _ in range(sets)]
    dys = [torch.randn(t, i, device=device, dtype=dt) for _ in range(sets)]
    fns: dict[str, Callable | None] = {
        "padless": S.swiglu if approximate is None else (lambda g, u: S.geglu(g, u, approximate)),
        "eager": S.swiglu_reference if approximate is None else (lambda g, u: S.geglu_reference(g, u, approximate)),
    }
    notes = {}
    module, why = try_import("liger_kernel.ops.swiglu" if approximate is None else "liger_kernel.ops.geglu")
    if module is None:
        fns["liger"], notes["liger"] = None, "n/a: " + why
    elif approximate is None:
        fns["liger"] = module.LigerSiLUMulFunction.apply
    elif approximate == "tanh":
        fns["liger"] = module.LigerGELUMulFunction.apply
    else:
        fns["liger"], notes["liger"] = None, "n/a: Liger has only the tanh GeGLU"
    impls = _autograd_impls(fns, notes, inputs, dys, 2 * elem)
    return [_measure(name, t, impl, sets, 3 * elem, 5 * elem, timer) for impl in impls]


# ---------------------------------------------------------------------------------------------------- RMSNorm
def rmsnorm_rows(t: int, shape: dict, timer: Timer, device, per_head: bool) -> list[Row]:
    import torch

    from padless.kernels import rmsnorm as N

    dt = torch.bfloat16
    xshape = (t, shape["H"], shape["D"]) if per_head else (t, shape["E"])
    name = "rmsnorm_qk_head" if per_head else "rmsnorm"
    n = 1
    for size in xshape:
        n *= size
    elem = n * 2
    sets = rotation_sets(2 * elem, device)
    w = (1 + 0.1 * torch.randn(xshape[-1], device=device, dtype=dt)).requires_grad_(True)
    inputs = [(torch.randn(*xshape, device=device, dtype=dt, requires_grad=True), w) for _ in range(sets)]
    dys = [torch.randn(*xshape, device=device, dtype=dt) for _ in range(sets)]
    fns: dict[str, Callable | None] = {
        "padless": lambda a, b: N.rms_norm(a, b, 1e-6),
        "eager": lambda a, b: N.rms_norm_reference(a, b, 1e-6),
    }
    module, why = try_import("liger_kernel.ops.rms_norm")
    fns["liger"] = (lambda a, b: module.LigerRMSNormFunction.apply(a, b, 1e-6, 0.0, "llama")) if module else None
    impls = _autograd_impls(fns, {"liger": "n/a: " + why}, inputs, dys, elem + w.numel() * 2)
    return [_measure(name, t, impl, sets, 2 * elem, 3 * elem, timer) for impl in impls]
