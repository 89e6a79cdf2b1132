"""Offline sm_90 compile of the varlen attention kernels (no GPU needed): registers, spills, shared memory.

Triton compiles for a ``GPUTarget("cuda", 90, 128)`` with its bundled ptxas, and ``cuobjdump -res-usage`` reads the
cubin: a tiling that spills (LOCAL > 0), overflows shared memory or fails to compile shows up on a CPU-only machine
before it costs GPU time. Used by ``tools/bench_attention.py --compile-check``.
"""

from __future__ import annotations

import itertools
import subprocess
import tempfile
from pathlib import Path

__all__ = ["compile_check", "compile_one"]

PTR_TYPES = {"LSE": "*fp32", "DELTA": "*fp32", "DQACC": "*fp32", "CU": "*i32", "SCHED": "*i32", "T": "i32", "S": "i32"}


def compile_one(fn, consts: dict, warps: int, stages: int) -> str:
    """Compile one @triton.jit kernel for sm_90; returns 'REG:.. LOCAL:.. dynamic-shared:..'."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"
        elif a == "DELTA" and consts.get("FUSE_DELTA"):
            sig[a] = "*bf16"  # fused: the kernel gets O and recomputes delta
        elif a in PTR_TYPES:
            sig[a] = PTR_TYPES[a]
        elif a.isupper():
            sig[a] = "*bf16"
        else:
            sig[a] = "fp32" if a in ("pre", "post", "scale") else "i32"
    # As the JIT specialises at run time: pointers 16-byte aligned and strides divisible by 16 (what lets the
    # pipeliner use cp.async for the loop's loads; without it no load is pipelined and shared memory looks small).
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if sig[a].startswith("*") or a.startswith("stride_")}  # fmt: skip
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 128),
                       options={"num_warps": warps, "num_stages": stages})  # fmt: skip
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
    fields = " ".join(w for w in usage.split() if w.startswith(("REG:", "LOCAL:")))
    return f"{fields} dynamic-shared:{k.metadata.shared}"


def _common(D: int, group: int, flags: dict) -> dict:
    import triton

    c = dict(GROUP=group, H=4 * group, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), CAUSAL=True, WINDOW=False,
             SOFTCAP=False, LONG_INDEXING=False, PREC="tf32")  # fmt: skip
    return dict(c, **flags)


def compile_kind(kind: str, cfg: tuple, D: int, group: int, flags: dict | None = None) -> str:
    """Compile the kernel a tuned-table kind uses ('fwd', 'bwd_kv', 'bwd_dq', 'bwd_atomic') with tiling cfg."""
    from padless.kernels import attention_bwd as B
    from padless.kernels import attention_fwd as F

    c = _common(D, group, flags or {})
    fuse = c.pop("FUSE_DELTA", False)  # backward kernels only
    if kind == "fwd":
        bm, hpb, bn, w, s = cfg
        return compile_one(F._fwd_kernel, dict(c, BLOCK_M=bm, HPB=hpb, BLOCK_N=bn), w, s)
    if kind in ("bwd_kv", "bwd_atomic"):
        bn, bm, hpb, w, s = cfg
        consts = dict(c, BLOCK_N=bn, BLOCK_M=bm, HPB=hpb, ATOMIC_DQ=kind == "bwd_atomic", FUSE_DELTA=fuse)
        return compile_one(B._dkdv_kernel, consts, w, s)
    bm, hpb, bn, w, s = cfg
    return compile_one(B._dq_kernel, dict(c, BLOCK_M=bm, HPB=hpb, BLOCK_N=bn, FUSE_DELTA=fuse), w, s)


def compile_check(dims: list[int], group: int, kinds: list[str], candidates: bool = False) -> list[str]:
    """One line per (D, bucket, kind, tiling): the defaults, or with ``candidates`` every sweep candidate."""
    from bench_attention_sweep import sweep_candidates

    from padless.kernels.attention import _builtin_configs

    lines = []
    for name, res in _compile_helpers(dims):
        lines.append(f"{name}: {res}")
        print(lines[-1], flush=True)
    for D, bucket in itertools.product(dims, ("short", "medium", "long")):
        for kind in kinds:
            cfgs = [_builtin_configs(D, bucket, group)[kind]]
            # Short examples run with delta fused into the backward kernels (default_configs' fuse_delta).
            variants = ({"FUSE_DELTA": bucket == "short"}, {"WINDOW": True, "SOFTCAP": True})
            if candidates:
                cfgs, variants = sweep_candidates(kind, bucket, D, group), ({},)
            for cfg, flags in itertools.product(cfgs, variants):
                try:
                    res = compile_kind(kind, cfg, D, group, flags)
                except Exception as e:  # report and go on: the point is to list every failing variant
                    res = f"FAILED {type(e).__name__}: {e}"[:300]
                lines.append(f"D={D} {bucket} {kind} {cfg} {flags or ''}: {res}")
                print(lines[-1], flush=True)
    return lines


def _compile_helpers(dims: list[int]) -> list[tuple[str, str]]:
    """The schedule kernel (one launch, three block sizes) and the delta kernel with and without dQ zeroing."""
    import triton

    from padless.kernels import attention_bwd as B
    from padless.kernels import attention_fwd as F

    out = []
    jobs = [("schedule LOG_S=10", F._schedule_kernel, dict(LOG_S=10, BLOCK_T=F.SCHEDULE_BLOCK), 4)]
    for D, zero in itertools.product(dims, (False, True)):
        bd = triton.next_power_of_2(D)
        consts = dict(H=32, HEAD_DIM=D, BLOCK_D=bd, BLOCK_T=max(1, 4096 // bd), LONG_INDEXING=False, ZERO_DQ=zero)
        jobs.append((f"delta D={D} ZERO_DQ={zero}", B._delta_kernel, consts, 4))
    for name, fn, consts, warps in jobs:
        try:
            res = compile_one(fn, consts, warps, 1)
        except Exception as e:  # report and go on, as compile_check does
            res = f"FAILED {type(e).__name__}: {e}"[:300]
        out.append((name, res))
    return out
