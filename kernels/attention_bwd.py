"""Varlen attention backward in Triton (FlashAttention-2 style): an atomic-dQ fast path and a deterministic one.

Shape legend as in ``kernels.attention_fwd``: q/do/dq (T, H, D), k/v/dk/dv (T, Hkv, D), lse and delta (T, H)
fp32, G = H // Hkv. The schedules (one per block size) come from the forward (``build_schedules``).

``_dkdv_kernel``: one program per (example, key block) and kv head; it loops over the G query heads of the group
(HPB at a time, packed into the rows as in the forward) and over the query blocks that see this key block, so
dK/dV are summed over the group inside the program: never atomics for dK/dV. Slots run in schedule order (an
example's first key blocks first): under the causal mask the first key blocks see the most queries.

Two ways to get dQ (``BwdConfig.dq_atomic``):
* atomic: ``_delta_kernel`` computes delta = rowsum(dO * O) per (token, head) and zeroes an fp32 (T, H, D) dQ
  buffer (it walks every row anyway: no separate memset); the dK/dV step also adds dS K into that buffer with
  atomics: 5 matmuls per tile and no dQ launch, but dq's summation order varies run to run.
* deterministic: ``_dq_kernel`` first, one program per (example, query block) and HPB heads, looping over key
  blocks as the forward. Each program owns its query rows, so it loads their O tile once (next to the dO tile it
  loads anyway), reduces delta, uses it and stores it for the dK/dV kernel that follows: no delta launch, and the
  extra load hides behind the compute-bound kernel's matmuls. Recomputing QK^T and dO V^T costs 2 extra matmuls
  per tile (7 instead of 5), but dq, dk, dv are bitwise reproducible. It is also the default: every tuned case
  measured it faster than the atomic kernel (each H200 bucket at D 128 and 256, the H100's one long sequence).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .attention_fwd import (
    _INTERPRET,
    _block_ranges,
    _dot,
    _load_kv,
    _load_tile,
    _scores,
    _slot_block,
    dot_precision,
    head_dim_block,
    score_constants,
)
from .indexing import needs_long_indexing
from .launch import LAUNCH_OPTIONS

__all__ = ["BwdConfig", "flash_bwd"]


class BwdConfig(NamedTuple):
    """dK/dV tiling (key block x query tokens x heads) and dQ tiling (query tokens x heads x key block)."""

    kv_block_n: int
    kv_block_m: int
    kv_hpb: int
    kv_warps: int
    kv_stages: int
    q_block_m: int
    q_hpb: int
    q_block_n: int
    q_warps: int
    q_stages: int
    # dQ by fp32 atomics inside the dK/dV kernel (5 matmuls instead of 7, no dQ launch), NOT bitwise reproducible;
    # False: the deterministic dQ kernel.
    dq_atomic: bool = False


# --------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _delta_kernel(O, DO, DELTA, DQACC, T, stride_ot, stride_oh, stride_dot, stride_doh,
                  H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                  LONG_INDEXING: tl.constexpr, ZERO_DQ: tl.constexpr):  # fmt: skip
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    if LONG_INDEXING:
        tok = tok.to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    m = (tok[:, None] < T) & (d[None, :] < HEAD_DIM)
    o = tl.load(O + tok[:, None] * stride_ot + h * stride_oh + d[None, :], mask=m, other=0.0).to(tl.float32)
    do = tl.load(DO + tok[:, None] * stride_dot + h * stride_doh + d[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(DELTA + tok * H + h, tl.sum(o * do, 1), mask=tok < T)
    if ZERO_DQ:  # the atomic path's fp32 (T, H, D) contiguous dQ accumulator starts at zero
        zero = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        tl.store(DQACC + tok[:, None] * (H * HEAD_DIM) + h * HEAD_DIM + d[None, :], zero, mask=m)


@triton.jit
def _q_ranges(j0, n, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              WINDOW: tl.constexpr):  # fmt: skip
    """Query-block ranges that see keys [j0, j0+BLOCK_N): [lo, f_lo) masked, [f_lo, f_hi) full, [f_hi, hi) masked.

    Full blocks have every row real (< n), below the diagonal and inside the window for every key of the block.
    """
    if CAUSAL:
        lo = (j0 // BLOCK_M) * BLOCK_M
        f_lo = ((j0 + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        if WINDOW:
            hi = tl.minimum(n, j0 + BLOCK_N - 1 + window)
            f_hi = (tl.minimum(n, j0 + window) // BLOCK_M) * BLOCK_M
        else:
            hi = n
            f_hi = (n // BLOCK_M) * BLOCK_M
    else:
        lo = j0 * 0
        hi = n
        f_lo = j0 * 0
        f_hi = tl.where(j0 + BLOCK_N <= n, (n // BLOCK_M) * BLOCK_M, 0)
    f_lo = tl.minimum(f_lo, hi)
    f_hi = tl.maximum(tl.minimum(f_hi, hi), f_lo)
    return lo, f_lo, f_hi, hi


@triton.jit
def _dkdv_step(
    dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, dqa_base, stride_qt, stride_qh, stride_dot,
    stride_doh, i0, n, window, pre, post, scale, rows, rh, offs_d,
    H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HPB: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, LONG_INDEXING: tl.constexpr,
):  # fmt: skip
    """One query block's contribution to this key block's dK and dV."""
    pad_d = BLOCK_D != HEAD_DIM
    rt = i0 + rows // HPB  # int32 token indices for the masks
    row_ok = rt < n
    rq = rt.to(tl.int64) if LONG_INDEXING else rt  # element offsets: 64-bit on the long path
    qT = _load_tile(q_base + rq[None, :] * stride_qt + rh[None, :] * stride_qh + offs_d[:, None],
                    row_ok[None, :], offs_d[:, None] < HEAD_DIM, MASK, pad_d)  # fmt: skip
    do = _load_tile(do_base + rq[:, None] * stride_dot + rh[:, None] * stride_doh + offs_d[None, :],
                    row_ok[:, None], offs_d[None, :] < HEAD_DIM, MASK, pad_d)  # fmt: skip
    if MASK:
        lse = tl.load(lse_base + rq * H + rh, mask=row_ok, other=0.0)
    else:
        lse = tl.load(lse_base + rq * H + rh)
    qkT = _dot(k, qT, None, PREC)  # (BLOCK_N, rows)
    sT, tT = _scores(qkT, pre, post, SOFTCAP)
    pT = tl.exp2(sT - lse[None, :])
    if MASK:
        keep = row_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[:, None] <= rt[None, :])  # cols <= rt < n: no key past the example's end
        else:
            # Key slots past the example's end (zeros in a partial key block) score 0: exp2(0 - lse) overflows
            # fp16 when a row's real scores are very negative, and the dQ dot then turns inf * 0 into NaN.
            keep = keep & (cols[:, None] < n)
        if WINDOW:
            keep = keep & (cols[:, None] > rt[None, :] - window)
        pT = tl.where(keep, pT, 0.0)
    dv = _dot(pT.to(do.dtype), do, dv, PREC)
    dpT = _dot(v, tl.trans(do), None, PREC)
    # delta is loaded only now, after the dP product: it is not live across the first three matmuls.
    if MASK:
        delta = tl.load(delta_base + rq * H + rh, mask=row_ok, other=0.0)
    else:
        delta = tl.load(delta_base + rq * H + rh)
    dsT = pT * (dpT - delta[None, :])
    if SOFTCAP:
        dsT = dsT * (1.0 - tT * tT)
    dk = _dot(dsT.to(qT.dtype), tl.trans(qT), dk, PREC)
    if ATOMIC_DQ:
        # Fast path: dQ += dS K straight into an fp32 (T, H, D) buffer; atomics make it non-deterministic.
        dq = _dot(tl.trans(dsT.to(k.dtype)), k, None, PREC)
        dqa = dqa_base + rq[:, None] * (H * HEAD_DIM) + rh[:, None] * HEAD_DIM + offs_d[None, :]
        tl.atomic_add(dqa, dq * scale, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, dqa_base, stride_qt, stride_qh, stride_dot,
    stride_doh, lo, hi, n, window, pre, post, scale, rows, offs_d, h0,
    H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HPB: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, LONG_INDEXING: tl.constexpr,
):  # fmt: skip
    rh = h0 + rows % HPB
    if _INTERPRET:  # see _fwd_inner: the interpreter cannot range() over runtime scalars
        i0 = lo
        while i0 < hi:
            dk, dv = _dkdv_step(dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, dqa_base, stride_qt,
                                stride_qh, stride_dot, stride_doh, i0, n, window, pre, post, scale, rows, rh, offs_d,
                                H, HEAD_DIM, BLOCK_D, HPB, MASK, CAUSAL, WINDOW, SOFTCAP, PREC,
                                ATOMIC_DQ, LONG_INDEXING)  # fmt: skip
            i0 += BLOCK_M
    else:
        for i0 in range(lo, hi, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, dqa_base, stride_qt,
                                stride_qh, stride_dot, stride_doh, i0, n, window, pre, post, scale, rows, rh, offs_d,
                                H, HEAD_DIM, BLOCK_D, HPB, MASK, CAUSAL, WINDOW, SOFTCAP, PREC,
                                ATOMIC_DQ, LONG_INDEXING)  # fmt: skip
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQACC, CU, SCHED,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    n_tiles, window, pre, post, scale,
    GROUP: tl.constexpr, H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, HPB: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, LONG_INDEXING: tl.constexpr,
    PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):  # fmt: skip
    # DELTA: delta (T, H) fp32 (from _delta_kernel, or stored by _dq_kernel on the deterministic path).
    # 1-D grid, kv heads fastest; slots in schedule order: an example's first key blocks (the heaviest under the
    # causal mask: every later query block sees them) start first.
    NH: tl.constexpr = H // GROUP
    pid = tl.program_id(0)
    ex, j0, start = _slot_block(SCHED, CU, pid // NH, BLOCK_N)
    if ex < 0:
        return
    n = tl.load(CU + ex + 1) - start
    # Token indices stay int32; on the long path the example's start and the key strides are int64 (the K/V tiles
    # load once per program), and the query rows' element offsets widen inside the step.
    kstep, vstep = stride_kt, stride_vt
    if LONG_INDEXING:
        start = start.to(tl.int64)
        kstep, vstep = tl.cast(stride_kt, tl.int64), tl.cast(stride_vt, tl.int64)
    kvh = pid % NH
    cols = j0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_M * HPB)
    k = _load_kv(K + start * stride_kt + kvh * stride_kh, cols, offs_d, kstep, n, HEAD_DIM, BLOCK_D, True, False)
    v = _load_kv(V + start * stride_vt + kvh * stride_vh, cols, offs_d, vstep, n, HEAD_DIM, BLOCK_D, True, False)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_base = Q + start * stride_qt
    do_base = DO + start * stride_dot
    lse_base = LSE + start * H
    delta_base = DELTA + start * H
    dqa_base = DQACC + start * (H * HEAD_DIM)  # (T, H, D) fp32 contiguous; only touched with ATOMIC_DQ
    lo, f_lo, f_hi, hi = _q_ranges(j0, n, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    # The G query heads of this kv head, HPB at a time: dK/dV sum over them without atomics.
    for hs in range(GROUP // HPB):
        h0 = kvh * GROUP + hs * HPB
        dk, dv = _dkdv_inner(dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, dqa_base, stride_qt,
                             stride_qh, stride_dot, stride_doh, lo, f_lo, n, window, pre, post, scale, rows, offs_d,
                             h0, H, HEAD_DIM, BLOCK_D, BLOCK_M, HPB, True, CAUSAL, WINDOW, SOFTCAP, PREC,
                             ATOMIC_DQ, LONG_INDEXING)  # fmt: skip
        dk, dv = _dkdv_inner(dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, dqa_base, stride_qt,
                             stride_qh, stride_dot, stride_doh, f_lo, f_hi, n, window, pre, post, scale, rows, offs_d,
                             h0, H, HEAD_DIM, BLOCK_D, BLOCK_M, HPB, False, CAUSAL, WINDOW, SOFTCAP, PREC,
                             ATOMIC_DQ, LONG_INDEXING)  # fmt: skip
        dk, dv = _dkdv_inner(dk, dv, k, v, cols, q_base, do_base, lse_base, delta_base, dqa_base, stride_qt,
                             stride_qh, stride_dot, stride_doh, f_hi, hi, n, window, pre, post, scale, rows, offs_d,
                             h0, H, HEAD_DIM, BLOCK_D, BLOCK_M, HPB, True, CAUSAL, WINDOW, SOFTCAP, PREC,
                             ATOMIC_DQ, LONG_INDEXING)  # fmt: skip
    out_ok = (cols[:, None] < n) & (offs_d[None, :] < HEAD_DIM)
    tok = start + cols
    tl.store(DK + tok[:, None] * stride_dkt + kvh * stride_dkh + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=out_ok)  # fmt: skip
    tl.store(DV + tok[:, None] * stride_dvt + kvh * stride_dvh + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=out_ok)  # fmt: skip


@triton.jit
def _dq_step(
    dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, kstep, vstep, j0, rt, n, window, pre, post, offs_d,
    offs_n, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One key block's contribution to this query block's dQ."""
    cols = j0 + offs_n
    # As the forward: a scalar base pointer per key block, loop-invariant int32 offsets inside the tile.
    kT = _load_kv(k_base + j0 * kstep, offs_n, offs_d, stride_kt, n - j0, HEAD_DIM, BLOCK_D, MASK, True)
    vT = _load_kv(v_base + j0 * vstep, offs_n, offs_d, stride_vt, n - j0, HEAD_DIM, BLOCK_D, MASK, True)
    qk = _dot(q, kT, None, PREC)
    s, t = _scores(qk, pre, post, SOFTCAP)
    p = tl.exp2(s - lse[:, None])
    if MASK:
        keep = cols[None, :] < n
        if CAUSAL:
            keep = keep & (cols[None, :] <= rt[:, None])
        if WINDOW:
            keep = keep & (cols[None, :] > rt[:, None] - window)
        p = tl.where(keep, p, 0.0)
    dp = _dot(do, vT, None, PREC)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return _dot(ds.to(kT.dtype), tl.trans(kT), dq, PREC)


@triton.jit
def _dq_inner(
    dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, kstep, vstep, lo, hi, rt, n, window, pre, post,
    offs_d, offs_n, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    if _INTERPRET:  # see _fwd_inner: the interpreter cannot range() over runtime scalars
        j0 = lo
        while j0 < hi:
            dq = _dq_step(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, kstep, vstep, j0, rt, n, window,
                          pre, post, offs_d, offs_n, HEAD_DIM, BLOCK_D, MASK, CAUSAL, WINDOW, SOFTCAP,
                          PREC)  # fmt: skip
            j0 += BLOCK_N
    else:
        for j0 in range(lo, hi, BLOCK_N):
            dq = _dq_step(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, kstep, vstep, j0, rt, n, window,
                          pre, post, offs_d, offs_n, HEAD_DIM, BLOCK_D, MASK, CAUSAL, WINDOW, SOFTCAP,
                          PREC)  # fmt: skip
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE, O, DQ, CU, SCHED, DELTA,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_ot, stride_oh,
    stride_dqt, stride_dqh,
    n_tiles, window, pre, post, scale,
    GROUP: tl.constexpr, H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, HPB: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, LONG_INDEXING: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    # delta = rowsum(dO * O) of this program's rows, computed here from O and dO and stored to DELTA (T, H) fp32
    # for the dK/dV kernel launched next. As the forward: 1-D grid, head blocks fastest, last (heaviest) query
    # blocks first.
    NH: tl.constexpr = H // HPB
    pid = tl.program_id(0)
    ex, m0, start = _slot_block(SCHED, CU, n_tiles - 1 - pid // NH, BLOCK_M)
    if ex < 0:
        return
    n = tl.load(CU + ex + 1) - start
    kstep, vstep = stride_kt, stride_vt
    if LONG_INDEXING:  # int32 token indices; the example's start and the key blocks' steps int64
        start = start.to(tl.int64)
        kstep, vstep = tl.cast(stride_kt, tl.int64), tl.cast(stride_vt, tl.int64)
    h0 = (pid % NH) * HPB
    kvh = h0 // GROUP
    rows = tl.arange(0, BLOCK_M * HPB)
    rt = m0 + rows // HPB
    rh = h0 + rows % HPB
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    tok = start + rt
    row_ok = rt < n
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + tok[:, None] * stride_qt + rh[:, None] * stride_qh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + tok[:, None] * stride_dot + rh[:, None] * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    lse = tl.load(LSE + tok * H + rh, mask=row_ok, other=0.0)
    o = tl.load(O + tok[:, None] * stride_ot + rh[:, None] * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + tok * H + rh, delta, mask=row_ok)
    k_base = K + start * stride_kt + kvh * stride_kh
    v_base = V + start * stride_vt + kvh * stride_vh
    dq = tl.zeros([BLOCK_M * HPB, BLOCK_D], dtype=tl.float32)
    lo, f_lo, f_hi, hi = _block_ranges(m0, n, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, kstep, vstep, lo, f_lo, rt, n, window,
                   pre, post, offs_d, offs_n, BLOCK_N, HEAD_DIM, BLOCK_D, True, CAUSAL, WINDOW, SOFTCAP,
                   PREC)  # fmt: skip
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, kstep, vstep, f_lo, f_hi, rt, n, window,
                   pre, post, offs_d, offs_n, BLOCK_N, HEAD_DIM, BLOCK_D, False, CAUSAL, WINDOW, SOFTCAP,
                   PREC)  # fmt: skip
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, kstep, vstep, f_hi, hi, rt, n, window,
                   pre, post, offs_d, offs_n, BLOCK_N, HEAD_DIM, BLOCK_D, True, CAUSAL, WINDOW, SOFTCAP,
                   PREC)  # fmt: skip
    tl.store(DQ + tok[:, None] * stride_dqt + rh[:, None] * stride_dqh + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=mask)  # fmt: skip


# --------------------------------------------------------------------------------------------------- launchers
def flash_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    sched_kv: torch.Tensor,
    sched_q: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    window: int | None,
    softcap: float | None,
    cfg: BwdConfig,
    long_indexing: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels: returns (dq, dk, dv) in the input dtypes (fp32 accumulation inside).

    ``sched_kv`` / ``sched_q``: schedules for ``cfg.kv_block_n`` / ``cfg.q_block_m`` (``sched_q`` unused on the
    atomic path). Atomic: delta (+ dQ buffer zeroing), dK/dV, then the fp32 -> dtype copy of the dQ buffer (none
    for fp32). Deterministic: dQ (which computes and stores delta), then dK/dV. ``long_indexing`` None: judged here.
    """
    T, H, D = q.shape
    Hkv = k.shape[1]
    group = H // Hkv
    assert group % cfg.kv_hpb == 0 and group % cfg.q_hpb == 0, (group, cfg)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    atomic_fp32 = cfg.dq_atomic and q.dtype == torch.float32
    # The atomic path's fp32 (T, H, D) contiguous accumulation buffer (zeroed by the delta kernel); fp32 inputs
    # accumulate straight into dq.
    dq_acc = torch.empty((T, H, D), dtype=torch.float32, device=q.device) if cfg.dq_atomic else None
    dq = dq_acc if atomic_fp32 else torch.empty_like(q)
    if T == 0:
        return dq, dk, dv
    block_d = head_dim_block(D)
    if long_indexing is None:  # the fp32 dQ buffer has as many elements as q: judged by q
        long_indexing = needs_long_indexing(q, k, v, do, out, dq)
    delta = torch.empty((T, H), dtype=torch.float32, device=q.device)
    pre, post = score_constants(softmax_scale, softcap)
    prec = dot_precision(q.dtype)
    qs, ks, vs, dos = q.stride()[:2], k.stride()[:2], v.stride()[:2], do.stride()[:2]
    wflag, sflag = window is not None, softcap is not None
    if cfg.dq_atomic:
        block_t = max(1, 4096 // block_d)
        _delta_kernel[(-(-T // block_t), H)](
            out, do, delta, dq_acc, T, *out.stride()[:2], *dos,
            H=H, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_T=block_t, LONG_INDEXING=long_indexing, ZERO_DQ=True,
            num_warps=4, num_stages=3, **LAUNCH_OPTIONS,
        )  # fmt: skip
    else:
        _dq_kernel[(sched_q.shape[0] * (H // cfg.q_hpb),)](
            q, k, v, do, lse, out, dq, cu_seqlens, sched_q, delta,
            *qs, *ks, *vs, *dos, *out.stride()[:2], *dq.stride()[:2],
            sched_q.shape[0], window or 0, pre, post, softmax_scale,
            GROUP=group, H=H, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=cfg.q_block_m, HPB=cfg.q_hpb,
            BLOCK_N=cfg.q_block_n, CAUSAL=causal, WINDOW=wflag, SOFTCAP=sflag, LONG_INDEXING=long_indexing,
            PREC=prec, num_warps=cfg.q_warps, num_stages=cfg.q_stages, **LAUNCH_OPTIONS,
        )  # fmt: skip
    _dkdv_kernel[(sched_kv.shape[0] * Hkv,)](
        q, k, v, do, lse, delta, dk, dv, dq_acc if cfg.dq_atomic else dq, cu_seqlens, sched_kv,
        *qs, *ks, *vs, *dos, *dk.stride()[:2], *dv.stride()[:2],
        sched_kv.shape[0], window or 0, pre, post, softmax_scale,
        GROUP=group, H=H, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_N=cfg.kv_block_n, BLOCK_M=cfg.kv_block_m,
        HPB=cfg.kv_hpb, CAUSAL=causal, WINDOW=wflag, SOFTCAP=sflag, LONG_INDEXING=long_indexing, PREC=prec,
        ATOMIC_DQ=cfg.dq_atomic, num_warps=cfg.kv_warps, num_stages=cfg.kv_stages, **LAUNCH_OPTIONS,
    )  # fmt: skip
    if cfg.dq_atomic and dq is not dq_acc:
        dq.copy_(dq_acc)
    return dq, dk, dv
