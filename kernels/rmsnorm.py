"""RMSNorm over the last dim, Llama/Qwen3 (``offset=0``) and Gemma ``(1 + w)`` (``offset=1``) variants.

Shapes: T packed tokens, E normalized size: the hidden size for the model's norms (x (T, E)), or D for Qwen3's
per-head q/k norms (x (T, H, D), weight (D,)). x is flattened to R rows of E; rows may be strided, a row's E
values must be contiguous.

Why fused: eager RMSNorm makes ~6 passes over (T, E) (fp32 cast, square, mean, scale, cast, weight product).
The forward here reads x once and writes y once, plus one fp32 rstd per row kept for the backward; the backward
reads dy and x once and writes dx once. The weight gradient is deterministic: every backward program sums its
rows' ``dy * normed`` into its own fp32 row of a (programs, E) buffer, and a second small kernel sums those rows
in a fixed order and casts to the weight's dtype (no atomics, so the same inputs give bit-identical weight
gradients). A frozen weight (LoRA) compiles the backward without any dw work and launches no reduction.

Backward, run 4 (H200 run 3: 53% / 73% / 79% of copy at T = 4K / 16K / 64K for E 4096, 48-76% per-head):
* the persistent grid is one wave of programs sized by a register cap (``maxnreg``) that the launcher always
  sets, and every program prefetches its next tile: E 4096 keeps 2 programs per SM (128 registers, no spill)
  with 16 KB loaded + 16 KB in flight each, instead of 2 x 16 KB that went idle during the compute; per-head
  rows use 16 x 128 tiles, 4 programs per SM, instead of one 32 x 128 program whose barriers stalled the SM;
* E is a constexpr (one compile per model width), so full rows carry no column masks and the prefetching
  loop fits in 128 registers;
* the dw partial rows (264 x 4096 x 4 B = 4.3 MB at E 4096, written and read once) are reduced and cast by one
  Triton launch instead of ``sum(0)`` + ``.to(dtype)`` (two launches, ~3-5 us at T = 4K: 10% of that row).
Predicted (not yet measured): >= 90% of copy at 16K and 64K; at 4K (100 MB, 24 us at copy rate) the launch
ramp, the one-wave tail (15-16 rows per program) and the ~3 us reduction launch leave ~80-85%.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .indexing import needs_long_indexing

__all__ = ["rms_norm", "rms_norm_reference"]


# --------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,  # (R, E) rows of stride_x
    w_ptr,  # (E,)
    y_ptr,  # (R, E) contiguous
    rstd_ptr,  # (R,) fp32
    R,
    E,
    stride_x,
    eps,
    offset,
    GEMMA_CAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    LONG_INDEXING: tl.constexpr,
):
    """One program normalizes BLOCK_R whole rows (BLOCK_E >= E)."""
    pid = tl.program_id(0)
    if LONG_INDEXING:
        pid = pid.to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_E)
    row_mask = rows < R
    mask = row_mask[:, None] & (cols[None, :] < E)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < E, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / E + eps)
    normed = x * rstd[:, None]
    if GEMMA_CAST:
        # Gemma: (normed * (offset + w)) in fp32, one rounding to x's dtype.
        y = normed * (offset + w[None, :])
    else:
        # Llama/Qwen3: round normed to x's dtype first, then multiply by the weight (rounded to y's dtype).
        y = normed.to(x_ptr.dtype.element_ty).to(tl.float32) * w[None, :]
    tl.store(y_ptr + rows[:, None] * E + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,  # (R, E) rows of stride_dy
    x_ptr,  # (R, E) rows of stride_x
    w_ptr,  # (E,)
    rstd_ptr,  # (R,) fp32
    dx_ptr,  # (R, E) contiguous
    dw_partial_ptr,  # (n_programs, E) fp32, one row per program
    R,
    n_blocks,  # cdiv(R, BLOCK_R)
    n_programs,  # the grid size
    stride_dy,
    stride_x,
    offset,
    E: tl.constexpr,  # fixed per model (hidden size or head dim): E == BLOCK_E drops every column mask
    GEMMA_CAST: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PREFETCH: tl.constexpr,
    LONG_INDEXING: tl.constexpr,
):
    """Program p handles row blocks p, p + N, p + 2N, ... (N programs); dx per row, dw summed per program.

    With g = dy * (offset + w) and n = x * rstd: dx = rstd * (g - n * mean(g * n)), dw = sum_rows(dy * n')
    where n' is n rounded to x's dtype for the Llama cast (the value the weight multiplied in the forward).

    * A (BLOCK_R, BLOCK_E) tile per iteration: all its dy and x loads go out together.
    * PREFETCH: the next tile's dy, x and rstd are loaded before the current tile is computed, so loads stay in
      flight during the compute (only where the registers allow it without losing resident programs).
    * dw accumulates in a (BLOCK_R, BLOCK_E) fp32 register tile, reduced over rows once at the end (no
      shared-memory row reduction per iteration), and written as this program's partial row; a second small
      kernel sums the partial rows in a fixed order (deterministic, no atomics).
    """
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
        tl.store(dw_partial_ptr + tl.program_id(0) * E + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


@triton.jit
def _dw_reduce_kernel(
    partial_ptr,  # (P, E) fp32 partial rows
    dw_ptr,  # (E,) in the weight's dtype
    P,
    E,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dw[c] = sum over p of partial[p, c], in a fixed order (tiles of BLOCK_P rows, in sequence), cast once."""
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


# ------------------------------------------------------------------------------------------- host launchers
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# A whole row lives in registers; past 64K elements it would spill (no model we train is near that).
_MAX_BLOCK_E = 65536


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., E) -> (R, E) with contiguous rows (a view when the strides allow it, else a copy)."""
    rows = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def _fwd_config(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_E, num_warps): about 4K elements per program.

    E 4096 -> 1 row x 4096 with 8 warps (16 elements, two 16-byte loads per thread); per-head E 128 -> 32 rows
    per program so that small rows still make wide programs. Tunable: tools/bench_kernels.py --sweep.

    Why this is enough (arithmetic with H200 run 1): a saturated HBM needs ~4.3 TB/s x ~1 us loaded latency
    / 132 SMs ~ 33 KB of loads in flight per SM. sm_90 register counts (Triton 3.6 offline compile): E 4096,
    8 warps: 64 registers x 256 threads = 16K of the 64K per SM, so 4 programs fit: 4 x 8 KB = 32 KB; per-head
    32 x 128, 8 warps: 80 registers, 3 programs, 24 KB. Run 1 at T = 64K: 4.05 TB/s (E 4096) and 3.99
    (per-head) = 95-96% of copy. The 16K row (1.83 TB/s,
    0.147 ms) is not a device limit: 0.147 ms = 0.066 ms of traffic at 4.05 TB/s + 0.081 ms fixed, the same
    fixed ~0.08 ms the 4K row shows (0.093 - 0.017), and the marginal rate 16K -> 64K (805 MB in 0.118 ms =
    6.8 TB/s) is above HBM's peak, which device time cannot be: the fixed part is the host launch path that
    do_bench timed (the graph-timed bench column isolates it). More rows per program would only add registers.
    """
    block_e = triton.next_power_of_2(n_cols)
    block_r = max(1, min(64, 4096 // block_e))
    elements = block_r * block_e
    return block_r, block_e, 16 if elements >= 16384 else 8 if elements >= 2048 else 4


class BwdConfig(NamedTuple):
    """Launch configuration of the backward (see :func:`_bwd_config`)."""

    block_r: int  # rows per tile
    block_e: int  # next power of two >= E
    num_warps: int
    prefetch: bool  # load the next tile before computing the current one
    programs: int  # persistent grid size (one wave)
    maxnreg: int  # register cap that makes ``programs_per_sm`` programs fit on an SM
    reduce_block_p: int  # partial rows per step of the dw reduction kernel
    reduce_block_c: int  # columns per program of the dw reduction kernel


# Registers per SM on sm_80/sm_90 (and the CPU stand-in): the budget the register caps below divide.
_REGS_PER_SM = 65536


def _register_cap(programs_per_sm: int, num_warps: int) -> int:
    """Registers per thread that let ``programs_per_sm`` programs of ``num_warps`` warps share an SM."""
    return min(255, _REGS_PER_SM // (programs_per_sm * num_warps * 32)) // 8 * 8  # ptxas allocates in 8s


def _bwd_config(n_rows: int, n_cols: int, dtype: torch.dtype, sms: int) -> BwdConfig:
    """The backward's launch configuration, a pure function of (rows, E, dtype, SM count).

    Bytes in flight per SM are what a memory-bound loop needs (~4.2 TB/s x ~1 us / 132 SMs ~ 32 KB). They come
    from (a) the tile each resident program has loaded and (b) PREFETCH, which keeps the next tile's loads out
    while the current tile computes. Register counts below: Triton 3.6 offline compile for sm_90 with the
    16-byte alignment the launcher specializes (pointers, strides), dx and dw, ``E`` a constexpr:
    * wide rows (E >= 1024): one row per tile, 16 elements per thread (E 4096 -> 8 warps), prefetch on:
      124 registers bf16, 128 fp32 (cap 128, no spill), so 2 programs x (16 KB loaded + 16 KB prefetched) per
      SM. Run 3's kernel (E a runtime value) could not prefetch there: 198 registers with prefetch (1 program per
      SM) by its own count, so it ran 2 programs x 16 KB without prefetch, loads idle while computing (79% of
      copy at T = 64K). E 8192: 16 warps, 1 program; E 2048: 4 warps, 4 programs (same 128 cap, no spill).
    * narrow rows (per-head E 128; 64, 256): 2048 elements per tile (E 128 -> 16 rows), 4 warps, prefetch on:
      122-128 registers (bf16/fp16/fp32, cap 128, no spill), so 4 programs x (8 KB + 8 KB) per SM; E 64 needs
      133-151, so 3 programs (cap 168). Run 3's 32 rows x 16 warps held 1 program x (16 KB + 16 KB) per SM and
      its per-block barriers stalled the whole SM (76% at 64K).
    The register cap is always set (65536 / (programs per SM x threads)), so the occupancy the persistent grid
    is sized for is the one the hardware gets: one wave, every program the same number of tiles (a grid larger
    than what fits would run a second, partial wave and double the time of the slowest SM).
    """
    block_e = triton.next_power_of_2(n_cols)
    if block_e >= 1024:
        block_r = 1
        num_warps = max(4, min(16, block_e // 512))  # 16 elements per thread up to E 8192
        per_sm = max(1, 16 // num_warps)
    else:
        block_r = max(1, 2048 // block_e)
        num_warps = 4
        per_sm = 4 if block_e >= 128 else 3  # E 64: 32 rows x 64 need up to 151 registers
    maxnreg = _register_cap(per_sm, num_warps)
    n_blocks = triton.cdiv(max(n_rows, 1), block_r)
    programs = max(1, min(n_blocks, per_sm * sms))
    # dw reduction: 16 columns (64 B of each partial row) per program and all partial rows in one tile of up to
    # 512 x 16 fp32 (32 values per thread at 8 warps): one round of loads per program (~1-2 us), instead of a
    # loop of dependent rounds; E 4096 -> 256 programs, per-head E 128 -> 8.
    reduce_c = 16
    reduce_p = max(1, min(triton.next_power_of_2(programs), 512))
    del dtype  # same configuration for bf16/fp16/fp32 (fp32 compiles to the same register counts, no spill)
    return BwdConfig(block_r, block_e, num_warps, True, programs, maxnreg, reduce_p, reduce_c)


def _sm_count(x: torch.Tensor) -> int:
    if x.is_cuda:
        return torch.cuda.get_device_properties(x.device).multi_processor_count
    return 2  # Triton's CPU interpreter: few programs, each looping over many rows, is fastest


def _check_args(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() == 0:
        raise ValueError("x is a scalar: expected (..., E).")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}: expected ({x.shape[-1]},) to match x's last dim "
            f"(x {tuple(x.shape)}; per-head norms take x (T, H, D) with weight (D,))."
        )
    if x.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise ValueError(f"x is {x.dtype}, weight {weight.dtype}: expected each one of {_DTYPES}.")
    if triton.next_power_of_2(x.shape[-1]) > _MAX_BLOCK_E:
        raise ValueError(f"x's last dim E={x.shape[-1]} is too large: rms_norm supports E <= {_MAX_BLOCK_E}.")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight on {weight.device}: expected one device.")


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, offset: float) -> torch.dtype:
    # Llama's ``weight * normed.to(x.dtype)`` promotes (bf16 x with an fp32 weight gives fp32); Gemma casts to x.
    return x.dtype if offset != 0.0 else torch.promote_types(x.dtype, weight.dtype)


def _launch_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float,
    block_r: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    y = torch.empty(x.shape, dtype=_out_dtype(x, weight, offset), device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, rstd
    default_r, block_e, default_warps = _fwd_config(n_cols)
    block_r = block_r or default_r
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
        x2,
        weight,
        y,
        rstd,
        n_rows,
        n_cols,
        x2.stride(0),
        eps,
        offset,
        GEMMA_CAST=offset != 0.0,
        BLOCK_R=block_r,
        BLOCK_E=block_e,
        LONG_INDEXING=needs_long_indexing(x2, y),
        num_warps=num_warps or default_warps,
    )
    return y, rstd


def _launch_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    compute_dx: bool,
    compute_dw: bool,
    block_r: int | None = None,
    num_warps: int | None = None,
    programs: int | None = None,
    prefetch: bool | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dx and dw (each only if asked). The overrides are for tests and tools/bench_kernels_sweep.py; with any of
    them the register cap follows the overridden grid (programs per SM = cdiv(programs, SMs)), so a swept
    "programs per SM" is what the hardware runs (spilling if the tile needs more registers than that leaves)."""
    x2, dy2 = _rows(x), _rows(dy)
    n_rows, n_cols = x2.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if compute_dx else None
    if n_rows == 0:
        return dx, torch.zeros_like(weight) if compute_dw else None
    sms = _sm_count(x)
    cfg = _bwd_config(n_rows, n_cols, x.dtype, sms)
    overridden = block_r is not None or num_warps is not None or programs is not None
    block_r = block_r or cfg.block_r
    num_warps = num_warps or cfg.num_warps
    n_blocks = triton.cdiv(n_rows, block_r)
    n_programs = min(programs or cfg.programs, n_blocks)
    maxnreg = _register_cap(triton.cdiv(n_programs, sms), num_warps) if overridden else cfg.maxnreg
    dw_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=x.device) if compute_dw else rstd
    _rms_norm_bwd_kernel[(n_programs,)](
        dy2,
        x2,
        weight,
        rstd,
        dx if compute_dx else x2,  # unused pointer when COMPUTE_DX is False
        dw_partial,
        n_rows,
        n_blocks,
        n_programs,
        dy2.stride(0),
        x2.stride(0),
        offset,
        E=n_cols,
        GEMMA_CAST=offset != 0.0,
        COMPUTE_DX=compute_dx,
        COMPUTE_DW=compute_dw,
        BLOCK_R=block_r,
        BLOCK_E=cfg.block_e,
        PREFETCH=cfg.prefetch if prefetch is None else prefetch,
        LONG_INDEXING=needs_long_indexing(dy2, x2, dx),
        num_warps=num_warps,
        maxnreg=maxnreg,
    )
    if not compute_dw:
        return dx, None
    # Deterministic reduction of the per-program partial rows (fixed order, no atomics), cast to the weight's
    # dtype in the same launch (run 3 used dw_partial.sum(0).to(dtype): two launches and a generic reduction).
    dw = torch.empty(n_cols, dtype=weight.dtype, device=x.device)
    block_p = min(cfg.reduce_block_p, triton.next_power_of_2(n_programs))
    _dw_reduce_kernel[(triton.cdiv(n_cols, cfg.reduce_block_c),)](
        dw_partial, dw, n_programs, n_cols, BLOCK_P=block_p, BLOCK_C=cfg.reduce_block_c, num_warps=8
    )
    return dx, dw


# ------------------------------------------------------------------------------------------ autograd.Function
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset):  # type: ignore[override]
        y, rstd = _launch_fwd(x, weight, eps, offset)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        # LoRA: frozen norm weights need no dw, so its partial sums are skipped entirely.
        dx, dw = _launch_bwd(dy, x, weight, rstd, ctx.offset, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dx, dw, None, None


# ------------------------------------------------------------------------------------------------ public API
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm of x (..., E) over its last dim with weight (E,), fused forward and backward (Triton).

    ``offset=0`` follows LlamaRMSNorm/Qwen3RMSNorm's casts, ``offset=1.0`` GemmaRMSNorm's ``(1 + w)`` in fp32
    (see :func:`rms_norm_reference`). Per-head q/k norms: x (T, H, D), weight (D,).
    """
    _check_args(x, weight)
    return _RMSNorm.apply(x, weight, float(eps), float(offset))


# ------------------------------------------------------------------------------------------------ reference
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """Out-of-place RMSNorm with Hugging Face's casts.

    ``offset == 0`` (LlamaRMSNorm, Qwen3RMSNorm): normalize in fp32, cast to x's dtype, then multiply by the weight
    (the result dtype follows PyTorch promotion of x and weight). ``offset != 0`` (GemmaRMSNorm with 1.0): multiply
    by ``(offset + weight)`` in fp32 and cast the product to x's dtype. float64 input computes in float64.
    """
    # fp32 as Hugging Face does; float64 inputs stay float64 so that tests get a true high-precision reference
    # (an fp32 "float64 reference" hid the fp32 error scale: run 3's fp32 GPU test at E=8192 failed on it).
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)
    normed = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        return weight * normed.to(x.dtype)
    return (normed * (offset + weight.to(compute))).to(x.dtype)
