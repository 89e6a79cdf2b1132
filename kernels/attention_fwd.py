"""Varlen attention forward in Triton (FlashAttention-2 style) and the device-side tile schedule.

Shape legend: T packed tokens, S examples, H query heads, Hkv key/value heads, G = H // Hkv (GQA group),
D head dim (BLOCK_D = next power of two, masked when D is 80 or 96). q (T, H, D), k/v (T, Hkv, D), out (T, H, D),
lse (T, H) fp32 in the log2 domain (log2 of the softmax denominator plus the row max of scores*log2(e)).

Why a tile schedule: short examples are the common case (Alpaca median ~95 tokens, ~170 per 16K pack), so a
program owns one (example, block) pair and never straddles two examples. ``sched`` maps each program's slot to
its example: example s owns the slots ``cu[s] // BLOCK + s + j`` for its blocks j < cdiv(l_s, BLOCK). Those ranges
never overlap (floor(b/B) - floor(a/B) + 1 >= cdiv(b - a, B)) and all fit in cdiv(T, BLOCK) + S slots, so a slot's
example is one binary search over ``cu_seqlens`` away: every slot is filled in parallel (unused slots -1, written
by the kernel itself), with no loop over the longest example and no host sync. A program reads its example from
``sched`` and its block from the slot formula. ``build_schedules`` fills the schedules of every block size a call
needs (forward, dK/dV, dQ) in one launch; the forward saves them for the backward.

Why heads in the row dimension: one program packs HPB query heads of the same GQA group into its rows (row r is
token r // HPB, head r % HPB), so a 16-token q block of 4 heads still feeds the tensor cores a 64-row tile while
the causal mask wastes work only at 16-token granularity, and each K/V tile is loaded once for HPB heads.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .indexing import needs_long_indexing
from .launch import LAUNCH_OPTIONS

__all__ = ["FwdConfig", "build_schedules", "dot_precision", "flash_fwd", "head_dim_block", "n_slots", "score_constants"]

LOG2E = 1.4426950408889634
# Triton's CPU interpreter (tests) needs two work-arounds, chosen at import like triton.jit itself chooses.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")
# Slots per program of the schedule kernel (one binary search per lane).
SCHEDULE_BLOCK = 256
# Masked scores are set to this finite value (not -inf) so a row with no visible key never makes a NaN.
# (Globals read inside @triton.jit code must be tl.constexpr.)
_MASKED = tl.constexpr(-1.0e30)


class FwdConfig(NamedTuple):
    """Forward (and dQ) tiling: BLOCK_M query tokens x HPB heads per program, BLOCK_N keys per step."""

    block_m: int
    hpb: int
    block_n: int
    num_warps: int
    num_stages: int


# --------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _schedule_kernel(CU, SCHED, S, T, block0, block1, block2, off1, off2, LOG_S: tl.constexpr,
                     BLOCK_T: tl.constexpr):  # fmt: skip
    """Fill up to three schedules (program_id(1) picks the block size) laid out back to back in SCHED (int32).

    Slot t of the schedule for block B holds the example s with cu[s] // B + s <= t < cu[s] // B + s + cdiv(l_s, B),
    or -1. Zero-length examples own no slot (their range is empty), so repeated cu_seqlens entries are safe.
    """
    which = tl.program_id(1)
    block = tl.where(which == 0, block0, tl.where(which == 1, block1, block2))
    off = tl.where(which == 0, 0, tl.where(which == 1, off1, off2))
    n_tiles = (T + block - 1) // block + S
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    # Lower bound: the first s in [0, S) whose slot base cu[s] // B + s exceeds t (bases strictly increase in s).
    lo = tl.zeros([BLOCK_T], dtype=tl.int32)
    hi = tl.zeros([BLOCK_T], dtype=tl.int32) + S
    for _ in tl.static_range(LOG_S):
        active = lo < hi
        mid = (lo + hi) // 2
        base = tl.load(CU + mid, mask=active, other=0) // block + mid
        right = active & (base <= t)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (base > t), mid, hi)
    ex = lo - 1
    ok = ex >= 0
    exc = tl.maximum(ex, 0)
    start = tl.load(CU + exc)
    length = tl.load(CU + exc + 1) - start
    j = t - (start // block + exc)
    ok = ok & (j * block < length)
    tl.store(SCHED + off + t, tl.where(ok, ex, -1), mask=t < n_tiles)


@triton.jit
def _slot_block(SCHED, CU, slot, BLOCK: tl.constexpr):
    """(example, first token of its block inside the example) of a schedule slot; example -1: nothing to do."""
    ex = tl.load(SCHED + slot)
    start = tl.load(CU + tl.maximum(ex, 0))
    return ex, (slot - start // BLOCK - ex) * BLOCK, start


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    if _INTERPRET:
        # Triton 3.6's interpreter multiplies bf16 bit patterns as integers; fp32 copies of bf16/fp16 are exact.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): exact limits at +-inf, absolute error ~1e-7 near 0 (fine for softcapped logits).
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit
def _scores(qk, pre, post, SOFTCAP: tl.constexpr):
    """Raw q.k -> scores in the log2 domain; with softcap also returns tanh(s/cap) for the backward."""
    if SOFTCAP:
        t = _tanh(qk * pre)
        return t * post, t
    else:
        return qk * pre, qk


@triton.jit
def _load_tile(ptrs, seq_ok, d_ok, MASK: tl.constexpr, PAD_D: tl.constexpr):
    """Load with only the masks this block needs (sequence tail and/or padded head dim); others read 0."""
    if MASK:
        if PAD_D:
            return tl.load(ptrs, mask=seq_ok & d_ok, other=0.0)
        else:
            return tl.load(ptrs, mask=seq_ok, other=0.0)
    else:
        if PAD_D:
            return tl.load(ptrs, mask=d_ok, other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _load_kv(base, cols, offs_d, stride_t, n, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr,
             TRANSPOSED: tl.constexpr):  # fmt: skip
    """Load a (BLOCK_N, BLOCK_D) K/V tile, or (BLOCK_D, BLOCK_N) if TRANSPOSED."""
    if TRANSPOSED:
        ptrs = base + cols[None, :] * stride_t + offs_d[:, None]
        return _load_tile(ptrs, cols[None, :] < n, offs_d[:, None] < HEAD_DIM, MASK, BLOCK_D != HEAD_DIM)
    else:
        ptrs = base + cols[:, None] * stride_t + offs_d[None, :]
        return _load_tile(ptrs, cols[:, None] < n, offs_d[None, :] < HEAD_DIM, MASK, BLOCK_D != HEAD_DIM)


@triton.jit
def _fwd_step(
    acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, j0, rt, n, window, pre, post, offs_d, offs_n,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One key block of the online softmax: scores, running max/denominator, rescaled accumulator."""
    cols = j0 + offs_n
    # K loaded transposed (BLOCK_D, BLOCK_N): the dot needs q @ k^T. The block's base pointer moves by a scalar
    # (int64 when LONG_INDEXING) and the tile's own offsets stay int32 and loop-invariant: no per-element 64-bit
    # multiply on a 500K-token sequence.
    kT = _load_kv(k_base + j0 * stride_kt, offs_n, offs_d, stride_kt, n - j0, HEAD_DIM, BLOCK_D, MASK, True)
    qk = _dot(q, kT, None, PREC)
    s, _ = _scores(qk, pre, post, SOFTCAP)
    if MASK:
        keep = cols[None, :] < n
        if CAUSAL:
            keep = keep & (cols[None, :] <= rt[:, None])
        if WINDOW:
            keep = keep & (cols[None, :] > rt[:, None] - window)
        s = tl.where(keep, s, _MASKED)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _load_kv(v_base + j0 * stride_vt, offs_n, offs_d, stride_vt, n - j0, HEAD_DIM, BLOCK_D, MASK, False)
    acc = _dot(p.to(v.dtype), v, acc, PREC)
    return acc, m_new, l_i


@triton.jit
def _fwd_inner(
    acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi, rt, n, window, pre, post,
    offs_d, offs_n,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    if _INTERPRET:
        # Triton's interpreter cannot range() over runtime scalars with numpy >= 2 (its scalars are 1-element
        # arrays); a while loop computes the same blocks. Compiled code keeps the for loop: only scf.for is
        # software-pipelined (num_stages).
        j0 = lo
        while j0 < hi:
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, j0, rt, n, window,
                                      pre, post, offs_d, offs_n, HEAD_DIM, BLOCK_D, MASK, CAUSAL, WINDOW, SOFTCAP,
                                      PREC)  # fmt: skip
            j0 += BLOCK_N
    else:
        for j0 in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, j0, rt, n, window,
                                      pre, post, offs_d, offs_n, HEAD_DIM, BLOCK_D, MASK, CAUSAL, WINDOW, SOFTCAP,
                                      PREC)  # fmt: skip
    return acc, m_i, l_i


@triton.jit
def _block_ranges(m0, n, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                  WINDOW: tl.constexpr):  # fmt: skip
    """Key-block ranges for q tokens [m0, m0+BLOCK_M): [lo, f_lo) masked, [f_lo, f_hi) full, [f_hi, hi) masked.

    Causal: never visit keys above the diagonal; window: never visit keys left of the window.
    """
    if CAUSAL:
        hi = tl.minimum(m0 + BLOCK_M, n)
        f_hi = ((m0 + 1) // BLOCK_N) * BLOCK_N  # blocks ending at or before the first row's diagonal
    else:
        hi = n
        f_hi = (n // BLOCK_N) * BLOCK_N
    lo = m0 * 0  # a tensor, not a constexpr 0: both returns of this helper stay runtime scalars
    f_lo = m0 * 0
    if WINDOW:
        lo = (tl.maximum(m0 - window + 1, 0) // BLOCK_N) * BLOCK_N
        # Fully inside the window for every row: first key >= last row - window + 1.
        f_lo = ((tl.maximum(m0 + BLOCK_M - window, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
        f_lo = tl.maximum(f_lo, lo)
    f_lo = tl.minimum(f_lo, hi)
    f_hi = tl.maximum(tl.minimum(f_hi, hi), f_lo)
    return lo, f_lo, f_hi, hi


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, CU, SCHED,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    n_tiles, window, pre, post,
    GROUP: tl.constexpr, H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, HPB: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, LONG_INDEXING: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    # One 1-D grid, head blocks fastest: programs launch in slot order with all heads of a slot together. The
    # heaviest slots (last blocks of examples) are listed last: walk the slots backwards to run them first.
    NH: tl.constexpr = H // HPB
    pid = tl.program_id(0)
    tile = n_tiles - 1 - pid // NH
    ex, m0, start = _slot_block(SCHED, CU, tile, BLOCK_M)
    if ex < 0:
        return
    n = tl.load(CU + ex + 1) - start
    if LONG_INDEXING:
        # int64 token offsets: a 500K-token pack has T*H*D past 2**31 elements.
        start, m0, n = start.to(tl.int64), m0.to(tl.int64), n.to(tl.int64)
    h0 = (pid % NH) * HPB
    kvh = h0 // GROUP

    rows = tl.arange(0, BLOCK_M * HPB)
    rt = m0 + rows // HPB  # token index inside the example
    rh = h0 + rows % HPB
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    tok = start + rt
    q_mask = (rt[:, None] < n) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + tok[:, None] * stride_qt + rh[:, None] * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)

    k_base = K + start * stride_kt + kvh * stride_kh
    v_base = V + start * stride_vt + kvh * stride_vh
    acc = tl.zeros([BLOCK_M * HPB, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M * HPB], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M * HPB], dtype=tl.float32)
    lo, f_lo, f_hi, hi = _block_ranges(m0, n, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, lo, f_lo, rt, n, window,
                               pre, post, offs_d, offs_n, BLOCK_N, HEAD_DIM, BLOCK_D, True, CAUSAL, WINDOW,
                               SOFTCAP, PREC)  # fmt: skip
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, f_lo, f_hi, rt, n, window,
                               pre, post, offs_d, offs_n, BLOCK_N, HEAD_DIM, BLOCK_D, False, CAUSAL, WINDOW,
                               SOFTCAP, PREC)  # fmt: skip
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, f_hi, hi, rt, n, window,
                               pre, post, offs_d, offs_n, BLOCK_N, HEAD_DIM, BLOCK_D, True, CAUSAL, WINDOW,
                               SOFTCAP, PREC)  # fmt: skip
    acc = acc / l_i[:, None]
    tl.store(O + tok[:, None] * stride_ot + rh[:, None] * stride_oh + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=q_mask)  # fmt: skip
    tl.store(LSE + tok * H + rh, m_i + tl.log2(l_i), mask=rt < n)


# --------------------------------------------------------------------------------------------------- launchers
def head_dim_block(head_dim: int) -> int:
    """The head-dimension tile: the next power of two, at least 16 (tl.dot's smallest inner dimension).

    Plain integer arithmetic rather than triton.next_power_of_2's constexpr wrapper: host code runs this on every
    call. Lanes past ``head_dim`` are masked on load and store.
    """
    return max(16, 1 << max(head_dim - 1, 0).bit_length())


def n_slots(n_tokens: int, n_seq: int, block: int) -> int:
    """Schedule length for one block size: cdiv(T, block) + S slots hold every (example, block) pair."""
    return (n_tokens + block - 1) // block + n_seq


def build_schedules(cu_seqlens: torch.Tensor, n_tokens: int, blocks: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """One launch: for each block size (1 to 3), an int32 (n_slots,) schedule (example per slot or -1).

    Device-side only (no host sync, CUDA-graph capturable): shapes come from ``n_tokens`` and ``cu_seqlens.numel()``.
    """
    assert 1 <= len(blocks) <= 3, blocks
    n_seq = cu_seqlens.numel() - 1
    sizes = [n_slots(n_tokens, n_seq, b) for b in blocks]
    # Each schedule starts 16-byte aligned, so Triton keeps its aligned-pointer specialisation for every view.
    offs = [0]
    for n in sizes[:-1]:
        offs.append(offs[-1] + (n + 3) // 4 * 4)
    buf = torch.empty(offs[-1] + sizes[-1], dtype=torch.int32, device=cu_seqlens.device)
    scheds = tuple(buf[o : o + n] for o, n in zip(offs, sizes, strict=True))
    if n_seq <= 0:
        buf.fill_(-1)
        return scheds
    b = (*blocks, blocks[0], blocks[0])
    o = (*offs, 0, 0)
    grid = (-(-max(sizes) // SCHEDULE_BLOCK), len(blocks))
    # LOG_S: binary-search steps, rounded up to a multiple of 4 so that packs with different example counts share a
    # few compiled variants (surplus steps do nothing).
    _schedule_kernel[grid](
        cu_seqlens, buf, n_seq, n_tokens, b[0], b[1], b[2], o[1], o[2],
        LOG_S=-(-n_seq.bit_length() // 4) * 4, BLOCK_T=SCHEDULE_BLOCK, num_warps=4, num_stages=3, **LAUNCH_OPTIONS,
    )  # fmt: skip
    return scheds


def score_constants(softmax_scale: float, softcap: float | None) -> tuple[float, float]:
    """(pre, post) so that log2-domain scores are qk*pre, or tanh(qk*pre)*post with a softcap."""
    if softcap is None:
        return softmax_scale * LOG2E, 1.0
    return softmax_scale / softcap, softcap * LOG2E


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products ("ieee"); bf16/fp16 ignore this and use the tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def flash_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    sched: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    window: int | None,
    softcap: float | None,
    cfg: FwdConfig,
    long_indexing: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward: returns (out (T, H, D) q.dtype, lse (T, H) fp32 log2 domain).

    ``sched``: the schedule for ``cfg.block_m`` (``build_schedules``). ``long_indexing`` None: judged here.
    """
    T, H, D = q.shape
    group = H // k.shape[1]
    assert group % cfg.hpb == 0, (group, cfg)
    out = torch.empty_like(q)
    lse = torch.empty((T, H), dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    if long_indexing is None:
        long_indexing = needs_long_indexing(q, k, v, out)
    pre, post = score_constants(softmax_scale, softcap)
    n_tiles = sched.shape[0]
    grid = (n_tiles * (H // cfg.hpb),)
    _fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens, sched,
        *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2],
        n_tiles, window or 0, pre, post,
        GROUP=group, H=H, HEAD_DIM=D, BLOCK_D=head_dim_block(D), BLOCK_M=cfg.block_m, HPB=cfg.hpb, BLOCK_N=cfg.block_n,
        CAUSAL=causal, WINDOW=window is not None, SOFTCAP=softcap is not None, LONG_INDEXING=long_indexing,
        PREC=dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **LAUNCH_OPTIONS,
    )  # fmt: skip
    return out, lse
