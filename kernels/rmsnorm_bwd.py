"""RMSNorm backward kernels (launched by ``kernels/rmsnorm.py``): dx, and the weight gradient reduced in a fixed order.

Shapes: R rows of E (x flattened; T tokens for the model's norms, T x H for per-head q/k norms), P persistent
programs. Every program sums its rows' ``dy * normed`` into its own fp32 row of a (P, E) workspace; those rows
are then summed in program order, never with float atomics, so the same inputs give bit-identical dw:
* two launches (``ONE_LAUNCH`` False): :func:`_dw_reduce_kernel` sums them after the backward kernel;
* one launch: each program takes a ticket on an int32 counter after storing its row; the last ``n_reducers``
  programs to arrive wait until all P have (a spin on the counter: they are the last of a one-wave grid, so
  the ones they wait for are already running or have free slots; the spin is bounded, and a timeout turns dw
  into NaN rather than hanging the GPU), each sums column slabs of the workspace
  and writes dw; the last reducer to finish zeroes the counter for the next launch (CUDA-graph replay).
Ordering: ``tl.debug_barrier`` (CTA barrier) before the ticket puts every thread's partial-row store before
thread 0's acq_rel atomic (the pattern of PyTorch Inductor's grid barrier); reducers read the workspace with
volatile loads after an acquiring atomic and a barrier, so they see the other SMs' rows in L2.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

__all__ = ["_dw_reduce_kernel", "_rms_norm_bwd_kernel"]

MAX_SPINS = tl.constexpr(2**21)  # one_launch: most polls of the ticket counter by a waiting reducer


@triton.jit
def _sum_partial_slab(partial_ptr, dw_ptr, slab, P, E, poison, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dw[slab columns] = sum over p of partial[p, slab columns], tiles of BLOCK_P rows in order, cast once.

    ``poison`` (0.0, or NaN when the wait for the other programs timed out) is added so a failure is visible."""
    cols = slab * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < E
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32) + poison
    start = 0
    while start < P:  # a while loop for the interpreter (see the backward kernel)
        prow = start + tl.arange(0, BLOCK_P)
        tile_mask = (prow < P)[:, None] & col_mask[None, :]
        # volatile: another SM wrote these rows during this launch; read them from L2, not a stale L1 line.
        tile = tl.load(partial_ptr + prow[:, None] * E + cols[None, :], mask=tile_mask, other=0.0, volatile=True)
        acc += tl.sum(tile, axis=0)
        start += BLOCK_P
    tl.store(dw_ptr + cols, acc.to(dw_ptr.dtype.element_ty), mask=col_mask)


# Sizes that change with T are not specialized (Triton would compile again for each "== 1" / "divisible by 16"
# pattern of them); strides and pointers are, for 16-byte vector loads.
@triton.jit(do_not_specialize=["R", "n_blocks", "n_programs", "n_reducers"])
def _rms_norm_bwd_kernel(
    dy_ptr,  # (R, E) rows of stride_dy
    x_ptr,  # (R, E) rows of stride_x
    w_ptr,  # (E,)
    rstd_ptr,  # (R,) fp32
    dx_ptr,  # (R, E) contiguous
    dw_partial_ptr,  # (n_programs, E) fp32, one row per program
    dw_ptr,  # (E,) in the weight's dtype (ONE_LAUNCH only)
    counter_ptr,  # (2,) int32, zero between launches: arrivals, finished reducers (ONE_LAUNCH only)
    R,
    n_blocks,  # cdiv(R, BLOCK_R)
    n_programs,  # the grid size
    n_reducers,  # ONE_LAUNCH: the last n_reducers programs to arrive sum the partial rows (1 <= it <= P)
    stride_dy,
    stride_x,
    offset,
    E: tl.constexpr,  # fixed per model (hidden size or head dim): E == BLOCK_E drops every column mask
    GEMMA_CAST: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    ONE_LAUNCH: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PREFETCH: tl.constexpr,
    REDUCE_P: tl.constexpr,
    REDUCE_C: tl.constexpr,
    LONG_INDEXING: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Program p handles row blocks p, p + N, p + 2N, ... (N programs); dx per row, dw summed per program.

    With g = dy * (offset + w) and n = x * rstd: dx = rstd * (g - n * mean(g * n)), dw = sum_rows(dy * n')
    where n' is n rounded to x's dtype for the Llama cast (the value the weight multiplied in the forward).

    * A (BLOCK_R, BLOCK_E) tile per iteration: all its dy and x loads go out together.
    * PREFETCH: the next tile's dy, x and rstd are loaded before the current tile is computed, so loads stay in
      flight during the compute (only where the registers allow it without losing resident programs).
    * dw accumulates in a (BLOCK_R, BLOCK_E) fp32 register tile, reduced over rows once at the end, and written
      as this program's partial row (then summed as the module docstring says).
    """
    if PDL:  # launched early (programmatic dependent launch): wait for the previous kernel before any access
        gdc_wait()
        gdc_launch_dependents()
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    col_mask = cols < E
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if GEMMA_CAST:
        w = offset + w
    dw_acc = tl.zeros((BLOCK_R, BLOCK_E), dtype=tl.float32)
    block = pid
    if LONG_INDEXING:
        block = pid.to(tl.int64)
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    if E == BLOCK_E:  # full rows: only the row mask (broadcast), so the compiler keeps no per-column predicates
        mask = row_mask[:, None]
    else:
        mask = row_mask[:, None] & col_mask[None, :]
    dy_next = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
    x_next = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    rstd_next = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
    # Interleaved blocks (neighbouring programs read neighbouring rows). A while loop, not tl.range: Triton 3.6's
    # interpreter cannot take a runtime bound in range() with numpy 2 (int() of a 1-element array).
    while block < n_blocks:
        dy = dy_next.to(tl.float32)
        x = x_next.to(tl.float32)
        rstd = rstd_next
        cur_rows = rows
        cur_mask = mask
        block += n_programs
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < R
        if E == BLOCK_E:
            mask = row_mask[:, None]
        else:
            mask = row_mask[:, None] & col_mask[None, :]
        if PREFETCH:  # the next block's loads go out now (fully masked past the end: no memory access)
            dy_next = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
            x_next = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
            rstd_next = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        normed = x * rstd[:, None]
        if COMPUTE_DX:
            g = dy * w[None, :]
            mean_gn = tl.sum(g * normed, axis=1) * (1.0 / E)
            dx = rstd[:, None] * (g - normed * mean_gn[:, None])
            tl.store(dx_ptr + cur_rows[:, None] * E + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=cur_mask)
        if COMPUTE_DW:
            if GEMMA_CAST:
                dw_acc += dy * normed
            else:
                dw_acc += dy * normed.to(x_ptr.dtype.element_ty).to(tl.float32)
        if not PREFETCH:  # the next block's loads go out only after this block's work
            dy_next = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
            x_next = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
            rstd_next = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * E + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
        if ONE_LAUNCH:
            tl.debug_barrier()  # every thread's partial-row store precedes the releasing ticket below
            ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
            first_reducer = n_programs - n_reducers
            if ticket >= first_reducer:
                poison = 0.0
                if n_reducers > 1:  # not the last arrival: wait for the rest (never taken by the interpreter)
                    # Bounded (~1 s at ~0.5 us a round): were the stragglers ever unable to run, dw becomes NaN
                    # (visible in the loss and the tests) instead of the GPU hanging.
                    spins = 0
                    while (tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < n_programs) & (
                        spins < MAX_SPINS
                    ):
                        spins += 1
                    if spins >= MAX_SPINS:
                        poison = float("nan")
                tl.debug_barrier()  # the acquire (thread 0) precedes every thread's reads of the workspace
                slab = ticket - first_reducer
                while slab * REDUCE_C < E:
                    _sum_partial_slab(dw_partial_ptr, dw_ptr, slab, n_programs, E, poison, REDUCE_P, REDUCE_C)
                    slab += n_reducers
                tl.debug_barrier()  # this reducer's reads are done before its finish ticket may reset the counter
                finished = tl.atomic_add(counter_ptr + 1, 1, sem="acq_rel", scope="gpu")
                if finished == n_reducers - 1:  # every reducer has left the spin: zero both for the next launch
                    tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
                    tl.atomic_xchg(counter_ptr + 1, 0, sem="relaxed", scope="gpu")


@triton.jit
def _dw_reduce_kernel(
    partial_ptr,  # (P, E) fp32 partial rows
    dw_ptr,  # (E,) in the weight's dtype
    P,
    E,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """dw[c] = sum over p of partial[p, c], in a fixed order (tiles of BLOCK_P rows, in sequence), cast once."""
    if PDL:  # see _rms_norm_bwd_kernel
        gdc_wait()
        gdc_launch_dependents()
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < E
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    start = 0
    while start < P:  # a while loop for the interpreter (see the backward kernel)
        prow = start + tl.arange(0, BLOCK_P)
        tile_mask = (prow < P)[:, None] & col_mask[None, :]
        tile = tl.load(partial_ptr + prow[:, None] * E + cols[None, :], mask=tile_mask, other=0.0)
        acc += tl.sum(tile, axis=0)
        start += BLOCK_P
    tl.store(dw_ptr + cols, acc.to(dw_ptr.dtype.element_ty), mask=col_mask)
